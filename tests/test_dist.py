import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from unet_dist import runtime
from unet_dist import dist
from unet_dist.errors import UserError

from helpers import CONFIGS, ROOT


def test_single_process_by_default():
    env = dist.detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun_env():
    env = dist.detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("n1", 1234)


def test_srun_env_without_torchrun():
    env = dist.detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                           "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu07" and env.master_port == 10000 + 4242
    one_task = dist.detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert one_task.world_size == 1
    # a step smaller than the job (srun -n 2 in a 4-task allocation) has the step's tasks
    step = dist.detect_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2",
                            "SLURM_STEP_ID": "3"})
    assert (step.rank, step.world_size) == (1, 2)


def test_batch_shell_of_a_multi_task_job_runs_alone_and_says_so(capsys):
    """sbatch -n 2 running `unet-dist train` in the script itself (no srun): no SLURM_STEP_ID, and no
    second rank will come, so waiting for one would hang until the rendezvous timeout."""
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    assert dist.detect_env(environ).world_size == 1
    dist.detect_env(environ)
    err = capsys.readouterr().err
    assert err.count("not in a job step (no srun)") == 1 and "SLURM_NTASKS=2" in err


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("node[3-5]", "node3"),
                                             ("a[10,12-14],b2", "a10"), ("n[001-004]", "n001")])
def test_first_host(nodelist, first):
    assert dist.first_host(nodelist) == first


def test_device_choice_cpu_is_always_the_cpu():
    assert dist.choose_device("cpu", 0).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_choice_without_cuda():
    assert dist.choose_device("auto", 0).type == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        dist.choose_device("cuda", 0)


def test_precision_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        runtime.resolve_precision("fp16", cpu)


def test_reductions_without_process_group():
    import numpy as np

    assert dist.all_reduce_sum(np.array([1, 2])).tolist() == [1, 2]
    assert dist.any_rank(True) and not dist.any_rank(False)


def test_submitit_env_on_slurm():
    env = dist.detect_env({"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_ID": "17"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "submitit")
    assert (env.master_addr, env.master_port) == ("vm", 10017)


def test_submitit_local_executor_env():
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
             "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "4321"}
    env = dist.detect_env(local)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "submitit")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 26000 + 4321 % 3000)
    # One local task is one process; torchrun's variables still win over submitit's.
    assert dist.detect_env({**local, "SUBMITIT_LOCAL_NTASKS": "1"}).world_size == 1
    assert dist.detect_env({**local, "RANK": "0", "WORLD_SIZE": "4"}).launcher == "torchrun"


# ------------------------------------------------------------------ ranks per node and their GPUs

def test_local_world_size_from_every_launcher():
    assert dist.detect_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
                           ).local_world_size == 2
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "5", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_NODELIST": "n[1-3]"}
    assert dist.detect_env({**slurm, "SLURM_NODEID": "1"}).local_world_size == 2
    assert dist.detect_env({**slurm, "SLURM_NODEID": "2"}).local_world_size == 1
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "3", "SUBMITIT_LOCAL_GLOBALID": "0"}
    assert dist.detect_env(local).local_world_size == 3
    assert dist.detect_env({}).local_world_size == 1
    assert [dist.tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]


def test_more_ranks_on_a_node_than_gpus_is_refused_with_one_line():
    """What `make demo` (2 ranks, device auto) did on a one-GPU workstation: both ranks on cuda:0,
    and NCCL's "Duplicate GPU detected" after both had started."""
    with pytest.raises(UserError) as refused:
        dist.gpu_index(local_rank=1, local_world_size=2, visible=1)
    message = str(refused.value)
    assert "2 ranks on this node but 1 visible GPU(s)" in message and "--nproc_per_node=1" in message
    assert "train.device=cpu" in message and "\n" not in message
    with pytest.raises(UserError):  # rank 0 refuses too: every rank stops before any collective
        dist.gpu_index(local_rank=0, local_world_size=2, visible=1)
    with pytest.raises(UserError):
        dist.gpu_index(local_rank=1, local_world_size=4, visible=2)


def test_one_gpu_per_rank_is_accepted():
    assert [dist.gpu_index(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert dist.gpu_index(0, 1, 1) == 0 and dist.gpu_index(1, 2, 8) == 1
    # SLURM's per-task binding (--gpus-per-task=1): each task sees only its own GPU, as device 0.
    assert dist.gpu_index(1, 2, 1, node_gpus=2) == 0
    with pytest.raises(UserError):  # SLURM gave the node one GPU for two tasks
        dist.gpu_index(1, 2, 1, node_gpus=1)
    assert dist.slurm_node_gpus({"SLURM_STEP_GPUS": "0,1"}) == 2
    assert dist.slurm_node_gpus({"SLURM_JOB_GPUS": "3"}) == 1 and dist.slurm_node_gpus({}) is None


def test_auto_precision_wants_native_bf16():
    assert runtime.auto_precision("cuda", native_bf16=True) == "bf16"
    assert runtime.auto_precision("cuda", native_bf16=False) == "fp32"  # emulated bf16 is slower than fp32
    assert runtime.auto_precision("cpu", native_bf16=True) == "fp32"
    assert not runtime.native_bf16(torch.device("cpu"))


def test_deterministic_sets_the_cublas_workspace_and_keeps_cudnn_autotuner_off():
    code = textwrap.dedent("""
        import json, os, torch
        from unet_dist import runtime
        runtime.make_deterministic()
        runtime.tune_for_fixed_shapes(torch.device("cuda"))  # must not turn the autotuner on now
        print(json.dumps([os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled(),
                          torch.backends.cudnn.benchmark]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [":4096:8", True, False]
    code = ("import torch; from unet_dist import runtime; runtime.tune_for_fixed_shapes(torch.device('cuda')); "
            "print(torch.backends.cudnn.benchmark)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


# ------------------------------------------------------------------------------ ports and CPUs

def _shell_port_formulas() -> dict[str, tuple[int, int]]:
    found = {}
    for path in ("slurm/train.sbatch", "slurm/predict.sbatch", "jobs/common.py"):
        match = re.search(r"MASTER_PORT=\$\(\((\d+) \+ SLURM_JOB_ID % (\d+)\)\)", (ROOT / path).read_text())
        assert match, path
        found[path] = (int(match.group(1)), int(match.group(2)))
    return found


def test_rendezvous_ports_stay_below_the_ephemeral_range_and_scripts_agree():
    lo, hi = dist.EPHEMERAL_PORTS
    for base, span in ((dist.SLURM_PORT_BASE, dist.SLURM_PORT_SPAN), (dist.LOCAL_PORT_BASE, dist.LOCAL_PORT_SPAN)):
        assert 1024 <= base and base + span - 1 < lo and not base <= 29500 < base + span  # torchrun's default
    for job in (0, 1, 4242, 15999, 16000, 31999, 2**31 - 1, 987654321):
        for port in (dist._slurm_port(str(job)), dist._local_port(str(job))):
            assert 1024 <= port < lo, (job, port)
    assert dist.SLURM_PORT_BASE + dist.SLURM_PORT_SPAN <= dist.LOCAL_PORT_BASE  # the two never overlap
    # The batch scripts compute the same port in shell as srun'd ranks do from SLURM_JOB_ID.
    assert set(_shell_port_formulas().values()) == {(dist.SLURM_PORT_BASE, dist.SLURM_PORT_SPAN)}


def test_loader_workers_fit_the_cpus_slurm_gives(capsys):
    srun = dist.DistEnv(launcher="slurm", world_size=2)
    assert dist.loader_workers(8, srun, {}) == 8  # outside SLURM: as configured
    assert dist.loader_workers(8, srun, {"SLURM_CPUS_PER_TASK": "9"}) == 8
    assert dist.loader_workers(8, srun, {"SLURM_CPUS_PER_TASK": "4"}) == 3
    assert "data.num_workers=8 but SLURM gives this rank 4 CPU(s)" in capsys.readouterr().err
    assert dist.loader_workers(8, srun, {"SLURM_CPUS_PER_TASK": "1"}) == 0
    assert dist.loader_workers(0, srun, {"SLURM_CPUS_PER_TASK": "1"}) == 0
    torchrun = dist.DistEnv(launcher="torchrun", world_size=4, local_world_size=4)  # 4 ranks share one task
    assert dist.loader_workers(8, torchrun, {"SLURM_CPUS_PER_TASK": "36"}) == 8
    assert dist.loader_workers(8, torchrun, {"SLURM_CPUS_PER_TASK": "16"}) == 3


def test_train_sbatch_gives_the_gpu_recipe_its_loader_workers():
    from unet_dist.config import load_config

    cfg = load_config(CONFIGS / "isbi2012.yaml")
    sbatch = int(re.search(r"^#SBATCH --cpus-per-task=(\d+)$", (ROOT / "slurm/train.sbatch").read_text(),
                           re.M).group(1))
    env = dist.DistEnv(launcher="slurm", world_size=2)
    for cpus in (sbatch, cfg.launch.cpus_per_task):  # sbatch script and submitit job
        assert dist.loader_workers(cfg.data.num_workers, env, {"SLURM_CPUS_PER_TASK": str(cpus)}) \
            == cfg.data.num_workers


# ------------------------------------------------------------------ the end of a long prediction

PATIENT_PROBE = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    from unet_dist import dist
    env = dist.detect_env()
    patient = sys.argv[1] == "patient"
    with dist.process_group(env, torch.device("cpu"), timeout_s=2):
        if env.rank == 1:
            time.sleep(8)  # this rank's share of the volume took longer than the job's timeout
        total = dist.all_reduce_sum(np.array([env.rank + 1]), patient=patient)
        dist.barrier(patient=patient)
        print(f"rank {env.rank} total {int(total[0])}", flush=True)
""")


@pytest.mark.parametrize("patient", [True, False])
def test_patient_reduction_outlasts_the_job_timeout(patient, tmp_path, free_port):
    """The reduction that ends a prediction waits as long as the slowest rank takes; the ordinary one
    (the control) times out after train.dist_timeout_s."""
    probe = tmp_path / "probe.py"
    probe.write_text(PATIENT_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port}", str(probe), "patient" if patient else "plain"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)
    if patient:
        assert proc.returncode == 0, proc.stderr[-3000:]
        # both ranks write to one pipe: their lines may interleave, so find the reports anywhere
        assert sorted(re.findall(r"rank (\d) total (\d+)", proc.stdout)) == [("0", "3"), ("1", "3")]
    else:
        assert proc.returncode != 0 and "total" not in proc.stdout
        assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower()


def test_the_demo_keeps_its_two_ranks_on_the_cpu():
    """`make demo` runs 2 ranks: on a one-GPU machine `auto` would be refused (two ranks, one GPU), so
    the demo's recipe and its predict command say cpu."""
    from unet_dist.config import load_config

    assert load_config(CONFIGS / "isbi2012_cpu.yaml").train.device == "cpu"
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    predict = demo[demo.index("-m unet_dist predict"):].split("\n\n")[0]
    assert "--device cpu" in predict
