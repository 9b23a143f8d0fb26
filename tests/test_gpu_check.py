"""scripts/gpu_check.sh, the prepared device check, in its dry run: the same steps and JSON on the CPU
at tiny sizes, so the one command meant for the first GPU machine does not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

STEPS = ["machine", "tests", "bench_train", "bench_predict", "isbi"]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def check(*args: str, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    full = {**os.environ, "UNET_DIST_PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_writes_every_step_as_json(tmp_path):
    out = tmp_path / "gpu-check"
    done = check("--dry-run", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("gpu_check: ")]
    for name in STEPS:  # one summary line per step
        assert any(line.split()[1:3] == [name, "ok"] for line in lines), (name, lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"] and list(summary["steps"]) == STEPS
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in STEPS}
    for name, record in records.items():
        assert record["step"] == name and record["status"] == "ok" and record["dry_run"], record
        # status "ok" says the step ended before its deadline (the script times steps out itself);
        # how many seconds it took is the machine's load, not the script's behaviour
        assert record["summary"]
        assert (out / record["log"]).is_file()
        assert all(c["exit_code"] == 0 and not c["timed_out"] for c in record["commands"]), record["commands"]

    machine = records["machine"]["result"]
    assert {"gpu", "driver", "cuda_runtime", "cudnn", "native_bf16", "torch", "python"} <= set(machine)
    assert machine["missing"] == [] and machine["native_bf16"] is False  # the dry run hides any GPU
    tests = records["tests"]["result"]
    assert tests["counts"]["skipped"] == len(tests["tests"]) >= 7  # no CUDA: every gpu test skips
    assert (out / tests["junit_xml"]).is_file()
    train = records["bench_train"]["result"]
    assert train["images_per_s"] > 0 and "mfu" in train and train["speedup"] > 0
    assert json.loads((out / train["report"]).read_text())["suite"] == "train"
    pred = records["bench_predict"]["result"]
    assert pred["ours_voxels_per_s"] > 0 and pred["monai_voxels_per_s"] > 0
    assert 0 <= pred["comparison"]["max_abs_diff_interior"] <= 1
    isbi = records["isbi"]["result"]
    assert isbi["train_status"] == "completed" and isbi["steps"] == isbi["total_steps"]
    assert isbi["predict"]["blocks"] >= 5 and isbi["checkpoint"] == "best.pt"
    for key in ("dice_membrane", "dice_neuron", "pixel_error", "v_rand", "v_info"):
        assert 0 <= isbi["evaluate"][key] <= 1, key
    assert not (out / "work").exists()


def test_the_wandb_guard_catches_an_import(tmp_path):
    """W&B is disabled on the GPU machine (wandb is not even installed): the check's children see a
    `wandb` that records its importer and fails, so a step that imports it fails too."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    env = gpu_check.child_env(tmp_path, dry_run=True)
    done = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "must not be imported" in done.stderr
    assert "File \"<string>\", line 1" in (tmp_path / ".guard" / "imports.txt").read_text()  # who imported it
    # The training command with W&B disabled never imports it.
    done = subprocess.run([sys.executable, "-c", "import sys, unet_dist.train, unet_dist.predict, unet_dist.cli; "
                           "assert 'wandb' not in sys.modules"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_step_is_one_line_and_exit_2(tmp_path):
    done = check("--only", "machine,gpu", tmp_path / "out", timeout=60)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --only") and done.stderr.count("\n") == 1
