"""Writing commands on a full disk, a read-only output, a forbidden folder, and a damaged input:
real processes, real mounts (a small tmpfs, a read-only bind mount), real permissions.

Each fault is one line `error: PATH: ...`, exit 2, and leaves either nothing or an output that
`--resume` completes, identical to an uninterrupted one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_dist.files import FAULT_ENV

from helpers import ROOT, SMOKE, blobs, first_layout_store, write_cremi

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
# 96 blocks of one chunk file each: a small tmpfs holds a few of them
BLOCKS = ["predict.block_size=[1,32,32]", "predict.shard_blocks=[1,1,1]"]
N_BLOCKS = 96


def run(*args, env=None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([*preexec_cmd(preexec), sys.executable, "-m", "unet_dist", *map(str, args)], cwd=ROOT,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)


def preexec_cmd(what):
    # root without the capabilities that override file permissions: a 0555 folder refuses it (EACCES)
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
            "--inh-caps", "-dac_override,-dac_read_search"] if what == "no-override" else []


def predict_args(ckpt, volume, out, *extra):
    return ["predict", "--checkpoint", ckpt, "--input", volume, "--out", out, "--device", "cpu", *BLOCKS, *extra]


def mount(*args) -> None:
    done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        if "permission denied" in done.stderr.lower() or "not permitted" in done.stderr.lower() \
                or "must be superuser" in done.stderr.lower():
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        raise AssertionError(f"mount {args}: {done.stderr}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        unmount(path)


@contextlib.contextmanager
def read_only_view(real: Path, view: Path):
    """`view` shows `real` read-only (a bind mount remounted ro), while `real` stays writable."""
    real.mkdir(parents=True, exist_ok=True)
    view.mkdir(parents=True, exist_ok=True)
    mount("--bind", real, view)
    try:
        mount("-o", "remount,ro,bind", view)
        yield view
    finally:
        unmount(view)


def arrays(pred: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(pred), mode="r")
    return {path: array[:] for path, array in group.arrays()} | {
        f"labels/mask/{path}": array[:] for path, array in group["labels/mask"].arrays()}


def assert_one_line(done: subprocess.CompletedProcess, *pieces: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    for piece in pieces:
        assert piece in line, line
    return line


@pytest.fixture(scope="module")
def reference(ckpt, volume, tmp_path_factory) -> Path:
    """One uninterrupted prediction."""
    out = tmp_path_factory.mktemp("ref") / "pred.zarr"
    done = run(*predict_args(ckpt, volume, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------- predict

def test_predict_on_a_full_disk_is_resumable_and_resume_after_freeing_space_matches(ckpt, volume, reference,
                                                                                      tmp_path):
    with tmpfs(tmp_path / "small", "128k") as disk:
        out = disk / "pred.zarr"
        line = assert_one_line(run(*predict_args(ckpt, volume, out)), str(out), "(No space left on device)",
                               f"of {N_BLOCKS} blocks are done: run again with --resume to finish")
        assert re.search(r"; in block \d+ \(z \d+:\d+, y \d+:\d+, x \d+:\d+\)", line), line
        assert 0 < int(re.search(rf"(\d+) of {N_BLOCKS} blocks are done", line)[1]) < N_BLOCKS
        mount("-o", "remount,size=16m", disk)  # space freed
        done = run(*predict_args(ckpt, volume, out, "--resume"))
        assert done.returncode == 0, done.stderr[-3000:]
        got, want = arrays(out), arrays(reference)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_predict_on_an_output_gone_read_only_after_two_blocks_is_resumable(ckpt, volume, reference, tmp_path):
    real, view = tmp_path / "real", tmp_path / "view"
    real.mkdir()
    view.mkdir()
    mount("--bind", real, view)
    try:
        out = view / "pred.zarr"
        # one writer: the third manifest batch (one block each) pauses, two blocks are recorded
        proc = subprocess.Popen([sys.executable, "-m", "unet_dist", *map(str, predict_args(
            ckpt, volume, out, "predict.writers=1", "predict.readers=1"))], cwd=ROOT,
            env={**ENV, FAULT_ENV: "block-mark@3"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (markers := list((real / "pred.zarr" / ".manifest").glob("*.paused"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()[-3000:]
            time.sleep(0.05)
        mount("-o", "remount,ro,bind", view)
        markers[0].unlink()  # through the writable path: the writer goes on, into a read-only output
        _, err = proc.communicate(timeout=120)
        assert_one_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), str(out),
                        "(Read-only file system)",
                        f"2 of {N_BLOCKS} blocks are done: run again with --resume to finish")
        mount("-o", "remount,rw,bind", view)
        done = run(*predict_args(ckpt, volume, out, "--resume"))  # the dead run's lock is taken over
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{N_BLOCKS} blocks of [1, 32, 32]" in done.stderr and "2 already done" in done.stderr
        got, want = arrays(out), arrays(reference)
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    finally:
        unmount(view)


def test_predict_into_a_read_only_or_forbidden_folder_writes_nothing(ckpt, volume, tmp_path):
    with read_only_view(tmp_path / "real", tmp_path / "ro") as ro:
        assert_one_line(run(*predict_args(ckpt, volume, ro / "pred.zarr")), f"{ro / 'pred.zarr'}: cannot write "
                        "(Read-only file system)")
        assert list(ro.iterdir()) == []
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop root's permission override")
    forbidden = tmp_path / "forbidden"
    forbidden.mkdir(mode=0o555)
    assert_one_line(run(*predict_args(ckpt, volume, forbidden / "pred.zarr"), preexec="no-override"),
                    f"{forbidden / 'pred.zarr'}: cannot write (Permission denied)")
    assert list(forbidden.iterdir()) == []


def test_a_damaged_input_chunk_leaves_no_output_and_names_the_block(ckpt, volume, tmp_path):
    damaged = tmp_path / "vol.zarr"
    shutil.copytree(volume, damaged)
    chunk = damaged / "0" / "c" / "0" / "0" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(b"\x00garbage" * 8)
    out = tmp_path / "pred.zarr"
    args = predict_args(ckpt, damaged, out)
    line = assert_one_line(run(*args), str(chunk), "in block 0 (z 0:1, y 0:32, x 0:32)",
                           f"no block was finished, so {out} was removed")
    assert "cannot be decoded" in line or "damaged" in line, line
    assert not out.exists() and list(tmp_path.glob(".pred.zarr*")) == []  # no store, no lock
    chunk.write_bytes(good)
    done = run(*args)  # the same command, no --resume or --overwrite needed
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------- export and evaluate

def test_export_on_a_full_disk_or_read_only_folder_is_one_line_and_leaves_nothing(reference, tmp_path):
    with tmpfs(tmp_path / "small", "16k") as disk:
        tiff = disk / "pred.tif"
        assert_one_line(run("export", reference, "--out", tiff), f"{tiff}: cannot write (No space left on device)")
        assert list(disk.iterdir()) == []  # not even the temporary file
    with read_only_view(tmp_path / "real", tmp_path / "ro") as ro:
        assert_one_line(run("export", reference, "--out", ro / "pred.tif"),
                        f"{ro / 'pred.tif'}: cannot write (Read-only file system)")


def test_evaluate_json_on_a_full_disk_or_read_only_folder_is_one_line(reference, volume, tmp_path):
    with read_only_view(tmp_path / "real", tmp_path / "ro") as ro:
        target = ro / "metrics.json"
        assert_one_line(run("evaluate", "--pred", reference, "--labels", volume, "--json", target),
                        f"{target}: cannot write (Read-only file system)")
    with tmpfs(tmp_path / "full", "4k") as disk:
        (disk / "filler").write_bytes(b"x" * 4096)  # the tmpfs is now full
        target = disk / "metrics.json"
        assert_one_line(run("evaluate", "--pred", reference, "--labels", volume, "--json", target),
                        f"{target}: cannot write (No space left on device)")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv to drop root's permission override")
def test_export_and_evaluate_json_into_a_forbidden_folder(reference, volume, tmp_path):
    forbidden = tmp_path / "forbidden"
    forbidden.mkdir(mode=0o555)
    assert_one_line(run("export", reference, "--out", forbidden / "pred.tif", preexec="no-override"),
                    f"{forbidden / 'pred.tif'}: cannot write (Permission denied)")
    assert_one_line(run("evaluate", "--pred", reference, "--labels", volume, "--json", forbidden / "m.json",
                        preexec="no-override"), f"{forbidden / 'm.json'}: cannot write (Permission denied)")
    assert list(forbidden.iterdir()) == []


# ----------------------------------------------- synth, convert, relabel, upgrade, train, report

def fill(disk: Path) -> None:
    """The tmpfs at `disk` made full."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


def stores_to_change(folder: Path, tmp_path: Path) -> None:
    """`inst.zarr` for relabel (instance IDs) and `old.zarr` for upgrade (the first layout) in `folder`."""
    ids = blobs((3, 48, 40), 9, seed=0)
    write_cremi(tmp_path / "cremi.h5", ids)
    done = run("convert", "--raw", f"{tmp_path / 'cremi.h5'}:volumes/raw", "--labels",
               f"{tmp_path / 'cremi.h5'}:volumes/labels/neuron_ids", "--out", folder / "inst.zarr", "--instances")
    assert done.returncode == 0, done.stderr[-3000:]
    first_layout_store(folder / "old.zarr", ids.astype(np.uint8), (ids % 2).astype(np.uint8))


def each_store_command_fails_in_one_line(folder: Path, source: Path, why: str, upgrade: bool = True) -> None:
    for args in (["synth", "--out", folder / "s.zarr", "--shape", "4,64,64"],
                 ["convert", "--raw", source, "--out", folder / "c.zarr"],
                 ["relabel", folder / "inst.zarr", "--boundary-width", "2"],
                 *([["upgrade", folder / "old.zarr"]] if upgrade else [])):
        line = assert_one_line(run(*args), f"({why})")
        assert line.startswith(f"error: {folder}"), (args[0], line)


@pytest.mark.slow
def test_store_commands_on_a_full_disk_write_nothing_and_lose_nothing(tiny_synth_store, tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        stores_to_change(disk, tmp_path)
        before = snapshot(disk)
        fill(disk)
        each_store_command_fails_in_one_line(disk, tiny_synth_store, "No space left on device", upgrade=False)
        assert snapshot(disk) == before and sorted(p.name for p in disk.iterdir()) == ["filler", "inst.zarr",
                                                                                        "old.zarr"]


def test_upgrade_on_a_full_disk_leaves_a_store_that_upgrade_finishes(tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        stores_to_change(disk, tmp_path)
        fill(disk)
        assert_one_line(run("upgrade", disk / "old.zarr"), f"{disk / 'old.zarr'}: cannot write (No space left")
        (disk / "filler").unlink()
        done = run("upgrade", disk / "old.zarr")
        assert done.returncode == 0, done.stderr[-3000:]
        info = run("info", disk / "old.zarr")
        assert info.returncode == 0 and "label image" in info.stdout, info.stderr[-3000:]


@pytest.mark.slow
def test_store_commands_on_a_read_only_folder_write_nothing(tiny_synth_store, tmp_path):
    real = tmp_path / "real"
    stores_to_change(real, tmp_path)
    before = snapshot(real)
    with read_only_view(real, tmp_path / "ro") as ro:
        each_store_command_fails_in_one_line(ro, tiny_synth_store, "Read-only file system")
    assert snapshot(real) == before


def train_args(store, run_dir, *extra):
    return ["train", "--config", SMOKE, f"data.store={store}", f"run.dir={run_dir}", "data.train_slices=[0,8]",
            "data.val_slices=[8,12]", "train.val_every=2", "train.ckpt_every=2", *extra]


@pytest.mark.slow
def test_train_and_report_on_a_full_disk_or_read_only_run_lose_nothing(synth_store, tmp_path):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        run_dir = disk / "run"
        first = run(*train_args(synth_store, run_dir, "train.steps=2"))
        assert first.returncode == 0, first.stderr[-3000:]
        before = snapshot(run_dir)
        fill(disk)
        for args in (train_args(synth_store, run_dir, "train.steps=4", "--resume", "auto"),
                     ["report", run_dir, "--store", synth_store, "--slices", "8:10"]):
            line = assert_one_line(run(*args), "(No space left on device)")
            assert line.startswith(f"error: {run_dir}"), line
        after = snapshot(run_dir)  # the checkpoint unchanged; logs at most appended to
        assert all(after.get(name, b"").startswith(data) for name, data in before.items()), sorted(after)
        assert not [name for name in after if name.startswith("report")], sorted(after)  # no torn picture
        (disk / "filler").unlink()
        real = tmp_path / "real"
        shutil.copytree(run_dir, real / "run")
    with read_only_view(real, tmp_path / "ro") as ro:
        for args in (train_args(synth_store, ro / "run", "train.steps=4", "--resume", "auto"),
                     ["report", ro / "run", "--store", synth_store, "--slices", "8:10"]):
            line = assert_one_line(run(*args), "(Read-only file system)")
            assert line.startswith(f"error: {ro / 'run'}"), line
    assert snapshot(real / "run") == after


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv to drop root's permission override")
def test_an_input_that_refuses_reading_is_named_as_unreadable(tiny_synth_store, tmp_path):
    store = tmp_path / "in.zarr"
    shutil.copytree(tiny_synth_store, store)
    metadata = store / "0" / "zarr.json"
    metadata.chmod(0)
    assert_one_line(run("info", store, preexec="no-override"), f"{metadata}: cannot read (Permission denied)")
    metadata.chmod(0o644)
    chunk = min(p for p in (store / "0" / "c").rglob("*") if p.is_file())
    chunk.chmod(0)
    out = tmp_path / "out.zarr"
    assert_one_line(run("convert", "--raw", store, "--out", out, preexec="no-override"), str(chunk),
                    "cannot read", "Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]  # no store, no temporary sibling


# ------------------------------------------------------------------------------------------ segment

def affinity_prediction(path: Path) -> Path:
    from unet_dist.bench.segment_inputs import noisy_affinities, voronoi_ids, write_affinity_store

    tile = noisy_affinities(voronoi_ids((8, 64, 64), cell=8, seed=4))
    return write_affinity_store(path, (8, 64, 64), (8, 32, 32), lambda box: tile[(slice(None), *box)])


@pytest.mark.slow
def test_segment_on_a_full_disk_or_read_only_store_is_one_line_and_the_same_command_finishes(tmp_path):
    args = ["--block-size", "8,32,32"]
    reference = affinity_prediction(tmp_path / "ref.zarr")
    assert run("segment", "--pred", reference, *args).returncode == 0
    expected = zarr.open_group(str(reference), mode="r")["labels/neurons/0"][:]
    real = tmp_path / "real"
    affinity_prediction(real / "pred.zarr")
    before = snapshot(real)
    with read_only_view(real, tmp_path / "ro") as ro:
        line = assert_one_line(run("segment", "--pred", ro / "pred.zarr", *args), "(Read-only file system)")
        assert line.startswith(f"error: {ro / 'pred.zarr'}"), line
    assert snapshot(real) == before
    with tmpfs(tmp_path / "disk", "2m") as disk:
        affinity_prediction(disk / "pred.zarr")
        inputs = snapshot(disk)
        fill(disk)
        line = assert_one_line(run("segment", "--pred", disk / "pred.zarr", *args), "(No space left on device)")
        assert line.startswith(f"error: {disk / 'pred.zarr'}"), line
        assert all(snapshot(disk).get(name) == data for name, data in inputs.items())  # the prediction kept
        (disk / "filler").unlink()
        done = run("segment", "--pred", disk / "pred.zarr", *args)  # the same command, once there is space
        assert done.returncode == 0, done.stderr[-3000:]
        assert np.array_equal(zarr.open_group(str(disk / "pred.zarr"), mode="r")["labels/neurons/0"][:], expected)
