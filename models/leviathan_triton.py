"""Fused Triton kernels for Leviathan's per-head spline modes (see models/leviathan.py).

    t [h, n, d_s] in (0, 1), Delta [h, d_s, kappa, r]  ->  M [h, n, r]
    B_j(t)  quadratic B-spline basis on kappa uniform knots (optionally normalised over j)
    phi     = sum_j B_j(t[:, d]) (1 + Delta[d, j, :])           [n, r] for each d
    M       = prod_d phi = sign * exp(sum_d log|phi|)

The torch reference builds [d_s, n, kappa] and [d_s, n, r] tensors per head and autograd keeps
them; here phi lives only in registers: the forward loops over d_s for a block of ids, the
backward recomputes phi for one coordinate d at a time from t and Delta[d].

Numerics (match the torch path to fp32 rounding): phi = B @ (1 + Delta[d]) is a tl.dot with
input_precision="ieee" (true fp32, not tf32: a 128-factor product amplifies relative errors);
the product is taken in log space as in the torch path (sum of log(max(|phi|, tiny)) and the
parity of negative factors), and the backward uses dM/dphi_d = sign(M) sign(phi_d)
exp(S - log|phi_d|), S = sum_d log|phi_d| (saved from the forward): the product of the other
factors, with no division by a possibly tiny phi_d. All arithmetic is fp32 whatever the input
dtype. Gradients w.r.t. Delta are reduced over ids inside each program (no atomics): the grid
is (d_s, heads, id-chunks) and the few chunk partials are summed by torch, so results are
deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, the torch path's clamp


@triton.jit
def _basis(t, KAPPA: tl.constexpr, BLOCK_K: tl.constexpr, NORMALIZE: tl.constexpr):
    """t [BLOCK_N] -> (B, dB/dt), both [BLOCK_N, BLOCK_K]; columns >= KAPPA are zero."""
    j = tl.arange(0, BLOCK_K)
    x = t[:, None] * (KAPPA - 1) - j[None, :].to(tl.float32)
    ax = tl.abs(x)
    inner = ax < 0.5
    outer = ax < 1.5
    valid = (j < KAPPA)[None, :]
    b = tl.where(inner, 0.75 - x * x, tl.where(outer, 0.5 * (1.5 - ax) * (1.5 - ax), 0.0))
    sx = tl.where(x < 0, -1.0, 1.0)
    db = tl.where(inner, -2.0 * x, tl.where(outer, -(1.5 - ax) * sx, 0.0)) * (KAPPA - 1)
    b = tl.where(valid, b, 0.0)
    db = tl.where(valid, db, 0.0)
    if NORMALIZE:
        s = tl.sum(b, axis=1)
        ds = tl.sum(db, axis=1)
        b = b / s[:, None]
        db = (db - b * ds[:, None]) / s[:, None]
    return b, db


@triton.jit
def _modes_fwd_kernel(t_ptr, delta_ptr, m_ptr, logabs_ptr, sign_ptr, N, DS, R,
                      KAPPA: tl.constexpr, NORMALIZE: tl.constexpr, TINY: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (cdiv(n, BLOCK_N), heads). t is laid out [h, d_s, n]; outputs [h, n, r]."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    nmask = rn < N
    rmask = rr < R
    wmask = (rk < KAPPA)[:, None] & rmask[None, :]
    logabs = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    negatives = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.int32)
    for d in range(DS):
        t = tl.load(t_ptr + (h * DS + d) * N + rn, mask=nmask, other=0.5).to(tl.float32)
        b, _ = _basis(t, KAPPA, BLOCK_K, NORMALIZE)
        delta = tl.load(delta_ptr + ((h * DS + d) * KAPPA + rk[:, None]) * R + rr[None, :],
                        mask=wmask, other=0.0).to(tl.float32)
        w = tl.where(wmask, 1.0 + delta, 0.0)
        phi = tl.dot(b, w, input_precision="ieee")
        logabs += tl.log(tl.maximum(tl.abs(phi), TINY))
        negatives += (phi < 0).to(tl.int32)
    sign = 1.0 - 2.0 * (negatives % 2).to(tl.float32)
    out = (h * N + rn[:, None]) * R + rr[None, :]
    omask = nmask[:, None] & rmask[None, :]
    tl.store(m_ptr + out, sign * tl.exp(logabs), mask=omask)
    tl.store(logabs_ptr + out, logabs, mask=omask)
    tl.store(sign_ptr + out, sign, mask=omask)


@triton.jit
def _modes_bwd_kernel(t_ptr, delta_ptr, grad_ptr, logabs_ptr, sign_ptr, dt_ptr, ddelta_ptr,
                      N, DS, R, CHUNK,
                      KAPPA: tl.constexpr, NORMALIZE: tl.constexpr, TINY: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (d_s, heads, chunks). One coordinate d of one head over ids [c*CHUNK, (c+1)*CHUNK):
    writes dL/dt[h, d, ids] and this chunk's partial dL/dDelta[h, d] into ddelta[c, h, d]."""
    d = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    wmask = (rk < KAPPA)[:, None] & rmask[None, :]
    row = h * DS + d
    delta = tl.load(delta_ptr + (row * KAPPA + rk[:, None]) * R + rr[None, :],
                    mask=wmask, other=0.0).to(tl.float32)
    w = tl.where(wmask, 1.0 + delta, 0.0)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    for start in range(lo, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        nmask = rn < hi
        t = tl.load(t_ptr + row * N + rn, mask=nmask, other=0.5).to(tl.float32)
        b, db = _basis(t, KAPPA, BLOCK_K, NORMALIZE)
        phi = tl.dot(b, w, input_precision="ieee")                  # [BLOCK_N, BLOCK_R]
        dphi_dt = tl.dot(db, w, input_precision="ieee")
        io = (h * N + rn[:, None]) * R + rr[None, :]
        omask = nmask[:, None] & rmask[None, :]
        g = tl.load(grad_ptr + io, mask=omask, other=0.0).to(tl.float32)
        s = tl.load(logabs_ptr + io, mask=omask, other=0.0)
        sg = tl.load(sign_ptr + io, mask=omask, other=0.0)
        aphi = tl.abs(phi)
        others = tl.exp(s - tl.log(tl.maximum(aphi, TINY)))         # prod of the other factors
        gphi = g * sg * tl.where(phi < 0, -1.0, 1.0) * others
        gphi = tl.where(omask & (aphi >= TINY), gphi, 0.0)           # clamp has zero gradient
        tl.store(dt_ptr + row * N + rn, tl.sum(gphi * dphi_dt, axis=1), mask=nmask)
        acc += tl.dot(tl.trans(b), gphi, input_precision="ieee")    # [BLOCK_K, BLOCK_R]
    dd = ((c * tl.num_programs(1) + h) * DS + d).to(tl.int64)
    tl.store(ddelta_ptr + (dd * KAPPA + rk[:, None]) * R + rr[None, :], acc, mask=wmask)


def _blocks(kappa: int, r: int, block_n: int):
    # tl.dot needs every block dimension >= 16. Ids per block: 64 in the forward (17 KB of shared
    # memory at the defaults), 32 in the backward (62 KB at kappa=16, r=64 on sm_80/sm_90, vs
    # 119 KB at 64: too much for consumer GPUs), measured with triton.compile for both targets.
    return block_n, max(16, triton.next_power_of_2(kappa)), max(16, triton.next_power_of_2(r))


class SplineModesFn(torch.autograd.Function):
    """M = spline_modes(t [h, n, d_s], delta [h, d_s, kappa, r], normalize) with fused kernels."""

    @staticmethod
    def forward(ctx, t, delta, normalize):
        h, n, ds = t.shape
        kappa, r = delta.shape[2], delta.shape[3]
        tT = t.detach().float().transpose(1, 2).contiguous()           # [h, d_s, n]: coalesced
        d32 = delta.detach().float().contiguous()
        M = torch.empty(h, n, r, device=t.device, dtype=torch.float32)
        logabs, sign = torch.empty_like(M), torch.empty_like(M)
        BN, BK, BR = _blocks(kappa, r, 64)
        if n > 0:
            _modes_fwd_kernel[(triton.cdiv(n, BN), h)](
                tT, d32, M, logabs, sign, n, ds, r, KAPPA=kappa, NORMALIZE=bool(normalize),
                TINY=_TINY, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BR, num_warps=4)
        ctx.save_for_backward(tT, d32, logabs, sign)
        ctx.normalize, ctx.t_dtype, ctx.delta_dtype = bool(normalize), t.dtype, delta.dtype
        return M.to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        tT, d32, logabs, sign = ctx.saved_tensors
        h, ds, n = tT.shape
        kappa, r = d32.shape[2], d32.shape[3]
        BN, BK, BR = _blocks(kappa, r, 32)
        # enough id-chunks to fill the GPU when heads * d_s is small (e.g. one head per TP rank)
        chunks = max(1, min(triton.cdiv(n, BN), triton.cdiv(2048, h * ds)))
        chunk = triton.cdiv(triton.cdiv(n, chunks), BN) * BN
        chunks = max(1, triton.cdiv(n, chunk)) if n > 0 else 1
        dt = torch.zeros_like(tT)
        ddelta = torch.zeros(chunks, h, ds, kappa, r, device=tT.device, dtype=torch.float32)
        if n > 0:
            _modes_bwd_kernel[(ds, h, chunks)](
                tT, d32, grad.float().contiguous(), logabs, sign, dt, ddelta, n, ds, r, chunk,
                KAPPA=kappa, NORMALIZE=ctx.normalize, TINY=_TINY,
                BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BR, num_warps=4)   # ~7 live [32, r] fp32 tiles
        return (dt.transpose(1, 2).to(ctx.t_dtype), ddelta.sum(0).to(ctx.delta_dtype), None)


def spline_modes_triton(t: torch.Tensor, delta: torch.Tensor, normalize: bool = False
                        ) -> torch.Tensor:
    """t [h, n, d_s] (or [n, d_s]) and delta [h, d_s, kappa, r] (or [d_s, kappa, r]) -> M."""
    if t.dim() == 2:
        return SplineModesFn.apply(t[None], delta[None], normalize)[0]
    return SplineModesFn.apply(t, delta, normalize)
