"""What only a GPU can show. Every test here is marked `gpu` and skips without CUDA; the CPU tests of
the same decisions (device per rank, precision, the loss-scaler on resume, deterministic refusals, the
3D tile runner) are in test_dist.py, test_train.py and test_bench.py. `scripts/gpu_check.sh` runs this
file on a GPU machine and copies the numbers recorded here (`record_property`) into its JSON.

Real processes throughout: the `unet-dist` command, torchrun, real stores on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_dist import checkpoint

from helpers import ENV, ROOT, SMOKE, run_cli, run_rank_alone, save_checkpoint, torchrun_cmd

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")]


def _train_args(store: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(SMOKE), f"data.store={store}", "data.train_slices=[0,8]",
            "data.val_slices=[8,12]", f"run.dir={run}", "train.device=cuda", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_gpu_training_bf16_channels_last_compile(synth_store, tmp_path, record_property):
    run = tmp_path / "run"
    done = run_cli(*_train_args(synth_store, run, "train.precision=bf16", "train.channels_last=true",
                                "train.compile=true", "train.steps=40", "train.val_every=20", "train.ckpt_every=20",
                                "data.num_workers=2"))
    assert done.code == 0, done.err[-3000:]
    assert "device cuda, precision bf16" in done.out
    rows = _metrics(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(r["train/skipped_steps"] == 0 for r in rows if "train/skipped_steps" in r)
    assert all(r["train/gpu_mem_gb"] > 0 for r in rows if "train/loss" in r)
    vals = [r for r in rows if "val/dice_membrane" in r]
    assert [r["step"] for r in vals] == [20, 40] and all(0 <= r["val/dice_membrane"] <= 1 for r in vals)
    record_property("first_loss", losses[0])
    record_property("last_loss", losses[-1])
    record_property("images_per_s", [r for r in rows if "train/images_per_s" in r][-1]["train/images_per_s"])


def test_resume_on_gpu_continues_within_tolerance(synth_store, tmp_path, record_property):
    """20 steps straight against 10, a new process with --resume auto, 10 more: the same weights up to
    GPU rounding (deterministic kernels, the seeded patch stream, the optimizer state restored)."""
    common = ["train.steps=20", "train.val_every=10", "train.ckpt_every=10", "train.deterministic=true",
              "train.precision=bf16", "data.num_workers=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = run_cli(*_train_args(synth_store, straight, *common))
    assert done.code == 0, done.err[-3000:]
    first = run_cli(*_train_args(synth_store, split, *common, "train.steps=10"))
    assert first.code == 0, first.err[-3000:]
    again = run_cli(*_train_args(synth_store, split, *common), "--resume", "auto")
    assert again.code == 0 and "resumed at step 10" in again.out, again.err[-3000:]
    a = checkpoint.load(checkpoint.step_path(straight / "checkpoints", 20))["model"]
    b = checkpoint.load(checkpoint.step_path(split / "checkpoints", 20))["model"]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    record_property("max_param_diff", worst)
    assert worst <= 1e-3


def test_predictor_on_gpu_matches_the_cpu(tmp_path, record_property):
    from unet_dist.config import ModelConfig
    from unet_dist.data.synth import synthesize
    from unet_dist.predict.prediction_store import probability_float
    from unet_dist.predict.pipeline import predict

    store = tmp_path / "vol.zarr"
    synthesize(store, shape=(4, 256, 320), seed=3)
    ckpt = save_checkpoint(tmp_path / "ck", ModelConfig(dims=2, depth=3, base_channels=16), seed=1)
    overrides = ["predict.block_size=[1,128,128]", "predict.probability_dtype=float16", "predict.batch_size=4"]
    runs = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        out = tmp_path / f"{device}-{precision}.zarr"
        result = predict(ckpt, store, out, labels=store, overrides=overrides, device=device, precision=precision)
        runs[device, precision] = (probability_float(zarr.open_group(str(out))["0"][:]), result)
    cpu, _ = runs["cpu", "fp32"]
    fp32 = float(np.abs(runs["cuda", "fp32"][0] - cpu).max())  # TF32 convolutions by default
    bf16 = float(np.abs(runs["cuda", "bf16"][0] - cpu).mean())
    record_property("fp32_max_abs_diff", fp32)
    record_property("bf16_mean_abs_diff", bf16)
    assert fp32 <= 0.02 and bf16 <= 0.02
    assert runs["cuda", "fp32"][1]["dice_membrane"] == pytest.approx(runs["cpu", "fp32"][1]["dice_membrane"], abs=5e-3)


def test_fp16_with_gradscaler_and_resume_from_bf16(synth_store, tmp_path, record_property):
    run = tmp_path / "run"
    common = ["train.val_every=10", "train.ckpt_every=10", "data.num_workers=1"]
    first = run_cli(*_train_args(synth_store, run, *common, "train.precision=bf16", "train.steps=10"))
    assert first.code == 0, first.err[-3000:]
    # The bf16 checkpoint holds a disabled scaler's empty state: fp16 starts a fresh loss scale.
    resumed = run_cli(*_train_args(synth_store, run, *common, "train.precision=fp16", "train.steps=30"),
                      "--resume", "auto")
    assert resumed.code == 0 and "Traceback" not in resumed.err, resumed.err[-3000:]
    assert "fresh loss scale" in resumed.out and "precision fp16" in resumed.out
    state = checkpoint.load(checkpoint.step_path(run / "checkpoints", 30))
    assert state["scaler"]["scale"] > 0
    losses = [r["train/loss"] for r in _metrics(run) if "train/loss" in r and r["step"] > 10]
    assert all(np.isfinite(losses))
    record_property("loss_scale", float(state["scaler"]["scale"]))


def test_more_ranks_than_visible_gpus_is_refused_on_every_rank(synth_store, tmp_path, free_port):
    """`make demo`'s case: 2 ranks, device auto, one GPU. Each rank says why and exits 2 before the
    process group (NCCL would fail later with "Duplicate GPU detected")."""
    run = tmp_path / "run"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    proc = subprocess.run(torchrun_cmd(2, free_port, *_train_args(synth_store, run)[:-1], "train.device=auto"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "2 ranks on this node but 1 visible GPU(s)" in proc.stderr, proc.stderr[-3000:]
    for rank in (0, 1):
        alone = run_rank_alone(rank, 2, free_port, *_train_args(synth_store, run)[:-1], "train.device=auto",
                               env={"CUDA_VISIBLE_DEVICES": env["CUDA_VISIBLE_DEVICES"]})
        assert alone.code == 2 and "2 ranks on this node but 1 visible GPU(s)" in alone.err, alone.err[-3000:]
    assert not run.exists()


def test_deterministic_interp_is_one_line_on_gpu(synth_store, tmp_path):
    done = run_cli(*_train_args(synth_store, tmp_path / "run", "train.deterministic=true", "model.upsample=interp"))
    assert done.code == 2 and "model.upsample=interp" in done.err and done.err.count("\n") == 1


def test_bench_predict_warms_up_a_3d_model_on_gpu(tmp_path):
    from unet_dist.bench.predict import _warmup
    from unet_dist.config import Config, to_dict
    from unet_dist.model import build_model, valid_input_shape

    cfg = Config()
    cfg.model.dims, cfg.model.depth, cfg.model.base_channels = 3, 2, 8
    ckpt = checkpoint.save(tmp_path, {"model": build_model(cfg.model).state_dict(), "model_config": to_dict(cfg.model),
                                      "config": to_dict(cfg), "step": 0}, keep_last=1)
    tile, batch = list(valid_input_shape(cfg.model, (16, 64, 64))), 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _warmup(str(ckpt), torch.device("cpu"), "bf16", tile, batch)
    assert torch.cuda.max_memory_allocated() == before  # a CPU run has nothing to warm up
    _warmup(str(ckpt), torch.device("cuda"), "bf16", tile, batch)
    # a forward of the planned batch ran on the GPU: at least its input, in bf16, was there
    assert torch.cuda.max_memory_allocated() - before >= batch * int(np.prod(tile)) * 2
