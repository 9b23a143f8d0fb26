"""Prediction as a submitit job: SLURM where `sbatch` is found, submitit's local executor elsewhere.

    python -m jobs.predict --checkpoint RUN/checkpoints/best.pt --input STORE.zarr --out PRED.zarr \
        --nodes 2 --gpus-per-node 4 --partition P --time 60 [--labels STORE.zarr] [predict.key=value ...]

    from jobs.predict import submit
    job = submit("runs/isbi/checkpoints/best.pt", "big.zarr", "big-pred.zarr", gpus_per_node=4)
    job.result()   # what `unet-dist predict` prints: blocks, voxels/s, Dice with --labels

One task per GPU, each calling `unet_dist.predict.predict` in-process (ranks through
`dist.detect_env`); every rank writes its own blocks. Logs: PRED.zarr.jobs/<job id>/. Resource
defaults come from the `launch` section of the config stored in the checkpoint.

Timeout and preemption: on submitit's signal the job requeues itself (submitit's own path: this
class's `checkpoint()`, then `scontrol requeue` or the local executor's restart) and the restarted
job continues with --resume: blocks in the manifest are kept, a block in flight is predicted again.
Requeues are bounded (--max-requeues), and a run that finished no block since its last requeue stops.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import submitit

from unet_dist.cli.arguments import slice_range
from unet_dist.errors import UserError
from unet_dist.predict.manifest import finished_blocks

from jobs import common
from jobs.launch import (NotRequeued, SubmittedJob, add_launch_arguments, executor_for, launch_from,
                         requeue_refusal, resources, submit_and_report)


class PredictJob(submitit.helpers.Checkpointable):
    def __init__(self, checkpoint: str, input: str, out: str, *, labels: str | None = None,
                 slices: tuple[int, int] | None = None, overrides=(), resume: bool = False, overwrite: bool = False,
                 device: str = "auto", precision: str = "auto", json_out: str | None = None, max_requeues: int = 3,
                 requeues: int = 0, blocks_at_requeue: int = -1):
        self.checkpoint_path, self.input, self.out = str(checkpoint), str(input), str(out)
        self.labels, self.slices, self.overrides = labels, slices, list(overrides)
        self.resume, self.overwrite = resume, overwrite
        self.device, self.precision, self.json_out = device, precision, json_out
        self.max_requeues, self.requeues, self.blocks_at_requeue = max_requeues, requeues, blocks_at_requeue

    def __call__(self) -> dict:
        from unet_dist import dist
        from unet_dist.files import write_json_atomic
        from unet_dist.predict.pipeline import predict

        resume, overwrite = self.resume, self.overwrite
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:  # requeued by SLURM: continue, never replace
            resume, overwrite = True, False
        result = predict(self.checkpoint_path, self.input, self.out, labels=self.labels, slices=self.slices,
                         overrides=self.overrides, resume=resume, overwrite=overwrite, device=self.device,
                         precision=self.precision)
        if self.json_out and dist.detect_env().is_main:
            write_json_atomic(self.json_out, result)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when the signal comes: requeue with --resume, within bounds."""
        done = finished_blocks(self.out)
        reason = requeue_refusal(self.requeues, self.max_requeues, done, self.blocks_at_requeue)
        if reason is None:
            print(f"jobs.predict: {done} block(s) done: requeue {self.requeues + 1} of at most {self.max_requeues}",
                  flush=True)
            return submitit.helpers.DelayedSubmission(PredictJob(
                self.checkpoint_path, self.input, self.out, labels=self.labels, slices=self.slices,
                overrides=self.overrides, resume=True, overwrite=False, device=self.device,
                precision=self.precision, json_out=self.json_out, max_requeues=self.max_requeues,
                requeues=self.requeues + 1, blocks_at_requeue=done))
        print(f"jobs.predict: not requeued: {reason}; rerun with --resume", file=sys.stderr, flush=True)
        raise NotRequeued(f"not requeued: {reason}; rerun with --resume")


def submit(checkpoint: str | Path, input: str | Path, out: str | Path, *, labels=None, slices=None, overrides=(),
           resume: bool = False, overwrite: bool = False, device: str = "auto", precision: str = "auto",
           json_out=None, max_requeues: int = 3, cluster: str = "auto", log_dir=None, signal_delay_s: int = 120,
           account: str = "", qos: str = "", constraint: str = "", **request) -> SubmittedJob:
    """Check the checkpoint, the input and the output here, then submit."""
    from unet_dist import checkpoint as ckpt
    from unet_dist.config import from_dict
    from unet_dist.data.store import RAW, TARGET_PATH, open_store
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    kind = common.choose_cluster(cluster)
    state = ckpt.load(Path(checkpoint))
    cfg = from_dict(state.get("config") or {"model": state["model_config"]}, f"{checkpoint}: config")
    open_store(input, arrays=(RAW,))
    if labels:
        open_store(labels, arrays=(TARGET_PATH,))
    out = Path(out)
    if out.exists() and not (resume or overwrite):
        raise UserError(f"{out}: already exists (pass --resume to continue it or --overwrite to replace it)")
    req = resources(cfg, kind, **request)
    folder = Path(log_dir) if log_dir else out.with_name(out.name + ".jobs") / "%j"
    absolute = lambda p: str(Path(p).absolute()) if p else p  # noqa: E731 (jobs may start elsewhere)
    executor = executor_for(kind, folder.absolute(), name="unet-predict", signal_delay_s=signal_delay_s,
                            max_requeues=max_requeues, account=account, qos=qos, constraint=constraint, **req)
    job = executor.submit(PredictJob(absolute(checkpoint), absolute(input), absolute(out), labels=absolute(labels),
                                     slices=slices, overrides=list(overrides), resume=resume, overwrite=overwrite,
                                     device=device, precision=precision, json_out=absolute(json_out),
                                     max_requeues=max_requeues))
    return SubmittedJob(job, kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels")
    parser.add_argument("--slices", help="START:STOP")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true")
    again.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    parser.add_argument("--max-requeues", type=int, default=3)
    add_launch_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="predict.* overrides, e.g. predict.block_size=[1,256,256]")
    args = parser.parse_args(argv)
    return submit_and_report(lambda: submit(
        args.checkpoint, args.input, args.out, labels=args.labels, slices=slice_range(args.slices),
        overrides=args.overrides, resume=args.resume, overwrite=args.overwrite, device=args.device,
        precision=args.precision, json_out=args.json_out, max_requeues=args.max_requeues, **launch_from(args)),
        args.wait)


if __name__ == "__main__":
    sys.exit(main())
