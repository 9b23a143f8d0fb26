"""`report`: the slice grid and the training curves as PNGs, drawn with Pillow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from unet_dist.cli import main
from unet_dist.config import Config, ModelConfig, PredictConfig, dump_yaml
from unet_dist.errors import UserError
from unet_dist.visualize.report import (INVENTED, MISSED, error_panel, format_tick, line_chart, nice_ticks, read_metrics,
                              report)

from helpers import fake_prediction, save_checkpoint


def colours(img: Image.Image) -> set[tuple[int, int, int]]:
    return set(map(tuple, np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()))


def make_run(run: Path, store: Path, val=(2, 5), metrics: bool = True) -> Path:
    run.mkdir(parents=True)
    cfg = Config(model=ModelConfig(depth=2, base_channels=8))
    cfg.data.store, cfg.data.val_slices = str(store), list(val)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    if metrics:
        lines = []
        for step in range(5, 105, 5):
            lines.append({"step": step, "train/loss": 0.7 * math.exp(-step / 40) + 0.2, "train/lr": 1e-3 * (1 - step / 120)})
            if step % 25 == 0:
                lines.append({"step": step, "val/dice_membrane": 0.5 + step / 400, "val/dice_neuron": 0.8 + step / 1000})
        lines.append({"step": 50, "train/loss": 0.123})  # a resumed run logs step 50 again: this one wins
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 10')
    return run


def test_error_panel_colours():
    raw = np.zeros((2, 3), np.float32)
    label = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
    mask = np.array([[1, 1, 0], [0, 1, 0]], np.uint8)
    rgb = error_panel(raw, label, mask)
    assert tuple(rgb[0, 1]) == MISSED and tuple(rgb[0, 2]) == INVENTED  # merge and split errors
    assert len({tuple(rgb[0, 0]), tuple(rgb[1, 0]), tuple(rgb[1, 1])}) == 1  # correct pixels: gray


def test_error_panel_leaves_unlabelled_voxels_uncounted():
    raw = np.zeros((2, 3), np.float32)
    label = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
    mask = np.array([[1, 1, 0], [0, 1, 0]], np.uint8)
    valid = np.array([[True, False, True], [False, True, True]])
    rgb = error_panel(raw, label, mask, valid)
    assert tuple(rgb[0, 2]) == INVENTED  # a labelled error stays an error
    assert tuple(rgb[0, 1]) not in (MISSED, INVENTED)  # the same error where unlabelled is not one
    assert tuple(rgb[0, 1]) == tuple(rgb[1, 0]) != tuple(rgb[1, 1])  # unlabelled: tinted alike, not grey
    np.testing.assert_array_equal(error_panel(raw, label, mask, np.ones((2, 3), bool)), error_panel(raw, label, mask))


def test_ticks_are_round_and_cover_the_range():
    for lo, hi in ((0.0, 1.0), (0.213, 0.871), (3.0, 2017.0), (1e-5, 3e-3), (-2.5, 7.0)):
        ticks = nice_ticks(lo, hi)
        assert 3 <= len(ticks) <= 11 and ticks[0] >= lo - 1e-12 and ticks[-1] <= hi + 1e-12
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 5, 10))
    assert format_tick(0.25, [0.0, 0.25, 0.5]) == "0.25" and format_tick(2e-3, [1e-3, 2e-3]) == "2.0e-3"
    assert nice_ticks(1.0, 1.0) == [1.0]


def test_metrics_later_lines_win_and_torn_lines_are_skipped(tmp_path, synth_store):
    run = make_run(tmp_path / "run", synth_store)
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[50]["train/loss"] == 0.123 and rows[50]["val/dice_membrane"] == 0.625
    assert list(rows) == sorted(rows) and len(rows) == 20
    chart = line_chart("t", [("a", [1, 2, 3], [0.1, 0.5, 0.2]), ("empty", [], [])], "y")
    assert chart.size == (720, 360)


def test_report_from_the_runs_checkpoint(tmp_path, synth_store):
    run = make_run(tmp_path / "run", synth_store)
    save_checkpoint(run / "checkpoints", ModelConfig(depth=2, base_channels=8))
    written = report(run)
    assert [p.name for p in written] == ["slices.png", "curves.png"]
    grid = Image.open(run / "report" / "slices.png")
    assert grid.width > 4 * 128 and grid.height > 3 * 128  # 4 columns, val_slices 2:5 -> 3 rows
    curves = Image.open(run / "report" / "curves.png")
    assert curves.size == (720, 3 * 360)
    # the curves are drawn in colour, not just axes
    assert len(colours(curves)) > 20


@pytest.mark.parametrize("model_cfg, block, slices", [
    (ModelConfig(depth=2, base_channels=8), [1, 48, 48], (2, 6)),
    (ModelConfig(dims=3, depth=1, base_channels=4), [4, 32, 32], (2, 10)),
], ids=["2d", "3d"])
def test_report_predicts_what_predict_writes_block_by_block(tmp_path, synth_store, model_cfg, block, slices):
    """The checkpoint's slices in the report are the predictor's output (to its uint8 rounding), and
    the network never sees more than one block's tile: memory does not grow with the slice."""
    from unet_dist.data.store import RAW
    from unet_dist.predict.pipeline import predict
    from unet_dist.predict.prediction_store import PROBABILITY, probability_float
    from unet_dist.visualize.report import rows_from_checkpoint
    from unet_dist.predict.block_plan import make_plan

    ckpt = save_checkpoint(tmp_path / "ck", model_cfg, seed=3, predict_cfg=PredictConfig(block_size=block))
    predict(ckpt, synth_store, tmp_path / "pred.zarr", slices=slices)
    stored = probability_float(zarr.open_group(str(tmp_path / "pred.zarr"))[PROBABILITY][:])
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[2:]) if args and args[0].shape[1] == 1 else None)
    try:
        raw = zarr.open_group(str(synth_store))[RAW]
        zs = [slices[0], slices[0] + 1, slices[1] - 1]
        rows = rows_from_checkpoint(ckpt, raw, *slices, zs, 0.5)
    finally:
        hook.remove()
    assert [row["z"] for row in rows] == zs
    for row in rows:
        assert np.abs(row["prob"] - stored[row["z"] - slices[0]]).max() <= 0.5 / 255 + 1e-4
    tile = make_plan(model_cfg, PredictConfig(block_size=block), raw.shape, slices).model_tile
    assert seen and {tuple(shape) for shape in seen} == {tile}  # a block and its halo, never the whole slice


def test_curves_of_several_volumes_add_a_chart_per_volume_dice(tmp_path):
    from unet_dist.visualize.report import COLORS, curves, volume_names

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 10, "train/loss": 0.5}]
    for step in (10, 20, 30):
        lines.append({"step": step, "val/dice_membrane": 0.5, "val/dice_neuron": 0.8,
                      "val/cremi_A/dice_membrane": 0.4 + step / 100, "val/cremi_B/dice_membrane": 0.6,
                      "val/cremi_A/pixel_error": 0.1})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    rows = read_metrics(run / "metrics.jsonl")
    assert volume_names(rows) == ["cremi_A", "cremi_B"]
    picture = curves(rows)
    assert picture.size == (720, 4 * 360)  # loss, learning rate, Dice, and Dice by volume
    last = picture.crop((0, 3 * 360, 720, 4 * 360))
    assert {COLORS[0], COLORS[1], COLORS[2]} <= colours(last)  # pooled, A and B drawn
    assert volume_names(read_metrics(make_run(tmp_path / "one", tmp_path) / "metrics.jsonl")) == []


def test_report_from_a_prediction_store_and_cli(tmp_path, synth_store, capsys):
    labels = zarr.open_group(str(synth_store), mode="r")["labels/neuron_interior/0"][:]
    pred = tmp_path / "pred.zarr"
    fake_prediction(pred, labels[3:11], first=3)
    run = make_run(tmp_path / "run", synth_store, metrics=False)
    assert main(["report", str(run), "--pred", str(pred), "--slices", "4:10", "--max-rows", "3",
                 "--panel", "64"]) == 0
    assert capsys.readouterr().out.split() == [str(run / "report" / "slices.png")]
    grid = Image.open(run / "report" / "slices.png")
    assert grid.height < 3 * (64 + 10) + 120  # 3 rows of 64 px panels
    # red (missed membrane) and blue (invented membrane) pixels are where the errors are
    pixels = colours(grid)
    assert MISSED in pixels and INVENTED in pixels
    assert main(["report", str(run), "--pred", str(pred), "--slices", "0:5"]) == 2
    assert "holds slices 3:11" in capsys.readouterr().err


def test_curves_only_and_nothing_to_draw(tmp_path, synth_store):
    run = tmp_path / "bare"
    run.mkdir()
    with pytest.raises(UserError, match="nothing to draw"):
        report(run)
    with pytest.raises(UserError, match="not a run directory"):
        report(tmp_path / "missing")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 0.5}) + "\n")
    assert [p.name for p in report(run)] == ["curves.png"]
