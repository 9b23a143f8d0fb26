"""convert / store / info on real files: the ISBI stack, slice folders, and broken inputs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from unet_dist.data import store as st
from unet_dist.data.pyramid import plan_levels
from unet_dist.data.convert import convert as convert_, format_info, store_info
from unet_dist.data.sources import open_source
from unet_dist.errors import UserError

ISBI_NM = (50, 4, 4)


def convert(raw=None, out=None, **kwargs):
    """convert with ISBI's voxel size unless a test gives one: these TIFFs record none, and convert
    refuses a source without a voxel size (test_sources.py tests that)."""
    kwargs.setdefault("resolution", ISBI_NM)
    return convert_(raw, out, **kwargs)


def read_store(path) -> dict:
    """Level 0 of raw and of the training target (when the store has one)."""
    group = zarr.open_group(str(path), mode="r")
    data = {"raw": group[st.RAW][:]}
    if st.TARGET in st.label_names(group):
        data["labels"] = group[st.TARGET_PATH][:]
    return data


def assert_nothing_left(out: Path) -> None:
    """Neither the store nor any temporary/aside sibling of it exists."""
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}*")) == []


def write_stack(path, data, **kw):
    tifffile.imwrite(path, data, photometric="minisblack", **kw)  # 3 or 4 slices are not RGB(A)
    return path


def write_slices(folder, stack, fmt="z{}.tif"):
    folder.mkdir()
    for z, plane in enumerate(stack):
        name = folder / fmt.format(z)
        if name.suffix == ".png":
            Image.fromarray(plane).save(name)
        else:
            tifffile.imwrite(name, plane)
    return folder


# ---------------------------------------------------------------- the ISBI stack


def test_tiff_roundtrip(em_store, em_arrays):
    data = read_store(em_store)
    assert data["raw"].dtype == np.uint8 and data["labels"].dtype == np.uint8
    np.testing.assert_array_equal(data["raw"], em_arrays["raw"])
    np.testing.assert_array_equal(data["labels"], em_arrays["labels"] // 255)


def test_store_metadata_and_provenance(em_store, em_dir):
    group = st.open_store(em_store, arrays=(st.RAW, st.TARGET_PATH))
    assert [m["name"] for m in group.attrs["ome"]["multiscales"]] == ["raw"]
    assert st.label_names(group) == [st.TARGET]
    assert st.voxel_size(group) == (50.0, 4.0, 4.0)
    prov = group.attrs["unet_dist"]
    for role, name in (("raw", "train-volume.tif"), ("labels", "train-labels.tif")):
        expected = hashlib.sha256((em_dir / name).read_bytes()).hexdigest()
        assert prov["sources"][role]["sha256"] == expected
        assert prov["sources"][role]["files"] == [name]
    assert prov["created"].endswith("+00:00") and prov["version"]
    assert prov["label_threshold"] is None and prov["invert"] is False


def test_raw_only_store_is_a_valid_ome_zarr_image(em_dir, tmp_path):
    from ome_zarr_models.v05.image import Image as OmeImage

    out = tmp_path / "raw.zarr"
    convert(em_dir / "train-volume.tif", out, resolution=(40, 5, 5))
    image = OmeImage.from_zarr(zarr.open_group(str(out), mode="r"))
    levels = 1 + len(plan_levels(tifffile.TiffFile(em_dir / "train-volume.tif").series[0].shape, (40, 5, 5)))
    assert [d.path for d in image.datasets[0]] == [str(k) for k in range(levels)] and image.labels is None
    assert st.voxel_size(zarr.open_group(str(out), mode="r")) == (40.0, 5.0, 5.0)


def test_isbi_info(isbi_store, isbi_arrays):
    info = store_info(isbi_store)
    raw, labels = info["arrays"]["0"], info["arrays"][st.TARGET_PATH]
    assert info["arrays"]["1"]["shape"] == info["arrays"]["labels/neuron_interior/1"]["shape"] == [30, 256, 256]
    assert raw["shape"] == labels["shape"] == [30, 512, 512]
    assert raw["dtype"] == labels["dtype"] == "uint8"
    assert raw["chunks"] == [1, 512, 512] and raw["shards"] is None
    assert raw["uncompressed_bytes"] == 30 * 512 * 512
    assert 1.0 < raw["ratio"] < 2.0  # EM is noisy
    assert labels["ratio"] > 10  # binary masks are not
    assert any(c.startswith("blosc(zstd") for c in raw["codecs"])
    assert labels["label_fraction"] == pytest.approx(isbi_arrays["labels"].mean() / 255)
    assert info["voxel_size"] == (50.0, 4.0, 4.0)
    text = format_info(info)
    assert "50 x 4 x 4 nm" in text and "label fraction 0.78" in text and "train-volume.tif" in text


def test_slice_folders_natural_order(em_arrays, em_store, tmp_path):
    # z0..z29 unpadded: a plain sort would put z10 before z2.
    stack, labels = em_arrays["raw"], em_arrays["labels"]
    expected = read_store(em_store)
    for kind, fmt in (("tif", "z{}.tif"), ("png", "z{}.png")):
        raw_dir = write_slices(tmp_path / f"raw_{kind}", stack, fmt)
        label_dir = write_slices(tmp_path / f"labels_{kind}", labels, fmt)
        (raw_dir / "notes.txt").write_text("not an image; ignored")
        out = tmp_path / f"{kind}.zarr"
        summary = convert(raw_dir, out, labels=label_dir)
        data = read_store(out)
        np.testing.assert_array_equal(data["raw"], expected["raw"])
        np.testing.assert_array_equal(data["labels"], expected["labels"])
        files = zarr.open_group(str(out)).attrs["unet_dist"]["sources"]["raw"]["files"]
        assert files[:3] == [fmt.format(0), fmt.format(1), fmt.format(2)]
        concatenated = b"".join((raw_dir / f).read_bytes() for f in files)
        assert zarr.open_group(str(out)).attrs["unet_dist"]["sources"]["raw"]["sha256"] == (
            hashlib.sha256(concatenated).hexdigest()
        )
        assert summary["label_fraction"] == pytest.approx(labels.mean() / 255)


def test_sharded_and_3d_chunks(isbi_dir, isbi_arrays, tmp_path):
    plain, sharded = tmp_path / "plain.zarr", tmp_path / "sharded.zarr"
    convert(isbi_dir / "train-volume.tif", plain, labels=isbi_dir / "train-labels.tif",
            chunks=(1, 128, 128))
    convert(isbi_dir / "train-volume.tif", sharded, labels=isbi_dir / "train-labels.tif",
            chunks=(1, 128, 128), shard=(8, 512, 512))
    data = read_store(sharded)
    np.testing.assert_array_equal(data["raw"], isbi_arrays["raw"])
    np.testing.assert_array_equal(data["labels"], isbi_arrays["labels"] // 255)
    count = lambda p: sum(len(files) for _, _, files in os.walk(p))  # noqa: E731
    assert count(sharded) < count(plain) / 10
    info = store_info(sharded)["arrays"]["0"]
    assert info["chunks"] == [1, 128, 128] and info["shards"] == [8, 512, 512]
    assert info["codecs"][0] == "sharding_indexed"

    cube = tmp_path / "cube.zarr"
    convert(isbi_dir / "train-volume.tif", cube, chunks="3d", shard=(32, 512, 512))
    array = zarr.open_group(str(cube))[st.RAW]
    assert array.chunks == (30, 256, 256) and array.shards == (30, 512, 512)
    np.testing.assert_array_equal(array[:], isbi_arrays["raw"])


# ---------------------------------------------------------------- small volumes, options


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (5, 24, 32), dtype=np.uint8)
    labels = (rng.random((5, 24, 32)) > 0.3).astype(np.uint8)
    return raw, labels


def test_threshold_invert_and_16bit(small, tmp_path):
    raw, labels = small
    raw16 = raw.astype(np.uint16) * 200
    grey = labels * 180 + 20  # a soft 0..255 probability-like map
    write_stack(tmp_path / "raw.tif", raw16)
    write_stack(tmp_path / "grey.tif", grey.astype(np.uint8))
    out = tmp_path / "t.zarr"
    convert(tmp_path / "raw.tif", out, labels=tmp_path / "grey.tif", label_threshold=100,
            invert=True, chunks=(2, 16, 16))
    data = read_store(out)
    assert data["raw"].dtype == np.uint16
    np.testing.assert_array_equal(data["raw"], raw16)
    np.testing.assert_array_equal(data["labels"], 1 - labels)
    prov = zarr.open_group(str(out)).attrs["unet_dist"]
    assert prov["label_threshold"] == 100 and prov["invert"] is True


def test_single_image_and_float_raw(small, tmp_path):
    raw, labels = small
    Image.fromarray(raw[0]).save(tmp_path / "one.png")
    Image.fromarray(labels[0] * 255).save(tmp_path / "one_labels.png")
    convert(tmp_path / "one.png", tmp_path / "one.zarr", labels=tmp_path / "one_labels.png")
    data = read_store(tmp_path / "one.zarr")
    assert data["raw"].shape == (1, 24, 32)
    np.testing.assert_array_equal(data["labels"][0], labels[0])

    write_stack(tmp_path / "f.tif", raw.astype(np.float32) / 255)
    convert(tmp_path / "f.tif", tmp_path / "f.zarr")
    group = zarr.open_group(str(tmp_path / "f.zarr"))
    assert group[st.RAW].dtype == np.float32 and st.voxel_size(group) == ISBI_NM
    # No voxel size in the file and none given: refused, never a default.
    expect_error(tmp_path / "g.zarr", "f.tif", "no voxel size", "--resolution",
                 raw=tmp_path / "f.tif", resolution=None)


def test_progress_reports_every_slab(small, tmp_path):
    raw, _ = small
    write_stack(tmp_path / "raw.tif", raw)
    calls = []
    convert(tmp_path / "raw.tif", tmp_path / "p.zarr", chunks=(2, 24, 32),
            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


# ---------------------------------------------------------------- mistakes: one clear line, nothing left


def expect_error(out: Path, *fragments, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        convert(out=out, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    assert_nothing_left(out)
    return message


def test_missing_and_garbage_inputs(small, tmp_path):
    raw, labels = small
    out = tmp_path / "out.zarr"
    write_stack(tmp_path / "raw.tif", raw)
    expect_error(out, "nope.tif", "no such file", raw=tmp_path / "nope.tif")
    expect_error(out, "nolabels.tif", "no such file", raw=tmp_path / "raw.tif",
                 labels=tmp_path / "nolabels.tif")
    (tmp_path / "garbage.tif").write_bytes(b"this is not a tiff at all" * 10)
    expect_error(out, "garbage.tif", "not a readable TIFF", raw=tmp_path / "garbage.tif")
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(out, "notes.txt", "unsupported format", raw=tmp_path / "notes.txt")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG garbage")
    expect_error(out, "fake.png", "not a readable PNG", raw=tmp_path / "fake.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    expect_error(out, "empty", "no .tif/.tiff/.png/.jpg images", raw=empty)


def test_truncated_tiff(small, tmp_path):
    raw, _ = small
    stack = np.repeat(raw, 20, axis=0)
    out = tmp_path / "out.zarr"
    for name, compression, fragment in (("cut.tif", None, "truncated"),
                                        ("cutz.tif", "zlib", "damaged or truncated")):
        path = write_stack(tmp_path / name, stack, compression=compression)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expect_error(out, name, fragment, raw=path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(small, tmp_path):
    path = write_stack(tmp_path / "locked.tif", small[0])
    path.chmod(0)
    try:
        expect_error(tmp_path / "out.zarr", "locked.tif", "cannot read", raw=path)
    finally:
        path.chmod(0o644)


def test_shape_mismatch(small, tmp_path):
    raw, labels = small
    write_stack(tmp_path / "raw.tif", raw)
    write_stack(tmp_path / "labels.tif", labels[:4])
    expect_error(tmp_path / "out.zarr", "labels.tif", "(4, 24, 32)", "(5, 24, 32)",
                 raw=tmp_path / "raw.tif", labels=tmp_path / "labels.tif")


def test_labels_not_binary(small, tmp_path):
    raw, labels = small
    write_stack(tmp_path / "raw.tif", raw)
    bad = labels * 255
    bad[3, 5, 5], bad[4, 1, 1] = 7, 128
    write_stack(tmp_path / "labels.tif", bad)
    message = expect_error(tmp_path / "out.zarr", "labels.tif", "not binary", "--label-threshold",
                           raw=tmp_path / "raw.tif", labels=tmp_path / "labels.tif")
    assert "7" in message and "slice 3" in message
    mixed = labels.copy()
    mixed[4] *= 255  # 1 in early slices, 255 in the last: two different "interior" values
    write_stack(tmp_path / "mixed.tif", mixed)
    expect_error(tmp_path / "out.zarr", "mixed.tif", "1, 255", raw=tmp_path / "raw.tif",
                 labels=tmp_path / "mixed.tif")
    write_stack(tmp_path / "float.tif", labels.astype(np.float32))
    expect_error(tmp_path / "out.zarr", "float.tif", "float32", "--label-threshold",
                 raw=tmp_path / "raw.tif", labels=tmp_path / "float.tif")


def test_bad_pages_and_slices(small, tmp_path):
    raw, _ = small
    out = tmp_path / "out.zarr"
    rgb = np.stack([raw] * 3, axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    expect_error(out, "rgb.tif", "2D grayscale", raw=tmp_path / "rgb.tif")
    Image.fromarray(rgb[0]).save(tmp_path / "rgb.png")
    expect_error(out, "rgb.png", "2D grayscale", raw=tmp_path / "rgb.png")

    odd_stack = tmp_path / "odd.tif"
    write_stack(odd_stack, raw)
    write_stack(odd_stack, raw[:2, :20], append=True)
    expect_error(out, "odd.tif", "page 5", "(20, 32)", "(24, 32)", raw=odd_stack)

    folder = write_slices(tmp_path / "slices", raw)
    tifffile.imwrite(folder / "z3.tif", raw[3, :20])
    expect_error(out, "z3.tif", "(20, 32)", "(24, 32)", "z0.tif", raw=folder)
    tifffile.imwrite(folder / "z3.tif", raw[:2], photometric="minisblack")
    expect_error(out, "z3.tif", "2 pages", raw=folder)

    zero = tmp_path / "zero.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(zero, np.zeros((0, 8), np.uint8))
    message = expect_error(out, "zero.tif", raw=zero)
    assert "empty" in message or "not a readable" in message


def test_nan_in_float_raw_names_the_slice(small, tmp_path):
    raw, _ = small
    data = np.repeat(raw, 4, axis=0).astype(np.float32)  # 20 slices; several slabs get written
    data[13, 2, 2] = np.nan
    write_stack(tmp_path / "nan.tif", data)
    expect_error(tmp_path / "out.zarr", "nan.tif", "slice 13", "NaN", raw=tmp_path / "nan.tif")
    folder = write_slices(tmp_path / "inf", data)
    data[13, 2, 2] = np.inf
    tifffile.imwrite(folder / "z13.tif", data[13])
    expect_error(tmp_path / "out.zarr", "z13.tif", "slice 13", raw=folder)


def test_bad_layout_and_resolution(small, tmp_path):
    write_stack(tmp_path / "raw.tif", small[0])
    raw = tmp_path / "raw.tif"
    out = tmp_path / "out.zarr"
    expect_error(out, "chunks", raw=raw, chunks=(0, 8, 8))
    expect_error(out, "chunks", "'4d'", raw=raw, chunks="4d")
    expect_error(out, "shard", "multiple", raw=raw, chunks=(1, 8, 8), shard=(2, 12, 8))
    expect_error(out, "resolution", raw=raw, resolution=(50, -4, 4))


# ---------------------------------------------------------------- the output: refuse, replace, clean up


def test_existing_store_needs_overwrite(small, tmp_path):
    raw, labels = small
    write_stack(tmp_path / "raw.tif", raw)
    write_stack(tmp_path / "other.tif", raw[:2])
    out = tmp_path / "out.zarr"
    convert(tmp_path / "raw.tif", out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(UserError, match="already exists .*--overwrite"):
        convert(tmp_path / "raw.tif", out)
    assert sorted(p.name for p in out.rglob("*")) == before
    convert(tmp_path / "other.tif", out, overwrite=True)
    assert read_store(out)["raw"].shape == (2, 24, 32)
    assert list(tmp_path.glob(".out.zarr*")) == []

    precious = tmp_path / "my_data"
    precious.mkdir()
    (precious / "thesis.txt").write_text("irreplaceable")
    with pytest.raises(UserError, match="not a Zarr store; refusing"):
        convert(tmp_path / "raw.tif", precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "irreplaceable"


def test_interrupt_midway_keeps_the_old_store(small, tmp_path):
    raw, _ = small
    write_stack(tmp_path / "raw.tif", raw)
    out = tmp_path / "out.zarr"

    def interrupt(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "raw.tif", out, chunks=(1, 24, 32), progress=interrupt)
    assert_nothing_left(out)
    convert(tmp_path / "raw.tif", out, resolution=(1, 2, 3))
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "raw.tif", out, overwrite=True, progress=interrupt)
    assert st.voxel_size(st.open_store(out)) == (1.0, 2.0, 3.0)
    assert list(tmp_path.glob(".out.zarr*")) == []


def test_sigterm_removes_the_temporary_store(tmp_path):
    out = tmp_path / "big.zarr"
    code = (
        "from unet_dist.data.synth import synthesize; "
        f"synthesize({str(out)!r}, shape=(2000, 256, 256))"
    )
    log = tmp_path / "stderr.txt"  # a file, not a pipe: nothing reads it while the child runs
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=stderr)
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing
    while not list(tmp_path.glob(".big.zarr.tmp-*/0/c")):
        if proc.poll() is not None:
            pytest.fail(f"the writer exited ({proc.returncode}) before writing a chunk: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no chunk written after 60 s: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert_nothing_left(out)


# ---------------------------------------------------------------- open_store, readers


def test_open_store_errors(em_store, em_arrays, tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.zarr: not a Zarr store"):
        st.open_store(tmp_path / "nowhere.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder: not a Zarr store"):
        st.open_store(tmp_path / "folder")
    zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    with pytest.raises(UserError, match=r"old\.zarr: a Zarr v2 store"):
        st.open_store(tmp_path / "old.zarr")
    raw_only = tmp_path / "raw_only.zarr"
    group = zarr.open_group(str(raw_only), mode="w")
    group.create_array("0", shape=(1, 2, 2), dtype="u1")
    with pytest.raises(UserError, match=r"raw_only\.zarr: no label image 'neuron_interior' \(label images: none\)"):
        st.open_store(raw_only, arrays=(st.RAW, st.TARGET_PATH))
    with pytest.raises(UserError, match=r"raw_only\.zarr: no array 'x' \(arrays: 0\)"):
        st.open_store(raw_only, arrays=("x",))
    assert st.open_store(em_store, arrays=(st.RAW, st.TARGET_PATH))[st.TARGET_PATH].shape == em_arrays["raw"].shape


def test_reader_reads_slabs_lazily(em_dir, em_arrays):
    source = open_source(em_dir / "train-volume.tif")
    assert source.shape == em_arrays["raw"].shape and source.shape[0] == 30 and source.dtype == np.uint8
    np.testing.assert_array_equal(source.read(7, 9), em_arrays["raw"][7:9])
    np.testing.assert_array_equal(source.read(29, 30), em_arrays["raw"][29:30])
    source.close()
