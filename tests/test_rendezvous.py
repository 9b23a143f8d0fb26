"""Two "nodes" on one machine: two torchrun agents with --nnodes=2 meeting on 127.0.0.1.

This is the multi-node path of slurm/train.sbatch's torchrun launcher (one agent per node, c10d
rendezvous on the first host) and of the README's static `--node_rank` form, with the two agents as
separate process trees that share nothing but the rendezvous endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import CONFIGS, ENV, ROOT


PROBE = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from unet_dist.dist import detect_env
    env = detect_env()
    dist.init_process_group("gloo")
    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    print(json.dumps({"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
                      "group_rank": int(os.environ["GROUP_RANK"]), "launcher": env.launcher,
                      "sum": float(total.item())}), flush=True)
    dist.destroy_process_group()
""")


def agents(rendezvous: str, port: int, nproc: int, *args: str) -> list[list[str]]:
    """Two torchrun command lines, node rank 0 and 1, meeting on 127.0.0.1:port."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}"]
    if rendezvous == "c10d":  # as slurm/train.sbatch does: node ranks come from the rendezvous
        base += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{port}"]
        return [base + list(args), base + list(args)]
    return [base + [f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}", *args] for i in (0, 1)]


def run_both(cmds: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) for cmd in cmds]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_agents_meet_and_reduce(rendezvous, tmp_path, free_port):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = run_both(agents(rendezvous, free_port, 1, str(probe)), timeout=180)
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(line) for proc in done for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in seen) == [0, 1]
    assert sorted(s["group_rank"] for s in seen) == [0, 1]  # two distinct node ranks
    assert all(s["world"] == 2 and s["local_rank"] == 0 and s["launcher"] == "torchrun" for s in seen)
    assert all(s["sum"] == 1.0 for s in seen)  # the all-reduce crossed the two agents


@pytest.mark.slow
def test_training_across_two_agents(synth_store, tmp_path, free_port):
    run = tmp_path / "run"
    train = ["-m", "unet_dist", "train", "--config", str(CONFIGS / "smoke.yaml"), f"data.store={synth_store}",
             "data.train_slices=[0,8]", "data.val_slices=[8,12]", f"run.dir={run}", "train.steps=20",
             "train.val_every=10", "train.ckpt_every=10"]
    done = run_both(agents("c10d", free_port, 1, *train))
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = "".join(proc.stdout for proc in done)
    assert "training 20 steps on 2 rank(s)" in out
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 20
    assert status["metrics"]["val/replica_spread"] == 0.0  # the two "nodes" hold identical weights
    assert (Path(run) / "checkpoints" / "step-000000020.pt").is_file()
