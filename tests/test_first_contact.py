"""What a new user meets first: stores from other tools train as they are, the config's own W&B
setting is honoured, and an override's mistake names the command line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from unet_dist.data import store as st

from helpers import SMOKE, fake_prediction, run_cli


def test_another_tools_v3_store_with_a_root_array_named_raw_trains_as_it_is(tiny_synth_store, tmp_path):
    source = zarr.open_group(str(tiny_synth_store), mode="r")
    foreign = tmp_path / "foreign.zarr"
    group = zarr.open_group(str(foreign), mode="w", zarr_format=3)  # no OME, no unet_dist provenance
    group.create_array("raw", data=np.asarray(source[st.RAW][:]), chunks=(1, 96, 128))
    group.create_group("masks").create_array("membranes", data=np.asarray(source[st.TARGET_PATH][:]),
                                             chunks=(1, 96, 128))
    done = run_cli("train", "--config", SMOKE, f"data.store={foreign}", "data.raw_array=raw",
                   "data.labels=masks/membranes", "data.train_slices=[0,6]", "data.val_slices=[6,8]",
                   f"run.dir={tmp_path / 'run'}", "train.steps=2", "train.val_every=2", "train.ckpt_every=2",
                   "data.num_workers=0")
    assert done.code == 0, done.err[-2000:]
    assert "first unet-dist layout" not in done.err
    assert (tmp_path / "run" / "checkpoints" / "step-000000002.pt").is_file()


@pytest.mark.parametrize("args", [
    ["convert", "--raw", "x.tif", "--out", "o.zarr", "--resolution", "50,4,4", "--boundary-width", "wide"],
    ["convert", "--raw", "x.tif", "--out", "o.zarr", "--label-threshold", "half"],
    ["convert", "--raw", "x.tif", "--out", "o.zarr", "--ignore-id", "none"],
    ["synth", "--out", "o.zarr", "--seed", "s"],
    ["report", "run", "--max-rows", "many"],
    ["view", "s.zarr", "--port", "abc"],
    ["view", "s.zarr", "--timeout", "soon"],
    ["cv", "--config", "c.yaml", "--folds", "five"],
    ["predict", "--checkpoint", "c.pt"],  # required options missing
])
def test_a_bad_option_value_is_one_line_and_exit_2(args, tmp_path):
    done = run_cli(*args, cwd=tmp_path)
    assert done.code == 2
    assert done.err.count("\n") == 1 and done.err.startswith(f"error: unet-dist {args[0]}: "), done.err
    assert f"(see unet-dist {args[0]} --help)" in done.err and "usage:" not in done.err
    assert not list(tmp_path.iterdir())  # nothing written


def test_disabled_in_the_config_wins_over_wandb_mode_in_the_environment(tiny_synth_store, tmp_path):
    from unet_dist.monitor.training import resolve_wandb_mode

    assert resolve_wandb_mode("disabled", {"WANDB_MODE": "online"}) == "disabled"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "offline"}) == "offline"
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={tiny_synth_store}", "data.train_slices=[0,6]",
                   "data.val_slices=[6,8]", f"run.dir={run}", "train.steps=1", "data.num_workers=0",
                   "logging.wandb=disabled", env={"WANDB_MODE": "offline"})
    assert done.code == 0, done.err[-2000:]
    assert not (run / "wandb").exists() and "wandb" not in done.out.lower()


def test_a_bad_override_names_the_command_line_and_a_bad_file_value_the_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  val_slices: [5, 2]\n")
    from_file = run_cli("config", "show", config)
    assert from_file.code == 2 and from_file.err.startswith(f"error: {config}: data.val_slices:"), from_file.err
    config.write_text("data:\n  val_slices: [25, 30]\n")
    from_override = run_cli("config", "show", config, "data.train_slices=[9,3]")
    assert from_override.code == 2, from_override.err
    assert from_override.err.startswith("error: command line: data.train_slices:"), from_override.err


def test_resuming_another_models_checkpoint_names_the_file_and_the_keys_and_writes_nothing(tiny_synth_store,
                                                                                            tmp_path):
    common = ["train", "--config", SMOKE, f"data.store={tiny_synth_store}", "data.train_slices=[0,6]",
              "data.val_slices=[6,8]", "train.steps=1", "data.num_workers=0"]
    first = run_cli(*common, f"run.dir={tmp_path / 'first'}")
    assert first.code == 0, first.err[-2000:]
    ckpt = tmp_path / "first" / "checkpoints" / "step-000000001.pt"
    other = tmp_path / "other"
    done = run_cli(*common, f"run.dir={other}", "model.base_channels=3", "--resume", ckpt)
    assert done.code == 2 and done.err.count("\n") == 1, done.err
    assert done.err.startswith(f"error: {ckpt}: trained with another model config (model.base_channels: ")
    assert "3 now" in done.err
    assert not other.exists()  # no empty run directory or checkpoints/ left behind

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    import torch

    pickled = tmp_path / "objects.pt"
    torch.save({"a": SimpleNamespace()}, pickled)
    for path, why in ((not_a_checkpoint, "not a PyTorch file"), (pickled, "only an unsafe load would run")):
        done = run_cli(*common, f"run.dir={other}", "--resume", path)
        assert done.code == 2 and done.err.count("\n") == 1, done.err
        assert done.err.startswith(f"error: {path}: not a valid unet_dist checkpoint (") and why in done.err
        assert "weights_only" not in done.err and "Re-running" not in done.err
        assert not other.exists()


def every_option(parser, name="unet-dist"):
    """(command, option or argument, help text) for every argument of every subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from every_option(sub, f"{name} {sub_name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield name, "/".join(action.option_strings) or action.dest, action.help or ""


def test_every_option_has_help_without_the_first_layouts_words():
    from unet_dist.cli import build_parser

    options = list(every_option(build_parser()))
    assert len(options) > 60
    missing = [f"{command} {option}" for command, option, text in options if not text.strip()]
    assert not missing, f"options without help: {missing}"
    stale = [f"{command} {option}: {text}" for command, option, text in options
             if "'raw'" in text or "'labels'" in text or "raw array" in text]
    assert not stale, stale


def test_evaluate_and_export_show_progress_with_rate_and_eta(tiny_synth_store, tmp_path):
    labels = np.asarray(zarr.open_group(str(tiny_synth_store), mode="r")[st.TARGET_PATH][:])
    fake_prediction(tmp_path / "pred.zarr", labels)
    scored = run_cli("evaluate", "--pred", tmp_path / "pred.zarr", "--labels", tiny_synth_store)
    exported = run_cli("export", tmp_path / "pred.zarr", "--out", tmp_path / "p.tif")
    for done, label in ((scored, "evaluate"), (exported, "export")):
        assert done.code == 0, done.err
        lines = [line for line in done.err.splitlines() if line.startswith(f"{label}: ")]
        assert "slices/s" in lines[0] and "eta" in lines[0], done.err  # the first line: rate and ETA
        assert lines[-1].startswith(f"{label}: {len(labels)}/{len(labels)} slices") and "elapsed" in lines[-1]


def test_submitit_default_cpus_fit_what_the_local_executor_offers():
    from jobs.launch import resources
    from unet_dist.config import load_config
    from unet_dist.runtime import usable_cores

    req = resources(load_config(SMOKE), "local", gpus_per_node=0, tasks_per_node=2)
    assert req["cpus_per_task"] == max(1, min(8, usable_cores() // 2))



def test_report_from_a_checkpoint_shows_its_prediction_progress(tiny_synth_store, tmp_path):
    run = tmp_path / "run"
    trained = run_cli("train", "--config", SMOKE, f"data.store={tiny_synth_store}", "data.train_slices=[0,6]",
                      "data.val_slices=[6,8]", f"run.dir={run}", "train.steps=1", "data.num_workers=0")
    assert trained.code == 0, trained.err[-2000:]
    done = run_cli("report", run, "--store", tiny_synth_store)
    assert done.code == 0, done.err
    lines = [line for line in done.err.splitlines() if line.startswith("report: predict: ")]
    assert lines and "blocks/s" in lines[0] and "elapsed" in lines[-1], done.err
    assert (run / "report" / "slices.png").is_file()
