"""The separable spline modes of Leviathan's heads: M = prod over d_s of phi, per distinct id.

phi[h, n, d, :] = sum_j B_j(t[h, n, d]) (1 + Delta[h, d, j, :]) with B the quadratic B-spline
basis on uniform knots; M = prod_d phi, taken as sign * exp(sum_d log|phi|). This is where the
generator spends its time, so it has three implementations of the same arithmetic:
- ``spline_modes_reference``: the definition in plain torch (autograd backward; slow, and it
  keeps [h, d_s, n, r] for the backward);
- ``spline_modes_torch``: the blocked torch path with a hand-written backward (CPU, or any
  device without Triton);
- ``models.leviathan_triton.spline_modes_triton``: fused Triton kernels (CUDA).
``spline_modes`` picks one.
"""
from __future__ import annotations

import math
import threading

import torch


def bspline_basis(t: torch.Tensor, knots: int, normalize: bool = False) -> torch.Tensor:
    """Quadratic B-spline basis of t on `knots` uniform knots g_j = j/(knots-1) in [0, 1]:
    t [...] -> B [..., knots]. x = (t - g_j)(knots-1) is computed as t(knots-1) - j (exact
    knots, same arithmetic as the Triton kernel). At most 3 entries per t are non-zero."""
    j = torch.arange(knots, device=t.device, dtype=t.dtype)
    x = t.unsqueeze(-1) * (knots - 1) - j
    ax = x.abs()
    B = torch.where(ax < 0.5, 0.75 - x * x,
                    torch.where(ax < 1.5, 0.5 * (1.5 - ax) ** 2, torch.zeros_like(x)))
    if normalize:  # the variant that makes the basis a partition of unity near the edges too
        B = B / B.sum(-1, keepdim=True)
    return B


def spline_modes_reference(t, delta, normalize=False):
    """The definition in plain torch (autograd does the backward). Builds the [h, d_s, n, kappa]
    basis and the [h, d_s, n, r] phi (both kept for the backward): slow and memory-hungry, so
    spline_modes_torch only uses it for t outside [0, 1]."""
    kappa = delta.shape[2]
    B = bspline_basis(t.transpose(1, 2), kappa, normalize)           # [h, d, n, kappa]
    phi = torch.matmul(B, 1.0 + delta)                                # [h, d, n, r]
    logabs = phi.abs().clamp_min(torch.finfo(phi.dtype).tiny).log().sum(1)
    sign = phi.detach().sign().prod(1)   # (-1)^(number of negative factors), exact in any dtype
    return sign * logabs.exp()                                        # [h, n, r]


def _alloc(name: str, like: torch.Tensor, numel: int) -> torch.Tensor:
    return like.new_empty(numel)


def _basis3(t: torch.Tensor, knots: int, normalize: bool, grad: bool = False, work=_alloc):
    """The 3 entries of bspline_basis(t, knots) that can be non-zero, for t in [0, 1]:
    t [...] -> (col [..., 3] int64, B [..., 3], dB/dt [..., 3] or None). Entry a belongs to knot
    j0 + a, j0 = floor(s - 0.5), s = t (knots-1), i.e. to column col = j0 + 1 + a of the basis
    padded with a zero knot on each side ([..., knots + 2]); j0 + a is -1 or `knots` only in
    the 2 pad columns, whose weights are dropped (the matching rows of 1 + Delta are zero).

    B_j is non-zero only for |x| < 1.5, x = s - j, so only j0, j0+1, j0+2 can be; their x lie
    in [0.5, 1.5), [-0.5, 0.5) and [-1.5, -0.5) (floor(s - 0.5) is the exact floor for s >= 0),
    which fixes the branch of the piecewise formula per entry (x rounded onto an endpoint gives
    the same value in both branches). x is the same s minus the same exact integer as in
    bspline_basis, so the weights are its entries, bit for bit (0.5 y^2 is computed as
    (0.5 y) y: the same number). Temporaries come from work(name, like, numel) (reused buffers
    on CPU); the results too, so they live until the next call."""
    shape, N = t.shape, t.numel()

    def buf(name, last=1, like=t):
        return work(name, like, N * last).view(*shape, last) if last > 1 else \
            work(name, like, N).view(shape)

    s = torch.mul(t, knots - 1, out=buf("s"))
    j = torch.sub(s, 0.5, out=buf("j")).floor_()                      # j0
    x = buf("x")
    B, col = buf("B3", 3), buf("col3", 3)
    (b0, b1, b2), (c0, c1, c2) = B.unbind(-1), col.unbind(-1)
    dB = buf("dB3", 3) if grad else None
    torch.sub(s, j, out=x)                                            # x0 = s - j0 in [.5, 1.5)
    torch.sub(1.5, x, out=x)                                          # y = 1.5 - |x0|
    if grad:                                                          # dB/dt = dB/dx (knots-1)
        torch.mul(x, -(knots - 1), out=dB[..., 0])                    # -(1.5 - |x|) sign(x)
    torch.mul(x, 0.5, out=b0).mul_(x)                                 # 0.5 (1.5 - |x|)^2
    j += 1                                                            # j0 + 1
    c0.copy_(j)
    torch.sub(s, j, out=x)                                            # x1 in [-.5, .5)
    if grad:
        torch.mul(x, -2.0 * (knots - 1), out=dB[..., 1])              # -2 x
    torch.mul(x, x, out=x)
    torch.sub(0.75, x, out=b1)                                        # 0.75 - x^2
    j += 1                                                            # j0 + 2
    c1.copy_(j)
    torch.add(j, 1, out=c2)
    torch.sub(s, j, out=x)                                            # x2 in [-1.5, -.5)
    x += 1.5                                                          # 1.5 - |x2|
    if grad:
        torch.mul(x, knots - 1, out=dB[..., 2])                       # -(1.5 - |x|) sign(x)
    torch.mul(x, 0.5, out=b2).mul_(x)                                 # 0.5 (1.5 - |x|)^2
    idx = buf("idx3", 3, like=torch.empty(0, dtype=torch.long, device=t.device)).copy_(col)
    if normalize:   # over the real knots: drop the pad knots -1 and `knots` from the sum
        valid = (col >= 1) & (col <= knots)
        B = B * valid
        total = B.sum(-1, keepdim=True)
        B = B / total
        if grad:
            dB = dB * valid
            dB = (dB - B * dB.sum(-1, keepdim=True)) / total
    return idx, B, dB


# Work sizes (CPU; other devices take everything in one chunk and one block). The basis is built
# one chunk of ~_CHUNK (head, coordinate, id) rows at a time, and phi one block of ~_BLOCK
# values (1 MB of fp32, a core's L2 cache) inside it: measured best of 2^16..2^21 on a 1-thread
# CPU (smaller blocks pay per-op overhead, larger ones leave the cache).
_CHUNK = 1 << 15
_BLOCK = 1 << 18
# sum_d log|phi_d| is taken as the sum over groups of _GROUP coordinates of log|their product|:
# 1/_GROUP of the logs (the forward's dominant elementwise cost), and the same value up to fp
# rounding provided no partial product leaves the normal range and no factor is below tiny
# (where the clamp acts). That holds if every |1 + Delta| <= _GROUP_WMAX (then |phi| <= 2^31:
# the basis weights are >= 0 and sum to <= 1) and every |group product| >= _GROUP_MIN: a partial
# product of <= 4 factors is then <= 2^124 and >= 2^-33 / 2^93 = 2^-126. Blocks where the
# second check fails (some |phi| within ~1e-10 of 0) are done factor by factor, as are all
# blocks when the first fails or the dtype is not float32/float64.
_GROUP = 4
_GROUP_WMAX = 2.0 ** 30
_GROUP_MIN = 2.0 ** -33

_WORK = threading.local()


def _work(name: str, like: torch.Tensor, numel: int) -> torch.Tensor:
    """A flat work buffer of >= numel elements, kept between calls on CPU (a fresh multi-MB
    tensor per call costs page faults there). Only ever used inside one forward or backward."""
    if like.device.type != "cpu":
        return like.new_empty(numel)
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None:
        bufs = _WORK.bufs = {}
    key = (name, like.dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = like.new_empty(numel)
    return buf[:numel]


def _even_split(total: int, most: int) -> int:
    """The size of ceil(total / most) near-equal parts."""
    parts = -(-total // max(1, most))
    return -(-total // max(1, parts))


class _Blocks:
    """The phi blocks of one call. Iterating yields, per block, its (heads, coords, ids) slices
    of the full tensors, its dense padded basis [hb, db, nb, kappa + 2] and, with grad, its
    padded columns [hb, db, nb, 3] and dB/dt [hb, db, nb, 3]. A block is whole heads or part of
    one head's coordinates (a multiple of _GROUP) for a range of ids; the basis is built per
    chunk (whole heads, or a coordinate range of one head) for the same ids; matmul() and all
    temporaries use work buffers of bounded size shared by every block."""

    def __init__(self, t, kappa, r, normalize, grad):
        h, n, ds = t.shape
        self.t, self.kappa, self.normalize, self.grad = t, kappa, normalize, grad
        if t.device.type == "cpu":
            unit = min(_GROUP, ds)
            nb = _even_split(n, _BLOCK // max(1, r * unit))         # ids per block
            cd = max(1, _BLOCK // max(1, nb * r))                   # coordinates per block
            if cd >= ds:
                cd = ds * (cd // ds)
            else:                                   # near-equal parts, multiples of unit
                cd = -(-_even_split(ds, max(unit, cd)) // unit) * unit
            cc = max(cd, _CHUNK // max(1, nb))                      # coordinates per chunk
            cc = ds * (cc // ds) if cc >= ds else cd * (cc // cd)
        else:                                   # one chunk, one block
            nb, cd, cc = max(1, n), ds * h, ds * h
        self.n, self.nb = n, max(1, nb)
        # (h0, h1, d0, d1, [blocks as (h0, h1, d0, d1)])
        if cc >= ds:
            hc, hb = cc // ds, max(1, cd // ds)
            self.chunks = [(c0, min(h, c0 + hc), 0, ds,
                            [(b0, min(h, c0 + hc, b0 + hb), 0, ds)
                             for b0 in range(c0, min(h, c0 + hc), hb)] if cd >= ds else
                            [(b0, b0 + 1, e0, min(ds, e0 + cd))
                             for b0 in range(c0, min(h, c0 + hc)) for e0 in range(0, ds, cd)])
                           for c0 in range(0, h, hc)]
        else:
            self.chunks = [(c0, c0 + 1, e0, min(ds, e0 + cc),
                            [(c0, c0 + 1, b0, min(ds, e0 + cc, b0 + cd))
                             for b0 in range(e0, min(ds, e0 + cc), cd)])
                           for c0 in range(h) for e0 in range(0, ds, cc)]

    def __iter__(self):
        kappa = self.kappa
        for n0 in range(0, self.n, self.nb):
            n1 = min(self.n, n0 + self.nb)
            for h0, h1, d0, d1, blocks in self.chunks:
                tc = self.t[h0:h1, n0:n1, d0:d1].transpose(1, 2)     # [hc, dc, nc] view
                col, B3, dB3 = _basis3(tc, kappa, self.normalize, self.grad, _work)
                Bc = _work("basis", self.t, col.numel() // 3 * (kappa + 2)).view(
                    *tc.shape, kappa + 2).zero_()
                Bc.scatter_(-1, col, B3)
                for bh0, bh1, bd0, bd1 in blocks:
                    loc = (slice(bh0 - h0, bh1 - h0), slice(bd0 - d0, bd1 - d0))
                    yield ((slice(bh0, bh1), slice(bd0, bd1), slice(n0, n1)), Bc[loc],
                           col[loc] if self.grad else None, dB3[loc] if self.grad else None)

    def matmul(self, x, y, name):
        """x [hb, db, m, k] @ y [hb, db, k, p] into the named work buffer."""
        shape = (*x.shape[:-1], y.shape[-1])
        out = _work(name, x, math.prod(shape)).view(shape)
        torch.bmm(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]),
                  out=out.view(-1, *shape[-2:]))
        return out


def _group_prod(phi: torch.Tensor) -> torch.Tensor:
    """[hb, db, nb, r] -> products over consecutive groups of <= _GROUP coordinates."""
    db = phi.shape[1]
    main = db - db % _GROUP
    parts = []
    if main:
        parts.append(phi[:, :main].unflatten(1, (main // _GROUP, _GROUP)).prod(2))
    if db % _GROUP:
        parts.append(phi[:, main:].prod(1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _padded_weights(delta):
    """1 + Delta with a zero knot row before and after: [h, d_s, kappa + 2, r] (a work buffer)."""
    h, ds, kappa, r = delta.shape
    W = _work("W", delta, h * ds * (kappa + 2) * r).view(h, ds, kappa + 2, r)
    W[:, :, 0].zero_()
    W[:, :, -1].zero_()
    torch.add(delta, 1.0, out=W[:, :, 1:-1])
    return W


def _grouping_safe(delta) -> bool:
    """max |1 + Delta| <= _GROUP_WMAX (the bound the grouped log-product needs), fp32/fp64."""
    if delta.dtype not in (torch.float32, torch.float64):
        return False
    if not delta.numel():
        return True
    lo, hi = torch.aminmax(delta)
    return bool((lo >= -1.0 - _GROUP_WMAX) & (hi <= _GROUP_WMAX - 1.0))


class _SplineModes(torch.autograd.Function):
    """M = spline_modes_torch(t, delta, normalize) for t in [0, 1], blocked, with a hand-written
    backward.

    The forward evaluates phi one block of (coordinates, ids) at a time and keeps only the
    [h, n, r] sums; autograd saves t, delta and M. The backward recomputes phi per block and
    uses dM/dphi_d = M / phi_d: what autograd of sign * exp(sum log max(|phi|, tiny)) gives,
    (dL/dM * M) * sign(phi_d) / |phi_d|, and zero where |phi_d| < tiny (the clamp)."""

    @staticmethod
    def forward(ctx, t, delta, normalize):
        h, n, ds = t.shape
        kappa, r = delta.shape[2], delta.shape[3]
        tiny = torch.finfo(t.dtype).tiny
        W = _padded_weights(delta)                                    # [h, d, kappa+2, r]
        grouped = _grouping_safe(delta)
        logabs = t.new_zeros(h, n, r)
        sign = t.new_ones(h, n, r)
        clamped = False        # is the clamp (zero gradient) active anywhere?
        blocks = _Blocks(t, kappa, r, normalize, grad=False)
        for (hs, dsl, ns), B, _, _ in blocks:
            phi = blocks.matmul(B, W[hs, dsl], "phi")                 # [hb, db, nb, r]
            if grouped:
                q = _group_prod(phi)                                  # [hb, groups, nb, r]
                qa = q.abs()
                if bool(qa.amin() >= _GROUP_MIN):
                    sign[hs, ns] *= q.sign_().prod(1)
                    logabs[hs, ns] += qa.log_().sum(1)
                    continue
            # factor by factor: the definition itself
            sign[hs, ns] *= phi.sign().prod(1)   # (-1)^(negative factors); 0 if a factor is 0
            a = phi.abs_()
            clamped = clamped or bool(a.amin() < tiny)
            logabs[hs, ns] += a.clamp_min_(tiny).log_().sum(1)
        M = sign * logabs.exp_()                                      # [h, n, r]
        ctx.save_for_backward(t, delta, M)
        ctx.normalize, ctx.clamped = normalize, clamped
        return M

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        t, delta, M = ctx.saved_tensors
        h, n, ds = t.shape
        kappa, r = delta.shape[2], delta.shape[3]
        need_t, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tiny = torch.finfo(t.dtype).tiny
        W = _padded_weights(delta)                                    # [h, d, kappa+2, r]
        gM = (grad * M).unsqueeze(1)                                  # dL/dlogabs [h, 1, n, r]
        dt = t.new_empty(h, ds, n) if need_t else None               # every entry written once
        dW = delta.new_empty(delta.shape) if need_delta else None    # first id range: beta=0
        blocks = _Blocks(t, kappa, r, ctx.normalize, grad=need_t)
        for (hs, dsl, ns), B, col, dB3 in blocks:
            phi = blocks.matmul(B, W[hs, dsl], "phi")                 # [hb, db, nb, r]
            g = gM[hs, :, ns]
            gphi = (torch.div(g, phi, out=phi) if not ctx.clamped else   # dL/dphi
                    torch.where(phi.abs() >= tiny, g / phi, 0.0))
            if need_delta:                        # += B^T @ dL/dphi, the real knots' columns
                Bk = B.reshape(-1, B.shape[-2], kappa + 2)[:, :, 1:kappa + 1]
                dW[hs, dsl].view(-1, kappa, r).baddbmm_(
                    Bk.transpose(1, 2), gphi.reshape(-1, gphi.shape[-2], r),
                    beta=0.0 if ns.start == 0 else 1.0)
            if need_t:     # dL/dt = sum_j dB_j/dt (dL/dphi @ W^T)_j, at the 3 non-zero j
                # (W @ dL/dphi^T: [kappa+2, nb] per row of (head, coordinate), a faster
                # matmul than its transpose here)
                G = blocks.matmul(W[hs, dsl], gphi.transpose(2, 3), "G")  # [hb, db, kappa+2, nb]
                torch.sum(G.gather(-2, col.transpose(2, 3)).mul_(dB3.transpose(2, 3)), -2,
                          out=dt[hs, dsl, ns])
        return (dt.transpose(1, 2) if need_t else None), dW, None


def spline_modes_torch(t: torch.Tensor, delta: torch.Tensor, normalize: bool = False
                       ) -> torch.Tensor:
    """The separable modes in plain torch (CPU, or any device without Triton).

    t [h, n, d_s] in (0, 1) and delta [h, d_s, kappa, r] -> M [h, n, r] with
    phi[h, n, d, :] = sum_j B_j(t[h, n, d]) (1 + delta[h, d, j, :]) and M = prod_d phi, taken as
    sign * exp(sum_d log|phi|) (sign = prod_d sign(phi): the parity of negative factors) so that
    128 factors neither overflow nor underflow. |phi| is clamped at the dtype's tiny before the
    log, so an exactly-zero factor gives M = 0 and a zero (not NaN) gradient.

    Fast and light (_SplineModes): B has at most 3 non-zero knots per t; phi is built and
    reduced one cache-sized block of (coordinates, ids) at a time and recomputed in the
    backward, so the [h, d_s, n, r] tensor never exists in full and autograd keeps only t,
    delta and M. t outside [0, 1] (or NaN) takes the plain definition instead."""
    lo, hi = torch.aminmax(t.detach()) if t.numel() else (0, 0)
    if not bool((lo >= 0) & (hi <= 1)):
        return spline_modes_reference(t, delta, normalize)
    return _SplineModes.apply(t, delta, bool(normalize))


def spline_modes(t, delta, normalize=False, use_triton=False):
    """Dispatch: the fused Triton kernel or the torch reference (same arithmetic). Half-precision
    inputs are computed in fp32 (a 128-factor product in bf16 is too coarse) and cast back."""
    if t.dtype in (torch.float16, torch.bfloat16) and not use_triton:
        return spline_modes_torch(t.float(), delta.float(), normalize).to(t.dtype)
    if use_triton:
        from models.leviathan_triton import spline_modes_triton  # imports triton lazily
        return spline_modes_triton(t, delta, normalize)
    return spline_modes_torch(t, delta, normalize)
