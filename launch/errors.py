"""How a failed run tells the user why, under any launcher.

Launchers (torchrun, the deepspeed launcher, srun) kill every rank as soon as one exits with an
error, so a message printed only by rank 0 can be lost. Every rank therefore prints its own
error, one line on stderr, flushed before it exits; the exit status says what kind of failure
it was:

    2  settings, data or a refused resume: nothing was trained, change the command
    3  training diverged (non-finite loss or gradients past the budget); no bad checkpoint saved
    1  anything else (an I/O error while saving, a crashed rank, a bug)
"""
from __future__ import annotations

import errno
import os
import sys
import traceback

EXIT_SETTINGS, EXIT_NONFINITE, EXIT_FAILED = 2, 3, 1


class ConfigError(ValueError):
    """Wrong or contradictory settings, or a checkpoint this run cannot resume from."""


class TrainingError(RuntimeError):
    """A failure during the run that the user has to act on (its message says how)."""
    exit_code = EXIT_FAILED


class NonFiniteError(TrainingError):
    """Training produced non-finite losses or gradients for more steps than allowed."""
    exit_code = EXIT_NONFINITE


def exit_code_of(exc: BaseException) -> int:
    from launch.data import DataError
    if isinstance(exc, (ConfigError, DataError)):
        return EXIT_SETTINGS
    return getattr(exc, "exit_code", EXIT_FAILED)


def report(exc: BaseException, rank: int, world: int) -> int:
    """Print ``error: ...`` for this rank (a traceback first when it is not one of ours) and
    return the exit status."""
    code = exit_code_of(exc)
    if code == EXIT_FAILED and not isinstance(exc, TrainingError):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        msg = f"{type(exc).__name__}: {exc}"
    else:
        msg = str(exc)
    msg = " ".join(msg.split())                   # one line, whatever the exception held
    where = f" [rank {rank} of {world}]" if world > 1 else ""
    print(f"error: {msg}{where}", file=sys.stderr, flush=True)
    return code


def describe_io_error(exc: BaseException, what: str, folder) -> str:
    """One line for a failed write: names disk full / quota when that is the cause, even when
    torch's C++ writer only says ``basic_ios::clear: iostream error``."""
    no = getattr(exc, "errno", None)
    full = no in (errno.ENOSPC, errno.EDQUOT)
    if not full and no is None:
        try:
            st = os.statvfs(folder)
            full = st.f_bavail * st.f_frsize < (1 << 20)       # under 1 MiB left
        except OSError:
            pass
    if full:
        cause = "disk quota exceeded" if no == errno.EDQUOT else "no space left on device"
    else:
        cause = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
    return f"{cause} while writing {what}"
