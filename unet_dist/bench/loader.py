"""`bench loader`: patches/s the DataLoader delivers from a Zarr store, with augmentation, per worker
count, against the patches/s our training step consumes.

The loader is the trainer's: `data.patches.PatchStream` + `make_loader` with the config's patch
size, batch size, augmentation, start method and prefetch factor (pinned memory on GPU machines).
For each worker count the first batch (worker start-up) is timed apart; the rate is measured after
the prefetch queue has drained (the batches it held when the clock started are skipped), for at least
`--seconds`. CONSUMPTION is our training step (the `train` suite's, fixed batch, no loader) on this
device, its median step time over `--steps`. FED is the same step fed by the loader with the largest
worker count: its `data_wait_frac` is the share of a step spent waiting for data (0 = the loader
never limits training). On a CPU-only machine the workers and the step share the cores, so FED is
slower than CONSUMPTION by design.

The store is `--store` (raw + labels) or a synthetic EM-like volume written to a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import time

PROFILES = {
    "cpu": ["model.base_channels=16", "data.patch_size=[256,256]", "data.batch_size=4"],
    "cuda": ["model.base_channels=64", "data.patch_size=[512,512]", "data.batch_size=16"],
    "tiny": ["model.depth=2", "model.base_channels=4", "data.patch_size=[64,64]", "data.batch_size=2",
             "data.prefetch_factor=2"],
}
VOLUMES = {"cpu": (16, 768, 768), "cuda": (32, 2048, 2048), "tiny": (4, 96, 96)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="a store with raw and labels (default: a synthetic volume in a temp folder)")
    p.add_argument("--workers", help="worker counts, comma-separated (default: 0,1,..,cores on the CPU; "
                                     "1,2,4,8 capped at the cores with a GPU)")
    p.add_argument("--seconds", type=float, help="measure each worker count at least this long (default 5; tiny 0)")
    p.add_argument("--steps", type=int, help="timed training steps for consumption and fed (default 5; tiny 2)")
    p.add_argument("--volume", help="Z,Y,X of the synthetic volume (default 16,768,768 CPU; 32,2048,2048 GPU)")


def _worker_counts(text: str | None, cuda: bool, tiny: bool, cores: int) -> list[int]:
    from unet_dist.errors import UserError

    if text:
        try:
            counts = sorted({int(t) for t in text.split(",") if t.strip()})
        except ValueError:
            raise UserError(f"--workers '{text}': expected comma-separated integers, e.g. 0,1,2") from None
        if not counts or counts[0] < 0:
            raise UserError(f"--workers '{text}': expected integers >= 0")
        return counts
    if tiny:
        return [0, 1]
    if cuda:
        return sorted({min(w, cores) for w in (1, 2, 4, 8)})
    return list(range(0, max(1, cores) + 1))


def measure_loader(stream, workers: int, cfg, pin: bool, seconds: float, min_batches: int) -> dict:
    """Start-up time and steady patches/s of a DataLoader with `workers` workers."""
    from unet_dist.data.patches import make_loader

    loader = make_loader(stream, workers, cfg.data.start_method, pin_memory=pin,
                         prefetch_factor=cfg.data.prefetch_factor)
    t0 = time.perf_counter()
    batches = iter(loader)
    next(batches)
    startup = time.perf_counter() - t0
    # Batches queued while the first was made come out at once: skip as many as the queue holds.
    skip = workers * (cfg.data.prefetch_factor + 1)
    for _ in range(skip):
        next(batches)
    count, t1 = 0, time.perf_counter()
    while count < min_batches or time.perf_counter() - t1 < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - t1
    del batches, loader
    gc.collect()  # ends the persistent workers before the next worker count starts its own
    n = cfg.data.batch_size
    return {"startup_s": startup, "batches": count, "seconds": elapsed, "patches_per_s": count * n / elapsed,
            "batch_s": elapsed / count}


def run(args) -> dict:
    from unet_dist import runtime
    from unet_dist.config import to_dict
    from unet_dist.data.patches import PatchSpec, PatchStream
    from unet_dist.train.loop import check_inputs
    from unet_dist.bench import common

    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    cfg, applied = common.suite_config(args, PROFILES, device)
    counts = _worker_counts(args.workers, cuda, args.tiny, runtime.usable_cores())
    seconds = args.seconds if args.seconds is not None else (0.0 if args.tiny else 5.0)
    steps = args.steps or (2 if args.tiny else 5)
    min_batches = 2 if args.tiny else 5
    with common.workdir(args.workdir) as work:
        _use_store(cfg, args, work, cuda)
        crop = check_inputs(cfg)
        spec = PatchSpec.from_config(cfg, 0, crop)
        rows = []
        for w in counts:
            common.log(f"loader: {w} worker(s)")
            m = measure_loader(PatchStream(spec, cfg.data.augment), w, cfg, cuda, seconds, min_batches)
            rows.append({"what": f"loader {w} worker(s)", "role": "ours", "workers": w, **m})

        precision = runtime.resolve_precision(cfg.train.precision, device)
        step, consume_s = _consuming_step(cfg, device, precision, steps)
        consume = step.images / consume_s
        rows.append({"what": "training step (consumes)", "role": "peer", "workers": None,
                     "patches_per_s": consume, "batch_s": consume_s})

        fed_workers = counts[-1]
        common.log(f"loader: training step fed by {fed_workers} worker(s)")
        fed = _fed(step, PatchStream(spec, cfg.data.augment), fed_workers, cfg, cuda, steps)
        rows.append({"what": f"step fed by {fed_workers} worker(s)", "role": "fed", "workers": fed_workers, **fed})
        del step

    best = max((r for r in rows if r["role"] == "ours"), key=lambda r: r["patches_per_s"])
    top = next(r for r in rows if r["role"] == "ours" and r["workers"] == counts[-1])
    for r in rows:
        r["x_consumption"] = r["patches_per_s"] / consume
    config = {"device": str(device), "overrides": applied, "store": "synthetic" if not args.store else args.store,
              "patch_size": list(cfg.data.patch_size), "batch_size": cfg.data.batch_size,
              "augment": to_dict(cfg.data.augment), "start_method": cfg.data.start_method,
              "prefetch_factor": cfg.data.prefetch_factor, "workers": counts, "seconds": seconds,
              "steps": steps, "model": to_dict(cfg.model), "precision": precision,
              "pin_memory": cuda}
    report = common.make_report(
        "loader", args, device, config, rows, top["patches_per_s"] / consume,
        f"loader patches/s with {counts[-1]} worker(s) / patches/s the training step consumes", top,
        rows[len(counts)], notes=[
            "the loader's rate is taken after the batches queued during start-up are consumed",
            "fed: data_wait_frac is the share of step time spent waiting for the next batch"])
    report["summary"] = {"best_workers": best["workers"], "best_patches_per_s": round(best["patches_per_s"], 2),
                         "consumption_patches_per_s": round(consume, 2),
                         "fed_data_wait_frac": round(fed["data_wait_frac"], 3)}
    return report

def _use_store(cfg, args, work, cuda: bool) -> None:
    """cfg.data on --store, or on a synthetic volume written into `work`; training on every slice
    (a synthetic volume, or a store shorter than the profile's slices)."""
    from unet_dist.bench import common
    from unet_dist.data.store import RAW, TARGET_PATH, open_store

    if args.store:
        store = args.store
    else:
        shape = _volume(args.volume, VOLUMES["tiny" if args.tiny else "cuda" if cuda else "cpu"])
        common.log(f"loader: writing a synthetic volume {shape}")
        store = str(common.make_volume_store(work / "volume.zarr", shape))
    depth = open_store(store, arrays=(RAW, TARGET_PATH))[RAW].shape[0]
    cfg.data.store = store
    if not args.store or cfg.data.train_slices[1] > depth:
        cfg.data.train_slices, cfg.data.val_slices = [0, depth], [depth - 1, depth]


def _consuming_step(cfg, device, precision: str, steps: int):
    """Our training step, warmed up, and its median seconds per step over `steps` steps."""
    from unet_dist.bench import common
    from unet_dist.bench.train import Variant
    from unet_dist.bench.train_steps import Batch, OurStep

    # nosync=False: each step ends with a device synchronisation, so a step can be timed on its own
    # (the trainer skips it; its throughput over many steps is the same).
    variant = Variant("ours", precision=precision, channels_last=cfg.train.channels_last,
                      compile=cfg.train.compile, nosync=False)
    common.log(f"loader: training step consumption ({variant.precision})")
    step = OurStep(cfg, device, variant, Batch(cfg))
    for _ in range(1 + (2 if variant.compile else 0)):
        step()
    step_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()  # ends with a device synchronisation (nosync=False)
        step_times.append(time.perf_counter() - t0)
    return step, common.median(step_times)  # the median step: robust to others' load spikes


def _fed(step, stream, workers: int, cfg, pin: bool, steps: int) -> dict:
    """Our step with each batch taken from the loader (as the trainer does), waiting time measured."""
    from unet_dist.data.patches import make_loader

    loader = make_loader(stream, workers, cfg.data.start_method, pin_memory=pin,
                         prefetch_factor=cfg.data.prefetch_factor)
    batches = iter(loader)
    for _ in range(2):  # start-up and one step
        _feed(step, next(batches))
        step()
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        w0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - w0
        _feed(step, batch)
        step()
    elapsed = time.perf_counter() - t0
    del batches, loader
    gc.collect()
    return {"patches_per_s": steps * step.images / elapsed, "batch_s": elapsed / steps,
            "data_wait_frac": wait / elapsed}


def _feed(step, batch) -> None:
    step.batch.raw, step.batch.label = batch["raw"], batch["label"]
    if "weight" in batch:
        step.batch.weight = batch["weight"]


def _volume(text: str | None, default) -> tuple[int, int, int]:
    from unet_dist.data.layout import parse_zyx
    return parse_zyx(text, "--volume") if text else tuple(default)


COLUMNS = [("what", "what"), ("patches_per_s", "patches/s"), ("batch_s", "s/batch"),
           ("startup_s", "startup s"), ("data_wait_frac", "wait frac"), ("x_consumption", "x consumption")]

