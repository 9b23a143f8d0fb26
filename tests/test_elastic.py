"""torchrun's own recovery (`--max-restarts`): a rank killed with SIGKILL, the workers restarted by the
agent with the command that started the run (no --resume), and the run finishing with the same final
checkpoint as one never interrupted, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unet_dist import checkpoint

from helpers import ENV, ROOT, SMOKE, torchrun_worker_pids


def torchrun(run: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "unet_dist", "train", "--config", str(SMOKE),
           f"run.dir={run}", "train.deterministic=true", "data.num_workers=0", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def final_params(run: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.step_path(run / "checkpoints", step))["model"]


@pytest.mark.slow
def test_torchrun_restart_after_sigkill_resumes_and_ends_bit_identical(em_store, tmp_path):
    n = 8
    args = [f"data.store={em_store}", f"train.steps={2 * n}", f"train.ckpt_every={n}", f"train.val_every={n}"]
    straight = tmp_path / "straight"
    proc = torchrun(straight, *args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    elastic = tmp_path / "elastic"
    proc = torchrun(elastic, *args, restarts=1)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.step_path(elastic / "checkpoints", n).exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step n"
            time.sleep(0.05)
        os.kill(torchrun_worker_pids(proc.pid)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restart 1: resuming" in out and "resumed at step" in out, out[-2000:]
    assert "connectFullMesh" not in err
    a, b = final_params(straight, 2 * n), final_params(elastic, 2 * n)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_on(ranks: int, run: Path, em_store, *extra: str) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    cmd = [*launcher, "-m", "unet_dist", "train", "--config", str(SMOKE), f"data.store={em_store}",
           f"run.dir={run}", "data.num_workers=0", "train.val_every=1000", "train.ckpt_every=2", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def saved_accumulate(run: Path, step: int) -> int:
    return checkpoint.load(checkpoint.step_path(run / "checkpoints", step))["config"]["train"]["accumulate"]


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_changed_world_size_is_said_and_global_batch_keeps_it(em_store, tmp_path, before, after):
    batch, accumulate = 2, 2 // before  # a global batch of 4 either way, which both world sizes can make
    old_global, new_global = batch * before * accumulate, batch * after * accumulate
    for keep in (False, True):
        run = tmp_path / f"keep-{keep}"
        first = train_on(before, run, em_store, f"data.batch_size={batch}", f"train.accumulate={accumulate}",
                         "train.steps=2")
        assert first.returncode == 0, first.stderr[-3000:]
        extra = [f"train.global_batch={old_global}"] if keep else []
        resumed = train_on(after, run, em_store, f"data.batch_size={batch}", f"train.accumulate={accumulate}",
                           "train.steps=4", "--resume", "auto", *extra)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed at step 2" in resumed.stdout
        if keep:
            assert "warning:" not in resumed.stderr
            assert f"keeps the global batch at {old_global}" in resumed.stdout
            # accumulate chosen so that batch x ranks x accumulate stays the global batch
            assert saved_accumulate(run, 4) * batch * after == old_global
        else:
            warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
            assert len(warnings) == 1, resumed.stderr[-2000:]  # one line, from rank 0 only
            assert (f"trained on {before} rank(s) with a global batch of {old_global}" in warnings[0]
                    and f"global batch of {new_global}" in warnings[0]
                    and f"train.global_batch={old_global}" in warnings[0])


def test_global_batch_that_the_ranks_cannot_make_is_one_line(em_store, tmp_path):
    done = train_on(1, tmp_path / "run", em_store, "data.batch_size=4", "train.global_batch=6", "train.steps=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: train.global_batch: 6 is not a multiple of data.batch_size x ranks = "
                                   "4 x 1 = 4; choose a multiple, or another data.batch_size")
