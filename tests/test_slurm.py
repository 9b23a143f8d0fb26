"""The launchers on a real SLURM cluster (slurm/local-cluster.sh; .ci/run starts it): sbatch scripts,
submitit jobs, time limits, requeues, bounds, distributed prediction.

Tests marked `slurm` skip when `sinfo` is missing or reaches no cluster. They submit real jobs and
poll `scontrol show job` (the local cluster keeps finished jobs for 10 minutes; there is no sacct).
Everything a job writes goes under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import ROOT, SMOKE, require, run_cli, save_checkpoint

TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
PREDICT_SBATCH = ROOT / "slurm" / "predict.sbatch"
SEGMENT_SBATCH = ROOT / "slurm" / "segment.sbatch"
VENV_BIN = str(Path(sys.executable).parent)


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo on PATH); start one with slurm/local-cluster.sh"
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answers"
    if probe.returncode != 0 or not probe.stdout.strip():
        last = ((probe.stderr or probe.stdout).strip().splitlines() or ["no partitions"])[-1]
        return f"no SLURM cluster answers sinfo ({last[:160]}); start one: eval \"$(slurm/local-cluster.sh start)\""
    return None


@pytest.fixture(scope="module")
def cluster() -> dict:
    """The environment jobs are submitted with (sbatch exports it to the job)."""
    require(_cluster_problem())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "SUBMITIT_", "SLURM_")) or k == "SLURM_CONF"}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def two_tasks(cluster) -> list[str]:
    """sbatch options for two tasks: on two nodes (two slurmd) when the cluster has them."""
    nodes = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%D"], capture_output=True, text=True).stdout
    if int(nodes.split()[0] if nodes.split() else 1) >= 2:
        return ["--nodes=2", "--ntasks-per-node=1"]
    return ["--ntasks=2"]


def smoke_args(store: Path, run: Path, *extra: str) -> list[str]:
    return [str(SMOKE), f"data.store={store}", f"run.dir={run}", "data.train_slices=[0,8]",
            "data.val_slices=[8,12]", *extra]


def sbatch(env: dict, tmp_path: Path, script: Path, *args: str, opts=(), extra_env: dict | None = None) -> str:
    cmd = ["sbatch", "--parsable", "--cpus-per-task=1", f"--output={tmp_path}/%j.out", *opts, str(script), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_job(job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job_info(job_id).get('JobState')}")


def wait_until(condition, what: str, timeout: float = 120, job_id: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job_id and job_info(job_id).get("JobState") in FINISHED:
            raise AssertionError(f"job {job_id} ended ({job_info(job_id).get('JobState')}) before {what}")
        time.sleep(0.2)
    if job_id:
        subprocess.run(["scancel", job_id])
    raise AssertionError(f"timed out waiting for {what}")


def log(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"{job_id}.out"
    return path.read_text() if path.exists() else ""


def train_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def ckpt_exists(run: Path, step: int):
    return lambda: (run / "checkpoints" / f"step-{step:09d}.pt").exists()


# ----------------------------------------------------------------------------- without a cluster

def test_scripts_parse_and_refuse_to_run_outside_slurm(tmp_path):
    for script in (TRAIN_SBATCH, PREDICT_SBATCH):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        done = subprocess.run(["bash", str(script), "--out", "x.zarr", str(SMOKE)], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 2 and "submit it with sbatch" in done.stderr
    usage = subprocess.run(["bash", str(TRAIN_SBATCH)], env={**os.environ, "SLURM_JOB_ID": "1"},
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# --------------------------------------------------------------------------------- sbatch

@pytest.mark.slurm
def test_sbatch_two_tasks_survive_scontrol_requeue(cluster, two_tasks, synth_store, tmp_path):
    """Two srun tasks (on two nodes where the cluster has them) train the smoke config; `scontrol
    requeue` mid-run (SIGTERM to every process,
    then SLURM requeues the job): the trainer checkpoints within KillWait, the job comes back with
    --resume auto and ends at the expected step with every step trained exactly once."""
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, TRAIN_SBATCH, *smoke_args(synth_store, run, "train.steps=30", "train.val_every=15",
                                                              "train.ckpt_every=5", "train.log_every=1"),
                 opts=two_tasks)
    wait_until(ckpt_exists(run, 5), "the first checkpoint", job_id=job)
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_job(job)
    text = log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "1" and "SIGTERM" in text and "resumed at step" in text
    assert "training 30 steps on 2 rank(s)" in text and "launcher srun" in text
    assert info["NumNodes"] == ("2" if "--nodes=2" in two_tasks else "1")
    assert train_steps(run) == list(range(1, 31))  # nothing lost, nothing trained twice
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 30 == status["total_steps"]
    assert status["metrics"]["val/replica_spread"] == 0.0
    assert "train.sbatch: training completed at step 30/30" in text and "final metrics" in text
    assert not (run / "requeues").exists()  # SLURM requeued it, not the script


@pytest.mark.slurm
def test_train_in_the_batch_shell_of_a_two_task_job_runs_alone_with_a_warning(cluster, synth_store, tmp_path):
    """`unet-dist train` called in the sbatch script itself (no srun) of a --ntasks=2 job sees
    SLURM_PROCID=0 and SLURM_NTASKS=2 but is not a job step: it trains alone and says why, instead of
    waiting for a second rank that never comes."""
    run = tmp_path / "run"
    script = tmp_path / "plain.sbatch"
    script.write_text("#!/bin/bash\nset -e\nunet-dist train --config " + " ".join(
        smoke_args(synth_store, run, "train.steps=4", "train.val_every=4", "train.ckpt_every=4")) + "\n")
    job = sbatch(cluster, tmp_path, script, opts=["--ntasks=2", "--time=3"])
    info = wait_job(job)
    text = log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "not in a job step (no srun)" in text and "training 4 steps on 1 rank(s)" in text
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


@pytest.mark.slurm
def test_sbatch_usr1_requeues_and_continues_the_wandb_run(cluster, synth_store, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N does): checkpoint, `scontrol requeue` by the
    script, resume; every step trained once; W&B offline by default, one run id over both starts, and
    the `wandb sync` command printed at the end."""
    run = tmp_path / "run"
    wandb_env = {k: str(tmp_path / "wandb-home" / k) for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                                               "WANDB_DATA_DIR")}
    job = sbatch(cluster, tmp_path, TRAIN_SBATCH,
                 *smoke_args(synth_store, run, "train.steps=30", "train.ckpt_every=5", "train.val_every=15",
                             "train.log_every=1", "logging.wandb=auto"),
                 opts=["--ntasks=2"], extra_env={**wandb_env, "NETRC": str(tmp_path / "no-netrc")})
    wait_until(ckpt_exists(run, 5), "the first checkpoint", job_id=job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_job(job)
    text = log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1" and "SIGUSR1" in text and "resumed at step" in text
    assert train_steps(run) == list(range(1, 31))
    lines = (run / "requeues").read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[0] == job and lines[0].endswith("USR1")
    assert json.loads((run / "status.json").read_text())["step"] == 30
    folders = sorted((run / "wandb").glob("offline-run-*"))
    ids = {f.name.rsplit("-", 1)[1] for f in folders}
    assert len(folders) == 2 and len(ids) == 1, folders
    assert f"wandb sync --id {ids.pop()}" in text.split("training completed")[-1]


@pytest.mark.slurm
def test_sbatch_time_limit_signal_checkpoints_and_requeues(cluster, synth_store, tmp_path):
    """The real thing: --time=1 with --signal=B:USR1@55; slurmctld sends the signal (its periodic check
    runs every 30 s), the trainer checkpoints, the script requeues, the job runs again."""
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, TRAIN_SBATCH,
                 *smoke_args(synth_store, run, "train.steps=100000", "train.ckpt_every=1000",
                             "train.val_every=100000", "train.log_every=1000"),
                 opts=["--ntasks=2", "--time=1", "--signal=B:USR1@55"])
    try:
        wait_until(lambda: job_info(job).get("Restarts") == "1", "the requeue", timeout=150, job_id=job)
        text = log(tmp_path, job)
        assert "SIGUSR1" in text and "stop signal received: checkpointing at step" in text, text[-3000:]
        assert (run / "requeues").read_text().split()[0] == job
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "interrupted" and 0 < status["step"] < 100000
        assert Path(status["checkpoint"]).is_file()
    finally:
        subprocess.run(["scancel", job])
    wait_job(job, timeout=60)


@pytest.mark.slurm
def test_sbatch_failed_start_is_not_requeued(cluster, tmp_path):
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, TRAIN_SBATCH, *smoke_args(tmp_path / "missing.zarr", run),
                 opts=["--ntasks=2"])
    info = wait_job(job)
    text = log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    assert "missing.zarr" in text and "Traceback" not in text
    assert "not requeued" in text and not (run / "requeues").exists()
    bad = sbatch(cluster, tmp_path, TRAIN_SBATCH, str(SMOKE), "train.stepz=3")
    info = wait_job(bad)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "unknown key 'train.stepz'" in log(tmp_path, bad)


@pytest.mark.slurm
def test_sbatch_torchrun_launcher_checkpoints_on_usr1_and_bound_stops_it(cluster, two_tasks, synth_store,
                                                                         tmp_path):
    """torchrun, one agent per node with a c10d rendezvous on the first node (two nodes x 1 worker
    where the cluster has two nodes, else one node x 2 workers): the agents ignore SIGUSR1, the
    workers checkpoint and exit 0; with launch.max_requeues=0 the job stops instead of requeueing."""
    multi = "--nodes=2" in two_tasks
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, TRAIN_SBATCH,
                 *smoke_args(synth_store, run, "train.steps=100000", "train.ckpt_every=10",
                             "train.val_every=100000", "train.log_every=10", "launch.max_requeues=0"),
                 opts=["--nodes=2", "--ntasks-per-node=1"] if multi else ["--ntasks=1", "--cpus-per-task=2"],
                 extra_env={"UNET_DIST_LAUNCHER": "torchrun", "UNET_DIST_NPROC_PER_NODE": "1" if multi else "2"})
    wait_until(ckpt_exists(run, 10), "the first checkpoint", job_id=job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_job(job)
    text = log(tmp_path, job)
    assert "launcher torchrun" in text and "training 100000 steps on 2 rank(s)" in text
    assert "training step exited with code 0" in text, text[-3000:]  # the agent survived the signal
    assert "not requeued" in text and "launch.max_requeues=0" in text
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"  # stopped short of its steps: exit 1
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] >= 10


@pytest.mark.slurm
def test_sbatch_distributed_prediction_equals_a_local_run(cluster, two_tasks, synth_store, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    args = ["--checkpoint", str(ckpt), "--input", str(synth_store), "predict.block_size=[1,64,64]"]
    local = run_cli("predict", *args, "--out", str(tmp_path / "local.zarr"), env={"OMP_NUM_THREADS": "1"})
    assert local.code == 0, local.err
    job = sbatch(cluster, tmp_path, PREDICT_SBATCH, *args, "--out", str(tmp_path / "slurm.zarr"), opts=two_tasks)
    info = wait_job(job)
    text = log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "on 2 rank(s)" in text and "48 block(s) in the manifest" in text
    a, b = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("local.zarr", "slurm.zarr"))
    for name in ("0", "labels/mask/0"):  # probability and mask
        assert np.array_equal(a[name][:], b[name][:]), name


def test_sbatch_segmentation_on_two_tasks_equals_a_local_run(cluster, two_tasks, tmp_path):
    """segment.sbatch, the CPU job after the GPU one: srun ranks give the IDs one process gives."""
    from unet_dist.bench.segment_inputs import noisy_affinities, voronoi_ids, write_affinity_store

    tile = noisy_affinities(voronoi_ids((16, 64, 64), cell=8, seed=3))
    for name in ("local.zarr", "slurm.zarr"):
        write_affinity_store(tmp_path / name, (16, 64, 64), (8, 32, 32), lambda box: tile[(slice(None), *box)])
    args = ["--block-size", "8,32,32"]
    local = run_cli("segment", "--pred", str(tmp_path / "local.zarr"), *args, env={"OMP_NUM_THREADS": "1"})
    assert local.code == 0, local.err
    job = sbatch(cluster, tmp_path, SEGMENT_SBATCH, "--pred", str(tmp_path / "slurm.zarr"), *args, opts=two_tasks)
    info = wait_job(job)
    text = log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", text[-3000:]
    a, b = (zarr.open_group(str(tmp_path / name), mode="r")["labels/neurons/0"][:] for name in ("local.zarr", "slurm.zarr"))
    assert a.max() > 10 and np.array_equal(a, b)
    assert not (tmp_path / "slurm.zarr" / ".segment").exists()  # the working state is gone


# -------------------------------------------------------------------------------- submitit

def submitit_env(cluster: dict):
    """Jobs inherit the submitting process's environment: set it for the duration of a test."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(cluster)
    return saved


def result_within(job, timeout: float = 240):
    """job.result(), but fail (not hang) when the job ends without a result (there is no sacct here)."""
    deadline = time.monotonic() + timeout
    ended_at = None
    while not job.job.done():
        state = job_info(job.job_id).get("JobState")
        if state in FINISHED:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > 15:
                raise AssertionError(f"job {job.job_id} {state} without a result: "
                                     f"{job.job.stderr() or ''}"[-3000:])
        if time.monotonic() > deadline:
            job.job.cancel(check=False)
            raise AssertionError(f"job {job.job_id} gave no result within {timeout} s")
        time.sleep(0.5)
    return job.result()


@pytest.mark.slurm
def test_submitit_job_is_preempted_requeued_and_returns_final_metrics(cluster, two_tasks, synth_store, tmp_path):
    """submitit's own preemption path: SIGTERM then USR2 to the tasks (job._interrupt()), checkpoint(),
    `scontrol requeue`; the job resumes from its checkpoint, trains every step exactly once, and
    job.result() returns the final metrics; logs in RUN_DIR/jobs/<job id>/."""
    from jobs.train import submit

    run = tmp_path / "run"
    saved = submitit_env(cluster)
    try:
        job = submit(SMOKE, smoke_args(synth_store, run, "train.steps=30", "train.val_every=15",
                                       "train.ckpt_every=5", "train.log_every=1")[1:],
                     cluster="slurm", gpus_per_node=0, cpus_per_task=1, time_min=10,
                     **(dict(nodes=2, tasks_per_node=1) if "--nodes=2" in two_tasks else dict(tasks_per_node=2)))
        wait_until(ckpt_exists(run, 5), "the first checkpoint", job_id=job.job_id)
        job._interrupt()
        result = result_within(job)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert job.cluster == "slurm" and job.folder == run / "jobs" / job.job_id
    assert result["step"] == 30 and 0.0 <= result["val/dice_membrane"] <= 1.0
    assert result["val/replica_spread"] == 0.0
    assert train_steps(run) == list(range(1, 31))
    lines = (run / "requeues").read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[0] == job.job_id and lines[0].endswith("submitit")
    assert job_info(job.job_id)["Restarts"] == "1"
    out = (job.folder / f"{job.job_id}_0_log.out").read_text()
    assert "training 30 steps on 2 rank(s)" in out and "resumed at step" in out
    assert (job.folder / f"{job.job_id}_1_log.err").is_file()


@pytest.mark.slurm
def test_clear_errors_before_anything_is_submitted(cluster, synth_store, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    common = ["--config", str(SMOKE), "--cluster", "slurm", "--gpus-per-node", "0", "--cpus-per-task", "1",
              "--time", "5", *smoke_args(synth_store, tmp_path / "run")[1:]]
    cases = [(["--partition", "nope"], "--partition nope: no such partition (available: debug, short)"),
             (["--partition", "short", "--time", "10"], "--time 10: partition short allows at most 5 minutes"),
             (["--nodes", "3"], "the cluster cannot run 3 node(s)"),
             (["--gpus-per-node", "2"], "generic resource"),
             (["--cpus-per-task", "512"], "Requested node configuration is not available")]
    for extra, message in cases:
        done = subprocess.run([sys.executable, "-m", "jobs.train", *common, *extra], cwd=tmp_path, env=cluster,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    # sbatch itself refuses a bad partition before queueing the script.
    refused = subprocess.run(["sbatch", "--partition=nope", str(TRAIN_SBATCH), str(SMOKE)], cwd=tmp_path,
                             env=cluster, capture_output=True, text=True)
    assert refused.returncode != 0 and "partition" in refused.stderr.lower()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before) and not (tmp_path / "run").exists()  # nothing was queued


@pytest.mark.slurm
def test_submitit_default_cpus_fit_what_the_cluster_announces(cluster, monkeypatch):
    """README's `python -m jobs.train --config configs/smoke.yaml --gpus-per-node 0 --tasks-per-node 2`:
    the default asks what the nodes offer, so the request passes `sbatch --test-only` on the local cluster."""
    from jobs.launch import resources
    from unet_dist.config import load_config

    for key in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(key, cluster[key])
    node_cpus = min(int(c.rstrip("+")) for c in subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True,
                                                              text=True, env=cluster).stdout.split())
    req = resources(load_config(SMOKE), "slurm", gpus_per_node=0, tasks_per_node=2)  # raises if it cannot run
    assert req["cpus_per_task"] == max(1, min(8, node_cpus // 2))
