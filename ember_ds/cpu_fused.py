"""Ember's table passes on CPU as fused C++ loops (``ember_ds/csrc/ember_cpu.cpp``).

The torch path in ``ember_ds.factored`` runs each pass as several torch ops per row chunk, so
it reads and writes chunk temporaries; the C++ loops do each pass in one sweep: the statistics
read G once, the update reads G and W and writes W, with OpenMP over rows, no temporaries
beyond 256 column partial sums, and the same values (the update bitwise: the same fp32
operations in the same order; the sums in a fixed order, so bitwise reproducible for any
thread count). A third call does a table's state step (r, c, s, the finite check, the
factors) in place of a dozen small torch ops: after a pass has streamed the table through
the caches each small op runs cold, and those ops cost about 0.3 ms of a 10 ms step.
``docs/EMBER.md`` ("The CPU path") says why C++ and not torch.compile.

The library is a plain C ABI (no torch or Python headers), built by one compiler call (about
a second) the first time a CPU table step runs, and cached per machine under the torch
extensions directory (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``) keyed by
the source, compiler, flags and CPU. Built with ``-march=native`` and ``-ffp-contract=off``.

``EMBER_DS_CPU_FUSED=0`` (read at every step) forces the torch path; ``CXX`` names the
compiler (default ``c++``). If the build fails or no compiler is found, the torch path is
used. Either way one line (rank 0 only under torch.distributed) says which path runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ENV = "EMBER_DS_CPU_FUSED"
SOURCE = Path(__file__).resolve().parent / "csrc" / "ember_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
         "-std=c++17", "-shared", "-fPIC"]
_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_UPDATE_PAIRS = {(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                 (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                 (torch.float32, torch.float16), (torch.float16, torch.float32),
                 (torch.float16, torch.float16)}

_lock = threading.Lock()
_lib = None          # the loaded ctypes library, once loaded
_tried = False       # a load was attempted (successful or not)
_reason = ""         # why the torch path is used, when it is
_build_s = None      # seconds the build took in this process (None: loaded from the cache)
_path = None         # the cached library
_noticed = False


def enabled() -> bool:
    """False when ``EMBER_DS_CPU_FUSED`` is set to 0 / false / off / no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "torch_extensions")
    return Path(root) / "ember_ds_cpu"


def _cpu_id() -> str:
    """The CPU's identity for the cache key (-march=native code must not move machines)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler():
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx) or (None if os.environ.get("CXX") else shutil.which("g++"))


def build(force: bool = False) -> tuple[Path, bool]:
    """Compile the library (or find it in the cache): (its path, whether this call built it).
    Raises on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), " ".join(version).encode(),
                                     _cpu_id().encode(), platform.machine().encode()]))
    out_dir = _cache_dir()
    target = out_dir / f"ember_cpu_{key.hexdigest()[:16]}.so"
    if target.exists() and not force:
        return target, False
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed: " +
                               (proc.stderr.strip().splitlines() or ["(no output)"])[-1])
        os.replace(tmp, target)  # atomic: ranks building at once each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target, True


def _load():
    global _lib, _tried, _reason, _build_s, _path
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            t0 = time.perf_counter()
            path, built = build()
            lib = ctypes.CDLL(str(path))
            if lib.ember_abi_version() != 2:
                raise RuntimeError("stale library (ABI version)")
            i64, vp, fp = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
            lib.ember_stats.argtypes = [vp, ctypes.c_int, i64, i64, i64, fp, fp, fp, ctypes.c_int]
            lib.ember_stats.restype = ctypes.c_int
            lib.ember_update.argtypes = [vp, ctypes.c_int, vp, ctypes.c_int, i64, i64, i64, i64,
                                         fp, fp, ctypes.c_double, ctypes.c_double,
                                         ctypes.c_double, ctypes.c_int]
            lib.ember_update.restype = ctypes.c_int
            d = ctypes.c_double
            lib.ember_state.argtypes = [fp, fp, fp, fp, fp, i64, i64, d, d, d, d, d, d, fp, fp]
            lib.ember_state.restype = ctypes.c_int
            lib.has_f16 = bool(lib.ember_has_f16())
            _build_s = time.perf_counter() - t0 if built else None
            _lib, _path = lib, path
        except Exception as exc:  # no compiler, a failed build, a library that will not load
            _lib, _reason = None, f"{type(exc).__name__}: {exc}".strip()
        return _lib


def available() -> bool:
    """True if the fused library is built and loaded (building it on first call)."""
    return _load() is not None


def describe() -> str:
    """One line: which CPU path Ember's table step uses, and why."""
    if not enabled():
        return f"Ember's CPU table step: torch path ({ENV}=0)"
    lib = _load()
    if lib is None:
        return f"Ember's CPU table step: torch path (fused C++ unavailable: {_reason})"
    built = f"built in {_build_s:.1f} s" if _build_s is not None else "cached"
    return (f"Ember's CPU table step: fused C++ kernels ({built}: {_path}; "
            f"{ENV}=0 for the torch path)")


def _notice() -> None:
    global _noticed
    if _noticed:
        return
    _noticed = True
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
    except Exception:  # pragma: no cover
        pass
    print(f"[ember_ds] {describe()}", file=sys.stderr, flush=True)


def _rowmajor(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] == 1) and \
        (t.shape[0] == 1 or t.stride(0) >= t.shape[1])


def _vec(t) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 1
                         and t.is_contiguous())


def use_for_stats(g, rowsum, colsum, rownz) -> bool:
    """Whether piece_stats runs here (the first CPU call builds or loads the library and says
    which path is used)."""
    if g.device.type != "cpu":
        return False
    _notice()
    if not enabled():
        return False
    ok = (g.dtype in _DTYPE and _rowmajor(g) and _vec(rowsum) and _vec(colsum) and _vec(rownz))
    if not ok:
        return False
    lib = _load()
    return lib is not None and (g.dtype != torch.float16 or lib.has_f16)


def use_for_update(w, g, a, b) -> bool:
    """Whether piece_update runs here (fp32 / bf16 / fp16 weights and gradients)."""
    if g.device.type != "cpu" or w.device.type != "cpu":
        return False
    _notice()
    if not enabled():
        return False
    ok = ((w.dtype, g.dtype) in _UPDATE_PAIRS and _rowmajor(w) and _rowmajor(g)
          and _vec(a) and _vec(b))
    if not ok:
        return False
    lib = _load()
    return lib is not None and (torch.float16 not in (w.dtype, g.dtype) or lib.has_f16)


def use_for_state(st: dict, rowsum, colsum) -> bool:
    """Whether state_step runs here: a CPU table whose state and reduced statistics are
    contiguous fp32 vectors."""
    if st["r"].device.type != "cpu" or not enabled():
        return False
    if not all(_vec(t) for t in (st["r"], st["c"], st["s"], rowsum, colsum)):
        return False
    return _load() is not None


def state_step(st: dict, rowsum, colsum, denom_c: float, beta2: float, global_rows: int,
               step: int, row_f, col_f) -> bool:
    """One table's state update after its statistics are reduced (the torch path's ops in
    ember_ds/optimizer.py, in their order and rounding, as one call): r, c, s in place, the
    update's factors into row_f [rows] and col_f [cols]. Returns False, and writes nothing,
    when the table's total sum of squares is not finite. ``step`` is the step being taken
    (1 for the first; the caller counts it)."""
    rows, cols = rowsum.numel(), colsum.numel()
    b2 = float(beta2)
    rc = _lib.ember_state(st["r"].data_ptr(), st["c"].data_ptr(), st["s"].data_ptr(),
                          rowsum.data_ptr(), colsum.data_ptr(), rows, cols, float(denom_c), b2,
                          (1.0 - b2) / cols, 1.0 - b2, float(global_rows * cols),
                          1.0 - b2 ** step, row_f.data_ptr(), col_f.data_ptr())
    return rc == 0


def scratch_bytes(rows: int, cols: int) -> int:
    """Bytes the fused statistics pass allocates for a [rows, cols] piece (its column partial
    sums: one row of cols floats per row block, at most 256 blocks; the update allocates
    nothing). Mirrors ``stats`` in csrc/ember_cpu.cpp."""
    n = rows * cols
    nblk = max(1, min(n // (1 << 16), 256, rows))
    per = -(-rows // nblk)
    return 4 * cols * -(-rows // per)


def _ld(t: torch.Tensor) -> int:
    return t.stride(0)  # the row stride, in elements (unused for a single row)


def _ptr(t):
    return None if t is None else t.data_ptr()


def piece_stats(g, rowsum, colsum, rownz=None) -> None:
    """rowsum += sum_j g^2, colsum += sum_i g^2 (and rownz += nonzeros per row), fused."""
    rows, cols = g.shape
    rc = _lib.ember_stats(g.data_ptr(), _DTYPE[g.dtype], rows, cols, _ld(g), rowsum.data_ptr(),
                          colsum.data_ptr(), _ptr(rownz), torch.get_num_threads())
    if rc != 0:  # pragma: no cover - use_for_stats checked the dtype
        raise RuntimeError(f"ember_stats: unsupported dtype {g.dtype}")


def piece_update(w, g, a, b, lr: float, eps: float, decay: float) -> None:
    """w <- w*decay - lr*g/(a_i*b_j + eps) in place, fused."""
    rows, cols = g.shape
    rc = _lib.ember_update(w.data_ptr(), _DTYPE[w.dtype], g.data_ptr(), _DTYPE[g.dtype], rows,
                           cols, _ld(w), _ld(g), a.data_ptr(), b.data_ptr(), float(lr),
                           float(eps), float(decay), torch.get_num_threads())
    if rc != 0:  # pragma: no cover - use_for_update checked the dtypes
        raise RuntimeError(f"ember_update: unsupported dtypes {w.dtype}, {g.dtype}")


__all__ = ["ENV", "available", "build", "describe", "enabled", "piece_stats", "piece_update",
           "scratch_bytes", "state_step", "use_for_state", "use_for_stats", "use_for_update"]
