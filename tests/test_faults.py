"""Faults during training, with real processes: full disk, unwritable run directory, a signal
during a checkpoint write, a rank killed mid-step (with and without torchrun)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_dist import checkpoint
from unet_dist.config import ModelConfig
from unet_dist.files import FAULT_ENV

from helpers import (ENV, ROOT, SMOKE, run_cli, run_rank_alone, save_checkpoint, torchrun_cmd,
                     torchrun_worker_pids)

SYNTH = ["data.train_slices=[0,8]", "data.val_slices=[8,12]"]


def train_cmd(store, run, *extra):
    return [sys.executable, "-m", "unet_dist", "train", "--config", str(SMOKE), f"data.store={store}",
            f"run.dir={run}", *SYNTH, *extra]


def _small_file_limit():
    # Every file this process writes is capped at 64 KiB: checkpoints do not fit, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_gives_clear_error_and_no_torn_checkpoint(synth_store, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(train_cmd(synth_store, run, "train.steps=4", "train.ckpt_every=2"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, preexec_fn=_small_file_limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot write checkpoint (File too large)" in proc.stderr and "Traceback" not in proc.stderr
    assert list((run / "checkpoints").iterdir()) == []  # neither a torn checkpoint nor a temporary file


def test_unwritable_run_directory_fails_before_training(synth_store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", *SYNTH, f"run.dir={blocker / 'run'}")
    assert done.code == 2 and "cannot create directory" in done.err and str(blocker) in done.err
    assert "training" not in done.out


@pytest.mark.slow
def test_sigterm_during_checkpoint_write_keeps_checkpoints_valid(synth_store, tmp_path):
    run = tmp_path / "run"
    # The fault point pauses the first checkpoint write after its temporary file is complete and
    # before the rename: the signal lands inside the write, every time.
    proc = subprocess.Popen(train_cmd(synth_store, run, "train.steps=100000", "train.ckpt_every=3",
                                      "train.val_every=100000", "train.keep_last=100"),
                            cwd=ROOT, env={**ENV, FAULT_ENV: "checkpoint-write"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and (markers := list(ckpts.glob(".step-*.paused")))):
        assert proc.poll() is None and time.monotonic() < deadline, "the checkpoint write was never reached"
        time.sleep(0.05)
    (marker,) = markers
    tmp = marker.with_name(marker.name.removesuffix(".paused"))
    assert tmp.is_file() and not (ckpts / "step-000000003.pt").exists()  # inside the write of step 3
    proc.send_signal(signal.SIGTERM)
    marker.unlink()  # the write goes on
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stop signal received: checkpointing at step 3" in out  # acted on at the next step boundary
    steps = checkpoint.list_steps(ckpts)
    assert [p.name for p in steps] == ["step-000000003.pt"]
    assert checkpoint.load(steps[0])["step"] == 3
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def ends_within(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Wait for `proc` to exit; a guard against a hang, not a timing: a process still running after
    `timeout` seconds is killed and the test fails with its stderr."""
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"{what} still running after {timeout} s: {err[-2000:]}")


@pytest.mark.slow
def test_rank_killed_under_torchrun_ends_the_job_then_resume_finishes(synth_store, tmp_path, free_port):
    run = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"data.store={synth_store}", f"run.dir={run}", *SYNTH,
            "train.steps=400", "train.ckpt_every=5", "train.val_every=1000", "train.dist_timeout_s=60"]
    proc = subprocess.Popen(torchrun_cmd(2, free_port, *args), cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not checkpoint.step_path(run / "checkpoints", 5).exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(torchrun_worker_pids(proc.pid)[1], signal.SIGKILL)
    ends_within(proc, 120, "torchrun after one rank was killed")
    assert proc.returncode != 0
    state, _ = checkpoint.load_latest(run / "checkpoints")
    assert 5 <= state["step"] < 400
    resumed = subprocess.run(torchrun_cmd(2, free_port, *args, "train.steps=" + str(state["step"] + 5),
                                          "--resume", "auto"),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {state['step']}" in resumed.stdout


@pytest.mark.slow
def test_rank_killed_without_torchrun_others_exit_instead_of_hanging(synth_store, tmp_path, free_port):
    """Ranks started as srun does (no agent): the survivor's collective fails or times out; it exits."""
    run = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port)}
        procs.append(subprocess.Popen(train_cmd(synth_store, run, "train.steps=100000", "train.ckpt_every=5",
                                                "train.val_every=100000", "train.dist_timeout_s=30"),
                                      cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 240
    while not checkpoint.step_path(run / "checkpoints", 5).exists():
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].kill()
    # train.dist_timeout_s=30 bounds the survivor's wait; without it the collective would hang for the
    # back end's default (10 minutes or more), which the guard below catches
    ends_within(procs[0], 120, "the surviving rank")
    procs[1].communicate(timeout=10)
    assert procs[0].returncode != 0


# ------------------------------------------------------------------ damaged and invalid stores

def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_damaged_chunk_is_named_in_training_and_prediction(synth_store, tmp_path, damage):
    store = _copy_store(synth_store, tmp_path / "damaged.zarr")
    chunk = store / "0" / "c" / "3" / "0" / "0"
    assert chunk.is_file()
    if damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(os.urandom(200))
    done = run_cli("train", "--config", SMOKE, f"data.store={store}", "data.train_slices=[0,8]",
                   "data.val_slices=[3,4]", f"run.dir={tmp_path / 'run'}", "train.steps=2", "train.val_every=1")
    assert done.code == 2, done.err[-2000:]
    assert str(chunk) in done.err and done.err.count("\n") == 1
    assert ("missing" if damage == "deleted" else "cannot be decoded") in done.err

    from unet_dist.config import Config, to_dict
    from unet_dist.model import build_model

    cfg = Config()
    cfg.model.depth, cfg.model.base_channels = 2, 4
    ckpt = checkpoint.save(tmp_path / "ck", {"model": build_model(cfg.model).state_dict(),
                                             "model_config": to_dict(cfg.model), "config": to_dict(cfg),
                                             "step": 0}, keep_last=1)
    pred = run_cli("predict", "--checkpoint", ckpt, "--input", store, "--out", tmp_path / "pred.zarr")
    assert pred.code == 2 and str(chunk) in pred.err, pred.err[-2000:]


def _float_store(path: Path, raw, labels) -> Path:
    import zarr

    group = zarr.open_group(path, mode="w")
    from unet_dist.data.store import RAW, TARGET_PATH
    group.create_array(RAW, shape=raw.shape, chunks=(1, *raw.shape[1:]), dtype=raw.dtype)[:] = raw
    group.create_array(TARGET_PATH, shape=labels.shape, chunks=(1, *raw.shape[1:]), dtype=labels.dtype)[:] = labels
    return path


def test_nan_raw_and_non_binary_labels_are_refused(tmp_path):
    import numpy as np

    raw = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    labels = np.ones((4, 64, 64), np.uint8)
    raw[:, 10, 10] = np.nan
    store = _float_store(tmp_path / "nan.zarr", raw, labels)
    args = ["train", "--config", SMOKE, f"data.store={store}", "data.train_slices=[0,4]", "data.val_slices=[3,4]",
            "train.steps=2"]
    done = run_cli(*args, f"run.dir={tmp_path / 'a'}")
    assert done.code == 2 and "NaN or infinite" in done.err and str(store) in done.err, done.err[-2000:]

    labels[:, 5, 5] = 255
    store = _float_store(tmp_path / "labels.zarr", np.nan_to_num(raw), labels)
    done = run_cli(*args[:3], f"data.store={store}", *args[4:], f"run.dir={tmp_path / 'b'}")
    assert done.code == 2 and "other than 0 and 1" in done.err and "--label-threshold" in done.err


def test_cuda_on_a_cpu_only_machine_is_one_line(synth_store, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", *SYNTH, "train.device=cuda",
                   f"run.dir={tmp_path / 'run'}")
    assert done.code == 2 and "CUDA is not available" in done.err and done.err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    bad = run_cli("train", "--config", SMOKE, "train.precision=fp8", f"run.dir={tmp_path / 'run'}")
    assert bad.code == 2 and "train.precision" in bad.err


# ------------------------------------------------------------------ concurrent predictions

@pytest.mark.slow
def test_second_prediction_on_the_same_output_refuses(tmp_path):
    from unet_dist.data.synth import synthesize

    store = tmp_path / "big.zarr"
    synthesize(store, shape=(48, 256, 256), seed=3)
    ckpt = save_checkpoint(tmp_path / "ck16", ModelConfig(depth=2, base_channels=16))
    out = tmp_path / "pred.zarr"
    args = ["-m", "unet_dist", "predict", "--checkpoint", str(ckpt), "--input", str(store), "--out", str(out),
            "predict.block_size=[1,128,128]", "predict.batch_size=1"]
    first = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = tmp_path / ".pred.zarr.lock"
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    second = run_cli(*args[2:], "--resume")
    assert second.code == 2 and "another prediction" in second.err and second.err.count("\n") == 1
    out_text, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert not lock.exists()
    # A lock left by a process that died is stale: the next run takes over.
    lock.write_text('{"host": "%s", "pid": 999999999, "since": "then"}' % os.uname().nodename)
    again = run_cli(*args[2:], "--resume")
    assert again.code == 0, again.err[-2000:]
    assert '"blocks_skipped": 192' in again.out and not lock.exists()


def test_more_ranks_than_blocks_is_refused(synth_store, tmp_path, free_port):
    ckpt = save_checkpoint(tmp_path / "ck4", ModelConfig(depth=2, base_channels=4))
    args = ("predict", "--checkpoint", ckpt, "--input", synth_store, "--slices", "0:1", "--out", tmp_path / "pred.zarr")
    for rank in (0, 1):
        alone = run_rank_alone(rank, 2, free_port, *args)
        assert alone.code == 2 and "2 ranks but only 1 block(s)" in alone.err and "Traceback" not in alone.err
    proc = subprocess.run(torchrun_cmd(2, free_port, *args), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "2 ranks but only 1 block(s)" in proc.stderr
    assert not (tmp_path / "pred.zarr").exists()
