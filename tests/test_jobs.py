"""The launchers' shared rules (jobs/common.py) and the submitit jobs on submitit's local executor
(no SLURM needed): results, logs, requeue through submitit's own path, bounds, errors before submission.
The same jobs on a real SLURM cluster are in test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from jobs import common
from unet_dist.errors import UserError

from helpers import ROOT, SMOKE, run_cli, save_checkpoint


def smoke(store: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.store={store}", f"run.dir={run}", "data.train_slices=[0,8]", "data.val_slices=[8,12]", *extra]


def jobs_cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------------ the rules

def test_requeue_decision_is_bounded_per_job_and_needs_progress(tmp_path):
    assert common.requeue_decision(tmp_path, "7", 10, max_requeues=2).requeue
    common.record_requeue(tmp_path, "7", 10, "USR1")
    assert common.requeue_steps(tmp_path, "7") == [10]
    stuck = common.requeue_decision(tmp_path, "7", 10, max_requeues=2)  # no step since the last requeue
    assert not stuck.requeue and "no progress" in stuck.reason
    assert common.requeue_decision(tmp_path, "7", 25, max_requeues=2).requeue
    common.record_requeue(tmp_path, "7", 25, "USR1")
    bound = common.requeue_decision(tmp_path, "7", 40, max_requeues=2)
    assert not bound.requeue and "already requeued 2 time(s)" in bound.reason and "max_requeues=2" in bound.reason
    # Another job (a new submission on the same run dir) starts its own count.
    assert common.requeue_decision(tmp_path, "8", 40, max_requeues=2).requeue
    assert not common.requeue_decision(tmp_path, "9", 40, max_requeues=0).requeue


def test_a_blockwise_job_is_requeued_within_its_bound_and_only_after_progress():
    from jobs.launch import requeue_refusal

    assert requeue_refusal(0, 2, done=5, done_at_requeue=0) is None
    assert "no block finished since the previous requeue (5 done)" in requeue_refusal(1, 2, 5, 5)
    assert "already requeued 2 time(s) (--max-requeues 2)" in requeue_refusal(2, 2, 9, 5)


def _status(run: Path, **status) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "status.json").write_text(json.dumps(status))


def test_after_step_decides_between_requeue_done_and_stop(tmp_path):
    run = tmp_path / "run"

    def after(code: int, mtime: int = 0, max_requeues: int = 3) -> int:
        return common.main(["after", "--run-dir", str(run), "--job-id", "5", "--exit-code", str(code),
                            "--status-mtime", str(mtime), "--max-requeues", str(max_requeues)])

    assert after(0) == common.AFTER_FAILED  # no status.json written: the step never trained
    _status(run, status="interrupted", step=12, total_steps=40, checkpoint="c", metrics={})
    assert after(137) == common.AFTER_FAILED  # a failed step is never requeued
    assert after(0, mtime=common.status_mtime(run)) == common.AFTER_FAILED  # stale: from before this run
    assert after(0, max_requeues=0) == common.AFTER_STOPPED
    assert after(0) == common.AFTER_REQUEUE and common.requeue_steps(run, "5") == [12]
    assert after(0) == common.AFTER_STOPPED  # still at step 12: no progress, no second requeue
    _status(run, status="completed", step=40, total_steps=40, checkpoint="c", metrics={"val/dice": 0.5})
    assert after(0) == common.AFTER_COMPLETED


def test_prepare_resolves_the_run_and_sends_wandb_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-000000120.pt").write_bytes(b"")
    assert common.main(["prepare", "--config", str(SMOKE), f"run.dir={run}", "logging.wandb=auto",
                        "launch.max_requeues=5"]) == 0
    out = capsys.readouterr().out
    assert f"RUN_DIR={run}" in out and "MAX_REQUEUES=5" in out and "START_STEP=120" in out
    assert "EXTRA_OVERRIDES=(logging.wandb=offline)" in out  # compute nodes: offline unless told otherwise
    assert common.main(["prepare", "--config", str(SMOKE), "logging.wandb=online"]) == 0
    assert "EXTRA_OVERRIDES=()" in capsys.readouterr().out
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert common.cluster_overrides(common.load_config(SMOKE, ["logging.wandb=auto"])) == []
    assert common.main(["prepare", "--config", str(SMOKE), "train.stepz=1"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err


def test_wandb_sync_command_and_time_limits(tmp_path):
    assert common.wandb_sync_command(tmp_path) is None
    for stamp in ("20250101_000000", "20250101_010000"):
        (tmp_path / "wandb" / f"offline-run-{stamp}-abc123").mkdir(parents=True)
    assert common.wandb_sync_command(tmp_path) == f"wandb sync --id abc123 {tmp_path}/wandb/offline-run-*-abc123"
    assert [common._minutes(t) for t in ("infinite", "30", "1:30:00", "2-00:00:00", "5:00", "0:30")] == \
        [None, 30, 90, 2880, 5, 1]


def test_signals_seen_tells_a_cancel_from_a_requeue_notice():
    from jobs.train import SignalsSeen

    caught = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        def seen(*signals):
            with SignalsSeen() as record:
                for sig in signals:
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)  # let Python run the handler
            return record

        assert seen(signal.SIGTERM).cancelled  # scancel
        assert not seen(signal.SIGTERM, signal.SIGUSR2).cancelled  # submitit's preemption: TERM then USR2
        assert not seen(signal.SIGUSR1).cancelled and signal.SIGUSR1 in seen(signal.SIGUSR1).signals
        assert not seen().cancelled  # nothing recorded: not taken for a cancel
        assert caught.count(signal.SIGTERM) == 2  # the handlers themselves still ran
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_missing_slurm_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(UserError, match="sbatch not found"):
        common.choose_cluster("slurm")
    assert common.choose_cluster("auto") == "local"
    assert "running with submitit's local executor" in capsys.readouterr().err
    done = jobs_cli("jobs.train", "--config", str(SMOKE), "--cluster", "slurm", f"run.dir={tmp_path / 'run'}",
                    env={"PATH": str(tmp_path)})
    assert done.returncode == 2 and done.stderr.startswith("error: sbatch not found") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_mistakes_fail_before_anything_is_submitted(synth_store, tmp_path):
    run = tmp_path / "run"
    cases = [
        (["train.stepz=3"], "unknown key 'train.stepz'"),
        ([f"data.store={tmp_path / 'missing.zarr'}"], "missing.zarr"),
        (["--nodes", "2"], "the local executor runs on this machine only"),
        (["--tasks-per-node", "0"], "--tasks-per-node 0: must be >= 1"),
    ]
    for extra, message in cases:
        done = jobs_cli("jobs.train", "--config", str(SMOKE), "--cluster", "local", "--gpus-per-node", "0",
                        *smoke(synth_store, run), *extra)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
        assert "Traceback" not in done.stderr
    assert not run.exists()
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-000000010.pt").write_bytes(b"x")
    again = jobs_cli("jobs.train", "--config", str(SMOKE), "--cluster", "local", *smoke(synth_store, run))
    assert again.returncode == 2 and "--resume auto" in again.stderr and not (run / "jobs").exists()
    missing = jobs_cli("jobs.predict", "--checkpoint", str(tmp_path / "none.pt"), "--input", str(synth_store),
                       "--out", str(tmp_path / "p.zarr"), "--cluster", "local")
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr


# --------------------------------------------------------------------- the local executor

def local_env(monkeypatch) -> None:
    """Local tasks inherit this process's environment."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def signal_tasks(job, signum=signal.SIGUSR2) -> None:
    """What submitit's local controller does near its timeout: the signal to every task."""
    for task in psutil.Process(int(job.job_id)).children():
        task.send_signal(signum)


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def train_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_local_job_is_requeued_on_its_signal_and_returns_final_metrics(synth_store, tmp_path, monkeypatch):
    from jobs.train import submit

    local_env(monkeypatch)
    run = tmp_path / "run"
    job = submit(SMOKE, smoke(synth_store, run, "train.steps=30", "train.val_every=15", "train.ckpt_every=5",
                              "train.log_every=1"),
                 cluster="local", gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, time_min=10)
    assert job.cluster == "local" and job.folder == run / "jobs" / job.job_id
    wait_for(lambda: (run / "checkpoints" / "step-000000005.pt").exists(), "the first checkpoint")
    signal_tasks(job)
    result = job.result()
    assert result["step"] == 30 and result["val/replica_spread"] == 0.0 and "val/dice_membrane" in result
    assert train_steps(run) == list(range(1, 31))  # resumed exactly where it stopped
    lines = (run / "requeues").read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[0] == job.job_id and lines[0].endswith("submitit")
    out = (job.folder / f"{job.job_id}_0_log.out").read_text()
    assert "training 30 steps on 2 rank(s)" in out and "resumed at step" in out


@pytest.mark.slow
def test_local_job_stops_when_its_requeues_are_used_up(synth_store, tmp_path, monkeypatch):
    from jobs.train import submit

    local_env(monkeypatch)
    run = tmp_path / "run"
    job = submit(SMOKE, smoke(synth_store, run, "train.steps=100000", "train.val_every=100000",
                              "train.ckpt_every=5", "train.log_every=100", "launch.max_requeues=0"),
                 cluster="local", gpus_per_node=0, tasks_per_node=1, time_min=10)
    wait_for(lambda: (run / "checkpoints" / "step-000000005.pt").exists(), "the first checkpoint")
    signal_tasks(job)
    with pytest.raises(Exception, match="not requeued: job .* already requeued 0 time"):
        job.result()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] >= 5 and not (run / "requeues").exists()


@pytest.mark.slow
def test_local_prediction_job_requeues_and_matches_a_single_process(synth_store, tmp_path, monkeypatch):
    from jobs.predict import submit
    from unet_dist.predict.manifest import finished_blocks

    local_env(monkeypatch)
    ckpt = save_checkpoint(tmp_path / "ckpt")
    blocks = ["predict.block_size=[1,32,32]", "predict.pyramid_max_side=64"]  # levels 0 and 1
    single = run_cli("predict", "--checkpoint", ckpt, "--input", synth_store, "--out", tmp_path / "one.zarr", *blocks,
                     env={"OMP_NUM_THREADS": "1"})
    assert single.code == 0, single.err
    out = tmp_path / "two.zarr"
    job = submit(ckpt, synth_store, out, overrides=blocks, cluster="local", gpus_per_node=0, tasks_per_node=2,
                 time_min=10)
    wait_for(lambda: finished_blocks(out) >= 20, "20 finished blocks")
    signal_tasks(job)
    result = job.result()
    assert result["blocks"] == 192 and result["blocks_skipped"] > 0  # the restart kept finished blocks
    assert job.folder == tmp_path / "two.zarr.jobs" / job.job_id
    assert "requeue 1 of at most 3" in (job.folder / f"{job.job_id}_0_log.out").read_text()
    a, b = (zarr.open_group(str(p), mode="r") for p in (tmp_path / "one.zarr", out))
    for name in ("0", "1", "labels/mask/0", "labels/mask/1"):  # every level of probability and mask
        assert np.array_equal(a[name][:], b[name][:]), name
