"""PNG pictures of a run, drawn with Pillow alone: a slice grid and the training curves.

* `slices.png`: one row per chosen slice, columns raw | label | prediction | errors. Errors are drawn
  over the dimmed raw image: red where membrane was missed (predicted interior on a membrane: these
  merge neurons), blue where membrane was invented (predicted membrane inside a neuron: splits).
  The prediction comes from a prediction store (`--pred`) or, by default, from the run's best (else
  newest) checkpoint, run block by block as `unet-dist predict` runs it.
* `curves.png`: training loss, learning rate and validation Dice against the step, from
  `metrics.jsonl` (a resumed run logs some steps twice: the later line wins).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unet_dist import rundir
from unet_dist.errors import UserError
from unet_dist.files import save_atomic
from unet_dist.visualize.overlay import INVENTED, MISSED, UNLABELLED_TINT, error_panel

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
WHITE, BLACK, GRID, TEXT = (255, 255, 255), (0, 0, 0), (225, 225, 225), (40, 40, 40)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


# ---------------------------------------------------------------------------------- slice grid

def _panel(image: np.ndarray, size: int, smooth: bool) -> Image.Image:
    if image.ndim == 2:
        image = np.clip(image, 0, 1) * 255 if image.dtype != np.uint8 else image
        img = Image.fromarray(image.astype(np.uint8), "L").convert("RGB")
    else:
        img = Image.fromarray(image, "RGB")
    scale = min(1.0, size / max(img.size))
    if scale < 1.0:
        target = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(target, Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST)
    return img


UNLABELLED_SWATCH = tuple(int(c) for c in (0.5 * UNLABELLED_TINT + 0.5 * 115))  # the tint over mid grey


def slice_grid(rows: list[dict], title: str, panel: int = 384) -> Image.Image:
    """rows: dicts with z, raw (float [0,1]), label (0/1), prob (float [0,1]), mask (0/1) and, when the
    store marks unlabelled voxels, valid (bool: labelled)."""
    from unet_dist.metrics import confusion_counts, scores_from_confusion

    font, small = _font(16), _font(13)
    columns = ("raw", "label", "prediction", "errors")
    images = []
    for row in rows:
        images.append([_panel(row["raw"], panel, True), _panel(row["label"].astype(np.float32), panel, False),
                       _panel(row["prob"], panel, True),
                       _panel(error_panel(row["raw"], row["label"], row["mask"], row.get("valid")), panel, False)])
    pw, ph = images[0][0].size
    gap, left, top, bottom = 6, 130, 56, 34
    width = left + len(columns) * (pw + gap)
    height = top + len(rows) * (ph + gap) + bottom
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), title, fill=TEXT, font=font)
    for c, name in enumerate(columns):
        draw.text((left + c * (pw + gap) + pw // 2, top - 8), name, fill=TEXT, font=font, anchor="ms")
    for r, (row, panels) in enumerate(zip(rows, images)):
        y = top + r * (ph + gap)
        scores = scores_from_confusion(confusion_counts(row["mask"], row["label"], valid=row.get("valid")))
        draw.text((gap, y + 4), f"slice {row['z']}", fill=TEXT, font=font)
        draw.text((gap, y + 26), f"Dice membrane\n  {scores['dice_membrane']:.3f}\npixel error\n"
                                 f"  {scores['pixel_error']:.3f}", fill=TEXT, font=small, spacing=3)
        for c, img in enumerate(panels):
            canvas.paste(img, (left + c * (pw + gap), y))
    y = height - bottom + 10
    x = left
    legend = [(MISSED, "missed membrane (merges)"), (INVENTED, "invented membrane (splits)")]
    if any("valid" in row for row in rows):
        legend.append((UNLABELLED_SWATCH, "unlabelled (not counted)"))
    for color, text in legend:
        draw.rectangle((x, y, x + 14, y + 14), fill=color)
        draw.text((x + 20, y + 1), text, fill=TEXT, font=small)
        x += 40 + int(draw.textlength(text, font=small))
    return canvas


# ------------------------------------------------------------------------------------- curves

def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 times a power of ten) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def format_tick(value: float, ticks: list[float]) -> str:
    span = max((abs(t) for t in ticks), default=0.0)
    if value == 0:
        return "0"
    if span < 1e-2 or span >= 1e5:
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value)
    decimals = next((d for d in range(10) if abs(round(step, d) - step) <= step * 1e-6), 10) if step else 0
    return f"{value:.{decimals}f}"


def line_chart(title: str, series: list[tuple[str, list, list]], ylabel: str, xlabel: str = "step",
               size: tuple[int, int] = (720, 360)) -> Image.Image:
    """A line chart with axes, ticks, grid, axis labels and a legend; series = (name, xs, ys)."""
    series = [(n, xs, ys) for n, xs, ys in series if len(xs)]
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    left, right, top, bottom = 78, 18, 52, 48
    x0, y0, x1, y1 = left, top, size[0] - right, size[1] - bottom
    draw.text((x0, 8), title, fill=TEXT, font=font)
    if not series:
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no data", fill=TEXT, font=font, anchor="mm")
        return img
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys]
    xlo, xhi = min(xs_all), max(xs_all)
    ylo, yhi = min(ys_all), max(ys_all)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    pad = (yhi - ylo) * 0.05 or (abs(yhi) * 0.1 or 1.0)
    ylo, yhi = ylo - pad, yhi + pad

    def px(x, y):
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    yticks, xticks = nice_ticks(ylo, yhi), nice_ticks(xlo, xhi, 6)
    for t in yticks:
        _, y = px(xlo, t)
        draw.line((x0, y, x1, y), fill=GRID)
        draw.line((x0 - 5, y, x0, y), fill=BLACK)
        draw.text((x0 - 8, y), format_tick(t, yticks), fill=TEXT, font=small, anchor="rm")
    for t in xticks:
        x, _ = px(t, ylo)
        draw.line((x, y0, x, y1), fill=GRID)
        draw.line((x, y1, x, y1 + 5), fill=BLACK)
        draw.text((x, y1 + 8), format_tick(t, xticks), fill=TEXT, font=small, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline=BLACK)
    draw.text(((x0 + x1) // 2, size[1] - 6), xlabel, fill=TEXT, font=small, anchor="mb")
    label = Image.new("RGB", (int(draw.textlength(ylabel, font=small)) + 4, 16), WHITE)
    ImageDraw.Draw(label).text((2, 1), ylabel, fill=TEXT, font=small)
    label = label.rotate(90, expand=True)
    img.paste(label, (6, (y0 + y1) // 2 - label.height // 2))
    for i, (name, xs, ys) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = [px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        if len(points) <= 60:
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    # legend: one row above the plot, right-aligned, so it never hides a curve
    x = x1
    for i, (name, _, _) in reversed(list(enumerate(series))):
        x -= int(draw.textlength(name, font=small)) + 30
        draw.line((x, top - 12, x + 20, top - 12), fill=COLORS[i % len(COLORS)], width=3)
        draw.text((x + 25, top - 12), name, fill=TEXT, font=small, anchor="lm")
        x -= 14
    return img


def read_metrics(path: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: merged values}; later lines win (a resumed run repeats steps)."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if isinstance(row, dict) and "step" in row:
            rows.setdefault(int(row["step"]), {}).update(row)
    return dict(sorted(rows.items()))


def _series(rows: dict[int, dict], key: str, name: str) -> tuple[str, list, list]:
    pts = [(s, float(r[key])) for s, r in rows.items()
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return name, [p[0] for p in pts], [p[1] for p in pts]


def volume_names(rows: dict[int, dict]) -> list[str]:
    """The volumes a run validated on one by one (`val/<name>/dice_membrane`), in order of appearance."""
    names: dict[str, None] = {}
    for row in rows.values():
        for key in row:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "val" and parts[2] == "dice_membrane":
                names[parts[1]] = None
    return list(names)


def curves(rows: dict[int, dict]) -> Image.Image:
    charts = [
        line_chart("loss", [_series(rows, "train/loss", "train"), _series(rows, "val/loss", "validation")], "loss"),
        line_chart("learning rate", [_series(rows, "train/lr", "lr")], "learning rate"),
        line_chart("validation Dice", [_series(rows, "val/dice_membrane", "membrane"),
                                       _series(rows, "val/dice_neuron", "neuron interior")], "Dice"),
    ]
    if volumes := volume_names(rows):  # several volumes (data.volumes): each one's membrane Dice
        charts.append(line_chart("membrane Dice by volume", [_series(rows, "val/dice_membrane", "pooled")]
                                 + [_series(rows, f"val/{name}/dice_membrane", name) for name in volumes], "Dice"))
    out = Image.new("RGB", (charts[0].width, sum(c.height for c in charts)), WHITE)
    for i, chart in enumerate(charts):
        out.paste(chart, (0, i * charts[0].height))
    return out


# ----------------------------------------------------------------------------- the command

def _rows_from_pred(pred, zs) -> list[dict]:
    from unet_dist.predict.prediction_store import MASK, PROBABILITY, open_prediction, probability_float

    group, z0 = open_prediction(pred)
    depth = group[PROBABILITY].shape[0]
    if zs[0] < z0 or zs[-1] >= z0 + depth:
        raise UserError(f"{pred}: holds slices {z0}:{z0 + depth}, not the requested {zs[0]}:{zs[-1] + 1}")
    return [{"z": z, "prob": probability_float(group[PROBABILITY][z - z0]),
             "mask": np.asarray(group[MASK][z - z0])} for z in zs]


def rows_from_checkpoint(ckpt: Path, raw, lo: int, hi: int, zs, threshold: float) -> list[dict]:
    """The checkpoint's prediction of slices `zs`, cut by the predictor's block plan over lo:hi and
    run as validation runs it (blocks that hold none of `zs` are skipped): the same numbers as
    `unet-dist predict`, and memory bounded by a block, not by the slice or the 3D range."""
    import torch

    from unet_dist.checkpoint import load_model
    from unet_dist.monitor.progress import Progress
    from unet_dist.predict.block_plan import block_core, make_plan
    from unet_dist.predict.infer import block_probability

    model, cfg, _ = load_model(ckpt)
    plan = make_plan(cfg.model, cfg.predict, raw.shape, (lo, hi))
    probs = {z: np.zeros(raw.shape[1:], np.float32) for z in zs}
    cores = {i: block_core(plan, i) for i in range(plan.n_blocks)}
    needed = [i for i, ((z0, z1), _, _) in cores.items() if any(z0 <= z - lo < z1 for z in zs)]
    progress = Progress("report: predict", len(needed), "blocks")
    for done, index in enumerate(needed, 1):
        (z0, z1), ys, xs = cores[index]
        prob, _ = block_probability(model, raw, plan, index, cfg.predict.batch_size, torch.device("cpu"),
                                    torch.autocast("cpu", enabled=False))
        for z in (z for z in zs if z0 <= z - lo < z1):
            probs[z][slice(*ys), slice(*xs)] = prob[z - lo - z0]
        progress.update(done)
    return [{"z": z, "prob": p, "mask": (p > threshold).astype(np.uint8)} for z, p in probs.items()]


def _checkpoint_of(run_dir: Path) -> Path | None:
    from unet_dist import checkpoint

    best = rundir.checkpoint_dir(run_dir) / rundir.BEST
    if best.is_file():
        return best
    steps = checkpoint.list_steps(run_dir / "checkpoints")
    return steps[-1] if steps else None


def _validated_volume(cfg):
    from unet_dist.data.training_set import volumes_of

    return next(v for v in volumes_of(cfg.data) if v.val_slices)


def report(run_dir, pred=None, store=None, slices=None, max_rows: int = 6, panel: int = 384) -> list[Path]:
    """Write RUN_DIR/report/{slices,curves}.png (what can be drawn); returns the files written."""
    from unet_dist.config import load_config
    from unet_dist.data.patches import to_unit_float
    from unet_dist.data.store import IGNORE, RAW, TARGET_PATH, open_store, slices_within
    from unet_dist.data.volumes import open_ignore

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    metrics = run_dir / rundir.METRICS
    shown = _validated_volume(cfg) if cfg else None  # the run's (first) validation volume
    store = store or (shown.store if shown else None)
    ckpt = None if pred else _checkpoint_of(run_dir)
    grid = bool(store and (pred or ckpt))
    if not grid and not metrics.is_file():
        raise UserError(f"{run_dir}: nothing to draw (no metrics.jsonl, and no prediction or checkpoint with a "
                        "store; pass --pred and --store)")
    if not grid:
        print(f"note: {run_dir}: no prediction or checkpoint (or no store) to draw slices from; curves only",
              file=sys.stderr)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    if grid:
        group = open_store(store, arrays=(RAW, TARGET_PATH))
        raw, labels = group[RAW], group[TARGET_PATH]
        ignore, _ = open_ignore(store, IGNORE, labels.shape)  # unlabelled voxels: no error, not counted
        lo, hi = slices_within(slices or (shown.val_slices if shown else None), raw.shape[0], str(store))
        zs = sorted({int(round(z)) for z in np.linspace(lo, hi - 1, min(max_rows, hi - lo))})
        if pred:
            rows, source = _rows_from_pred(pred, zs), f"prediction {Path(pred).name}"
        else:
            rows = rows_from_checkpoint(ckpt, raw, lo, hi, zs, cfg.predict.threshold if cfg else 0.5)
            source = f"checkpoint {ckpt.name}"
        for row in rows:
            row["raw"] = to_unit_float(np.asarray(raw[row["z"]]))
            row["label"] = np.asarray(labels[row["z"]])
            if ignore is not None:
                row["valid"] = np.asarray(ignore[row["z"]]) == 0
            if row["prob"].shape != row["raw"].shape:
                raise UserError(f"{pred}: slices of {row['prob'].shape} do not match {store}'s {row['raw'].shape}")
        path = out_dir / "slices.png"
        grid = slice_grid(rows, f"{run_dir.name}: {source} on {Path(store).name}, slices {lo}:{hi}", panel)
        save_atomic(path, grid.save)
        written.append(path)
    if metrics.is_file():
        path = out_dir / "curves.png"
        save_atomic(path, curves(read_metrics(metrics)).save)
        written.append(path)
    return written
