"""Checkpoints: the schema, atomic save, retention, loading the newest valid one, and the model in one.

A checkpoint is one dict of tensors and plain types, so `torch.load(weights_only=True)` reads it and
an untrusted file cannot run code. A file is valid only once complete: it is written to a temporary
name, flushed to disk, then `os.replace`d into place.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unet_dist.config import Config, from_dict, model_config_from_dict, parse_override, to_dict, validate
from unet_dist.errors import UserError
from unet_dist.files import fault_point
from unet_dist.model import build_model
from unet_dist.rundir import BEST, STEP_FILE, step_file

FORMAT = 1
REQUIRED_KEYS = ("format", "model", "model_config", "step")


def make_dir(directory: Path) -> Path:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointWriteError(f"{directory}: cannot create directory ({exc.strerror or exc})") from None
    return directory


def check_writable(directory: Path) -> None:
    """Fail before training starts if the run directory cannot take files."""
    directory = make_dir(directory)
    probe = directory / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
    except OSError as exc:
        raise CheckpointWriteError(f"{directory}: run directory is not writable ({exc.strerror or exc})") from None
    finally:
        probe.unlink(missing_ok=True)


def step_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / step_file(step)


class CheckpointWriteError(UserError):
    """The checkpoint could not be written (full disk, quota, read-only or missing directory)."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # Serialize in memory first: an I/O failure then surfaces as a plain OSError with its reason
    # ("No space left on device"), not as torch's opaque error from inside the zip writer.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        fault_point("checkpoint-write", tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path}: cannot write checkpoint ({exc.strerror or exc}); "
                                   "earlier checkpoints are untouched") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(ckpt_dir: Path, state: dict, keep_last: int, is_best: bool = False) -> Path:
    """Write `step-<step>.pt` atomically, refresh `best.pt` if asked, then prune old steps."""
    ckpt_dir = make_dir(ckpt_dir)
    state = {"format": FORMAT, **state}
    path = step_path(ckpt_dir, int(state["step"]))
    _atomic_torch_save(state, path)
    if is_best:
        _atomic_torch_save(state, ckpt_dir / BEST)
    prune(ckpt_dir, keep_last)
    return path


def save_best(ckpt_dir: Path, state: dict) -> Path:
    """Refresh only `best.pt` (a validation improved between periodic checkpoints)."""
    path = make_dir(ckpt_dir) / BEST
    _atomic_torch_save({"format": FORMAT, **state}, path)
    return path


def list_steps(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step files; never touches best.pt."""
    steps = list_steps(ckpt_dir)
    for old in steps[: max(0, len(steps) - keep_last)]:
        old.unlink(missing_ok=True)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one checkpoint safely; a truncated, foreign or malicious file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise UserError(f"{path}: not a valid unet_dist checkpoint ({_load_failure(exc)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path}: not a unet_dist checkpoint (missing keys)")
    if state["format"] != FORMAT:
        raise UserError(f"{path}: checkpoint format {state['format']} is not supported (expected {FORMAT})")
    return state


def _load_failure(exc: Exception) -> str:
    """Why torch could not load a file, in our words. Torch's own text for a file of Python objects
    advises loading it unsafely (weights_only=False), which runs whatever code the file holds: we
    never do that, and the message must not read as advice to."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "it holds Python objects that only an unsafe load would run; unet_dist loads checkpoints safely"
    if "zip archive" in text or "central directory" in text:
        return "a truncated or damaged file: not a complete PyTorch file"
    if isinstance(exc, (KeyError, EOFError)) or "invalid load key" in text:
        return "not a PyTorch file"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest step checkpoint that loads; torn or corrupt newer ones are reported and skipped."""
    for path in reversed(list_steps(ckpt_dir)):
        try:
            return load(path, map_location), path
        except UserError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr, flush=True)
    return None


def load_model(ckpt_path, overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, Config, dict]:
    """The checkpoint's model (eval mode, on the CPU), its config with `predict.*` overrides applied, and the
    checkpoint itself: the one way from a checkpoint to a model (predict, report, bench); mistakes are UserErrors."""
    state = load(ckpt_path)
    model_cfg = model_config_from_dict(state["model_config"], f"{ckpt_path}: model_config")
    stored = state.get("config") or {}
    if stored.get("model", state["model_config"]) != state["model_config"]:
        raise UserError(f"{ckpt_path}: its model_config and config.model disagree; not a checkpoint of one model")
    data = to_dict(from_dict(stored, str(ckpt_path)))
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "predict" or not name:
            raise UserError(f"command line: '{key}': only predict.* settings can be overridden here")
        data["predict"][name] = value
    cfg = from_dict(data, "command line")
    cfg.model = model_cfg
    validate(Config(predict=cfg.predict), "command line")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"{ckpt_path}: weights do not fit its model_config ({reason[:160]})") from None
    return model.eval(), cfg, state
