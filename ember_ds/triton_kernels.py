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

__all__ = ["available", "piece_stats_triton", "piece_update_triton"]

_MIN_TILES = 4          # each stats program handles at least this many row tiles
_TILE_ELEMS = 4096      # elements per tile (BLOCK_M * BLOCK_N)
_MAX_BLOCK_N = 256


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


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
        col_off = cn.to(tl.int64) * stride_gn
        offs_m = tl.arange(0, BLOCK_M)
        # ADD_ROWS (a single column block): rowsum += row sums directly; otherwise write this
        # block's partial row sums to row pid_n of a [column blocks, rows] buffer
        row_base = rowout_ptr + pid_n.to(tl.int64) * stride_ro_b
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
            r_ptrs = row_base + rm64 * stride_ro
            if ADD_ROWS:
                rsum = tl.load(r_ptrs, mask=mmask, other=0.0) + rsum
            tl.store(r_ptrs, rsum, mask=mmask)
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
        w_ptrs = w_ptr + (rm64 * stride_wm)[:, None] + (cn64 * stride_wn)[None, :]
        g_ptrs = g_ptr + (rm64 * stride_gm)[:, None] + (cn64 * stride_gn)[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        denom = a[:, None] * b[None, :] + eps
        # same order as the torch CPU path (w.mul_(decay), then addcdiv_: w + (value*g)/denom),
        # with IEEE-rounded division
        new = w * decay + tl.div_rn(-lr * g, denom)
        tl.store(w_ptrs, new.to(w_ptr.dtype.element_ty), mask=mask)


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


def piece_stats_triton(g: torch.Tensor, rowsum: torch.Tensor, colsum: torch.Tensor,
                       max_programs: int | None = None) -> None:
    """Add sum_j g_ij^2 into ``rowsum`` [rows] and sum_i g_ij^2 into ``colsum`` [cols] (fp32).

    Deterministic (no atomics; partial sums are added by torch reductions in a fixed order).
    ``max_programs`` bounds the grid (default: 4 per SM on CUDA) and thereby the
    [programs, cols] fp32 partial-column buffer."""
    _check_mat("g", g)
    rows, cols = g.shape
    _check_vec("rowsum", rowsum, rows, g.device)
    _check_vec("colsum", colsum, cols, g.device)
    if g.numel() == 0:
        return
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
    _check_mat("w", w)
    _check_mat("g", g)
    if w.shape != g.shape or w.device != g.device:
        raise ValueError(f"w {tuple(w.shape)} on {w.device} and g {tuple(g.shape)} on "
                         f"{g.device} must match")
    rows, cols = g.shape
    _check_vec("a", a, rows, g.device)
    _check_vec("b", b, cols, g.device)
    if g.numel() == 0:
        return
    block_m, block_n = _blocks(rows, cols)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _update_kernel[grid](
        w, g, a, b, rows, cols,
        w.stride(0), w.stride(1), g.stride(0), g.stride(1), a.stride(0), b.stride(0),
        float(lr), float(eps), float(decay),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=False)
