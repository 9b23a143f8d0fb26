"""data.sources on real files of every format convert reads, written here with each format's own
tools (h5py, zarr-python, tensorstore, tifffile, Pillow; N5 also byte by byte from its spec), and
convert from each: the store's raw equals the source, its voxel size is the source's."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from helpers import ome_multiscale, run_cli, write_hdf5, write_n5_tensorstore, write_precomputed
from unet_dist.data import store as st
from unet_dist.data.convert import convert
from unet_dist.data.sources import Source, open_source
from unet_dist.errors import UserError

SHAPE = (7, 20, 24)  # z, y, x all different: a transposed read cannot pass


@pytest.fixture
def vol():
    return np.random.default_rng(3).integers(0, 60000, SHAPE, dtype=np.uint16)


def check(source: Source, data, voxel_size=None, offset=None):
    """shape, dtype, every slab size read back, voxel size and offset."""
    assert source.shape == data.shape and source.dtype == data.dtype.newbyteorder("=")
    np.testing.assert_array_equal(source.read(0, data.shape[0]), data)
    for z0, z1 in ((3, 4), (0, 2), (2, 5), (6, 7), (1, 2)):
        if z1 > data.shape[0]:
            continue
        np.testing.assert_array_equal(source.read(z0, z1), data[z0:z1])
    assert source.voxel_size == (pytest.approx(voxel_size) if voxel_size else None)
    assert source.offset == (pytest.approx(offset) if offset else None)


def error(spec, *fragments) -> str:
    with pytest.raises(UserError) as info:
        open_source(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# ---------------------------------------------------------------- writers


def write_ome_zarr(path, data, version, scale0, unit="micrometer", translation=None, axes="zyx"):
    """An OME-Zarr image of two levels (0.4: zarr v2 .zattrs; 0.5: zarr v3 attributes.ome)."""
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    multiscale = ome_multiscale(2, scale0, unit, version, translation, axes)
    group.attrs.update({"multiscales": [multiscale]} if fmt == 2 else
                       {"ome": {"version": "0.5", "multiscales": [multiscale]}})
    group.create_array("0", data=data, chunks=(*data.shape[:-2], 8, 8))
    group.create_array("1", data=np.ascontiguousarray(data[..., ::2, ::2]))
    return group


def write_n5_by_hand(path, data, block=(3, 8, 8), **attrs):
    """An N5 dataset written from the N5 spec, not by a library: `dimensions` and `blockSize` list
    x, y, z; a block is a big-endian header (mode, ndim, its x, y, z size) and raw big-endian
    voxels, x fastest; its file is `x/y/z` in block coordinates."""
    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({
        "dimensions": list(data.shape[::-1]), "blockSize": list(block[::-1]),
        "dataType": "uint16", "compression": {"type": "raw"}, **attrs}))
    bz, by, bx = block
    for z in range(0, data.shape[0], bz):
        for y in range(0, data.shape[1], by):
            for x in range(0, data.shape[2], bx):
                part = data[z:z + bz, y:y + by, x:x + bx]
                header = struct.pack(">HH3I", 0, 3, *part.shape[::-1])
                name = path / str(x // bx) / str(y // by) / str(z // bz)
                name.parent.mkdir(parents=True, exist_ok=True)
                name.write_bytes(header + part.astype(">u2").tobytes())


# ---------------------------------------------------------------- HDF5


def test_hdf5_cremi_convention(vol, tmp_path):
    path = write_hdf5(tmp_path / "sample_A.hdf", {"volumes/raw": vol, "volumes/labels/neuron_ids": vol.astype(np.uint64)},
                      chunks=(3, 8, 8), resolution=[40.0, 4.0, 4.0], offset=[80.0, 0.0, 8.0])
    with open_source(f"{path}:volumes/raw") as source:
        check(source, vol, (40, 4, 4), (80, 0, 8))
        assert source.read_depth == 3 and source.path == f"{path}:volumes/raw"
        record = source.record()
        assert record["format"] == "hdf5" and record["inner"] == "volumes/raw" and len(record["sha256"]) == 64
    write_hdf5(tmp_path / "plain.h5", {"data": vol.astype(">u2")})  # big-endian, contiguous, no attributes
    with open_source(tmp_path / "plain.h5") as source:  # the only array needs no inner path
        check(source, vol)
        assert source.inner == "data" and source.dtype.isnative


def test_hdf5_mistakes(vol, tmp_path):
    path = write_hdf5(tmp_path / "s.hdf", {"volumes/raw": vol, "volumes/labels/ids": vol})
    error(path, "s.hdf", "2 arrays", "s.hdf:INNER", "volumes/raw")
    error(f"{path}:volumes/rwa", "s.hdf:volumes/rwa", "no 'volumes/rwa'", "volumes/labels/ids, volumes/raw")
    error(f"{path}:volumes", "a group, not an array", "volumes/raw")
    error(tmp_path / "missing.hdf:volumes/raw", "missing.hdf: no such file")
    write_hdf5(tmp_path / "rgb.h5", {"rgb": np.zeros((4, 5, 6, 3), np.uint8), "text": np.array([b"x"])})
    error(f"{tmp_path / 'rgb.h5'}:rgb", "rgb.h5:rgb", "(4, 5, 6, 3)", "3D")
    error(f"{tmp_path / 'rgb.h5'}:text", "rgb.h5:text", "expected numbers")
    (tmp_path / "fake.h5").write_bytes(b"not hdf5 at all" * 20)
    error(tmp_path / "fake.h5", "fake.h5", "not a readable HDF5")


def test_hdf5_2d_and_leading_axes_of_one(vol, tmp_path):
    path = write_hdf5(tmp_path / "m.h5", {"image": vol[2], "tczyx": vol[None, None]})
    with open_source(f"{path}:image") as source:
        check(source, vol[2:3])
    with open_source(f"{path}:tczyx") as source:
        check(source, vol)


# ---------------------------------------------------------------- Zarr and OME-Zarr


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_arrays(vol, tmp_path, fmt):
    data = vol.astype(">u2") if fmt == 2 else vol
    zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(2, 8, 8), zarr_format=fmt)
    with open_source(tmp_path / "a.zarr") as source:
        check(source, vol)
        assert source.format == f"zarr v{fmt}" and source.read_depth == 2
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=fmt)
    group.create_array("volumes/raw", data=vol, chunks=(1, 20, 24))
    group.create_array("volumes/mask", data=vol > 5)
    with open_source(f"{tmp_path / 'g.zarr'}:volumes/raw") as source:
        check(source, vol)
    error(tmp_path / "g.zarr", "g.zarr", "2 arrays", "volumes/mask, volumes/raw")
    error(f"{tmp_path / 'g.zarr'}:volumes/nope", "no 'volumes/nope'", "volumes/mask, volumes/raw")
    # a Zarr copy of a CREMI file keeps its attributes: resolution (z, y, x nm) and offset
    group["volumes/raw"].attrs.update(resolution=[40, 4, 4], offset=[80, 0, 8])
    group["volumes/mask"].attrs.update(resolution=[0, 1, 1])  # a placeholder, not a size
    with open_source(f"{tmp_path / 'g.zarr'}:volumes/raw") as source:
        check(source, vol, voxel_size=(40, 4, 4), offset=(80, 0, 8))
    with open_source(f"{tmp_path / 'g.zarr'}:volumes/mask") as source:
        assert source.voxel_size is None


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_levels_units_and_translation(vol, tmp_path, version):
    from ome_zarr_models.v04.image import ImageAttrs as Attrs04
    from ome_zarr_models.v05.image import ImageAttrs as Attrs05

    path = tmp_path / "img.ome.zarr"
    group = write_ome_zarr(path, vol, version, [0.03, 0.005, 0.005], "micrometer", translation=[1.5, 0, 0.01])
    # the metadata as written is valid OME-Zarr of that version
    (Attrs04 if version == "0.4" else Attrs05).model_validate(
        dict(group.attrs) if version == "0.4" else group.attrs["ome"])
    with open_source(path) as source:  # the image: its level 0
        check(source, vol, (30, 5, 5), (1500, 0, 10))
        assert source.inner == "0"
    with open_source(f"{path}:1") as source:  # a level named by path
        check(source, vol[:, ::2, ::2], (30, 10, 10), (1500, 0, 10))
    error(f"{path}:2", "img.ome.zarr:2", "no '2'", "0, 1")


def test_ome_zarr_label_image_and_channel_axis(vol, tmp_path):
    root = zarr.open_group(str(tmp_path / "seg.zarr"), mode="w")
    labels = root.create_group("labels/neurons")
    labels.attrs["ome"] = {"version": "0.5", "multiscales": [ome_multiscale(1, [40, 4, 4], "nanometer", "0.5")]}
    labels.create_array("0", data=vol % 2)
    with open_source(f"{tmp_path / 'seg.zarr'}:labels/neurons/0") as source:
        check(source, vol % 2, (40, 4, 4), (0, 0, 0))
    with open_source(f"{tmp_path / 'seg.zarr'}:labels/neurons") as source:
        assert source.inner == "labels/neurons/0"

    write_ome_zarr(tmp_path / "c1.zarr", vol[None], "0.5", [1, 40, 4, 4], "nanometer", axes="czyx")
    with open_source(tmp_path / "c1.zarr") as source:  # a channel axis of one is no axis
        check(source, vol, (40, 4, 4), (0, 0, 0))
    write_ome_zarr(tmp_path / "c2.zarr", np.stack([vol, vol]), "0.5", [1, 40, 4, 4], "nanometer", axes="czyx")
    error(tmp_path / "c2.zarr", "c2.zarr:0", "(2, 7, 20, 24)", "3D")


def test_store_and_source_read_a_global_scale_alike(vol, tmp_path):
    """A multiscale-wide scale multiplies every level's: `store.voxel_size` (what info, view and
    predict read) and the Zarr source reader (what convert reads) both apply it, in nm."""
    group = write_ome_zarr(tmp_path / "g.zarr", vol, "0.5", [1, 1, 1], "micrometer", translation=[2, 0, 0])
    attrs = group.attrs["ome"]
    attrs["multiscales"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [0.04, 0.004, 0.004]}]
    group.attrs["ome"] = attrs
    with open_source(tmp_path / "g.zarr") as source:
        source_size, source_offset = source.voxel_size, source.offset
    assert source_size == pytest.approx((40, 4, 4)) and source_offset == pytest.approx((80, 0, 0))
    assert st.voxel_size(st.open_store(tmp_path / "g.zarr")) == pytest.approx(source_size)


def test_ome_zarr_without_units_has_no_voxel_size(vol, tmp_path):
    group = write_ome_zarr(tmp_path / "u.zarr", vol, "0.5", [40, 4, 4])
    attrs = group.attrs["ome"]
    for axis in attrs["multiscales"][0]["axes"]:
        del axis["unit"]
    group.attrs["ome"] = attrs
    with open_source(tmp_path / "u.zarr") as source:
        assert source.voxel_size is None


# ---------------------------------------------------------------- N5 and neuroglancer precomputed


def test_n5_axes_are_x_y_z(vol, tmp_path):
    root = tmp_path / "spec.n5"
    root.mkdir()
    (root / "attributes.json").write_text('{"n5": "2.0.0"}')
    write_n5_by_hand(root / "raw", vol, resolution=[4, 5, 40])  # x, y, z nm
    with open_source(f"{root}:raw") as source:
        check(source, vol, (40, 5, 4), None)
        assert source.format == "n5" and source.read_depth == 3


def test_n5_bigdataviewer_layout_and_pixel_resolution(vol, tmp_path):
    root = tmp_path / "vol.n5"
    write_n5_tensorstore(root / "setup0/timepoint0/s0", vol, downsamplingFactors=[1, 1, 1])
    write_n5_tensorstore(root / "setup0/timepoint0/s1", np.ascontiguousarray(vol[:, ::2, ::2]),
                         downsamplingFactors=[2, 2, 1])
    (root / "attributes.json").write_text('{"n5": "2.5.1"}')
    (root / "setup0/timepoint0/attributes.json").write_text(
        json.dumps({"pixelResolution": {"dimensions": [0.004, 0.004, 0.04], "unit": "um"}}))
    with open_source(f"{root}:setup0/timepoint0/s0") as source:
        check(source, vol, (40, 4, 4), None)
    with open_source(f"{root}:setup0/timepoint0/s1") as source:  # the group's size x the level's factors
        check(source, vol[:, ::2, ::2], (40, 8, 8), None)
    with open_source(f"{root}:setup0/timepoint0") as source:  # a multiscale group: s0
        assert source.inner == "setup0/timepoint0/s0"
    error(f"{root}:setup0/timepoint1/s0", "vol.n5:setup0/timepoint1/s0", "no 'setup0/timepoint1/s0'",
          "setup0/timepoint0/s0, setup0/timepoint0/s1")


def test_precomputed_scales(vol, tmp_path):
    path = tmp_path / "em"
    write_precomputed(path, vol, (4, 4, 40), (10, 20, 3), scales=2)
    with open_source(path) as source:  # the first scale
        check(source, vol, (40, 4, 4), (120, 80, 40))
        assert source.inner == "4_4_40" and source.read_depth == 3
    with open_source(f"{path}:8_8_40") as source:
        check(source, vol[:, ::2, ::2], (40, 8, 8), (120, 160, 80))
    error(f"{path}:16_16_40", "em:16_16_40", "no scale '16_16_40'", "4_4_40, 8_8_40")


# ---------------------------------------------------------------- images


def test_jpeg_folder_and_mixed_sizes(vol, tmp_path):
    folder = tmp_path / "fib"
    folder.mkdir()
    data = (vol // 256).astype(np.uint8)
    for z, plane in enumerate(data):
        Image.fromarray(plane).save(folder / f"slice_{z}.jpg", quality=95)
    expected = np.stack([np.asarray(Image.open(folder / f"slice_{z}.jpg")) for z in range(SHAPE[0])])
    (folder / "info").write_text("scan notes: a text file, not a precomputed volume")
    with open_source(folder) as source:
        check(source, expected)
        assert [f.name for f in source.files][:3] == ["slice_0.jpg", "slice_1.jpg", "slice_2.jpg"]
    Image.fromarray(data[0, :10]).save(folder / "slice_7.jpg")
    error(folder, "slice_7.jpg", "(10, 24)", "(20, 24)", "same size")


def test_tiff_voxel_sizes_imagej_and_ome(vol, tmp_path):
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(1 / 0.004, 1 / 0.005),
                     metadata={"spacing": 0.03, "unit": "micron", "axes": "ZYX"})
    with open_source(tmp_path / "ij.tif") as source:
        check(source, vol, (30, 5, 4), None)
    tifffile.imwrite(tmp_path / "ij_nm.tif", vol, imagej=True, resolution=(1 / 4, 1 / 4),
                     metadata={"spacing": 50, "unit": "nm", "axes": "ZYX"})
    with open_source(tmp_path / "ij_nm.tif") as source:
        assert source.voxel_size == (50, 4, 4)
    tifffile.imwrite(tmp_path / "ij_px.tif", vol, imagej=True, metadata={"axes": "ZYX"})  # pixels: no size
    with open_source(tmp_path / "ij_px.tif") as source:
        assert source.voxel_size is None
    tifffile.imwrite(tmp_path / "x.ome.tif", vol, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 4, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.0045,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 0.05})  # Z in the default unit, micrometres
    with open_source(tmp_path / "x.ome.tif") as source:
        check(source, vol, (50, 4.5, 4), None)
    tifffile.imwrite(tmp_path / "plain.tif", vol, photometric="minisblack", resolution=(72, 72))
    with open_source(tmp_path / "plain.tif") as source:  # 72 dpi is not a voxel size
        assert source.voxel_size is None


def test_paths_and_formats(vol, tmp_path):
    odd = tmp_path / "run:2"  # a colon in a real path is not an inner path
    odd.mkdir()
    tifffile.imwrite(odd / "v.tif", vol, photometric="minisblack")
    with open_source(odd / "v.tif") as source:
        assert source.shape == SHAPE
    error(f"{odd / 'v.tif'}:volumes/raw", "v.tif:volumes/raw", "not a container")
    (tmp_path / "scan.nii").write_bytes(b"\0" * 400)
    error(tmp_path / "scan.nii", "scan.nii", "unsupported format", "HDF5", "N5")
    (tmp_path / "box").mkdir()
    error(f"{tmp_path / 'box'}:a/b", "box:a/b", "not a Zarr, N5 or precomputed")


# ---------------------------------------------------------------- convert from every format


def make_every_format(vol, tmp_path) -> dict:
    """spec -> (voxel size it records) for one volume in each format."""
    write_hdf5(tmp_path / "a.hdf", {"volumes/raw": vol}, chunks=(3, 8, 8), resolution=[40, 4, 4])
    write_ome_zarr(tmp_path / "b.zarr", vol, "0.4", [0.04, 0.004, 0.004])
    write_ome_zarr(tmp_path / "c.zarr", vol, "0.5", [40, 4, 4], "nanometer")
    write_n5_tensorstore(tmp_path / "d.n5/s0", vol, resolution=[4, 4, 40])
    (tmp_path / "d.n5/attributes.json").write_text('{"n5": "2.0.0"}')
    write_precomputed(tmp_path / "e", vol, (4, 4, 40), (0, 0, 0))
    tifffile.imwrite(tmp_path / "f.ome.tif", vol, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 4, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 40, "PhysicalSizeZUnit": "nm"})
    return {f"{tmp_path / 'a.hdf'}:volumes/raw": "hdf5", str(tmp_path / "b.zarr"): "zarr v2",
            str(tmp_path / "c.zarr"): "zarr v3", f"{tmp_path / 'd.n5'}:s0": "n5",
            str(tmp_path / "e"): "neuroglancer precomputed", str(tmp_path / "f.ome.tif"): "tiff"}


def test_convert_cli_from_every_format(vol, tmp_path):
    for i, (spec, fmt) in enumerate(make_every_format(vol, tmp_path).items()):
        out = tmp_path / f"out{i}.zarr"
        done = run_cli("convert", "--raw", spec, "--out", out, "--chunks", "2,16,16")
        assert done.code == 0, (spec, done.err)
        assert "40 x 4 x 4 nm" in done.out and "warning" not in done.err
        group = st.open_store(out)
        np.testing.assert_array_equal(group[st.RAW][:], vol)
        assert st.voxel_size(group) == (40, 4, 4)
        assert group.attrs["unet_dist"]["sources"]["raw"]["format"] == fmt


def test_convert_resolution_never_invented(vol, tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", vol, photometric="minisblack")
    write_hdf5(tmp_path / "v.h5", {"raw": vol}, resolution=[40, 4, 4])
    out = tmp_path / "out.zarr"
    done = run_cli("convert", "--raw", tmp_path / "v.tif", "--out", out)
    assert done.code == 2 and not out.exists()
    assert done.err.strip() == f"error: {tmp_path / 'v.tif'}: the source records no voxel size; pass --resolution Z,Y,X (in nm)"
    done = run_cli("convert", "--raw", tmp_path / "v.tif", "--out", out, "--resolution", "30,6,6")
    assert done.code == 0 and st.voxel_size(st.open_store(out)) == (30, 6, 6)
    # both given and different: --resolution wins, and says so in one line
    done = run_cli("convert", "--raw", tmp_path / "v.h5", "--out", out, "--resolution", "30,6,6", "--overwrite")
    assert done.code == 0 and st.voxel_size(st.open_store(out)) == (30, 6, 6)
    warnings = [line for line in done.err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: --resolution 30,6,6 overrides the voxel size 40,4,4 nm recorded in {tmp_path / 'v.h5'}:raw"]
    # raw and labels that disagree are refused unless --resolution settles it
    write_hdf5(tmp_path / "l.h5", {"labels": (vol > 30000).astype(np.uint8)}, resolution=[50, 4, 4])
    with pytest.raises(UserError, match=r"l\.h5:labels: voxel size 50,4,4 nm, but .*v\.h5:raw has 40,4,4 nm"):
        convert(tmp_path / "v.h5", tmp_path / "x.zarr", labels=tmp_path / "l.h5")
    convert(tmp_path / "v.h5", tmp_path / "x.zarr", labels=tmp_path / "l.h5", resolution=(45, 4, 4))
    assert st.voxel_size(st.open_store(tmp_path / "x.zarr")) == (45, 4, 4)


class Recording(Source):
    """A real source that records each slab it is asked for and the largest block it holds."""

    def __init__(self, inner: Source):
        self.inner_source = inner
        self.path, self.root, self.shape, self.dtype = inner.path, inner.root, inner.shape, inner.dtype
        self.asked: list[tuple[int, int]] = []
        self.held = 0

    def read(self, z0, z1):
        self.asked.append((z0, z1))
        data = self.inner_source.read(z0, z1)
        block = self.inner_source._block
        self.held = max(self.held, block[1].shape[0] if block else 0)
        return data

    def close(self):
        self.inner_source.close()


@pytest.mark.parametrize("fmt", ["hdf5", "n5"])
def test_convert_reads_slab_by_slab(vol, tmp_path, fmt):
    deep = np.concatenate([vol] * 6)  # 42 slices in chunks 4 deep
    if fmt == "hdf5":
        spec = write_hdf5(tmp_path / "v.h5", {"raw": deep}, chunks=(4, 8, 8))
    else:
        write_n5_tensorstore(tmp_path / "v.n5", deep, block=(4, 8, 8))
        spec = tmp_path / "v.n5"
    source = Recording(open_source(spec))
    convert(source, tmp_path / "out.zarr", chunks=(2, 20, 24), resolution=(40, 4, 4))
    assert source.asked == [(z, min(z + 2, 42)) for z in range(0, 42, 2)]  # each slab once, in order
    assert source.held == 4  # one chunk row of the source kept, never more
    np.testing.assert_array_equal(st.open_store(tmp_path / "out.zarr")[st.RAW][:], deep)


def test_damaged_containers_are_one_line_and_write_nothing(vol, tmp_path):
    """A truncated HDF5 file, a Zarr chunk and an N5 block overwritten with garbage: convert stops
    with one line naming the file, exit 2, and leaves no output (the damage is found mid-stream)."""
    cut = write_hdf5(tmp_path / "cut.hdf", {"volumes/raw": vol}, chunks=(1, 20, 24), resolution=[40, 4, 4])
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    zarr.create_array(str(tmp_path / "bad.zarr"), data=vol, chunks=(1, 20, 24), zarr_format=2)
    (tmp_path / "bad.zarr" / "5.0.0").write_bytes(b"\x00garbage" * 40)
    write_n5_tensorstore(tmp_path / "bad.n5", vol, block=(1, 20, 24), resolution=[4, 4, 40])
    (tmp_path / "bad.n5" / "0" / "0" / "5").write_bytes(b"\x00garbage" * 40)
    for spec, name in ((f"{cut}:volumes/raw", "cut.hdf"), (tmp_path / "bad.zarr", "bad.zarr"),
                       (tmp_path / "bad.n5", "bad.n5")):
        out = tmp_path / f"out-{name}.zarr"
        done = run_cli("convert", "--raw", spec, "--resolution", "40,4,4", "--out", out)
        errors = [line for line in done.err.splitlines() if not line.startswith("convert: ")]  # progress
        assert done.code == 2 and len(errors) == 1 and name in errors[0] and "damaged" in errors[0], (name, done.err)
        assert not out.exists()
        assert not list(tmp_path.glob(f".out-{name}*"))  # no temporary sibling left either
