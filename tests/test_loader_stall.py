"""A stalled DataLoader worker with real processes: a worker of a running trainer stopped with
SIGSTOP; the run ends naming it after `data.loader_timeout_s`, and a stop signal is honoured while
the trainer waits on it (before: no output forever, the stop checkpoint only after SIGCONT)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, IterableDataset

from unet_dist import checkpoint
from unet_dist.compat import dataloader as compat
from unet_dist.train.batch_wait import BatchWaiter, LoaderStalled, StopWhileWaiting
from unet_dist.train.signals import ignore_stop_signals

from helpers import CONFIGS, ROOT, run_cli, torchrun_cmd, torchrun_worker_pids

SMOKE = CONFIGS / "smoke.yaml"
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


class _Held(IterableDataset):
    """0, 1, 2, ... from each worker, each once `release` is set: a worker that never delivers."""

    def __init__(self, release):
        self.release = release

    def __iter__(self):
        self.release.wait()
        yield from range(1000)


class _Flag:
    raised = False


@pytest.mark.parametrize("ending", ["timeout", "stop"])
def test_a_wait_for_a_held_worker_ends_in_a_slice_or_two(ending):
    """BatchWaiter on a real worker process that holds its batch: the loader timeout names the
    worker owing the batch, a stop flag ends the wait; the held worker is killed on close."""
    context = multiprocessing.get_context("fork")
    release = context.Event()
    loader = DataLoader(_Held(release), batch_size=None, num_workers=2, multiprocessing_context=context,
                        persistent_workers=True, worker_init_fn=ignore_stop_signals)
    stop = _Flag()
    waiter = BatchWaiter(loader, stop, 1 if ending == "timeout" else 0, start_batch=7, rank=3)
    pids = compat.worker_pids(waiter.iterator)
    stop.raised = ending == "stop"
    try:
        with pytest.raises(LoaderStalled if ending == "timeout" else StopWhileWaiting) as ended:
            next(waiter)
    finally:
        release.set()  # worker 1 may go; worker 0, which owes the batch, is killed unasked
        waiter.close()
    assert waiter.stalled == (0,)
    if ending == "timeout":
        assert f"loader worker 0 (pid {pids[0]}) has not delivered batch 7 of rank 3" in str(ended.value)
    assert not any(p.is_alive() for p in waiter.iterator._workers)  # held, ignoring SIGTERM: killed


def test_loader_timeout_is_checked():
    done = run_cli("config", "show", SMOKE, "data.loader_timeout_s=-1")
    assert done.code == 2 and "data.loader_timeout_s" in done.err and "Traceback" not in done.err


def _start(store: Path, run: Path, *overrides: str, port: int | None = None) -> subprocess.Popen:
    """The trainer; with `port`, two ranks under torchrun (the agent is the process started)."""
    args = ["train", "--config", str(SMOKE), f"data.store={store}", "data.train_slices=[0,8]",
            "data.val_slices=[8,12]", f"run.dir={run}", "train.steps=100000", "train.ckpt_every=5",
            "train.val_every=100000", "train.log_every=1", "data.num_workers=2", *overrides]
    cmd = torchrun_cmd(2, port, *args) if port else [sys.executable, "-m", "unet_dist", *args]
    # output to files: a full pipe would stall the trainer itself
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(run.parent / "out.txt", "w"),
                            stderr=open(run.parent / "err.txt", "w"), start_new_session=True)


def _workers(proc: subprocess.Popen, deadline: float, rank: int | None = None) -> list[int]:
    """The trainer's loader workers once it has logged step 5: its forked children (their
    command line is the trainer's own); with `rank`, those of that rank under the torchrun agent."""
    while True:
        assert proc.poll() is None, f"trainer ended ({proc.returncode})"
        assert time.monotonic() < deadline, "the trainer never got going"
        trainer = proc.pid if rank is None else torchrun_worker_pids(proc.pid).get(rank)
        if trainer is None:
            time.sleep(0.05)
            continue
        cmdline = _cmdline(trainer)  # read each time: just after Popen it may not have exec'd yet
        children = [int(pid) for task in Path(f"/proc/{trainer}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        workers = sorted(pid for pid in children if _cmdline(pid) == cmdline)
        if len(workers) == 2 and _steps_logged(proc) >= 5:
            return workers
        time.sleep(0.05)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _run_dir(proc: subprocess.Popen) -> Path:
    return Path(next(a for a in proc.args if a.startswith("run.dir="))[len("run.dir="):])


def _steps_logged(proc: subprocess.Popen) -> int:
    metrics = _run_dir(proc) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line).get("step", 0) for line in lines), default=0)


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped); "" when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _wait_stalled(proc: subprocess.Popen, deadline: float, quiet_s: float = 2.0) -> int:
    """Until the trainer has taken no step for `quiet_s` (its prefetched batches used up: it waits
    on the stopped worker); returns the last step logged."""
    last, since = _steps_logged(proc), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert proc.poll() is None, f"trainer ended ({proc.returncode})"
        assert time.monotonic() < deadline, "the trainer never stalled"
        time.sleep(0.1)
        if (step := _steps_logged(proc)) != last:
            last, since = step, time.monotonic()
    return last


def _release(pids: list[int]) -> None:
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the trainer did not end within {timeout} s")
    return code, (_run_dir(proc).parent / "err.txt").read_text()


@pytest.mark.slow
def test_a_stalled_worker_ends_the_run_with_one_line_after_the_loader_timeout(synth_store, tmp_path):
    (tmp_path / "a").mkdir()
    proc = _start(synth_store, tmp_path / "a" / "run", "data.loader_timeout_s=3")
    workers = []
    try:
        workers = _workers(proc, time.monotonic() + 300)
        stopped = workers[0]
        os.kill(stopped, signal.SIGSTOP)
        code, err = _finish(proc, timeout=120)
        gone = _state(stopped) == ""  # before the finally below kills it anyway
    finally:
        _release(workers)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "loader worker 0" in errors[0] and f"(pid {stopped})" in errors[0], err[-3000:]
    assert "data.loader_timeout_s=3" in errors[0]
    step = int(re.search(r"checkpoint of step (\d+) written", errors[0]).group(1))
    assert checkpoint.step_path(tmp_path / "a" / "run" / "checkpoints", step).exists()
    assert gone, "the stalled worker outlived the trainer"


@pytest.mark.slow
def test_a_stop_signal_is_honoured_while_a_worker_is_stalled(synth_store, tmp_path):
    (tmp_path / "b").mkdir()
    run = tmp_path / "b" / "run"
    proc = _start(synth_store, run)  # the default loader timeout: far away
    workers = []
    try:
        workers = _workers(proc, time.monotonic() + 300)
        os.kill(workers[1], signal.SIGSTOP)
        _wait_stalled(proc, time.monotonic() + 120)
        assert _state(workers[1]) == "T"
        os.kill(proc.pid, signal.SIGTERM)  # the trainer alone: the worker stays stopped
        code, err = _finish(proc, timeout=60)
        gone = [pid for pid in workers if _state(pid) == ""]
    finally:
        _release(workers)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert gone == workers, "a worker outlived the trainer"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert Path(status["checkpoint"]) == checkpoint.step_path(run / "checkpoints", status["step"])
    assert Path(status["checkpoint"]).exists()
    out = (tmp_path / "b" / "out.txt").read_text()
    assert f"stop signal received: checkpointing at step {status['step']}" in out


@pytest.mark.slow
def test_a_stalled_worker_of_another_rank_ends_every_rank_with_its_line(synth_store, tmp_path, free_port):
    (tmp_path / "c").mkdir()
    proc = _start(synth_store, tmp_path / "c" / "run", "data.loader_timeout_s=3", port=free_port)
    workers, trainers = [], []
    try:
        trainers = list(torchrun_worker_pids(proc.pid).values())
        workers = _workers(proc, time.monotonic() + 300, rank=1)
        trainers = list(torchrun_worker_pids(proc.pid).values())
        os.kill(workers[0], signal.SIGSTOP)
        code, err = _finish(proc, timeout=120)
        left = [pid for pid in trainers + workers if _state(pid) not in ("", "Z")]
    finally:
        _release(workers)
    assert code != 0 and not left, (left, err[-3000:])
    # one line from the rank whose worker stalled (torchrun's agent adds its own report after it);
    # stopped while putting a batch, worker 0 holds the result queue's lock and blocks worker 1
    # too, which may then be the one owing the batch awaited
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(rf"\(pid ({'|'.join(map(str, workers))})\) has not delivered",
                                           errors[0]), (workers, err[-3000:])
    assert "of rank 1" in errors[0] and "data.loader_timeout_s=3" in errors[0], err[-3000:]
