"""Progress lines of long work: rate and ETA, bars on terminals, sparse plain lines in logs."""

from __future__ import annotations

import io

from unet_dist.monitor.progress import Progress

from helpers import run_cli


def test_plain_lines_carry_rate_and_eta_and_stay_sparse():
    out = io.StringIO()
    progress = Progress("predict", 4, "blocks", unit_bytes=1_000_000, mode="plain", every_s=0, stream=out)
    for done in range(1, 5):
        progress.update(done)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("predict: 1/4 blocks")
    assert all(" blocks/s" in line and " MB/s" in line for line in lines)
    assert all("eta " in line for line in lines[:3]) and "elapsed " in lines[3]

    sparse = io.StringIO()
    progress = Progress("convert", 100, "slices", mode="plain", every_s=3600, stream=sparse)
    for done in range(1, 101):
        progress(done, 100)
    assert [line.split("  ")[0] for line in sparse.getvalue().splitlines()] == [
        "convert: 1/100 slices", "convert: 100/100 slices"]  # the first, then the last


def test_bar_redraws_in_place_and_ends_the_line():
    out = io.StringIO()
    progress = Progress("synth", 3, "slices", mode="bar", stream=out)
    for done in range(1, 4):
        progress.update(done)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[########################] synth: 3/3 slices" in text


def test_synth_on_the_command_line_reports_rate(tmp_path):
    done = run_cli("synth", "--out", tmp_path / "s.zarr", "--shape", "3,64,64")
    assert done.code == 0, done.err
    assert "synth: 3/3 slices" in done.err and "slices/s" in done.err and "elapsed" in done.err


def training_monitor(run_dir, progress: str):
    from unet_dist.config import Config
    from unet_dist.monitor.training import Monitor

    cfg = Config()
    cfg.train.steps, cfg.logging.wandb, cfg.logging.progress = 40, "disabled", progress
    return Monitor(run_dir, cfg, start_step=10)  # resumed at step 10: the rate counts steps from there


def test_training_lines_come_from_the_shared_display(tmp_path, capsys):
    monitor = training_monitor(tmp_path / "run", "plain")
    monitor.log(20, {"train/loss": 0.5, "train/lr": 1e-3, "train/not_shown": 3.0})
    monitor.log(25, {"val/dice_membrane": 0.75})
    monitor.message("checkpoint written")
    monitor.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step: 20/40 steps  ") and " steps/s  loss 0.5  lr 0.001  eta " in lines[0]
    assert "not_shown" not in lines[0]
    assert lines[1].startswith("step: 25/40 steps  ") and "dice_membrane 0.75" in lines[1]
    assert lines[2:] == ["checkpoint written"]


def test_training_bar_ends_its_line_before_validation_and_messages(tmp_path, capsys):
    monitor = training_monitor(tmp_path / "run", "bar")
    monitor.log(20, {"train/loss": 0.5})
    monitor.log(25, {"val/dice_membrane": 0.75})  # a result stays on screen: a line of its own
    monitor.log(30, {"train/loss": 0.25})
    monitor.message("checkpoint written")
    monitor.close()
    captured = capsys.readouterr()
    assert captured.err.startswith("\r[") and "] step: 20/40 steps" in captured.err
    err_lines = captured.err.split("\n")
    assert err_lines[1].startswith("step: 25/40 steps") and "dice_membrane 0.75" in err_lines[1]
    assert "] step: 30/40 steps" in err_lines[2] and err_lines[3:] == [""]  # the bar ended before the message
    assert captured.out == "checkpoint written\n"
