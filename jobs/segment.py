"""Segmentation as a submitit job, a CPU job: SLURM where `sbatch` is found, submitit's local executor
elsewhere.

    python -m jobs.segment --pred PRED.zarr --tasks-per-node 32 --partition cpu --time 30 \
        [--threshold T] [--block-size Z,Y,X] [--config C.yaml] [segment.key=value ...]

    from jobs.segment import submit
    job = submit("big-pred.zarr", tasks_per_node=32)
    job.result()   # what `unet-dist segment` prints: blocks, fragments, edges, neurons, Mvox/s

One task per core (no GPU), each calling `unet_dist.segment.pipeline.segment` in-process (ranks
through `dist.detect_env`); every rank writes its own blocks. Logs: PRED.zarr.segment-jobs/<job id>/.
On submitit's signal the job requeues itself (bounded by --max-requeues, and only when blocks were
finished since the last requeue): the restarted job runs the same segmentation, which continues from
the blocks in PRED.zarr/.segment's manifests, never with --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import submitit

from unet_dist.cli.segment import overrides_of, threshold_for
from unet_dist.errors import UserError
from unet_dist.predict.manifest import finished_blocks

from jobs import common
from jobs.launch import (NotRequeued, SubmittedJob, add_launch_arguments, executor_for, launch_from,
                         requeue_refusal, resources, submit_and_report)

PHASES = ("fragments", "edges", "relabel")  # segment.pipeline's, without importing torch where one submits


def blocks_done(pred: str | Path) -> int:
    """Blocks finished over the three phases: the progress a requeue needs."""
    return sum(finished_blocks(Path(pred) / ".segment" / phase) for phase in PHASES)


class SegmentJob(submitit.helpers.Checkpointable):
    def __init__(self, pred: str, *, config: str | None = None, overrides=(), overwrite: bool = False,
                 json_out: str | None = None, max_requeues: int = 3, requeues: int = 0, blocks_at_requeue: int = -1):
        self.pred, self.config, self.overrides = str(pred), config, list(overrides)
        self.overwrite, self.json_out = overwrite, json_out
        self.max_requeues, self.requeues, self.blocks_at_requeue = max_requeues, requeues, blocks_at_requeue

    def __call__(self) -> dict:
        from unet_dist import dist
        from unet_dist.config import load_config
        from unet_dist.files import write_json_atomic
        from unet_dist.segment.pipeline import segment

        cfg = load_config(self.config, self.overrides)
        result = segment(self.pred, cfg.segment, overwrite=self.overwrite, progress=cfg.logging.progress)
        if self.json_out and dist.detect_env().is_main:
            write_json_atomic(self.json_out, result)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when the signal comes: requeue to continue, within bounds."""
        done = blocks_done(self.pred)
        reason = requeue_refusal(self.requeues, self.max_requeues, done, self.blocks_at_requeue)
        if reason is None:
            print(f"jobs.segment: {done} block(s) done: requeue {self.requeues + 1} of at most {self.max_requeues}",
                  flush=True)
            return submitit.helpers.DelayedSubmission(SegmentJob(
                self.pred, config=self.config, overrides=self.overrides, overwrite=False, json_out=self.json_out,
                max_requeues=self.max_requeues, requeues=self.requeues + 1, blocks_at_requeue=done))
        print(f"jobs.segment: not requeued: {reason}; submit the same segmentation again to continue",
              file=sys.stderr, flush=True)
        raise NotRequeued(f"not requeued: {reason}; submit the same segmentation again to continue")


def submit(pred: str | Path, *, config=None, threshold: float | None = None, block_size: str | None = None,
           overrides=(), overwrite: bool = False, json_out=None, max_requeues: int = 3, cluster: str = "auto",
           log_dir=None, signal_delay_s: int = 120, account: str = "", qos: str = "", constraint: str = "",
           **request) -> SubmittedJob:
    """Check the prediction, the settings and the output here, then submit a CPU job."""
    from unet_dist.config import load_config, validate_segment
    from unet_dist.predict.prediction_store import NEURONS
    from unet_dist.segment.pipeline import open_input

    kind = common.choose_cluster(cluster)
    overrides = overrides_of(threshold_for(pred, threshold, overrides), block_size, overrides)
    cfg = load_config(config, overrides)
    validate_segment(cfg.segment, "segment")
    pred = Path(pred)
    open_input(pred)
    if (pred / "labels" / NEURONS).exists() and not overwrite:
        raise UserError(f"{pred}: labels/{NEURONS} already exists (pass --overwrite to replace it)")
    request["gpus_per_node"] = 0  # the segmentation needs no GPU: a CPU job, one task per core
    request["tasks_per_node"] = request.get("tasks_per_node") or 1
    request["cpus_per_task"] = request.get("cpus_per_task") or 1
    req = resources(cfg, kind, **request)
    folder = Path(log_dir) if log_dir else pred.with_name(pred.name + ".segment-jobs") / "%j"
    absolute = lambda p: str(Path(p).absolute()) if p else p  # noqa: E731 (jobs may start elsewhere)
    executor = executor_for(kind, folder.absolute(), name="unet-segment", signal_delay_s=signal_delay_s,
                            max_requeues=max_requeues, account=account, qos=qos, constraint=constraint, **req)
    job = executor.submit(SegmentJob(absolute(pred), config=absolute(config), overrides=overrides,
                                     overwrite=overwrite, json_out=absolute(json_out), max_requeues=max_requeues))
    return SubmittedJob(job, kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.segment", description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True)
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--block-size", metavar="Z,Y,X")
    parser.add_argument("--config")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    parser.add_argument("--max-requeues", type=int, default=3)
    add_launch_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="segment.* overrides, e.g. segment.merge=union_find")
    args = parser.parse_args(argv)
    return submit_and_report(lambda: submit(
        args.pred, config=args.config, threshold=args.threshold, block_size=args.block_size,
        overrides=args.overrides, overwrite=args.overwrite, json_out=args.json_out,
        max_requeues=args.max_requeues, **launch_from(args)), args.wait)


if __name__ == "__main__":
    sys.exit(main())
