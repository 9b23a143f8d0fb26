"""Cross-validation: the fold arithmetic and threshold tuning (pure), and real cv runs on a tiny store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from unet_dist.config import load_config
from unet_dist.evaluate.cross_validation import (THRESHOLDS, Fold, best_threshold, cross_fitted, fold_config, fold_slices, make_folds,
                          mean_std, scores, summarize)
from unet_dist.errors import UserError

from helpers import ENV, ROOT, SMOKE, run_cli, torchrun_cmd

# A few steps of the smoke model: the test checks the plumbing, not the scores.
TINY = ["data.patch_size=[32,32]", "train.steps=4", "train.val_every=2", "train.ckpt_every=2", "train.log_every=2",
        "train.warmup_steps=1", "logging.wandb=disabled"]


# ------------------------------------------------------------------------------------ folds

@pytest.mark.parametrize("n,folds", [(30, 5), (30, 4), (30, 7), (8, 2), (10, 10), (29, 3)])
def test_folds_are_consecutive_disjoint_and_cover_every_slice(n, folds):
    ranges = [fold_slices(n, folds, k) for k in range(folds)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a < b for a, b in ranges)
    assert all(ranges[k][1] == ranges[k + 1][0] for k in range(folds - 1))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_isbi_five_folds():
    assert [fold_slices(30, 5, k) for k in range(5)] == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30)]
    assert [f.name for f in make_folds(30, 5)] == [f"fold-{k}" for k in range(5)]
    assert make_folds(30, 5, only=3) == [Fold("fold-3", 3, (18, 24))]
    assert make_folds(30, 5, holdout=(25, 30)) == [Fold("holdout-25-30", 0, (25, 30))]


@pytest.mark.parametrize("n,folds,k", [(30, 1, 0), (30, 31, 0), (30, 5, 5), (30, 5, -1)])
def test_bad_folds_are_user_errors(n, folds, k):
    with pytest.raises(UserError):
        fold_slices(n, folds, k)


@pytest.mark.parametrize("holdout", [(0, 30), (25, 31), (5, 5)])
def test_bad_holdout_is_a_user_error(holdout):
    with pytest.raises(UserError):
        make_folds(30, 5, holdout=holdout)


def test_fold_config_holds_the_fold_out_and_validates_on_it():
    cfg = load_config(SMOKE, ["run.dir=runs/x", "run.name=exp"])
    out = fold_config(cfg, 30, Fold("fold-2", 2, (12, 18)))
    assert out.data.train_slices == [0, 30]
    assert out.data.holdout_slices == [12, 18] and out.data.val_slices == [12, 18]
    assert out.run.dir == os.path.join("runs/x", "fold-2") and out.run.name == "exp-fold-2"
    assert cfg.data.holdout_slices == [] and cfg.run.dir == "runs/x"  # the original is untouched
    assert out.logging.group == "cv-x" and out.logging.job_type == "cv-fold"  # one W&B group for the folds
    named = fold_config(load_config(SMOKE, ["logging.group=mine"]), 30, Fold("fold-0", 0, (0, 6)))
    assert named.logging.group == "mine"


# ----------------------------------------------------------------------- thresholds, summary

def test_scores_and_best_threshold():
    # counts (tp, fp, fn, tn) of the interior class at three thresholds; the middle one is perfect
    counts = np.array([[80, 20, 0, 0], [80, 0, 0, 20], [60, 0, 20, 20]])
    assert scores(counts[1]) == {"dice_neuron": 1.0, "dice_membrane": 1.0, "pixel_error": 0.0, "dice_mean": 1.0}
    assert best_threshold(counts, (0.3, 0.5, 0.7)) == 0.5
    assert best_threshold(np.array([counts[1], counts[1], counts[0]]), (0.4, 0.6, 0.7)) == 0.4  # tie: nearest 0.5


def test_tuned_threshold_of_a_fold_is_chosen_on_the_other_folds():
    t = (0.3, 0.5, 0.7)
    good, bad = [10, 0, 0, 10], [10, 10, 0, 0]
    sweeps = {"a": np.array([good, bad, bad]), "b": np.array([bad, bad, good]), "c": np.array([bad, bad, good])}
    tuned = cross_fitted(sweeps, t)
    assert tuned["a"]["threshold"] == 0.7 and tuned["a"]["dice_mean"] < 1  # b and c prefer 0.7
    assert tuned["b"]["threshold"] == 0.7 and tuned["b"]["dice_mean"] == 1.0  # a + c tie: nearest 0.5 wins
    alone = cross_fitted({"a": sweeps["a"]}, t)["a"]
    assert alone["threshold"] == 0.3 and alone["chosen_on"] == "this fold (oracle)"


def test_mean_std_is_the_sample_spread():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "min": 1.0, "max": 3.0, "n": 2}
    assert mean_std([0.5])["std"] == 0.0


def test_summarize_pools_folds():
    counts = np.tile(np.array([[8, 2, 1, 9]]), (len(THRESHOLDS), 1))
    rows = [{"fold": f"fold-{k}", "variants": {"plain": {
        "dice_neuron": 0.9 + k / 100, "dice_membrane": 0.8, "dice_mean": 0.85 + k / 200, "pixel_error": 0.1,
        "v_rand": 0.9, "v_info": 0.95, "threshold": 0.5,
        "sweep": {"thresholds": list(THRESHOLDS), "counts": counts.tolist()}}}} for k in range(3)]
    summary = summarize(rows)["plain"]
    assert summary["at_threshold"]["dice_neuron"]["mean"] == pytest.approx(0.91)
    assert summary["at_threshold"]["dice_neuron"]["n"] == 3
    assert summary["tuned"]["chosen_on"] == "other folds"
    assert set(summary["tuned"]["thresholds"]) == {"fold-0", "fold-1", "fold-2"}
    assert summary["threshold_all_folds"] == 0.5  # all equal: the tie goes to 0.5


# ------------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def cv_store(tmp_path_factory):
    from unet_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("cv") / "cv.zarr"
    synthesize(out, shape=(8, 64, 64), seed=3)
    return out


def test_cv_two_folds_end_to_end_then_resume_skips_them(cv_store, tmp_path):
    root = tmp_path / "cv"
    args = ["cv", "--config", SMOKE, "--folds", "2", "--tta", f"data.store={cv_store}", f"run.dir={root}", *TINY]
    done = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert done.code == 0, done.err
    report = json.loads((root / "cv.json").read_text())
    assert [r["slices"] for r in report["fold_results"]] == [[0, 4], [4, 8]]
    for k, r in enumerate(report["fold_results"]):
        run = root / f"fold-{k}"
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "completed" and status["step"] == 4
        assert (run / "checkpoints" / "best.pt").is_file() and r["checkpoint"].endswith("best.pt")
        assert (run / "pred.zarr").is_dir() and (run / "pred-tta.zarr").is_dir()
        config = (run / "config.yaml").read_text()
        assert "holdout_slices:\n  - {0}\n  - {1}".format(*r["slices"]) in config
        for variant in ("plain", "tta"):
            v = r["variants"][variant]
            assert all(0.0 <= v[m] <= 1.0 for m in ("dice_neuron", "dice_membrane", "pixel_error", "v_rand", "v_info"))
            assert v["dice_mean"] == pytest.approx((v["dice_neuron"] + v["dice_membrane"]) / 2)
            assert len(v["sweep"]["counts"]) == len(THRESHOLDS)
            assert sum(v["sweep"]["counts"][0]) == 4 * 64 * 64  # every held-out voxel counted once
            assert v["tuned"]["chosen_on"] == "other folds"
    summary = report["summary"]
    assert set(summary) == {"plain", "tta"}
    dice = [r["variants"]["plain"]["dice_membrane"] for r in report["fold_results"]]
    assert summary["plain"]["at_threshold"]["dice_membrane"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["plain"]["at_threshold"]["dice_membrane"]["std"] == pytest.approx(np.std(dice, ddof=1))
    assert "mean" in done.out and "std" in done.out and "fold-1" in done.out

    # --resume auto: both folds completed, nothing is retrained or predicted again
    mtime = (root / "fold-0" / "checkpoints" / "best.pt").stat().st_mtime_ns
    again = run_cli(*args, "--resume", "auto", env={"OMP_NUM_THREADS": "1"})
    assert again.code == 0, again.err
    assert again.err.count("finished earlier") == 2
    assert (root / "fold-0" / "checkpoints" / "best.pt").stat().st_mtime_ns == mtime
    assert json.loads((root / "cv.json").read_text())["summary"] == summary

    # without --resume auto, a run directory that holds a finished fold is refused (exit 2, one line)
    refused = run_cli(*args)
    assert refused.code == 2 and "--resume auto" in refused.err


def test_cv_only_one_fold_and_a_bad_fold(cv_store, tmp_path):
    root = tmp_path / "cv"
    done = run_cli("cv", "--config", SMOKE, "--folds", "2", "--only", "1", f"data.store={cv_store}",
                   f"run.dir={root}", *TINY, env={"OMP_NUM_THREADS": "1"})
    assert done.code == 0, done.err
    report = json.loads((root / "cv.json").read_text())
    assert [r["fold"] for r in report["fold_results"]] == ["fold-1"] and not (root / "fold-0").exists()
    assert report["summary"]["plain"]["tuned"]["chosen_on"] == "this fold (oracle)"
    bad = run_cli("cv", "--config", SMOKE, "--folds", "2", "--only", "2", f"data.store={cv_store}",
                  f"run.dir={tmp_path / 'bad'}", *TINY)
    assert bad.code == 2 and "--only 2" in bad.err and not (tmp_path / "bad").exists()


def test_cv_stops_on_sigterm_then_resume_auto_finishes(cv_store, tmp_path):
    root = tmp_path / "cv"
    common = ["-m", "unet_dist", "cv", "--config", SMOKE, "--folds", "2", f"data.store={cv_store}", f"run.dir={root}",
              *TINY]
    common += ["train.steps=200", "train.val_every=200", "train.ckpt_every=200"]  # seconds per fold
    proc = subprocess.Popen([sys.executable, *map(str, common)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = root / "fold-0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "fold 0 never started training"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped at fold-0" in err and "--resume auto" in err
    assert json.loads((root / "fold-0" / "status.json").read_text())["status"] == "interrupted"
    assert not (root / "fold-1").exists()  # cv stopped instead of moving on
    # the same command with --resume auto continues fold 0 from its checkpoint, then runs fold 1
    done = run_cli(*common[2:], "--resume", "auto", env={"OMP_NUM_THREADS": "1"})
    assert done.code == 0, done.err
    assert "resumed at step" in done.out + done.err
    report = json.loads((root / "cv.json").read_text())
    assert [r["fold"] for r in report["fold_results"]] == ["fold-0", "fold-1"]
    assert all(r["train_steps"] == 200 for r in report["fold_results"])
    # another recipe in the same run directory is refused, not silently reused
    other = run_cli(*common[2:], "--resume", "auto", "train.lr=1e-4")
    assert other.code == 2 and "train.lr" in other.err and "another run.dir" in other.err


@pytest.mark.slow
def test_cv_on_two_ranks_under_torchrun(cv_store, tmp_path, free_port):
    """train -> predict -> evaluate per fold in one torchrun job: they share the one process group
    cv holds (a second init_process_group under torchrun fails: the agent's store keeps the first
    group's keys)."""
    root = tmp_path / "cv"
    proc = subprocess.run(torchrun_cmd(2, free_port, "cv", "--config", SMOKE, "--folds", "2", f"data.store={cv_store}",
                                       f"run.dir={root}", *TINY), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "cv.json").read_text())
    assert len(report["fold_results"]) == 2
    assert all(r["world_size"] == 2 for r in report["fold_results"])
    assert proc.stdout.count("[plain]") == 1  # only rank 0 prints the table
