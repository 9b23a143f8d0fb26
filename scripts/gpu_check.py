"""The prepared device check (scripts/gpu_check.sh runs it): everything a first GPU machine must show,
in one command with a hard deadline, every result as JSON.

    scripts/gpu_check.sh OUTDIR             on a one-GPU machine: 8 minutes at most
    scripts/gpu_check.sh --dry-run OUTDIR   the same steps on the CPU at tiny sizes (CI runs it)

Steps, in order (cheap and essential first; a step that would start past the deadline is skipped):

    machine        GPU, driver, CUDA, cuDNN, native bf16, torch and the modules this project needs
    tests          tests/test_gpu.py: one-GPU training (bf16, channels_last, compile), resume, predictor
                   GPU vs CPU, fp16 with GradScaler, the refusal of two ranks on one GPU, ...
    bench_train    `unet-dist bench train` (bf16, channels_last, compile) with MFU
    bench_predict  `unet-dist bench predict` against MONAI on 64 x 4096 x 4096 (1.07 Gvoxel)
    isbi           the ISBI GPU recipe (configs/isbi2012.yaml) for a few minutes, then predict and
                   evaluate slices 25-29 ($UNET_DIST_ISBI_DIR; the dry run uses a synthetic volume
                   when it is missing)

Each step runs its commands as child processes with their own timeout (a child's whole process
group is ended at its limit), writes OUTDIR/<step>.json (`status` ok | failed | timeout | skipped,
`reason`, `seconds`, `commands`, `result`) and prints one summary line; OUTDIR/summary.json lists
them all, and OUTDIR/logs/<step>.log holds the commands' output. Exit code 0 when every step is ok.

Assumptions of the GPU machine: no network, Python with torch (CUDA) installed, this project's other
dependencies importable (the caller installs the extra wheels with `pip install --no-index --no-deps
--target DIR` and puts DIR on PYTHONPATH), wandb absent. Nothing here installs or downloads anything.
W&B is disabled (WANDB_MODE=disabled), and a guard module named `wandb` sits first on the children's
PYTHONPATH: if anything imports wandb, the guard records who did and the step fails.

This module imports neither torch nor the project, so a broken environment is reported, not crashed on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 455  # gpu_check.sh ends everything by 480 s: this leaves time to end a late child and write the summary
DRY_DEADLINE_S = 900  # the dry run shares CI's cores with other jobs

# Seconds per step on the GPU (estimates for one H100/H200, not yet measured; each is also capped by
# the time left). The ISBI run comes last and takes what is left, up to its budget: the trainer is
# stopped by SIGTERM (it checkpoints) when its time is up, so it fits whatever the steps before took.
BUDGETS = {"machine": 25, "tests": 170, "bench_train": 90, "bench_predict": 110, "isbi": 240}
DRY_BUDGETS = {"machine": 60, "tests": 120, "bench_train": 240, "bench_predict": 300, "isbi": 300}
MIN_START_S = {"isbi": 90}  # a step with less time than this left (default 20 s) is skipped, not started

REQUIRED_MODULES = ("numpy", "scipy", "zarr", "numcodecs", "tifffile", "yaml", "psutil", "PIL", "submitit",
                    "monai", "pytest", "torch")

GUARD = '''"""A stand-in for wandb put first on PYTHONPATH by scripts/gpu_check.py: W&B is disabled there, so
nothing may import it. Records who did, then fails the import as a missing wandb would."""
import os, traceback
with open(os.environ["UNET_DIST_WANDB_GUARD"], "a") as f:
    f.write("".join(traceback.format_stack()) + "\\n")
raise ImportError("wandb must not be imported when W&B is disabled (scripts/gpu_check.py guard)")
'''

MACHINE_PROBE = r'''
import importlib, json, os, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
        "modules": {}, "missing": []}
for name in sys.argv[1].split(","):
    try:
        module = importlib.import_module(name)
        info["modules"][name] = getattr(module, "__version__", "?")
    except Exception as exc:
        info["missing"].append(f"{name} ({type(exc).__name__}: {str(exc)[:120]})")
try:
    import torch
    from unet_dist import dist, runtime
    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, cuda_available=cuda, cuda_runtime=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None, gpu_count=torch.cuda.device_count())
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = torch.device("cuda", 0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), native_bf16=runtime.native_bf16(device),
                    precision_auto=runtime.resolve_precision("auto", device),
                    tf32_convolutions=bool(torch.backends.cudnn.allow_tf32))
        from unet_dist.bench.machine import peak_bf16_flops
        info["peak_bf16_dense_tflops"] = (peak_bf16_flops(props.name) or 0) / 1e12 or None
    else:
        info.update(gpu=None, native_bf16=False, precision_auto=runtime.resolve_precision("auto", torch.device("cpu")))
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
smi = shutil.which("nvidia-smi")
if smi:
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        info["nvidia_smi"] = out
        info["driver"] = out[0].split(",")[1].strip() if out else None
    except Exception as exc:
        info["driver"] = f"nvidia-smi failed: {exc}"
else:
    info["driver"] = None
print(json.dumps(info))
'''


# --------------------------------------------------------------------------- running children

@dataclass
class Ran:
    command: list[str]
    code: int | None
    seconds: float
    timed_out: bool
    stdout: str
    stderr: str

    def brief(self) -> dict:
        return {"command": " ".join(self.command), "exit_code": self.code, "seconds": round(self.seconds, 1),
                "timed_out": self.timed_out}


class TimeUp(Exception):
    """The step's time ran out."""


@dataclass
class Step:
    name: str
    dry_run: bool
    out: Path
    env: dict
    deadline: float  # time.monotonic() at which this step must have ended
    ran: list[Ran] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, command: list[str], limit: float | None = None, term_after: float | None = None,
            check: bool = True) -> Ran:
        """Run a child in its own process group, for at most `limit` seconds (and what the step has
        left). `term_after`: send SIGTERM (the trainer checkpoints and stops) this long before the limit."""
        limit = min(limit or 1e9, self.left())
        if limit <= 1:
            raise TimeUp(f"no time left for {command[2:5]}")
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, env=self.env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        timed_out, soft = False, (limit - term_after) if term_after else None
        try:
            if soft and soft > 1:
                try:
                    out, err = proc.communicate(timeout=soft)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGTERM)
                    out, err = proc.communicate(timeout=max(1, limit - soft))
            else:
                out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            out, err = proc.communicate()
        ran = Ran(command, proc.returncode, time.monotonic() - started, timed_out, out or "", err or "")
        self.ran.append(ran)
        with open(self.out / "logs" / f"{self.name}.log", "a") as log:
            log.write(f"$ {' '.join(command)}\n# exit {ran.code}, {ran.seconds:.1f} s"
                      f"{', TIMED OUT' if timed_out else ''}\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}\n")
        if timed_out:
            raise TimeUp(f"`{' '.join(command[1:4])} ...` ran out of time after {ran.seconds:.0f} s")
        if check and ran.code != 0:
            tail = (ran.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StepFailed(f"`{' '.join(command[1:4])} ...` exited {ran.code}: {tail[:300]}")
        return ran

    def python(self, *args: str, **kw) -> Ran:
        return self.run([sys.executable, *args], **kw)

    def unet_dist(self, *args: str, **kw) -> Ran:
        return self.python("-m", "unet_dist", *map(str, args), **kw)


class StepFailed(Exception):
    """A step's command failed or its result is wrong."""


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed("no JSON result in the command's output")


# ----------------------------------------------------------------------------------- the steps

def step_machine(step: Step) -> tuple[dict, str]:
    ran = step.python("-c", MACHINE_PROBE, ",".join(REQUIRED_MODULES), limit=60)
    info = last_json_line(ran.stdout)
    if info.get("error"):
        raise StepFailed(f"torch or unet_dist does not load: {info['error']}")
    if info["missing"]:
        raise StepFailed("missing modules: " + "; ".join(info["missing"]))
    if not step.dry_run and not info.get("cuda_available"):
        raise StepFailed("CUDA is not available to torch")
    line = (f"{info.get('gpu') or 'no GPU (CPU)'}, driver {info.get('driver')}, CUDA {info.get('cuda_runtime')}, "
            f"cuDNN {info.get('cudnn')}, native bf16 {'yes' if info.get('native_bf16') else 'no'}, "
            f"torch {info.get('torch')}, Python {info['python']}")
    return info, line


def step_tests(step: Step) -> tuple[dict, str]:
    xml = step.out / "tests.xml"
    ran = step.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py",
                      f"--junitxml={xml}", "-o", "junit_family=xunit2", check=False)
    if not xml.is_file():
        raise StepFailed(f"pytest wrote no report (exit {ran.code}): "
                         + ((ran.stderr or ran.stdout).strip().splitlines() or [""])[-1][:300])
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], \
                    (node.get("message") or "")[:500]
                break
        props = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message, "recorded": props})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    result = {"counts": counts, "tests": cases, "junit_xml": xml.name}
    line = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if counts["failed"] or counts["error"]:
        bad = [c["test"] for c in cases if c["outcome"] in ("failed", "error")]
        raise StepFailed(f"{line}: {', '.join(bad)}", result)
    if not cases:
        raise StepFailed("no test ran", result)
    if not step.dry_run and (counts["skipped"] or not counts["passed"]):
        raise StepFailed(f"{line}: on a GPU machine none may skip", result)
    return result, line + (" (no CUDA: all skip in the dry run)" if step.dry_run else "")


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def step_bench_train(step: Step) -> tuple[dict, str]:
    report = step.out / "reports" / "bench-train.json"
    if step.dry_run:
        args = ["--tiny", "--device", "cpu", "--variants", "bf16+cl"]
    else:  # the trainer's GPU settings: bf16, channels_last, torch.compile (one compile: ~1 minute)
        args = ["--device", "cuda", "--variants", "bf16,bf16+cl+compile", "--steps", "10", "--rounds", "3"]
    step.unet_dist("bench", "train", "--json", report, *args)
    data = json.loads(report.read_text())
    best = data["ours"]
    rows = [{k: r.get(k) for k in ("variant", "role", "images_per_s", "tflops", "mfu", "peak_mem_mb", "x_peer")}
            for r in data["results"]]
    result = {"report": f"reports/{report.name}", "speedup": data["speedup"], "best": best["variant"],
              "images_per_s": best["images_per_s"], "mfu": best["mfu"], "rows": rows,
              "peak_bf16_dense_flops": data["config"].get("peak_bf16_dense_flops"),
              "tf32_convolutions": data["config"].get("tf32_convolutions")}
    mfu = f"MFU {best['mfu']:.3f}" if best.get("mfu") is not None else "MFU - (no bf16 peak for this device)"
    return result, f"{best['variant']} {best['images_per_s']:.1f} img/s, {mfu}, x{data['speedup']:.2f} the fp32 peer"


def step_bench_predict(step: Step) -> tuple[dict, str]:
    report = step.out / "reports" / "bench-predict.json"
    args = ["--tiny", "--device", "cpu"] if step.dry_run else ["--device", "cuda", "--volume", "64,4096,4096"]
    step.unet_dist("bench", "predict", "--json", report, *args, "--workdir", step.out / "work")
    data = json.loads(report.read_text())
    ours, peer = data["ours"], data["peer"]
    result = {"report": f"reports/{report.name}", "speedup": data["speedup"], "voxels": ours["voxels"],
              "ours_voxels_per_s": ours["voxels_per_s"], "monai_voxels_per_s": peer["voxels_per_s"],
              "ours_gpu_peak_mb": ours.get("cuda_peak_mb"), "monai_gpu_peak_mb": peer.get("cuda_peak_mb"),
              "comparison": data.get("comparison")}
    if not step.dry_run and ours["voxels"] < 1e9:
        raise StepFailed(f"only {ours['voxels']} voxels predicted; the check asks for at least 1 Gvoxel", result)
    diff = data.get("comparison", {}).get("max_abs_diff_interior")
    return result, (f"{ours['voxels']:.3g} voxels: ours {ours['voxels_per_s']:.3g} voxel/s, MONAI "
                    f"{peer['voxels_per_s']:.3g} voxel/s, x{data['speedup']:.2f}, interior max |diff| {diff}")


def step_isbi(step: Step) -> tuple[dict, str]:
    work = step.out / "isbi"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    isbi = Path(os.environ.get("UNET_DIST_ISBI_DIR") or ROOT / "data" / "isbi2012")
    have = all((isbi / n).is_file() for n in ("train-volume.tif", "train-labels.tif"))
    store = work / "isbi2012.zarr"
    if have:
        step.unet_dist("convert", "--raw", isbi / "train-volume.tif", "--labels", isbi / "train-labels.tif",
                       "--resolution", "50,4,4", "--out", store, limit=120)
        data = f"ISBI 2012 from {isbi}"
    elif step.dry_run:
        step.unet_dist("synth", "--out", store, "--shape", "30,128,128", "--seed", "0", limit=120)
        data = "synthetic 30 x 128 x 128 (ISBI data not found; dry run)"
    else:
        raise StepSkipped(f"ISBI data not found in {isbi} (set UNET_DIST_ISBI_DIR)")
    run = work / "run"
    if step.dry_run:
        overrides = ["model.depth=2", "model.base_channels=4", "data.patch_size=[64,64]", "data.batch_size=2",
                     "data.num_workers=0", "train.steps=6", "train.warmup_steps=2", "train.val_every=3",
                     "train.ckpt_every=3", "train.log_every=3", "train.device=cpu", "train.precision=fp32",
                     "train.channels_last=false", "predict.batch_size=1"]
        device = ["--device", "cpu"]
    else:  # the recipe, with a schedule that fits the step (the trainer stops on SIGTERM if it must)
        workers = max(0, min(8, (os.cpu_count() or 2) - 2))
        overrides = [f"train.steps={step.env.get('GPU_CHECK_ISBI_STEPS', '2000')}", f"data.num_workers={workers}",
                     "train.device=cuda"]
        device = ["--device", "cuda"]
    reserve = 50 if not step.dry_run else 100  # for predict + evaluate after training
    t0 = time.monotonic()
    # Past its time the trainer gets SIGTERM (as from SLURM): it checkpoints at the next step and exits 0.
    step.unet_dist("train", "--config", ROOT / "configs" / "isbi2012.yaml", f"data.store={store}",
                   f"run.dir={run}", "logging.wandb=disabled", "logging.progress=plain", *overrides,
                   limit=step.left() - reserve, term_after=30)
    train_s = time.monotonic() - t0
    status = json.loads((run / "status.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speed = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    ckpt = run / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        ckpt = Path(status["checkpoint"])
    pred = work / "pred.zarr"
    predicted = last_json_line(step.unet_dist(
        "predict", "--checkpoint", ckpt, "--input", store, "--labels", store, "--slices", "25:30", "--out", pred,
        *device).stdout)
    evaluation = last_json_line(step.unet_dist("evaluate", "--pred", pred, "--labels", store, "--slices", "25:30",
                                               "--json", work / "evaluation.json").stdout)
    result = {"data": data, "train_status": status["status"], "steps": status["step"],
              "total_steps": status["total_steps"], "train_seconds": round(train_s, 1),
              "images_per_s_last": speed[-1] if speed else None, "checkpoint": ckpt.name,
              "val": status.get("metrics"), "predict": predicted, "evaluate": evaluation}
    line = (f"{status['step']}/{status['total_steps']} steps ({status['status']}) in {train_s:.0f} s; slices 25-29: "
            f"Dice membrane {evaluation.get('dice_membrane', float('nan')):.4f}, neuron "
            f"{evaluation.get('dice_neuron', float('nan')):.4f}, pixel error {evaluation.get('pixel_error', float('nan')):.4f}, "
            f"V_rand {evaluation.get('v_rand', float('nan')):.4f}")
    return result, line


class StepSkipped(Exception):
    """The step cannot run here (its input is missing)."""


STEPS: list[tuple[str, Callable[[Step], tuple[dict, str]]]] = [
    ("machine", step_machine), ("tests", step_tests), ("bench_train", step_bench_train),
    ("bench_predict", step_bench_predict), ("isbi", step_isbi)]


# ------------------------------------------------------------------------------------ the check

def child_env(out: Path, dry_run: bool) -> dict:
    guard = out / ".guard"
    (guard / "wandb").mkdir(parents=True, exist_ok=True)
    (guard / "wandb" / "__init__.py").write_text(GUARD)
    env = dict(os.environ)
    paths = [str(guard), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), WANDB_MODE="disabled", UNET_DIST_WANDB_GUARD=str(guard / "imports.txt"),
               PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path even on a GPU machine
    return env


def run_step(name: str, fn, out: Path, env: dict, dry_run: bool, end: float, budget: float) -> dict:
    guard = Path(env["UNET_DIST_WANDB_GUARD"])
    guard.unlink(missing_ok=True)
    started = time.monotonic()
    left = end - started
    record = {"step": name, "dry_run": dry_run, "budget_s": budget, "status": "ok", "reason": "", "result": {},
              "log": f"logs/{name}.log"}
    step = Step(name, dry_run, out, env, deadline=started + min(budget, left))
    line = ""
    if left < MIN_START_S.get(name, 20):
        record.update(status="skipped", reason=f"only {left:.0f} s left before the deadline")
    else:
        try:
            record["result"], line = fn(step)
        except TimeUp as exc:
            record.update(status="timeout", reason=str(exc))
        except StepSkipped as exc:
            record.update(status="skipped", reason=str(exc))
        except StepFailed as exc:
            record.update(status="failed", reason=str(exc.args[0]))
            if len(exc.args) > 1:
                record["result"] = exc.args[1]
        except Exception as exc:  # a bug in this script or an unexpected report: recorded, not fatal
            record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    if guard.is_file():
        record.update(status="failed", reason="wandb was imported although W&B is disabled; importers in "
                                              f"{name}-wandb-imports.txt")
        shutil.copy(guard, out / f"{name}-wandb-imports.txt")
    record["seconds"] = round(time.monotonic() - started, 1)
    record["commands"] = [r.brief() for r in step.ran]
    summary = line if record["status"] == "ok" else record["reason"]
    record["summary"] = summary
    write_json(out / f"{name}.json", record)
    print(f"gpu_check: {name:<13} {record['status']:<7} {record['seconds']:6.1f} s  {summary}", flush=True)
    return record


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder for the JSON results and logs (created)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes (CI)")
    parser.add_argument("--deadline", type=float, help=f"seconds for all steps (default {DEADLINE_S}; "
                                                        f"dry run {DRY_DEADLINE_S})")
    parser.add_argument("--only", help="comma-separated steps to run (default: all)")
    args = parser.parse_args(argv)
    names = [n for n, _ in STEPS]
    only = args.only.split(",") if args.only else names
    if unknown := [n for n in only if n not in names]:
        print(f"error: --only: unknown step(s) {', '.join(unknown)}; steps are {', '.join(names)}", file=sys.stderr)
        return 2
    out = Path(args.outdir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    for old in (out / "logs").glob("*.log"):
        old.unlink()
    args.deadline = args.deadline or (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
    start = time.monotonic()
    end = start + args.deadline
    env = child_env(out, args.dry_run)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    print(f"gpu_check: {'DRY RUN (CPU, tiny sizes)' if args.dry_run else 'GPU'}; results in {out}; "
          f"deadline {args.deadline:.0f} s", flush=True)
    records = [run_step(name, fn, out, env, args.dry_run, end, budgets[name]) for name, fn in STEPS if name in only]
    summary = {"dry_run": args.dry_run, "seconds": round(time.monotonic() - start, 1), "deadline_s": args.deadline,
               "ok": all(r["status"] == "ok" for r in records),
               "steps": {r["step"]: {"status": r["status"], "seconds": r["seconds"], "summary": r["summary"]}
                         for r in records}}
    write_json(out / "summary.json", summary)
    shutil.rmtree(out / "work", ignore_errors=True)
    print(f"gpu_check: {'all steps ok' if summary['ok'] else 'NOT all steps ok'} in {summary['seconds']:.0f} s; "
          f"{out / 'summary.json'}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
