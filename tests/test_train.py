"""The trainer with real processes: one CPU process, torchrun with 2 gloo ranks, kill -9, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unet_dist import checkpoint

from helpers import CONFIGS, ENV, ROOT, SMOKE, run_cli, torchrun_cmd


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def test_single_process_trains(em_store, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={em_store}", f"run.dir={run}",
                   "train.steps=60", "train.val_every=30", "train.ckpt_every=30", env={"OMP_NUM_THREADS": "2"})
    assert done.code == 0, done.err
    rows = metrics(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # loss falls
    vals = [r for r in rows if "val/dice_membrane" in r]
    assert [r["step"] for r in vals] == [30, 60]
    assert all(0.0 <= r["val/dice_membrane"] <= 1.0 and 0.5 < r["val/dice_neuron"] <= 1.0 for r in vals)
    assert {"train/images_per_s", "train/data_wait_frac", "train/lr"} <= set(rows[0])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "step-000000030.pt", "step-000000060.pt"]
    state = checkpoint.load(run / "checkpoints" / "step-000000060.pt")
    assert state["step"] == 60 and state["config"]["train"]["steps"] == 60
    assert (run / "config.yaml").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 60 and status["checkpoint"].endswith("060.pt")
    final = json.loads(done.out.strip().splitlines()[-1])
    assert final["step"] == 60 and "val/dice_membrane" in final
    # Without --resume, an existing run is never silently overwritten.
    again = run_cli("train", "--config", SMOKE, f"data.store={em_store}", f"run.dir={run}")
    assert again.code == 2 and "--resume auto" in again.err and "Traceback" not in again.err


@pytest.mark.slow
def test_two_ranks_torchrun_stay_in_sync(em_store, tmp_path, free_port):
    run = tmp_path / "run"
    proc = subprocess.run(torchrun_cmd(2, free_port, "train", "--config", SMOKE, f"data.store={em_store}",
                                       f"run.dir={run}", "train.steps=40", "data.num_workers=1",
                                       "train.accumulate=2"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run)
    vals = [r for r in rows if "val/dice_membrane" in r]
    assert [r["step"] for r in vals] == [20, 40]
    assert all(r["val/replica_spread"] == 0.0 for r in vals)  # replicas hold identical parameters
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert (run / "checkpoints" / "step-000000040.pt").is_file()
    assert "training 40 steps on 2 rank(s)" in proc.stdout
    # Validation counts are summed over ranks: one process on the final weights reports the same.
    from unet_dist.config import from_dict
    from unet_dist.runtime import autocast
    from unet_dist.model import build_model
    from unet_dist.train.validation import validate

    state = checkpoint.load(run / "checkpoints" / "step-000000040.pt")
    cfg = from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])  # saved from the unwrapped model: no "module." prefix
    cpu = torch.device("cpu")
    single, _ = validate(model, cfg, cpu, autocast(cpu, "fp32"), want_panel=False)
    for key in ("val/dice_neuron", "val/dice_membrane", "val/pixel_error"):
        assert single[key] == pytest.approx(vals[-1][key], abs=1e-9), key


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path.name} appeared: "
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.mark.slow
def test_exact_resume_after_kill_9(em_store, tmp_path):
    """2N steps straight == N steps, kill -9 of the whole process group, resume, N more: bit for bit."""
    n = 12
    common = ["--config", SMOKE, f"data.store={em_store}", f"train.steps={2 * n}", f"train.ckpt_every={n}",
              f"train.val_every={n}", "train.deterministic=true", "data.num_workers=1",
              "data.augment.elastic=true", "train.keep_last=5"]

    def torchrun(run, port, *extra, **popen):
        cmd = torchrun_cmd(2, port, "train", *common, f"run.dir={run}", *extra)
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, **popen)

    from helpers import pick_free_port as free_port

    straight = tmp_path / "straight"
    proc = torchrun(straight, free_port())
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    killed = tmp_path / "killed"
    proc = torchrun(killed, free_port(), "train.log_every=1")
    _wait_for(checkpoint.step_path(killed / "checkpoints", n), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank, worker and the torchrun agent at once
    proc.wait(timeout=60)
    # A torn newer checkpoint (as a kill during a write would leave without the atomic rename)
    # must be reported and skipped.
    checkpoint.step_path(killed / "checkpoints", 2 * n - 1).write_bytes(b"torn")
    proc = torchrun(killed, free_port(), "--resume", "auto")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed at step" in out and "skipping" in err

    a = params(checkpoint.step_path(straight / "checkpoints", 2 * n))
    b = params(checkpoint.step_path(killed / "checkpoints", 2 * n))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("wandb", ["disabled", "offline"])
def test_sigterm_checkpoints_and_exits_cleanly(em_store, tmp_path, wandb):
    """SIGTERM to the whole process group, as SLURM sends it: with W&B on, it also kills W&B's
    service process, and the checkpoint must still be written."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "unet_dist", "train", "--config", str(SMOKE), f"data.store={em_store}",
           f"run.dir={run}", "train.steps=100000", "train.ckpt_every=5", "train.val_every=100000",
           "data.num_workers=1", f"logging.wandb={wandb}"]
    env = {**ENV, "WANDB_MODE": wandb}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _wait_for(checkpoint.step_path(run / "checkpoints", 5), proc)
    deadline = time.monotonic() + 300
    while '"step": 10,' not in (run / "metrics.jsonl").read_text():  # steps past the last checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "training stopped early"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: the main process, loader workers, W&B service
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop signal received" in out and "Traceback" not in err
    state, path = checkpoint.load_latest(run / "checkpoints")
    assert state["step"] >= 5 and state["step"] < 100000
    stopped_at = int(out.split("checkpointing at step ")[1].split()[0])
    assert state["step"] == stopped_at >= 10  # the step where the signal was seen: a new checkpoint
    assert path.name == checkpoint.step_path(run / "checkpoints", stopped_at).name
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "status": "interrupted", "step": state["step"], "checkpoint": str(path)}
    resumed = run_cli("train", "--config", SMOKE, f"data.store={em_store}", f"run.dir={run}",
                      f"train.steps={state['step'] + 3}", "train.ckpt_every=5", "--resume", "auto")
    assert resumed.code == 0, resumed.err
    assert checkpoint.load_latest(run / "checkpoints")[0]["step"] == state["step"] + 3


def test_bad_inputs_fail_fast_with_one_line(em_store, synth_store, tmp_path, free_port):
    run = tmp_path / "run"
    missing = run_cli("train", "--config", SMOKE, f"data.store={tmp_path / 'nope.zarr'}", f"run.dir={run}")
    assert missing.code == 2 and "nope.zarr" in missing.err and missing.err.count("\n") == 1
    typo = run_cli("train", "--config", SMOKE, "train.stesp=3", f"run.dir={run}")
    assert typo.code == 2 and "train.stesp" in typo.err
    big = run_cli("train", "--config", SMOKE, f"data.store={em_store}", "data.patch_size=[1024,1024]",
                  f"run.dir={run}")
    assert big.code == 2 and "data.patch_size" in big.err
    odd = run_cli("train", "--config", SMOKE, f"data.store={em_store}", "data.patch_size=[66,66]",
                  f"run.dir={run}")
    assert odd.code == 2 and "patch" in odd.err.lower()
    slices = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", "data.train_slices=[0,8]", "data.val_slices=[10,40]",
                     f"run.dir={run}")
    assert slices.code == 2 and "data.val_slices" in slices.err
    assert not run.exists()  # nothing written for a mistake

    import zarr

    unlabelled = tmp_path / "raw_only.zarr"
    group = zarr.open_group(unlabelled, mode="w")
    group.create_array("0", shape=(4, 64, 64), chunks=(1, 64, 64), dtype="uint8")
    # Under torchrun every rank reports the same line and exits; nothing hangs in a collective.
    proc = subprocess.run(torchrun_cmd(2, free_port, "train", "--config", SMOKE, f"data.store={unlabelled}",
                                       f"run.dir={run}"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("no label image 'neuron_interior'") == 2
    proc = subprocess.run(torchrun_cmd(2, free_port, "train", "--config", SMOKE, f"data.store={em_store}",
                                       f"run.dir={run}", "train.sync_batchnorm=true"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("SyncBatchNorm runs on GPUs only") == 2
    assert not run.exists()


def test_wandb_offline_logs_and_resume_continues_run(synth_store, tmp_path):
    from wandb_records import history, of_type, run_ids

    run = tmp_path / "run"
    args = ["--config", SMOKE, f"data.store={synth_store}", f"run.dir={run}", "logging.wandb=offline",
            "logging.artifact_max_mb=0.1",
            "logging.images=true", "data.val_slices=[8,12]", "data.train_slices=[0,8]", "train.val_every=10",
            "train.ckpt_every=10"]
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None}
    first = run_cli("train", *args, "train.steps=10", env=env)
    assert first.code == 0, first.err
    assert "wandb sync --id" in first.out
    second = run_cli("train", *args, "train.steps=20", "--resume", "auto", env=env)
    assert second.code == 0, second.err
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one folder per start, as `wandb sync --id` expects
    ids = {rid for f in files for rid in run_ids(f)}
    assert len(ids) == 1 and ids == {checkpoint.load_latest(run / "checkpoints")[0]["wandb_run_id"]}
    rows = history(files[0]) + history(files[1])
    logged = set().union(*rows)
    assert {"train/loss", "train/lr", "train/images_per_s", "val/dice_membrane", "val/dice_neuron"} <= logged
    assert {"val/masks", "val/errors", "val/probability"} <= logged
    assert {r["_step"] for r in rows if "val/dice_membrane" in r} == {10, 20}
    # checkpoints of 0.4 MB over logging.artifact_max_mb=0.1 are not uploaded, and the run says so
    assert not of_type(files[0], "artifact") and "not uploaded as W&B artifacts" in first.out


@pytest.mark.slow
def test_wandb_offline_two_ranks_masks_summary_artifacts_console(synth_store, tmp_path, free_port):
    from wandb_records import history, of_type, summary

    run = tmp_path / "run"
    env = {**ENV, "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(torchrun_cmd(2, free_port, "train", "--config", SMOKE, f"data.store={synth_store}",
                                       f"run.dir={run}", "logging.wandb=offline", "logging.images=true",
                                       "data.val_slices=[8,12]", "data.train_slices=[0,8]", "train.steps=20",
                                       "train.val_every=10", "train.ckpt_every=10", "logging.tags=[smoke,ci]",
                                       "logging.group=g7"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (run / "wandb").glob("offline-run-*")  # rank 0 alone logs to W&B
    (file,) = folder.glob("run-*.wandb")
    (info,) = of_type(file, "run")
    assert list(info.tags) == ["smoke", "ci"] and info.run_group == "g7" and info.job_type == "train"

    masks = [row["val/masks"] for row in history(file) if "val/masks" in row]
    assert len(masks) == 2 and all(set(m["masks"]) == {"prediction", "ground_truth"} for m in masks)
    for m in masks:  # the mask files exist and hold the class ids of the labels
        for layer in m["masks"].values():
            assert (folder / "files" / layer["path"]).is_file()

    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = summary(file)
    assert final["val/dice_membrane"] == {"max": max(r["val/dice_membrane"] for r in jsonl if "val/dice_membrane" in r)}
    assert final["train/loss"] == {"min": min(r["train/loss"] for r in jsonl if "train/loss" in r)}

    artifacts = of_type(file, "artifact")
    assert [a.type for a in artifacts] == ["model", "model"] and artifacts[0].name == f"model-{info.run_id}"
    assert {"latest", "step-20"} <= set(artifacts[-1].aliases)
    assert any("best" in a.aliases for a in artifacts)
    console = "".join(line.line for line in of_type(file, "output_raw"))
    assert "training 20 steps on 2 rank(s)" in console


def test_model_command(cli):
    done = cli("model", CONFIGS / "isbi2012.yaml", "--patch", "572,572", "model.padding=valid", "model.norm=none")
    assert done.code == 0, done.err
    assert "572" in done.out and "388" in done.out
    bad = cli("model", CONFIGS / "isbi2012.yaml", "--patch", "100,100")
    assert bad.code == 2 and "100" in bad.err and bad.err.count("\n") == 1


def test_loss_options():
    from unet_dist.train.step import loss_fn

    logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
    label = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    good = loss_fn(logits, label, None, "bce")
    bad = loss_fn(-logits, label, None, "bce")
    assert good < 0.05 < bad
    assert loss_fn(logits, label, None, "bce_dice") > good  # dice term adds a small positive amount
    weight = torch.tensor([[[[1.0, 10.0], [1.0, 10.0]]]])
    assert loss_fn(-logits, label, weight, "bce") > bad  # membrane errors weigh more


def test_warmup_then_cosine():
    from unet_dist.config import TrainConfig
    from unet_dist.train.state import lr_factor

    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_options_bf16_weight_map_dice_channels_last(synth_store, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", "data.train_slices=[0,8]",
                   "data.val_slices=[8,12]", f"run.dir={run}", "train.steps=6", "train.val_every=6",
                   "train.precision=bf16", "train.weight_map=true", "train.loss=bce_dice",
                   "train.channels_last=true", "train.optimizer=adamw", "train.weight_decay=0.01",
                   "model.norm=group", "model.upsample=interp")
    assert done.code == 0, done.err
    assert "precision bf16" in done.out
    assert json.loads((run / "status.json").read_text())["step"] == 6
    state = checkpoint.load(checkpoint.step_path(run / "checkpoints", 6))
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group.get("decoupled_weight_decay", True)  # AdamW
    weights = state["model"]
    assert not any("running_mean" in k for k in weights)  # group norm keeps no running statistics
    assert all(w.ndim != 4 or w.shape[-1] != 2 or w.shape[-2] != 2 for w in weights.values())  # no 2x2 transposed convs
    convs = [w for w in weights.values() if w.ndim == 4 and w.shape[-1] == 3 and w.shape[1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)

    def first_loss(*options) -> float:
        other = tmp_path / "-".join(o.split(".")[-1] for o in options)
        again = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", "data.train_slices=[0,8]",
                        "data.val_slices=[8,12]", f"run.dir={other}", "train.steps=5", "train.val_every=5",
                        "train.precision=bf16", "train.channels_last=true", "train.optimizer=adamw",
                        "train.weight_decay=0.01", "model.norm=group", "model.upsample=interp", *options)
        assert again.code == 0, again.err
        return json.loads((other / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]

    both = first_loss("train.weight_map=true", "train.loss=bce_dice")
    assert both > first_loss("train.weight_map=false", "train.loss=bce_dice")  # the weight map weighs in
    assert both > first_loss("train.weight_map=true", "train.loss=bce")  # and so does the Dice term


@pytest.mark.slow
def test_nonfinite_loss_stops_with_clear_error(synth_store, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", "data.train_slices=[0,8]",
                   "data.val_slices=[8,12]", f"run.dir={run}", "train.steps=50", "train.lr=1e30",
                   "train.warmup_steps=0", "train.grad_clip=0", "train.ckpt_every=1", "train.max_nonfinite_steps=3",
                   "model.norm=none")
    assert done.code == 3, done.err
    assert "non-finite for 3 consecutive steps" in done.err and "Traceback" not in done.err
    for path in (run / "checkpoints").glob("step-*.pt"):  # what was kept holds finite weights
        assert all(torch.isfinite(t).all() for t in checkpoint.load(path)["model"].values())


@pytest.mark.slow
def test_torch_compile_option(synth_store, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", "data.train_slices=[0,8]",
                   "data.val_slices=[8,12]", f"run.dir={run}", "train.steps=3", "train.val_every=3",
                   "train.compile=true")
    assert done.code == 0, done.err[-2000:]
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ GPU-path decisions, on the CPU

def test_fp16_resume_from_a_bf16_or_fp32_checkpoint_starts_a_fresh_loss_scale():
    from unet_dist.train.state import restore_scaler

    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    note = restore_scaler(fp16, {})  # what a disabled (bf16/fp32) scaler saved: GradScaler would raise
    assert "fresh loss scale" in note and "\n" not in note
    assert fp16.get_scale() == 65536.0
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0).state_dict()
    assert restore_scaler(torch.amp.GradScaler("cpu", enabled=True), saved) is None
    resumed = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(resumed, saved)
    assert resumed.get_scale() == 128.0
    assert restore_scaler(torch.amp.GradScaler("cpu", enabled=False), saved) is None  # fp16 -> bf16


def test_deterministic_without_cuda_kernels_is_refused_on_cuda_only():
    from unet_dist.config import load_config
    from unet_dist.train.loop import deterministic_problem

    cfg = load_config(SMOKE, ["train.deterministic=true", "model.upsample=interp"])
    problem = deterministic_problem(cfg, "cuda")
    assert "train.deterministic" in problem and "model.upsample=interp" in problem and "\n" not in problem
    assert deterministic_problem(cfg, "cpu") is None
    assert deterministic_problem(load_config(SMOKE, ["train.deterministic=true"]), "cuda") is None
    assert deterministic_problem(load_config(SMOKE, ["model.upsample=interp"]), "cuda") is None
    three_d = load_config(SMOKE, ["train.deterministic=true", "model.dims=3", "data.patch_size=[8,64,64]"])
    assert "model.dims=3" in deterministic_problem(three_d, "cuda") and deterministic_problem(three_d, "cpu") is None


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_is_skipped_without_reading_the_flag_on_the_host(fused):
    """Fused Adam (the GPU optimizer; also built on the CPU here) takes the decision on the device via
    found_inf, as GradScaler drives it; the plain one reads the flag."""
    from unet_dist.compat.torch_amp import step_if_finite

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == fused
    model(torch.randn(3, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    step_if_finite(optimizer, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())  # Adam's step count not advanced
    assert not hasattr(optimizer, "found_inf")
    step_if_finite(optimizer, torch.tensor(True))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_health_counts_consecutive_non_finite_steps_on_the_device():
    from unet_dist.train.step import Health, TrainingDiverged

    health = Health(torch.device("cpu"), limit=3, precision="bf16")
    for flag in (False, False, True, False, False):
        health.update(torch.tensor(flag))
    assert health.check(5) == 4  # a run of 2, then 2 again: no divergence
    health.update(torch.tensor(False))
    health.last_checkpoint = "ckpt.pt"
    with pytest.raises(TrainingDiverged, match="non-finite for 3 consecutive steps.*ckpt.pt.*precision=fp32"):
        health.check(6)


# ------------------------------------------------------------------ validation through the tiles

def _random_run(tmp_path: Path, overrides: list[str]):
    from unet_dist.config import load_config, to_dict
    from unet_dist.model import build_model

    cfg = load_config(SMOKE, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    ckpt = checkpoint.save(tmp_path / "ckpt", {"model": model.state_dict(), "model_config": to_dict(cfg.model),
                                               "step": 0, "config": to_dict(cfg)}, keep_last=1)
    return cfg, model.eval(), ckpt


@pytest.mark.parametrize("overrides", [
    ["predict.block_size=[1,64,64]", "predict.batch_size=3"],  # 2D: 4 blocks per 128^2 slice
    ["model.dims=3", "data.patch_size=[8,32,32]", "model.base_channels=4", "predict.block_size=[4,64,64]",
     "predict.halo=[2,8,8]", "predict.batch_size=1"],  # 3D: the validation band in 2 x 2 x 2 blocks
])
def test_validation_goes_through_the_predictor_tiling_and_agrees_with_it(overrides, synth_store, tmp_path):
    """Validation reads blocks with their context, as the predictor does, so it never puts a whole
    slice or 3D band through the network at once, and its scores are the predictor's."""
    from unet_dist.runtime import autocast
    from unet_dist.predict.pipeline import predict
    from unet_dist.train.validation import validate

    cfg, model, ckpt = _random_run(tmp_path, [f"data.store={synth_store}", "data.train_slices=[0,4]",
                                              "data.val_slices=[4,12]", *overrides])
    cpu = torch.device("cpu")
    scores, panel = validate(model, cfg, cpu, autocast(cpu, "fp32"), want_panel=True)
    raw, label, prob, valid = panel  # of the first block, not a whole slice
    assert valid is None  # the store marks no voxel unlabelled
    assert raw.shape == label.shape == prob.shape == (64, 64)
    result = predict(ckpt, synth_store, tmp_path / "pred.zarr", labels=synth_store, slices=(4, 12), device="cpu",
                     precision="fp32")
    for key in ("dice_neuron", "dice_membrane", "pixel_error"):
        assert scores[f"val/{key}"] == pytest.approx(result[key], abs=2e-3), key


def test_loader_workers_end_with_training(synth_store, tmp_path):
    """The workers ignore stop signals, so nothing at interpreter exit can end them: training shuts
    them down itself (once, under torchrun, a finished rank waited forever for its worker)."""
    import gc
    import multiprocessing

    from unet_dist.config import load_config
    from unet_dist.train.loop import train

    cfg = load_config(SMOKE, [f"data.store={synth_store}", "data.train_slices=[0,8]", "data.val_slices=[8,12]",
                              f"run.dir={tmp_path / 'run'}", "train.steps=2", "train.val_every=2",
                              "data.num_workers=1", "logging.wandb=disabled"])
    before = set(multiprocessing.active_children())
    gc.disable()  # as at interpreter exit: whatever a reference cycle holds is still alive
    try:
        assert train(cfg).status == "completed"
        left = [p for p in multiprocessing.active_children() if p not in before]
        for p in left:
            p.kill()  # they ignore SIGTERM: without this, pytest itself would hang at exit
        assert left == []  # no worker left running
    finally:
        gc.enable()
