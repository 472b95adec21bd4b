"""Checkpoints that a kill, a full disk, a flipped bit or a diverged run cannot cost a user.

Layout of ``--save DIR`` (plain DeepSpeed can read it: ``engine.load_checkpoint(DIR)``)::

    DIR/latest              tag of the newest complete checkpoint, moved last
    DIR/step00000400/       DeepSpeed's files (engine.save_checkpoint), rng-rank<r>.pt per rank,
                            train_state.json (settings, step, losses), manifest.json (every
                            file's size and sha256; written last: the completeness marker)
    DIR/corrupt-<tag>/      a checkpoint found damaged on resume, set aside (never deleted)

A save writes into ``DIR/.tmp-<tag>/<tag>/``; every rank checksums a share of the files, rank 0
writes the manifest, renames the folder into place (atomic), moves ``latest``, then prunes to
the ``keep`` newest checkpoints with finite losses. A kill at any point leaves ``latest`` on a
complete checkpoint. A failed write (disk full, I/O error) raises CheckpointIOError with one
line; the previous checkpoint is untouched. On resume the chosen checkpoint's files are checked
against its manifest before DeepSpeed reads them; a damaged one is reported by file name, set
aside, and the next newest intact one is used (or, with ``strict``, the resume is refused).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from launch.errors import ConfigError, TrainingError, describe_io_error

TAG_RE = re.compile(r"^step(\d+)$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
_CHUNK = 8 << 20


class CheckpointIOError(TrainingError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def fault(point: str, step: Optional[int] = None, rank: int = 0) -> bool:
    """Fault injection for tests/test_faults.py: ``EMBER_FAULT=point[@step][#rank],...``. A
    ``kill:`` point kills this process with SIGKILL; other points return True where they
    apply (the caller injects the fault). Unset in normal runs: one dict lookup."""
    spec = os.environ.get("EMBER_FAULT")
    if not spec:
        return False
    for item in spec.split(","):
        name, _, r = item.partition("#")
        name, _, s = name.partition("@")
        if name == point and (not s or int(s) == step) and (not r or int(r) == rank):
            if point.startswith("kill:"):
                os.kill(os.getpid(), signal.SIGKILL)
            return True
    return False


def _complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / TRAIN_STATE).is_file()


def read_train_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / TRAIN_STATE).read_text())
    except (OSError, ValueError):
        return {}


def finite_losses(state: dict) -> bool:
    vals = [state.get("train_loss"), state.get("val_loss")]
    return all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in vals)


def candidates(root) -> list[Path]:
    """Complete checkpoint folders under ``root``, newest first: the one ``latest`` names, then
    the others by step. ``.tmp-*`` (a kill during a save) and ``corrupt-*`` never count."""
    root = Path(root)
    if not root.is_dir():
        return []
    if TAG_RE.match(root.name) and _complete(root):         # --resume DIR/step00000400
        return [root]
    found = sorted((p for p in root.iterdir()
                    if p.is_dir() and TAG_RE.match(p.name) and _complete(p)),
                   key=lambda p: int(TAG_RE.match(p.name).group(1)), reverse=True)
    try:
        tag = (root / "latest").read_text().strip()
    except OSError:
        tag = ""
    named = [p for p in found if p.name == tag]
    return named + [p for p in found if p.name != tag]


def find_checkpoint(root) -> Optional[tuple[str, Path]]:
    """(tag, folder) of the newest complete checkpoint (not verified; see Checkpointer.choose)."""
    c = candidates(root)
    return (c[0].name, c[0]) if c else None


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Checkpointer:
    """Saves, verifies, chooses and loads checkpoints of one run (every rank makes the same
    calls; ``dist`` is torch.distributed)."""

    def __init__(self, root, engine, rank: int, world: int, dist, keep: int = 2,
                 manifest: bool = True, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.engine, self.rank, self.world, self.dist = engine, rank, world, dist
        self.keep, self.manifest, self.log = keep, manifest, log

    # -- collective helpers ----------------------------------------------------------------
    def _gather(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def _agree(self, error: Optional[str], cls=CheckpointIOError) -> None:
        """Every rank raises the first rank's error, so no rank waits for one that left."""
        errors = [e for e in self._gather(error) if e]
        if errors:
            raise cls(errors[0])

    def _digests(self, folder: Path, names: list[str]) -> dict:
        """{name: [size, sha256]}: each rank hashes every world-th file (threads for the rest)."""
        mine = names[self.rank::self.world]
        with ThreadPoolExecutor(max_workers=min(4, max(1, len(mine)))) as pool:
            local = dict(zip(mine, pool.map(lambda n: list(_sha256(folder / n)), mine)))
        merged = {}
        for part in self._gather(local):
            merged.update(part)
        return merged

    # -- save ------------------------------------------------------------------------------
    def clean_leftovers(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()

    def save(self, step: int, client_state: dict, train_state: dict,
             rng_state: Callable[[], dict]) -> Path:
        import torch
        tag = tag_of(step)
        staging = self.root / f".tmp-{tag}"
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(staging, ignore_errors=True)
            except OSError as e:
                error = describe_io_error(e, f"checkpoint folder {self.root}", self.root.parent)
        self._agree(error)
        try:
            # a failure inside DeepSpeed's save may leave other ranks in its barriers: this
            # rank reports and leaves at once (the launcher stops the others)
            self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state,
                                        save_latest=False)
            fault("kill:save-written", step, self.rank)
            torch.save(rng_state(), staging / tag / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                write_atomic(staging / tag / TRAIN_STATE, json.dumps(train_state, indent=1))
        except (OSError, RuntimeError) as e:
            message = self._io_message(e, tag, staging)
            self._discard(staging)
            raise CheckpointIOError(message) from e
        self.dist.barrier()
        folder = staging / tag
        if self.manifest:
            names = _files(folder) if self.rank == 0 else None
            names = self._gather(names)[0]
            try:
                files = self._digests(folder, names)
                error = None
            except OSError as e:
                files, error = {}, self._io_message(e, tag, staging)
            self._agree(error)
            if self.rank == 0:
                error = self._try(lambda: write_atomic(folder / MANIFEST, json.dumps(
                    {"format": 1, "tag": tag, "algorithm": "sha256", "files": files}, indent=1)),
                    tag, staging)
            self._agree(error)
        fault("kill:save-manifest", step, self.rank)
        if self.rank == 0:
            error = self._try(lambda: self._publish(staging, tag), tag, staging)
        self._agree(error)
        return self.root / tag

    def _io_message(self, e, tag, staging) -> str:
        latest = find_checkpoint(self.root)
        kept = (f"; the previous checkpoint {latest[0]} is intact and named by latest"
                if latest else "")
        name = getattr(e, "filename", None)
        if not name:                 # torch's writer does not say which file: the newest one
            written = [p for p in staging.rglob("*") if p.is_file()]
            name = max(written, key=lambda p: p.stat().st_mtime).name if written else None
        what = f"{tag}/{Path(name).name}" if name else tag
        return (describe_io_error(e, f"checkpoint {what} in {self.root}", self.root)
                + f"{kept}; free space (or fix the folder) and rerun with --resume")

    def _try(self, fn, tag, staging) -> Optional[str]:
        try:
            fn()
            return None
        except OSError as e:
            message = self._io_message(e, tag, staging)
            self._discard(staging)
            return message

    def _discard(self, staging: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)      # give the space back

    def _publish(self, staging: Path, tag: str) -> None:
        final = self.root / tag
        if final.exists():                    # re-saving a step (after resuming further back)
            old = self.root / f".tmp-old-{tag}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staging / tag, final)
        fsync_dir(self.root)
        fault("kill:save-renamed", int(tag[4:]))
        write_atomic(self.root / "latest", tag)
        for extra in staging.iterdir():       # e.g. DeepSpeed's zero_to_fp32.py
            if not (self.root / extra.name).exists():
                shutil.move(str(extra), self.root / extra.name)
        shutil.rmtree(staging, ignore_errors=True)
        self.prune(keep_tag=tag)

    def prune(self, keep_tag: str) -> None:
        """Keep the ``keep`` newest checkpoints whose losses were finite (and ``keep_tag``);
        delete the rest. The newest finite checkpoint is never deleted."""
        done = sorted((int(TAG_RE.match(p.name).group(1)), p) for p in self.root.iterdir()
                      if p.is_dir() and TAG_RE.match(p.name) and _complete(p))
        finite = [p for _, p in done if finite_losses(read_train_state(p))]
        keep = {p.name for p in finite[-self.keep:]} | {keep_tag}
        for _, p in done:
            if p.name not in keep:
                fault("kill:prune", int(TAG_RE.match(keep_tag).group(1)))
                shutil.rmtree(p, ignore_errors=True)

    # -- resume ----------------------------------------------------------------------------
    def verify(self, folder: Path) -> list[str]:
        """Problems of a checkpoint against its manifest (empty: intact). Collective."""
        names = None
        problems: list[str] = []
        if self.rank == 0:
            try:
                manifest = json.loads((folder / MANIFEST).read_text())["files"]
                names = sorted(n for n in manifest if (folder / n).is_file())
                problems = [f"{folder.name}/{n}: missing" for n in sorted(manifest)
                            if not (folder / n).is_file()]
            except FileNotFoundError:
                names = []                  # written before manifests existed: not checkable
            except (OSError, ValueError, KeyError, TypeError) as e:
                names, problems = [], [f"{folder.name}/{MANIFEST}: unreadable ({e})"]
        names, problems = self._gather((names, problems))[0]
        try:
            got = self._digests(folder, names) if names else {}
        except OSError as e:
            got, problems = {}, problems + [f"{folder.name}: unreadable ({e})"]
        if self.rank == 0 and names:
            manifest = json.loads((folder / MANIFEST).read_text())["files"]
            for n in names:
                (size, digest), (want_size, want) = got[n], manifest[n]
                if size != want_size:
                    problems.append(f"{folder.name}/{n}: {size} bytes, expected {want_size}"
                                    + (" (truncated)" if size < want_size else ""))
                elif digest != want:
                    problems.append(f"{folder.name}/{n}: checksum mismatch (corrupted)")
        return self._gather(problems)[0]

    def choose(self, root, strict: bool) -> Optional[Path]:
        """The newest intact checkpoint under ``root``. Damaged ones are reported, then set
        aside as ``corrupt-<tag>`` (or, with ``strict``, the resume is refused)."""
        for folder in candidates(root):
            problems = self.verify(folder)
            if not problems:
                if self.rank == 0 and not (folder / MANIFEST).is_file():
                    self.log(f"warning: {folder} has no manifest (saved by an older version): "
                             "its files are not verified")
                return folder
            what = "; ".join(problems)
            if strict:
                raise ConfigError(f"checkpoint {folder} is damaged: {what}; resume without "
                                  "--strict-resume to fall back to the newest intact one")
            if self.rank == 0:
                aside = folder.with_name(f"corrupt-{folder.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(folder, aside)
                self.log(f"warning: checkpoint {folder.name} is damaged ({what}); set aside as "
                         f"{aside.name}, falling back to the previous one")
            self.dist.barrier()
        return None

    def load(self, folder: Path, set_rng_state: Callable[[dict], None]) -> dict:
        """DeepSpeed loads a verified folder ``<root>/<tag>``; returns its client state."""
        import torch
        try:
            load_path, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        except Exception as e:          # noqa: BLE001 - DeepSpeed / torch raise many kinds
            raise TrainingError(f"could not load checkpoint {folder}: {type(e).__name__}: "
                                f"{e}") from e
        if load_path is None:
            raise TrainingError(f"DeepSpeed could not load the checkpoint {folder}")
        rng = folder / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        return client or {}


def rng_state() -> dict:
    import random

    import numpy as np
    import torch
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        state["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:       # noqa: BLE001 - tracker without states (CPU)
        pass
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        try:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker
            get_cuda_rng_tracker().set_states(state["tracker"])
        except Exception:   # noqa: BLE001
            pass

