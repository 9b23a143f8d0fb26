"""A failed prediction: one line on every rank, and no half store that blocks the next run.

A block that fails (a damaged input chunk, a full disk, a read-only output, a block that raises every
time) is named with its region. Once every rank has stopped, the ranks compare notes (`settle`): when
no block is finished and this run created the output, the output is removed, so the same command
runs again as it is; otherwise the output stays, and the line says how many blocks are done and that
`--resume` finishes them.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from unet_dist import dist
from unet_dist.errors import UserError, write_fault
from unet_dist.predict.block_plan import Plan, block_core


def block_region(plan: Plan, index: int) -> str:
    """`block 5 (z 3:4, y 32:64, x 0:32)`, z in the input's slice numbers."""
    (z0, z1), (y0, y1), (x0, x1) = block_core(plan, index)
    return f"block {index} (z {z0 + plan.z0}:{z1 + plan.z0}, y {y0}:{y1}, x {x0}:{x1})"


@contextlib.contextmanager
def in_block(plan: Plan, index: int, out: Path | None = None, doing: str = "predicting") -> Iterator[None]:
    """Errors inside name the block; a write fault (full disk, read-only, ...) becomes a UserError
    naming the file, else `out` (a chunk written through a file descriptor does not know its path)."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"{exc}; in {block_region(plan, index)}") from None
    except Exception as exc:
        if fault := write_fault(exc, getattr(exc, "filename", None) or out):
            raise UserError(f"{fault}; in {block_region(plan, index)}") from None
        exc.add_note(f"while {doing} {block_region(plan, index)}")
        raise


def settle(error: Exception | None, out: Path, n_blocks: int, done: int, created: bool,
           patient: bool = False, outcome: Callable[[int], str] | None = None) -> None:
    """Every rank calls this once its share has stopped, `error` what stopped it (None: finished);
    `done`: the blocks this rank knows to be stored and recorded. When any rank failed, every rank
    raises: the first failure's line, and what became of the output (`outcome(finished blocks)` on
    rank 0 for another writer than predict, e.g. segment, whose state a rerun continues)."""
    message = None if error is None else str(error) if isinstance(error, UserError) else \
        f"{type(error).__name__}: {error}"
    notes = dist.all_gather_object((message, int(done)), patient=patient)
    failed = [(rank, m) for rank, (m, _) in enumerate(notes) if m is not None]
    if not failed:
        return
    finished = sum(d for _, d in notes)
    said = None
    if dist.is_main():
        said = outcome(finished) if outcome else _outcome(out, n_blocks, finished, created)
    said = dist.broadcast_object(said)
    rank, first = failed[0]
    line = f"{f'rank {rank}: ' if len(notes) > 1 else ''}{first}; {said}"
    if error is not None and not isinstance(error, UserError):
        error.add_note(said)  # a fault of ours keeps its traceback
        raise error
    raise UserError(line)


def _outcome(out: Path, n_blocks: int, finished: int, created: bool) -> str:
    """What became of the output (rank 0, after every rank has stopped writing)."""
    if finished == 0 and created:
        shutil.rmtree(out, ignore_errors=True)
        if not (out.exists() or out.is_symlink()):
            return f"no block was finished, so {out} was removed: the same command starts afresh"
        return f"no block was finished: remove {out}, or run again with --overwrite"
    return f"{finished} of {n_blocks} blocks are done: run again with --resume to finish"
