"""Fused Triton kernels for Ember's two per-piece passes (see ``ember_ds.factored``).

``piece_stats_triton(g, rowsum, colsum)``
    rowsum[i] += sum_j g_ij^2 and colsum[j] += sum_i g_ij^2, in fp32. Reads G once. No atomics:
    a [row programs, column blocks] grid (about ``_max_programs`` programs in all); program
    (m, n) loops over its contiguous range of rows in one column block of width <= 256 and
    writes its partial column sums to row m of a ``[row programs, cols]`` fp32 buffer, and its
    row sums either straight into ``rowsum`` (one column block) or to row n of a
    ``[column blocks, rows]`` buffer. ``colsum += part.sum(0)`` and ``rowsum += rowpart.sum(0)``
    (torch reductions in a fixed order) finish. For a block of whole rows both buffers stay
    far below 1/8 of the piece (see ``_stats_plan``); for a partial row [1, n] they hold
    n + n/256 floats (less than one table row). The call is bitwise reproducible for a fixed
    shape and device.

``piece_update_triton(w, g, a, b, lr, eps, decay)``
    w <- w*decay - lr * g / (a_i*b_j + eps) in place, computed in fp32 and rounded once to w's
    dtype. A pure elementwise 2-D tiled kernel: no temporaries. The fp32 operations follow the
    torch CPU path's order, (w*decay) + ((-lr)*g) / (a_i*b_j + eps), with IEEE division and FMA
    contraction off, so fp32 results match it (bitwise under the interpreter on this CPU).

``g`` and ``w`` are 2-D views [rows, cols] of any float dtype (fp32 / bf16 / fp16) with
arbitrary strides (typically a block of whole rows with row stride = the table's width, or a
partial row [1, n]); ``rowsum``, ``colsum``, ``a``, ``b`` are 1-D fp32. Offsets are 64-bit, so
tables above 2**31 elements are fine.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (used by the tests). Note that
the interpreter rounds fp32 -> bf16 stores by truncation, while compiled CUDA rounds to nearest
even (as torch does), so interpreted bf16 results may differ from torch by one bf16 ulp. For
low-precision weights these kernels, the torch path and the fused CPU path all decay and update
in fp32 and round once.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional: CPU-only installs fall back to the torch path in ``factored``
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _HAVE_TRITON = False

__all__ = ["available", "device_step_enabled", "piece_stats_triton", "piece_update_triton",
           "piece_update_factored", "state_step_triton"]

_MIN_TILES = 4          # each stats program handles at least this many row tiles
_TILE_ELEMS = 4096      # elements per tile (BLOCK_M * BLOCK_N)
_MAX_BLOCK_N = 256
_ONE_PASS_MAX_N = 8192  # widest piece the one-launch stats kernel takes (one column block)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


DEVICE_STEP_ENV = "EMBER_DS_DEVICE_STEP"


def device_step_enabled(t: torch.Tensor) -> bool:
    """Whether Ember's table step runs on the device path (state step and finite check in a
    kernel, no host read): a CUDA tensor with the kernels available, or, for tests, a CPU
    tensor under the interpreter with ``EMBER_DS_DEVICE_STEP=1``. ``EMBER_DS_DEVICE_STEP=0``
    turns it off (the host-checked path of earlier releases)."""
    flag = os.environ.get(DEVICE_STEP_ENV, "").strip()
    if flag == "0" or not available() or t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and _interpret() and flag == "1"


def available() -> bool:
    """True if the kernels can run: triton importable and CUDA present, or TRITON_INTERPRET=1."""
    if not _HAVE_TRITON:
        return False
    if _interpret():
        return True
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _blocks(rows: int, cols: int, tile: int = _TILE_ELEMS) -> tuple[int, int]:
    block_n = min(_MAX_BLOCK_N, _next_pow2(max(cols, 1)))
    block_m = max(1, min(tile // block_n, _next_pow2(max(rows, 1))))
    return block_m, block_n


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None
                             else torch.cuda.current_device())
    return 8  # interpreter: programs run one after another; keep a few to exercise the buffer


if _HAVE_TRITON:

    @triton.jit
    def _sum_rows(g_ptr, row_ptr, stride_r, row_lo, row_hi, cn, nmask, stride_gm, stride_gn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ADD_ROWS: tl.constexpr):
        # rows [row_lo, row_hi) of g in one column block ``cn``: each row's sum of squares
        # stored (or added, ADD_ROWS) at row_ptr + row * stride_r; returns the column sums
        col_off = cn.to(tl.int64) * stride_gn
        offs_m = tl.arange(0, BLOCK_M)
        col_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(row_lo, row_hi, BLOCK_M):
            rm = m0 + offs_m
            mmask = rm < row_hi
            rm64 = rm.to(tl.int64)
            ptrs = g_ptr + (rm64 * stride_gm)[:, None] + col_off[None, :]
            g = tl.load(ptrs, mask=mmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
            q = g * g
            col_acc += tl.sum(q, axis=0)
            rsum = tl.sum(q, axis=1)
            r_ptrs = row_ptr + rm64 * stride_r
            if ADD_ROWS:
                rsum = tl.load(r_ptrs, mask=mmask, other=0.0) + rsum
            tl.store(r_ptrs, rsum, mask=mmask)
        return col_acc

    @triton.jit
    def _stats_kernel(g_ptr, rowout_ptr, part_ptr,
                      rows, cols, rows_per_prog,
                      stride_gm, stride_gn, stride_ro_b, stride_ro,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ADD_ROWS: tl.constexpr):
        # program (pid_m, pid_n): rows [pid_m*rows_per_prog, +rows_per_prog) x one column block.
        # Every output element is written by exactly one program, once: no atomics, and no
        # global read-after-write inside the kernel (so no intra-CTA ordering is needed).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        row_lo = pid_m * rows_per_prog
        row_hi = tl.minimum(row_lo + rows_per_prog, rows)
        cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cn < cols
        # ADD_ROWS (a single column block): rowsum += row sums directly; otherwise write this
        # block's partial row sums to row pid_n of a [column blocks, rows] buffer
        row_base = rowout_ptr + pid_n.to(tl.int64) * stride_ro_b
        col_acc = _sum_rows(g_ptr, row_base, stride_ro, row_lo, row_hi, cn, nmask, stride_gm,
                            stride_gn, BLOCK_M, BLOCK_N, ADD_ROWS)
        tl.store(part_ptr + pid_m.to(tl.int64) * cols + cn, col_acc, mask=nmask)

    @triton.jit
    def _update_kernel(w_ptr, g_ptr, a_ptr, b_ptr,
                       rows, cols,
                       stride_wm, stride_wn, stride_gm, stride_gn, stride_a, stride_b,
                       lr, eps, decay,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < rows
        nmask = cn < cols
        mask = mmask[:, None] & nmask[None, :]
        rm64 = rm.to(tl.int64)
        cn64 = cn.to(tl.int64)
        a = tl.load(a_ptr + rm64 * stride_a, mask=mmask, other=1.0)
        b = tl.load(b_ptr + cn64 * stride_b, mask=nmask, other=1.0)
        _apply_update(w_ptr, g_ptr, rm64, cn64, mask, a, b, stride_wm, stride_wn, stride_gm,
                      stride_gn, lr, eps, decay)

    @triton.jit
    def _apply_update(w_ptr, g_ptr, rm64, cn64, mask, a, b, stride_wm, stride_wn, stride_gm,
                      stride_gn, lr, eps, decay):
        w_ptrs = w_ptr + (rm64 * stride_wm)[:, None] + (cn64 * stride_wn)[None, :]
        g_ptrs = g_ptr + (rm64 * stride_gm)[:, None] + (cn64 * stride_gn)[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        denom = a[:, None] * b[None, :] + eps
        # same order as the torch CPU path (w.mul_(decay), then addcdiv_: w + (value*g)/denom),
        # with IEEE-rounded division
        new = w * decay + tl.div_rn(-lr * g, denom)
        tl.store(w_ptrs, new.to(w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _stats_rows_kernel(g_ptr, rowsum_ptr, colsum_ptr, part_ptr, count_ptr,
                           rows, cols, rows_per_prog,
                           stride_gm, stride_gn, stride_r, stride_c,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           ADD_ROWS: tl.constexpr, ADD_COLS: tl.constexpr):
        # One launch for a whole piece of up to _ONE_PASS_MAX_N columns: program m owns whole
        # rows [m*rows_per_prog, ...) (its row sums are final: stored, or added) and writes its
        # column sums to row m of ``part``; the last program to finish (an atomic counter)
        # adds the rows of ``part`` in program order into colsum and resets the counter. The
        # order of every sum is fixed, so the result does not depend on scheduling.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        row_lo = pid * rows_per_prog
        row_hi = tl.minimum(row_lo + rows_per_prog, rows)
        cn = tl.arange(0, BLOCK_N)
        nmask = cn < cols
        col_acc = _sum_rows(g_ptr, rowsum_ptr, stride_r, row_lo, row_hi, cn, nmask, stride_gm,
                            stride_gn, BLOCK_M, BLOCK_N, ADD_ROWS)
        tl.store(part_ptr + pid.to(tl.int64) * cols + cn, col_acc, mask=nmask)
        # every thread's part stores precede the counter's release (the CUDA "last block"
        # pattern); the last program reads part through L2 (.cg), never a stale L1 line
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == nprog - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for m in range(0, nprog):
                total += tl.load(part_ptr + m * cols + cn, mask=nmask, other=0.0,
                                 cache_modifier=".cg")
            c_ptrs = colsum_ptr + cn.to(tl.int64) * stride_c
            if ADD_COLS:
                total = tl.load(c_ptrs, mask=nmask, other=0.0) + total
            tl.store(c_ptrs, total, mask=nmask)
            tl.atomic_xchg(count_ptr, 0)

    @triton.jit
    def _state_kernel(rowsum_ptr, colsum_ptr, nact_ptr, r_ptr, c_ptr, s_ptr, aux_ptr,
                      rows, cols, b2, one_minus_b2, alpha_r, denom_rows, vd,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACTIVE: tl.constexpr):
        # A table's state step from its reduced statistics, in the torch path's order:
        #   r <- b2 r + alpha_r rowsum;  c <- b2 c + (1-b2) colsum/denom;  s <- b2 s + (1-b2)
        #   total/(V D);  aux = [applied steps, skipped steps, skipped now, beta2 (fp64)].
        # Every program sums colsum in the same order, so all agree on the finite check;
        # program m updates rows [m*BLOCK_R, ...), program 0 also c, s and aux. A non-finite
        # total (a NaN or inf in the table, or squares past fp32's range) writes no state and
        # sets the flag that the update kernel reads: the step is skipped on the device.
        pid = tl.program_id(0)
        cc = tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, cols, BLOCK_C):
            acc += tl.load(colsum_ptr + c0 + cc, mask=c0 + cc < cols, other=0.0)
        total = tl.sum(acc, axis=0)
        ok = (total - total) == 0.0                      # False for NaN and +-inf
        rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rr < rows
        r = tl.load(r_ptr + rr, mask=rmask, other=0.0)
        rs = tl.load(rowsum_ptr + rr, mask=rmask, other=0.0)
        tl.store(r_ptr + rr, tl.where(ok, r * b2 + rs * alpha_r, r), mask=rmask)
        if pid == 0:
            if ACTIVE:
                denom = tl.maximum(tl.load(nact_ptr), 1.0)
            else:
                denom = denom_rows
            for c0 in range(0, cols, BLOCK_C):
                cmask = c0 + cc < cols
                c = tl.load(c_ptr + c0 + cc, mask=cmask, other=0.0)
                cs = tl.load(colsum_ptr + c0 + cc, mask=cmask, other=0.0)
                c_new = c * b2 + tl.div_rn(cs, denom) * one_minus_b2
                tl.store(c_ptr + c0 + cc, tl.where(ok, c_new, c), mask=cmask)
            s = tl.load(s_ptr)
            s_new = s * b2 + tl.div_rn(total, vd) * one_minus_b2
            tl.store(s_ptr, tl.where(ok, s_new, s))
            okf = ok.to(tl.float64)
            tl.store(aux_ptr, tl.load(aux_ptr) + okf)
            tl.store(aux_ptr + 1, tl.load(aux_ptr + 1) + (1.0 - okf))
            tl.store(aux_ptr + 2, 1.0 - okf)

    @triton.jit
    def _update_factored_kernel(w_ptr, g_ptr, r_ptr, c_ptr, s_ptr, aux_ptr,
                                rows, cols,
                                stride_wm, stride_wn, stride_gm, stride_gn, stride_r, stride_c,
                                lr, eps, decay,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # The update with its factors made here from the state: sqrt(vhat_ij) = a_i * b_j,
        # a_i = sqrt(r_i / (max(s, 1e-30) (1 - b2^t))), b_j = sqrt(c_j) (IEEE sqrt and
        # division, the torch path's formula); b2^t by squaring in fp64, a function of t alone
        # (a resumed run computes the same). Masked off entirely when the state kernel
        # flagged the table non-finite: weights unchanged, as on the host-checked path.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        skipped = tl.load(aux_ptr + 2) != 0.0
        t = tl.load(aux_ptr).to(tl.int64)
        p = tl.load(aux_ptr + 3)
        power = tl.full([], 1.0, tl.float64)
        for i in range(0, 48):
            power = tl.where(((t >> i) & 1) != 0, power * p, power)
            p = p * p
        bc = (1.0 - power).to(tl.float32)
        den = tl.maximum(tl.load(s_ptr), 1e-30) * bc
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < tl.where(skipped, 0, rows)          # no row at all when skipped
        nmask = cn < cols
        mask = mmask[:, None] & nmask[None, :]
        rm64 = rm.to(tl.int64)
        cn64 = cn.to(tl.int64)
        a = tl.sqrt_rn(tl.div_rn(tl.load(r_ptr + rm64 * stride_r, mask=mmask, other=1.0), den))
        b = tl.sqrt_rn(tl.load(c_ptr + cn64 * stride_c, mask=nmask, other=1.0))
        _apply_update(w_ptr, g_ptr, rm64, cn64, mask, a, b, stride_wm, stride_wn, stride_gm,
                      stride_gn, lr, eps, decay)


def _check_vec(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != n or t.device != device:
        raise ValueError(f"{name} must be a 1-D fp32 tensor of {n} elements on {device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _check_mat(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, cols] view, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {t.dtype}")


def _stats_plan(rows: int, cols: int, cap: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, row programs, column blocks, rows per program) for the stats kernel.

    The grid is [row programs, column blocks] with at most about ``cap`` programs; each row
    program gets at least ``_MIN_TILES`` row tiles (when there are that many), so the
    [row programs, cols] partial-column buffer holds at most
    max(cols, rows*cols / (_MIN_TILES*BLOCK_M)) floats. With more than one column block the
    [column blocks, rows] partial-row buffer holds rows*ceil(cols/BLOCK_N) <= 2*rows*cols/256
    floats (cols > BLOCK_N = 256 there)."""
    block_m, block_n = _blocks(rows, cols)
    col_blocks = -(-cols // block_n)
    tiles = -(-rows // block_m)
    progs = max(1, min(max(1, cap // col_blocks), tiles // _MIN_TILES))
    rows_per_prog = -(-tiles // progs) * block_m
    progs = -(-rows // rows_per_prog)
    return block_m, block_n, progs, col_blocks, rows_per_prog


def _one_pass_plan(rows: int, cols: int, cap: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, programs, rows per program) for the one-launch stats kernel: one
    column block of next_pow2(cols), tiles of about _TILE_ELEMS, at least _MIN_TILES row tiles
    per program and at most ``cap`` programs (the last one adds programs x cols partials)."""
    block_n = _next_pow2(max(cols, 1))
    block_m = max(1, min(_TILE_ELEMS // block_n, _next_pow2(max(rows, 1))))
    tiles = -(-rows // block_m)
    progs = max(1, min(cap, tiles // _MIN_TILES))
    rows_per_prog = -(-tiles // progs) * block_m
    return block_m, block_n, -(-rows // rows_per_prog), rows_per_prog


_COUNTERS: dict = {}  # device -> int32 [1], the stats kernel's finish counter (reset by it)


def _counter(device: torch.device) -> torch.Tensor:
    # one per device: Ember issues its kernels one after another on one stream
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def piece_stats_triton(g: torch.Tensor, rowsum: torch.Tensor, colsum: torch.Tensor,
                       max_programs: int | None = None, overwrite: bool = False) -> None:
    """Add sum_j g_ij^2 into ``rowsum`` [rows] and sum_i g_ij^2 into ``colsum`` [cols] (fp32);
    with ``overwrite`` store them instead (no zeroed buffers needed: one launch less).

    Up to _ONE_PASS_MAX_N columns this is one launch (the last program finishes the column
    sums); wider pieces take the two-dimensional kernel and torch reductions. Deterministic:
    every partial sum is added in a fixed order. ``max_programs`` bounds the grid (default:
    2 per SM on CUDA for the one-launch kernel, 4 for the other) and thereby the
    [programs, cols] fp32 partial-column buffer."""
    _check_mat("g", g)
    rows, cols = g.shape
    _check_vec("rowsum", rowsum, rows, g.device)
    _check_vec("colsum", colsum, cols, g.device)
    if g.numel() == 0:
        if overwrite:
            rowsum.zero_()
            colsum.zero_()
        return
    if cols <= _ONE_PASS_MAX_N:
        cap = max_programs if max_programs is not None else max(1, _max_programs(g.device) // 2)
        block_m, block_n, progs, rows_per_prog = _one_pass_plan(rows, cols, cap)
        part = torch.empty((progs, cols), dtype=torch.float32, device=g.device)
        _stats_rows_kernel[(progs,)](
            g, rowsum, colsum, part, _counter(g.device), rows, cols, rows_per_prog,
            g.stride(0), g.stride(1), rowsum.stride(0), colsum.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, ADD_ROWS=not overwrite, ADD_COLS=not overwrite,
            num_warps=4 if block_m * block_n <= _TILE_ELEMS else 8, enable_fp_fusion=False)
        return
    if overwrite:
        rowsum.zero_()
        colsum.zero_()
    block_m, block_n, progs, col_blocks, rows_per_prog = _stats_plan(
        rows, cols, max_programs if max_programs is not None else _max_programs(g.device))
    part = torch.empty((progs, cols), dtype=torch.float32, device=g.device)
    if col_blocks == 1:
        rowout, stride_b, stride_r = rowsum, 0, rowsum.stride(0)
    else:
        rowout = torch.empty((col_blocks, rows), dtype=torch.float32, device=g.device)
        stride_b, stride_r = rowout.stride(0), 1
    _stats_kernel[(progs, col_blocks)](
        g, rowout, part, rows, cols, rows_per_prog,
        g.stride(0), g.stride(1), stride_b, stride_r,
        BLOCK_M=block_m, BLOCK_N=block_n, ADD_ROWS=col_blocks == 1, num_warps=4,
        enable_fp_fusion=False)
    if col_blocks > 1:
        rowsum.add_(rowout.sum(dim=0))
    colsum.add_(part[0] if progs == 1 else part.sum(dim=0))


def piece_update_triton(w: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        lr: float, eps: float, decay: float) -> None:
    """w <- w*decay - lr * g / (a_i*b_j + eps), in place; a [rows], b [cols] fp32."""
    _launch_update(_update_kernel, w, g, ("a", a), ("b", b), (), lr, eps, decay)


def _launch_update(kernel, w, g, a, b, state, lr, eps, decay) -> None:
    """Check the operands (``a``, ``b``: (name, [rows] / [cols] fp32 vector)) and launch an
    update kernel over [rows, cols] tiles; ``state``: its pointers between b and rows."""
    _check_mat("w", w)
    _check_mat("g", g)
    if w.shape != g.shape or w.device != g.device:
        raise ValueError(f"w {tuple(w.shape)} on {w.device} and g {tuple(g.shape)} on "
                         f"{g.device} must match")
    rows, cols = g.shape
    _check_vec(a[0], a[1], rows, g.device)
    _check_vec(b[0], b[1], cols, g.device)
    if g.numel() == 0:
        return
    block_m, block_n = _blocks(rows, cols)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    kernel[grid](
        w, g, a[1], b[1], *state, rows, cols,
        w.stride(0), w.stride(1), g.stride(0), g.stride(1), a[1].stride(0), b[1].stride(0),
        float(lr), float(eps), float(decay),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=False)


def state_step_triton(st: dict, rowsum: torch.Tensor, colsum: torch.Tensor,
                      n_active: torch.Tensor | None, beta2: float, global_rows: int) -> None:
    """A table's state step on the device (one launch): r, c, s and ``st["aux"]`` (fp64
    [applied steps, skipped steps, skipped now, beta2]) from the reduced statistics, skipped
    on the device when the total sum of squares is not finite. ``n_active``: the 1-element
    count of active rows (normalize="active_rows"), else None (c is divided by V)."""
    r, c = st["r"], st["c"]
    rows, cols = r.numel(), c.numel()
    _check_vec("rowsum", rowsum, rows, r.device)
    _check_vec("colsum", colsum, cols, r.device)
    block_r = min(1024, _next_pow2(max(rows, 1)))
    block_c = min(1024, _next_pow2(max(cols, 1)))
    b2 = float(beta2)
    _state_kernel[(triton.cdiv(rows, block_r),)](
        rowsum, colsum, colsum if n_active is None else n_active, r, c, st["s"], st["aux"],
        rows, cols, b2, 1.0 - b2, (1.0 - b2) / cols, float(global_rows),
        float(global_rows * cols),
        BLOCK_R=block_r, BLOCK_C=block_c, ACTIVE=n_active is not None, num_warps=4)


def piece_update_factored(w: torch.Tensor, g: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
                          st: dict, lr: float, eps: float, decay: float) -> None:
    """w <- w*decay - lr * g / (a_i*b_j + eps) in place with the factors a, b made in the
    kernel from the piece's spans of the state (``r`` [rows], ``c`` [cols]) and the table's
    ``st["s"]`` / ``st["aux"]``; nothing is written when the state step flagged the table."""
    _launch_update(_update_factored_kernel, w, g, ("r", r), ("c", c), (st["s"], st["aux"]),
                   lr, eps, decay)
