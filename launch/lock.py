"""One run per folder: an exclusive lock file in --out and in --save.

Two runs writing the same metrics.csv or checkpoint folder destroy each other's work without an
error, so a run claims each folder with ``<folder>/.run.lock`` (created with O_EXCL; it holds
host, pid, the process start time and the command). A second run refuses, naming the holder.
A lock whose holder is gone (killed with -9, a node that crashed) must not block the restart:
on the same host the holder is checked directly (pid alive and the same process); from another
host the holder is presumed dead when it has not refreshed the lock's time stamp (done every
minute by a background thread) for ``STALE_AFTER`` seconds. A stale lock is taken over with a
notice.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".run.lock"
REFRESH_EVERY = 60.0
STALE_AFTER = 600.0


class LockError(RuntimeError):
    """The folder is held by another live run."""


def _start_time(pid: int):
    """Kernel start time of a process (tells a reused pid from the original), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict, age: float) -> bool:
    if holder.get("host") != socket.gethostname():
        return age < STALE_AFTER
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError, OverflowError):
        return False
    started = _start_time(pid)
    return started is None or holder.get("start") in (None, started)


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {when}"


class RunLock:
    """``acquire()`` claims the folder or raises LockError; ``release()`` frees it (only while
    it is still ours)."""

    def __init__(self, folder, purpose: str, log=print):
        self.folder, self.purpose, self.log = Path(folder), purpose, log
        self.path = self.folder / LOCK_NAME
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), start=_start_time(os.getpid()),
                       time=time.time(), cmd=" ".join(sys.argv)[:300])
        self._stop = threading.Event()

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.me))
            threading.Thread(target=self._refresh, daemon=True).start()
            return self
        raise LockError(f"could not lock {self.folder}: its lock file {self.path} keeps changing")

    def _handle_existing(self) -> None:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return                                     # released meanwhile: try again
        try:
            holder = json.loads(text)
        except ValueError:                             # being written right now, or garbage
            if age < 5:
                time.sleep(0.2)
                return
            holder = {}
        if holder and _alive(holder, age):
            raise LockError(f"{self.purpose} folder {self.folder} is in use by another run "
                            f"({_describe(holder)}); wait for it to end or use another folder")
        # stale: move it aside, and make sure what we moved is the stale lock we judged
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:                  # another run's fresh lock: put it back
            os.rename(aside, self.path)
            return
        aside.unlink()
        self.log(f"took over the stale lock of {self.folder} "
                 f"({_describe(holder) if holder else 'unreadable'}; that run is gone)")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
