"""Checkpoints that a kill, a full disk, a flipped bit or a diverged run cannot cost a user.

Layout of ``--save DIR`` (plain DeepSpeed can read it: ``engine.load_checkpoint(DIR)``)::

    DIR/latest              tag of the newest complete checkpoint, moved last
    DIR/step00000400/       DeepSpeed's files (engine.save_checkpoint), rng-rank<r>.pt per rank,
                            train_state.json (settings, step, losses), manifest.json (every
                            file's size and CRC-32; written last: the completeness marker)
    DIR/corrupt-<tag>/      a checkpoint found damaged on resume, set aside (never deleted)

A save writes into ``DIR/.tmp-<tag>/<tag>/``; every rank checksums the files it wrote, rank 0
writes the manifest, renames the folder into place (atomic), moves ``latest``, then prunes to
the ``keep`` newest checkpoints with finite losses. A kill at any point leaves ``latest`` on a
complete checkpoint. A failed write (disk full, I/O error) raises CheckpointIOError with one
line; the previous checkpoint is untouched. On resume the chosen checkpoint's files are checked
against its manifest before DeepSpeed reads them; a damaged one is reported by file name, set
aside, and the next newest intact one is used (or, with ``strict``, the resume is refused).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from launch.errors import ConfigError, TrainingError, describe_io_error

TAG_RE = re.compile(r"^step(\d+)$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
_CHUNK = 1 << 20
PIECE = 4 << 20


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
    """The manifest is written last; a checkpoint from before manifests existed is complete
    with its train_state.json (which then does not say ``"manifest": true``)."""
    if (folder / MANIFEST).is_file():
        return True
    state = read_train_state(folder)
    return bool(state) and not state.get("manifest")


def read_train_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / TRAIN_STATE).read_text())
    except (OSError, ValueError):
        return {}


def finite_losses(state: dict) -> bool:
    vals = [state.get("train_loss"), state.get("val_loss")]
    return all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in vals)


def _is_step_folder(path: Path) -> bool:
    """A folder named for a step, or one holding a step's own files (a renamed copy)."""
    return bool(TAG_RE.match(path.name)) or (path / TRAIN_STATE).is_file() \
        or (path / MANIFEST).is_file()


def _latest_tag(root: Path) -> str:
    try:
        return (root / "latest").read_text().strip()
    except OSError:
        return ""


def scan(root) -> list[tuple[Path, Optional[str]]]:
    """Every step folder of ``root`` in the order a resume tries them: the one ``latest`` names,
    then the others by step, newest first; each with None (complete) or why it cannot be used
    (``latest`` naming a folder that is not there, a step folder without its manifest). ``root``
    may also be one step folder. ``.tmp-*`` (a kill during a save) and ``corrupt-*`` never
    count."""
    root = Path(root)
    if not root.is_dir():
        return []

    def why(folder: Path) -> Optional[str]:
        return None if _complete(folder) else (
            f"is incomplete (no {MANIFEST}: a save or copy that did not finish)")
    if _is_step_folder(root):                                  # --resume DIR/step00000400
        return [(root, why(root))]
    found = sorted((p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                   key=lambda p: int(TAG_RE.match(p.name).group(1)), reverse=True)
    tag = _latest_tag(root)
    named = [p for p in found if p.name == tag]
    gone = []
    if tag and not named:
        gone = [(root / tag, f"is named by {root / 'latest'} but "
                 + ("is not there (deleted?)" if not (root / tag).exists() else
                    "is not a step folder of launch/train.py"))]
    return gone + [(p, why(p)) for p in named + [p for p in found if p.name != tag]]


def candidates(root) -> list[Path]:
    """Complete checkpoint folders under ``root``, newest first: the one ``latest`` names, then
    the others by step (``scan``'s order, without the unusable ones)."""
    return [p for p, why in scan(root) if why is None]


def find_checkpoint(root) -> Optional[tuple[str, Path]]:
    """(tag, folder) of the newest complete checkpoint (not verified; see Checkpointer.choose)."""
    c = candidates(root)
    return (c[0].name, c[0]) if c else None


def no_checkpoint(flag: str, root, skipped=None) -> str:
    """The one-line error of a folder without an intact checkpoint: every step and why
    (``skipped``: (folder, why) pairs; default: ``scan``'s unusable ones)."""
    skipped = [(f, why) for f, why in scan(root) if why] if skipped is None else skipped
    what = "; ".join(f"{f.name} {why}" for f, why in skipped)
    return f"{flag} {root}: no intact checkpoint there" + (
        f" ({what})" if what else
        " (no step folder, no 'latest': not a checkpoint folder of launch/train.py)")


def open_checkpoint(path, log: Callable[[str], None] = print,
                    flag: str = "--checkpoint") -> Path:
    """The step folder a reader of checkpoints uses (launch/export.py, generate.py,
    evaluate.py, consolidate.py, reshard.py): chosen and verified against its manifest exactly
    as ``train.py --resume`` chooses (Checkpointer.choose: the one ``latest`` names, else the
    newest; a damaged, incomplete or missing one is skipped with a one-line notice naming it
    and why, falling back to the newest intact one), in this process alone and without
    renaming anything. ConfigError (one line, every reason) when none is intact."""
    return Checkpointer(path, None, 0, 1, None, log=log).choose(
        path, strict=False, set_aside=False, required=True, flag=flag)


def _crc_piece(path: Path, offset: int, length: int) -> str:
    crc = 0
    buf = bytearray(min(_CHUNK, max(length, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        while length > 0:
            n = fh.readinto(view[:min(length, len(buf))])
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            length -= n
    return f"{crc:08x}"


def _zip_directory(path: Path) -> Optional[str]:
    """For a torch zip file: a CRC-32 over its central directory (each record's name, CRC-32,
    sizes and offset), else None. torch computes every record's CRC-32 while it writes, so
    this checksums the whole file for the cost of reading its directory."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if not infos or any(i.CRC == 0 and i.file_size for i in infos):   # written without CRCs
        return None
    blob = "\n".join(f"{i.filename}:{i.CRC}:{i.file_size}:{i.compress_size}:{i.header_offset}"
                     for i in infos)
    return f"zip:{zlib.crc32(blob.encode()):08x}"


def checksum_async(pool, path: Path) -> Callable[[], list]:
    """Start checksumming a file; returns a function giving ``[size, check]``. ``check`` is
    ``"zip:<crc>"`` for a torch zip file (see _zip_directory; verified record by record), else
    the CRC-32 (zlib, the zip format's check) of each PIECE-sized piece, computed on the pool's
    threads. CRC-32 finds every burst of flipped bits up to 32 long and all but 1 in 4e9 of the
    rest; a cryptographic hash of every byte slowed a save of the tiny preset by a third."""
    size = os.stat(path).st_size
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    directory = _zip_directory(path) if is_zip else None
    if directory is not None:
        return lambda: [size, directory]
    parts = [pool.submit(_crc_piece, path, o, min(PIECE, size - o))
             for o in range(0, max(size, 1), PIECE)]
    return lambda: [size, [f.result() for f in parts]]


def _mismatch(path: Path, size: int, got, want) -> Optional[str]:
    """Why a file does not match its manifest entry (None: it does)."""
    if size != want[0]:
        return f"{size} bytes, expected {want[0]}" + (" (truncated)" if size < want[0] else "")
    if isinstance(want[1], str):
        if got != want[1]:
            return "zip directory checksum mismatch (corrupted)"
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            return f"unreadable zip ({e})"
        return f"checksum mismatch in record {bad} (corrupted)" if bad else None
    bad = [i for i, (a, b) in enumerate(zip(got, want[1])) if a != b]
    if bad or len(got) != len(want[1]):
        at = bad[0] * PIECE if bad else 0
        return f"checksum mismatch in bytes {at}-{min(at + PIECE, size)} (corrupted)"
    return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write a small file so that readers see the old or the new content, never a mix
    (``durable``: on disk before this returns, fsync'ed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
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
        if self.dist is None:                     # one process (the readers)
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def _agree(self, error: Optional[str], cls=CheckpointIOError) -> None:
        """Every rank raises the first rank's error, so no rank waits for one that left."""
        errors = [e for e in self._gather(error) if e]
        if errors:
            raise cls(errors[0])

    def _problems(self, folder: Path, names: list[str], manifest: dict) -> list[str]:
        """Each rank checks every world-th file against the manifest; all problems, gathered."""
        def check(name):
            try:
                size, got = checksum_async(pool, folder / name)()
                why = _mismatch(folder / name, size, got, manifest[name])
            except OSError as e:
                why = f"unreadable ({e.strerror or e})"
            except (TypeError, ValueError, IndexError, KeyError) as e:
                why = f"bad manifest entry ({e})"
            return f"{folder.name}/{name}: {why}" if why else None
        with ThreadPoolExecutor(max_workers=4) as pool:
            mine = [p for p in pool.map(check, names[self.rank::self.world]) if p]
        return [p for part in self._gather(mine) for p in part]

    # -- save ------------------------------------------------------------------------------
    def clean_leftovers(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()

    def save(self, step: int, client_state: dict, train_state: dict,
             rng_state: Callable[[], dict], extra: Optional[dict] = None) -> Path:
        """``extra``: more files rank 0 writes into the checkpoint (name -> object for
        torch.save), checksummed like the rest."""
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
        folder = staging / tag
        with ThreadPoolExecutor(max_workers=4) as pool, self._sealing(pool) as (sealed, seal):
            try:
                # a failure inside DeepSpeed's save may leave other ranks in its barriers: this
                # rank reports and leaves at once (the launcher stops the others)
                self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state,
                                            save_latest=False)
                fault("kill:save-written", step, self.rank)
                torch.save(rng_state(), folder / f"rng-rank{self.rank}.pt")
                seal(folder / f"rng-rank{self.rank}.pt")
                if self.rank == 0:
                    state = dict(train_state, manifest=self.manifest)
                    (folder / TRAIN_STATE).write_text(json.dumps(state, indent=1))
                    seal(folder / TRAIN_STATE)
                    for name, obj in (extra or {}).items():
                        torch.save(obj, folder / name)
                        seal(folder / name)
                mine = {}
                for p, (sync, digest) in sealed.items():
                    sync.result()
                    if digest is not None and folder in p.parents:
                        mine[str(p.relative_to(folder))] = digest()
            except (OSError, RuntimeError) as e:
                message = self._io_message(e, tag, staging)
                self._discard(staging)
                raise CheckpointIOError(message) from e
        self.dist.barrier()
        if self.manifest:
            files = {}
            for part in self._gather(mine):
                files.update(part)
            if self.rank == 0:
                def write_manifest():
                    with ThreadPoolExecutor(max_workers=4) as extra:
                        for name in _files(folder):  # anything DeepSpeed wrote another way
                            if name not in files:
                                files[name] = checksum_async(extra, folder / name)()
                    write_atomic(folder / MANIFEST, json.dumps(
                        {"format": 1, "tag": tag, "algorithm": "zip directory CRC-32, else CRC-32 per 4 MiB", "files": files},
                        indent=1), durable=False)
                error = self._try(write_manifest, tag, staging)
            self._agree(error)
        fault("kill:save-manifest", step, self.rank)
        if self.rank == 0:
            error = self._try(lambda: self._publish(staging, tag), tag, staging)
        self._agree(error)
        return self.root / tag

    @contextmanager
    def _sealing(self, pool):
        """Make each file the save writes durable (fsync) and checksum it as soon as it is
        written, on other cores while the next file is being written: every rank seals what
        it wrote itself. Yields ({path: (fsync future, checksum getter or None)}, seal)."""
        sealed: dict = {}
        ce = getattr(self.engine, "checkpoint_engine", None)

        def seal(path):
            path = Path(path)
            sync = pool.submit(_fsync_file, path)
            digest = checksum_async(pool, path) if self.manifest else None
            sealed[path] = (sync, digest)
        if ce is None:
            yield sealed, seal
            return
        original = ce.save

        def save(state_dict, path):
            original(state_dict, path)
            seal(path)
        ce.save = save
        try:
            yield sealed, seal
        finally:
            del ce.save

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
        names, manifest = None, None
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
        names, problems, manifest = self._gather((names, problems, manifest))[0]
        return problems + self._problems(folder, names, manifest) if names else problems

    def choose(self, root, strict: bool, set_aside: bool = True, required: bool = False,
               flag: str = "--resume") -> Optional[Path]:
        """The newest intact checkpoint under ``root`` (``scan``'s order, each verified against
        its manifest): the one rule of every reader (``open_checkpoint``) and of the resume. A
        skipped one (damaged, incomplete, or named by ``latest`` but gone) is reported in one
        line naming it, why and the step used instead; a damaged one is set aside as
        ``corrupt-<tag>`` when ``set_aside`` (the resume; readers rename nothing). ``strict``:
        refuse instead of falling back. ``required``: ConfigError when none is intact (else
        None)."""
        root = Path(root)
        skipped: list[tuple[Path, str, str]] = []          # folder, why, what was done
        for folder, why in scan(root):
            if why is None:
                problems = self.verify(folder)
                if not problems:
                    self._report(skipped, folder.name)
                    if self.rank == 0 and not (folder / MANIFEST).is_file():
                        self.log(f"warning: {folder} has no manifest (saved by an older "
                                 "version): its files are not verified")
                    if (self.rank == 0 and set_aside and skipped and TAG_RE.match(folder.name)
                            and folder.parent == root and _latest_tag(root) != folder.name):
                        write_atomic(root / "latest", folder.name)   # for plain DeepSpeed
                    return folder
                why = f"is damaged ({'; '.join(problems)})"
            if strict:
                raise ConfigError(f"checkpoint {folder} {why}; resume without --strict-resume "
                                  "to fall back to the newest intact one")
            done = ""
            if set_aside and why.startswith("is damaged"):
                aside = folder.with_name(f"corrupt-{folder.name}")
                if self.rank == 0:
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(folder, aside)
                if self.dist is not None:
                    self.dist.barrier()
                done = f"set aside as {aside.name}, "
            skipped.append((folder, why, done))
        if required:
            raise ConfigError(no_checkpoint(flag, root, [(f, why) for f, why, _ in skipped]))
        self._report(skipped, None)
        return None

    def _report(self, skipped, using: Optional[str]) -> None:
        """One line per skipped checkpoint, naming the one used instead."""
        if self.rank != 0:
            return
        for folder, why, done in skipped:
            self.log(f"warning: checkpoint {folder.name} {why}; {done}falling back to "
                     + (using or "none: no intact checkpoint is left"))

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


    def load_resharded(self, folder: Path, set_rng_state: Callable[[dict], None],
                       names=None) -> dict:
        """Resume ``folder`` at this engine's job shape, which differs from the one that saved
        it (launch/reshard.py); returns its client state with ``converted`` (what was restored,
        from which shape). Ranks that did not exist take rank 0's random state."""
        import torch

        from launch.reshard import describe, load_universal, read_universal
        try:
            state = read_universal(folder, verified=True)
            done = load_universal(self.engine, state, names)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(f"could not convert checkpoint {folder} to this job's shape: "
                                f"{type(e).__name__}: {e}") from e
        rng = folder / f"rng-rank{self.rank}.pt"
        if not rng.is_file():
            rng = folder / "rng-rank0.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        ts = read_train_state(folder)
        return {"step": ts.get("step"), "train_state": ts,
                "converted": f"{', '.join(done)} from {describe(state.shape)}"}


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

