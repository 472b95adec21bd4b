"""Ember's two passes over a block of one token table, in row chunks.

A *piece* is a contiguous [rows, cols] view of a table's gradient (and of its weights): a whole
table, the whole-row block of a ZeRO partition, or one partial row cut at a partition edge.
Pass 1 (statistics) reads G once: per-row and per-column sums of G*G. Pass 2 (update) reads G
and W and writes W: W <- W*decay - lr*G / (a_i*b_j + eps), where a_i*b_j = sqrt(vhat_ij)
because vhat is rank-1. Work goes in row chunks so no fp32 temporary larger than 1/16 of the
piece (at least ``MIN_CHUNK_ELEMS``, at most ``CHUNK_ELEMS``, and one row) is ever built, and every reduction is a contiguous
torch reduction in a fixed order, so runs are bitwise reproducible. On CUDA the fused Triton
kernels in ``ember_ds.triton_kernels`` do the same without temporaries; on CPU the fused C++
loops of ``ember_ds.cpu_fused`` (one sweep per pass, OpenMP over rows) replace the chunked torch
ops when that library builds (``EMBER_DS_CPU_FUSED=0``: this torch path).
"""
from __future__ import annotations

import torch

from . import cpu_fused, triton_kernels

CHUNK_ELEMS = 1 << 20      # at most 4 MiB of fp32 temporaries per chunk
MIN_CHUNK_ELEMS = 1 << 16  # small tables: few chunks (per-op overhead), 256 KiB at most


def _chunk_rows(rows: int, cols: int) -> int:
    budget = min(CHUNK_ELEMS, max(cols, (rows * cols) // 16, MIN_CHUNK_ELEMS))
    return max(1, budget // max(cols, 1))


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_kernels.available()


def piece_stats(g: torch.Tensor, rowsum: torch.Tensor, colsum: torch.Tensor,
                rownz: torch.Tensor | None = None, overwrite: bool = False) -> None:
    """Add sum_j g_ij^2 into ``rowsum`` [rows] and sum_i g_ij^2 into ``colsum`` [cols] (fp32);
    ``overwrite``: store them instead (the caller's buffer need not be zeroed).
    With ``rownz`` [rows], also add each row's count of nonzero gradients: a row is active
    when any |g| > 0, which a sum of squares cannot tell once g*g underflows."""
    if overwrite and (g.numel() == 0 or rownz is not None):
        rowsum.zero_()
        colsum.zero_()
        overwrite = False
    if g.numel() == 0:
        return
    device_step = triton_kernels.device_step_enabled(g)
    if not device_step and cpu_fused.use_for_stats(g, rowsum, colsum, rownz):
        if overwrite:
            rowsum.zero_()
            colsum.zero_()
        return cpu_fused.piece_stats(g, rowsum, colsum, rownz)
    if rownz is not None:
        step = _chunk_rows(*g.shape)
        for r0 in range(0, g.shape[0], step):
            rownz[r0:r0 + step] += torch.count_nonzero(g[r0:r0 + step], dim=1)
    if device_step or _use_triton(g):
        return triton_kernels.piece_stats_triton(g, rowsum, colsum, overwrite=overwrite)
    if overwrite:
        rowsum.zero_()
        colsum.zero_()
    rows, cols = g.shape
    step = _chunk_rows(rows, cols)
    # one fp32 chunk buffer for the whole call, filled with out= ops: a fresh chunk-sized
    # tensor per chunk costs a round of page faults each time on CPU (and briefly two chunks
    # alive at once); the values are the same as g[...].float().square()
    buf = torch.empty(min(step, rows) * cols, dtype=torch.float32, device=g.device)
    for r0 in range(0, rows, step):
        gc = g[r0:r0 + step]
        q = buf[:gc.numel()].view(gc.shape)
        if gc.dtype == torch.float32:
            torch.square(gc, out=q)
        else:
            q.copy_(gc).square_()
        rowsum[r0:r0 + step] += q.sum(dim=1)
        colsum += q.sum(dim=0)


def piece_update(w: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 lr: float, eps: float, decay: float) -> None:
    """w <- w*decay - lr * g / (a_i*b_j + eps), in place; a [rows], b [cols] fp32."""
    if g.numel() == 0:
        return
    if w.dtype == torch.float64:  # float64 tables are updated in float64, never rounded
        _update_float64(w, g, a, b, lr, eps, decay)
        return
    if cpu_fused.use_for_update(w, g, a, b):
        return cpu_fused.piece_update(w, g, a, b, lr, eps, decay)
    if _use_triton(g):
        from .triton_kernels import piece_update_triton
        return piece_update_triton(w, g, a, b, lr, eps, decay)
    rows, cols = g.shape
    low = not (w.dtype == torch.float32 and g.dtype == torch.float32)
    # elementwise: the chunking does not change the values. Low precision needs a second fp32
    # buffer (w in fp32), so its chunks are half as tall and the transient stays the same.
    step = _chunk_rows(rows, cols)
    if low:
        step = max(1, step // 2)
    n = min(step, rows) * cols
    dbuf = torch.empty(n, dtype=torch.float32, device=g.device)
    wbuf = torch.empty(n, dtype=torch.float32, device=g.device) if low else None
    for r0 in range(0, rows, step):
        wc, gc = w[r0:r0 + step], g[r0:r0 + step]
        denom = torch.outer(a[r0:r0 + step], b, out=dbuf[:gc.numel()].view(gc.shape)).add_(eps)
        if not low:
            if decay != 1.0:
                wc.mul_(decay)
            wc.addcdiv_(gc, denom, value=-lr)
        else:  # low-precision weights: decay and update in fp32, round once (as the kernel)
            wf = wbuf[:gc.numel()].view(gc.shape).copy_(wc)
            if decay != 1.0:
                wf.mul_(decay)
            # a bf16/fp16 g is upcast exactly inside addcdiv_ (fp32 compute); anything wider is
            # cast to fp32 first, as g.float() would
            g32 = gc if gc.dtype in (torch.bfloat16, torch.float16) else gc.float()
            wc.copy_(wf.addcdiv_(g32, denom, value=-lr))


def _update_float64(w, g, a, b, lr, eps, decay) -> None:
    """The rank-1 update of a float64 table in float64 (the factors a, b are fp32 state)."""
    rows, cols = g.shape
    step = max(1, _chunk_rows(rows, cols) // 2)
    for r0 in range(0, rows, step):
        wc, gc = w[r0:r0 + step], g[r0:r0 + step]
        denom = torch.outer(a[r0:r0 + step].double(), b.double()).add_(eps)
        if decay != 1.0:
            wc.mul_(decay)
        wc.addcdiv_(gc.double(), denom, value=-lr)
