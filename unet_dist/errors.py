"""The one exception type for a user's mistake, and how a command turns it into one line.

A `UserError` becomes one line on stderr and exit code 2 (`run_command`, used by the console
script and the launchers); anything else is a fault and keeps its traceback. The message names the
file or key and the problem.

A fault of the place being written (disk full, quota, read-only file system, no permission) is the
user's to fix too: `writing(path)` turns it into a UserError naming the path, where a command writes
(some writes, like a file descriptor's, do not know their path); `run_command` turns any such error
left into the same line with the path the error carries. A permission error may come from reading
as well (an input file chmod 000): the line then says "cannot read" and names that file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator

EXIT_USER_ERROR = 2
_warned: set[str] = set()
# What the user (or the cluster's admins) must fix where the output goes; anything else is a fault of ours.
WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG})


class UserError(Exception):
    """A mistake in the user's input (file, config key, argument), not a bug."""


def run_command(command: Callable[[], int]) -> int:
    """Run `command`; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        return command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as exc:
        if (fault := write_fault(exc)) is None:
            raise
        print(f"error: {fault}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def write_fault(exc: BaseException, path=None) -> UserError | None:
    """`exc` as a UserError naming `path` (else the file the error names) when it is a fault of the
    place being written (full disk, quota, read-only, no permission) or a file that refuses reading;
    None for anything else."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_FAULTS:
        return None
    # A permission error on a file that refuses reading is the read it most likely was (an input
    # chmod 000, read while writing `path`): writes here go through new temporary files.
    if exc.errno == errno.EACCES and exc.filename and not _readable(exc.filename):
        return UserError(f"{exc.filename}: cannot read ({exc.strerror or exc})")
    where = path if path is not None else exc.filename
    return UserError(f"{f'{where}: ' if where else ''}cannot write ({exc.strerror or exc})")


def _readable(path) -> bool:
    """False only for a path that is there (a file or a folder) and refuses reading; a path not there,
    or in a folder we cannot look into, says nothing about reading."""
    try:
        os.lstat(path)
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # non-blocking: a FIFO must not hang us
    except PermissionError:
        return not os.path.lexists(path)
    except OSError:
        return True
    return True


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Inside: a write fault (see `write_fault`) becomes one UserError line naming `path`."""
    try:
        yield
    except OSError as exc:
        if (fault := write_fault(exc, path)) is None:
            raise
        raise fault from None


def warn_once(message: str) -> None:
    """`warning: ...` on stderr, once per process for each distinct message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
