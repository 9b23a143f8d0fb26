"""Cross-validation over the labelled slices: train, predict and evaluate each fold, in-process.

Fold k of F over n labelled slices holds out the consecutive slices [k n / F, (k + 1) n / F). Its run
trains on every other slice (`data.train_slices=[0, n]`, `data.holdout_slices=[a, b]`: no patch
touches the held-out slices), validates on them (`data.val_slices=[a, b]`), and lives in
`RUN_DIR/fold-<k>/` (RUN_DIR = the config's `run.dir`). Its checkpoint (`best.pt` by default) then
predicts the held-out slices through the tiled predictor, and `evaluate` scores them: Dice of neuron
interior and of membrane, their mean, pixel error, V_rand and V_info. `--holdout A:B` runs one such
fold for a chosen range instead (e.g. the classic split: train 0-24, evaluate 25-29).

Besides the scores at the configured threshold, each fold records confusion counts over a grid of
thresholds. The "tuned" threshold of fold k is chosen on the OTHER folds' held-out predictions
(cross-fitted, so no fold is scored with a threshold picked on its own labels); with a single fold
there are no others and the tuned row is the oracle on the held-out slices themselves, marked so.
V_rand and V_info are already maxima over thresholds (as the challenge computes them).

`torchrun ... -m unet_dist cv` runs every fold on N ranks: cv joins one process group for all
folds, and the steps (`train`, `predict`, `evaluate`) meet in it at a barrier instead of joining
their own (a second join under torchrun fails: the agent's store keeps the first group's keys). Rank 0 writes `fold-<k>/cv-fold.json` as
each fold finishes and `RUN_DIR/cv.json` (per-fold metrics, mean and sample std over folds) at the end;
the summary covers every fold with a result on disk, so folds run separately (`--only K`) add up.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from unet_dist import checkpoint, dist, rundir
from unet_dist.config import Config, load_config, to_dict
from unet_dist.data.store import RAW, TARGET_PATH, open_store
from unet_dist.errors import UserError
from unet_dist.files import write_json_atomic
from unet_dist.train.signals import StopFlag

METRICS = ("dice_neuron", "dice_membrane", "dice_mean", "pixel_error", "v_rand", "v_info")
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
FOLD_FILE = "cv-fold.json"


# ------------------------------------------------------------------------------- folds (pure)

@dataclass(frozen=True)
class Fold:
    name: str  # fold-<k> or holdout-<a>-<b>: the run directory under RUN_DIR
    index: int
    slices: tuple[int, int]  # [start, stop) held out


def fold_slices(n: int, folds: int, k: int) -> tuple[int, int]:
    """Held-out slices [k n / F, (k + 1) n / F) of fold k: consecutive, disjoint, covering 0..n."""
    if not 2 <= folds <= n:
        raise UserError(f"--folds {folds}: expected 2 <= folds <= {n} (the labelled slices)")
    if not 0 <= k < folds:
        raise UserError(f"--only {k}: expected a fold in 0..{folds - 1}")
    return k * n // folds, (k + 1) * n // folds


def make_folds(n: int, folds: int, only: int | None = None, holdout: tuple[int, int] | None = None) -> list[Fold]:
    if holdout is not None:
        a, b = holdout
        if not 0 <= a < b <= n or (a, b) == (0, n):
            raise UserError(f"--holdout {a}:{b}: expected slices within 0:{n} that leave some for training")
        return [Fold(f"holdout-{a}-{b}", 0, (a, b))]
    ks = range(folds) if only is None else [only]
    return [Fold(f"fold-{k}", k, fold_slices(n, folds, k)) for k in ks]


def fold_config(cfg: Config, n: int, fold: Fold) -> Config:
    """The fold's config: trains on 0..n without the held-out slices, validates on them."""
    out = copy.deepcopy(cfg)
    a, b = fold.slices
    out.data.train_slices = [0, n]
    out.data.val_slices = [a, b]
    out.data.holdout_slices = [a, b]
    out.run.dir = str(Path(cfg.run.dir) / fold.name)
    if out.run.name:
        out.run.name = f"{out.run.name}-{fold.name}"
    # the folds of one cv are one W&B group, each fold a run of job type cv-fold
    out.logging.group = cfg.logging.group or f"cv-{Path(cfg.run.dir).name}"
    if out.logging.job_type == "train":
        out.logging.job_type = "cv-fold"
    return out


# ------------------------------------------------------------------------ threshold sweeps (pure)

def scores(counts) -> dict:
    """Dice of both classes, their mean and pixel error from (tp, fp, fn, tn) of the interior class."""
    from unet_dist.metrics import scores_from_confusion

    s = scores_from_confusion(counts)
    return {**s, "dice_mean": 0.5 * (s["dice_neuron"] + s["dice_membrane"])}


def sweep_counts(prob: np.ndarray, label: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """(len(thresholds), 4) confusion counts of `prob > t` against the labels, for each t."""
    from unet_dist.metrics import confusion_counts

    return np.stack([confusion_counts(prob, label, t) for t in thresholds])


def best_threshold(counts: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """The threshold whose pooled counts give the highest class-averaged Dice (ties: nearest 0.5)."""
    values = [scores(c)["dice_mean"] for c in counts]
    top = max(values)
    return min((t for t, v in zip(thresholds, values) if v >= top - 1e-12), key=lambda t: abs(t - 0.5))


def cross_fitted(sweeps: dict[str, np.ndarray], thresholds: Sequence[float] = THRESHOLDS) -> dict[str, dict]:
    """For each fold, the threshold chosen on the other folds' pooled counts and its scores there.
    With one fold, the oracle threshold chosen on that fold itself (flagged)."""
    out = {}
    for name, counts in sweeps.items():
        others = [c for other, c in sweeps.items() if other != name]
        pooled = np.sum(others, axis=0) if others else counts
        t = best_threshold(pooled, thresholds)
        out[name] = {"threshold": t, "chosen_on": "other folds" if others else "this fold (oracle)",
                     **scores(counts[list(thresholds).index(t)])}
    return out


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) over folds."""
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(len(arr))}


def summarize(results: list[dict], thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Per variant (plain / tta): mean and std of each metric over folds at the configured threshold
    and at the cross-fitted tuned threshold, plus the threshold that is best over all folds pooled."""
    summary = {}
    variants = sorted({v for r in results for v in r["variants"]})
    for variant in variants:
        rows = [r for r in results if variant in r["variants"]]
        if not rows:
            continue
        fixed = {m: mean_std([r["variants"][variant][m] for r in rows]) for m in METRICS}
        sweeps = {r["fold"]: np.asarray(r["variants"][variant]["sweep"]["counts"]) for r in rows}
        tuned_per_fold = cross_fitted(sweeps, thresholds)
        for r in rows:
            r["variants"][variant]["tuned"] = tuned_per_fold[r["fold"]]
        tuned = {m: mean_std([t[m] for t in tuned_per_fold.values()])
                 for m in ("dice_neuron", "dice_membrane", "dice_mean", "pixel_error")}
        pooled = np.sum(list(sweeps.values()), axis=0)
        summary[variant] = {
            "folds": [r["fold"] for r in rows],
            "threshold": rows[0]["variants"][variant]["threshold"],
            "at_threshold": fixed,
            "tuned": {**tuned, "thresholds": {k: v["threshold"] for k, v in tuned_per_fold.items()},
                      "chosen_on": "other folds" if len(rows) > 1 else "this fold (oracle)"},
            "threshold_all_folds": best_threshold(pooled, thresholds),
        }
    return summary


# ---------------------------------------------------------------------------------- the command

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _labelled_slices(store: str) -> int:
    group = open_store(store, arrays=(RAW, TARGET_PATH))
    return int(group[TARGET_PATH].shape[0])


def _pick_checkpoint(run_dir: Path, checkpoint_kind: str) -> Path:
    ckpt_dir = rundir.checkpoint_dir(run_dir)
    if checkpoint_kind == "best" and (ckpt_dir / rundir.BEST).is_file():
        return ckpt_dir / rundir.BEST
    steps = checkpoint.list_steps(ckpt_dir)
    if not steps:
        raise UserError(f"{ckpt_dir}: no checkpoint to predict with")
    return steps[-1]


# Keys that do not change what a finished fold computed: a rerun with --resume auto may differ in them.
_RERUN_MAY_DIFFER = {"train.val_every", "train.ckpt_every", "train.log_every", "train.keep_last", "train.dist_timeout_s",
               "data.num_workers", "data.prefetch_factor", "data.start_method"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_fold(run_dir: Path, fcfg: Config) -> None:
    """A fold's run directory may be continued only by the same data, model and training settings
    (a different --folds, store or recipe would silently reuse the wrong model)."""
    import yaml

    path = run_dir / rundir.CONFIG
    if not path.is_file():
        return
    try:
        old = _flatten({k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items()
                        if k in ("data", "model", "train")})
    except (OSError, yaml.YAMLError, AttributeError):
        raise UserError(f"{path}: unreadable; remove {run_dir} or choose another run.dir") from None
    new = _flatten({k: v for k, v in to_dict(fcfg).items() if k in ("data", "model", "train")})
    differ = sorted(k for k in set(old) | set(new) if k not in _RERUN_MAY_DIFFER and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ[:4])
        raise UserError(f"{run_dir}: holds a run with other settings: {shown}"
                        f"{' ...' if len(differ) > 4 else ''}; use another run.dir")


def _log(message: str) -> None:
    if dist.detect_env().is_main:
        print(f"cv: {message}", file=sys.stderr, flush=True)


def run_fold(cfg: Config, n: int, fold: Fold, resume: str, tta: bool, checkpoint_kind: str, stop: StopFlag) -> str:
    """Train (unless finished), predict the held-out slices, evaluate; rank 0 writes the fold's result.
    Returns "done", or "stopped" when a stop signal interrupted it (run again with --resume auto)."""
    from unet_dist.train.loop import train

    fcfg = fold_config(cfg, n, fold)
    run_dir = Path(fcfg.run.dir)
    variants = ["plain", "tta"] if tta else ["plain"]
    if resume == "auto":
        check_same_fold(run_dir, fcfg)
    previous = _read_json(run_dir / FOLD_FILE) if resume == "auto" else None
    status = rundir.read_status(run_dir) or {}
    finished = resume == "auto" and status.get("status") == "completed"
    if previous and finished and set(variants) <= set(previous.get("variants", {})) \
            and previous.get("checkpoint_kind") == checkpoint_kind:
        _log(f"{fold.name}: finished earlier, result kept ({run_dir / FOLD_FILE})")
        return "done"

    a, b = fold.slices
    train_s = previous.get("train_s") if previous else None
    if finished:
        _log(f"{fold.name}: training finished earlier (status.json), not retrained")
    else:
        _log(f"{fold.name}: training on slices 0:{n} without {a}:{b}, validating on {a}:{b} -> {run_dir}")
        t0 = time.perf_counter()
        result = train(fcfg, resume=resume)
        stop.arm()
        train_s = round(time.perf_counter() - t0, 1)
        if result.status != "completed":
            _log(f"{fold.name}: training stopped at step {result.step} (checkpointed)")
            return "stopped"
        status = rundir.read_status(run_dir) or {}

    ckpt = _pick_checkpoint(run_dir, checkpoint_kind)
    store = fcfg.data.store
    out = {"fold": fold.name, "index": fold.index, "slices": [a, b], "run_dir": str(run_dir),
           "checkpoint": str(ckpt), "checkpoint_kind": checkpoint_kind, "train_s": train_s,
           "train_steps": status.get("step"), "world_size": dist.detect_env().world_size, "variants": {}}
    for variant in variants:
        if stop.raised:
            return "stopped"
        scored = _predict_and_score(fold, run_dir, ckpt, store, variant)
        if scored is not None:  # ranks other than 0 have nothing to record
            out["checkpoint_step"], out["variants"][variant] = scored
    if dist.detect_env().is_main:
        write_json_atomic(run_dir / FOLD_FILE, out)
    return "done"


def _predict_and_score(fold: Fold, run_dir: Path, ckpt: Path, store, variant: str) -> tuple | None:
    """Predict the fold's held-out slices with `ckpt` (8-fold TTA for the "tta" variant) and evaluate:
    (the checkpoint's step, the variant's metrics and threshold sweep) on rank 0, None on the others."""
    from unet_dist.evaluate.scoring import evaluate
    from unet_dist.predict.prediction_store import PROBABILITY, open_prediction, probability_float
    from unet_dist.predict.pipeline import predict

    a, b = fold.slices
    pred_path = run_dir / ("pred-tta.zarr" if variant == "tta" else "pred.zarr")
    tta_on = variant == "tta"
    _log(f"{fold.name}: predicting slices {a}:{b} with {ckpt.name}" + (" and 8-fold TTA" if tta_on else ""))
    t0 = time.perf_counter()
    predict(ckpt, store, pred_path, labels=store, slices=(a, b), overrides=[f"predict.tta={str(tta_on).lower()}"],
            overwrite=True)
    predict_s = round(time.perf_counter() - t0, 1)
    metrics = evaluate(pred_path, store, slices=(a, b))
    if metrics is None:
        return None
    group, z0 = open_prediction(pred_path, arrays=(PROBABILITY,))
    made = group.attrs.get("unet_dist", {}).get("predict", {})
    labels = open_store(store, arrays=(TARGET_PATH,))[TARGET_PATH]
    counts = sum(sweep_counts(probability_float(group[PROBABILITY][z - z0]), np.asarray(labels[z]))
                 for z in range(a, b))
    return made.get("checkpoint_step"), {
        **{k: metrics[k] for k in ("dice_neuron", "dice_membrane", "pixel_error", "v_rand", "v_info",
                                   "v_rand_threshold", "v_info_threshold")},
        "dice_mean": 0.5 * (metrics["dice_neuron"] + metrics["dice_membrane"]),
        "threshold": made.get("settings", {}).get("threshold"), "predict_s": predict_s, "pred": str(pred_path),
        "sweep": {"thresholds": list(THRESHOLDS), "counts": counts.tolist()},
    }


def collect(run_root: Path, names: Sequence[str]) -> list[dict]:
    """The fold results on disk under run_root, in fold order (only folds of this layout)."""
    found = []
    for name in names:
        r = _read_json(run_root / name / FOLD_FILE)
        if r is not None:
            found.append(r)
    return found


def cv(config: str, overrides: Sequence[str] = (), folds: int = 5, only: int | None = None,
       holdout: tuple[int, int] | None = None, resume: str = "never", tta: bool = False,
       checkpoint_kind: str = "best") -> dict | None:
    """Run the folds; rank 0 writes RUN_DIR/cv.json and returns it (other ranks return None)."""

    if resume not in ("never", "auto"):
        raise UserError(f"--resume {resume}: expected never or auto")
    if checkpoint_kind not in ("best", "last"):
        raise UserError(f"--checkpoint {checkpoint_kind}: expected best or last")
    cfg = load_config(config, overrides)
    if cfg.data.volumes:
        raise UserError("cv: folds are consecutive slices of one store (data.store); unset data.volumes "
                        "(or run cv on each volume)")
    n = _labelled_slices(cfg.data.store)
    todo = make_folds(n, folds, only, holdout)
    all_names = [f.name for f in (todo if holdout else make_folds(n, folds))]
    root = Path(cfg.run.dir)
    env = dist.detect_env()
    main = env.is_main
    started = time.perf_counter()
    # Stop signals that arrive between training runs, when no trainer listens: the fold in progress
    # finishes its current step, then cv stops (exit 0) so that a requeued job continues with
    # --resume auto. train() installs its own handlers while it runs; `arm()` puts these back after.
    stop = StopFlag()
    # One process group for every fold's train, predict and evaluate (they would each join their own).
    device = dist.choose_device(cfg.train.device, env.local_rank, env.local_world_size)
    with dist.process_group(env, device, cfg.train.dist_timeout_s):
        for fold in todo:
            if stop.raised or run_fold(cfg, n, fold, resume, tta, checkpoint_kind, stop) == "stopped":
                _log(f"stop signal received: stopped at {fold.name}; run again with --resume auto to continue")
                break
    if not main:
        return None
    results = collect(root, all_names)
    report = {
        "config": str(config), "overrides": list(overrides), "store": cfg.data.store, "labelled_slices": n,
        "folds": len(all_names), "layout": "holdout" if holdout else f"{folds} folds of consecutive slices",
        "checkpoint": checkpoint_kind, "tta": tta, "seconds_this_call": round(time.perf_counter() - started, 1),
        "resolved_config": to_dict(cfg), "fold_results": results, "summary": summarize(results),
    }
    write_json_atomic(root / "cv.json", report)
    print(format_table(report), flush=True)
    return report


def format_table(report: dict) -> str:
    """Per-fold rows and mean +- std, per variant, at the configured threshold and tuned."""
    head = f"{'fold':<16}{'slices':>8}  " + "".join(f"{m:>14}" for m in METRICS) + f"{'train_s':>9}"
    lines = [f"cv: {report['layout']}, {report['labelled_slices']} labelled slices, checkpoint {report['checkpoint']}"]
    for variant, summ in report["summary"].items():
        lines += ["", f"[{variant}] threshold {summ['threshold']}", head]
        for r in report["fold_results"]:
            v = r["variants"].get(variant)
            if v is None:
                continue
            a, b = r["slices"]
            lines.append(f"{r['fold']:<16}{f'{a}:{b}':>8}  " + "".join(f"{v[m]:>14.4f}" for m in METRICS)
                         + f"{(r.get('train_s') or float('nan')):>9.0f}")
        at = summ["at_threshold"]
        lines.append(f"{'mean':<16}{'':>8}  " + "".join(f"{at[m]['mean']:>14.4f}" for m in METRICS))
        lines.append(f"{'std':<16}{'':>8}  " + "".join(f"{at[m]['std']:>14.4f}" for m in METRICS))
        tuned = summ["tuned"]
        ts = sorted(set(tuned["thresholds"].values()))
        lines.append(f"{'tuned mean':<16}{'':>8}  " + "".join(
            f"{tuned[m]['mean']:>14.4f}" if m in tuned else f"{'':>14}" for m in METRICS)
            + f"   thresholds {ts} chosen on {tuned['chosen_on']}")
        lines.append(f"{'tuned std':<16}{'':>8}  " + "".join(
            f"{tuned[m]['std']:>14.4f}" if m in tuned else f"{'':>14}" for m in METRICS))
    return "\n".join(lines)
