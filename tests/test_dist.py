import pytest
import torch

from unet_dist import dist
from unet_dist.errors import UserError


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
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 4242
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


def test_device_choice_on_cpu():
    assert dist.choose_device("cpu", 0).type == "cpu"
    if not torch.cuda.is_available():
        assert dist.choose_device("auto", 0).type == "cpu"
        with pytest.raises(UserError, match="CUDA is not available"):
            dist.choose_device("cuda", 0)


def test_precision_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert dist.resolve_precision("auto", cpu) == "fp32"
    assert dist.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        dist.resolve_precision("fp16", cpu)


def test_reductions_without_process_group():
    import numpy as np

    assert dist.all_reduce_sum(np.array([1, 2])).tolist() == [1, 2]
    assert dist.any_rank(True) and not dist.any_rank(False)


def test_submitit_env_on_slurm():
    env = dist.detect_env({"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_ID": "17"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "submitit")
    assert (env.master_addr, env.master_port) == ("vm", 20017)


def test_submitit_local_executor_env():
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
             "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "4321"}
    env = dist.detect_env(local)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "submitit")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 30000 + 4321)
    # One local task is one process; torchrun's variables still win over submitit's.
    assert dist.detect_env({**local, "SUBMITIT_LOCAL_NTASKS": "1"}).world_size == 1
    assert dist.detect_env({**local, "RANK": "0", "WORLD_SIZE": "4"}).launcher == "torchrun"
