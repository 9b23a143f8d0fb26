"""Faults during training, with real processes: full disk, unwritable run directory, a signal
during a checkpoint write, a rank killed mid-step (with and without torchrun)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_dist import checkpoint

from conftest import CONFIGS, ROOT, run_cli, torchrun_cmd

SMOKE = CONFIGS / "smoke.yaml"
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
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
    # A wider model makes each write long enough to be caught in the middle.
    proc = subprocess.Popen(train_cmd(synth_store, run, "train.steps=100000", "train.ckpt_every=1",
                                      "train.val_every=100000", "model.base_channels=48", "train.keep_last=100"),
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and any(p.name.startswith(".step-") for p in ckpts.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint write was observed"
    proc.send_signal(signal.SIGTERM)  # while a temporary checkpoint file is being written
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = checkpoint.list_steps(ckpts)
    assert steps and all(checkpoint.load(p)["step"] == int(p.stem.split("-")[1]) for p in steps)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers under an agent."""
    ranks = {}
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


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
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
    started = time.monotonic()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - started < 120
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
    started = time.monotonic()
    procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=10)
    assert procs[0].returncode != 0 and time.monotonic() - started < 90
