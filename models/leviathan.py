"""Leviathan: a continuous token-embedding generator that replaces the V x D input table.

A token id is written as k base-b digits (b = ceil(V^(1/k))); each digit picks a row of a small
shared codebook and the rows are summed into a seed z. Each of h heads projects and normalises
the seed, squashes it into (0, 1), expands every coordinate on a quadratic B-spline basis, forms
r separable modes as a product over the d_s coordinates, and maps them to the model width; the
heads are summed (arXiv 2601.22040; the README's Leviathan section lists the options).

Fast by construction: the generator is a pure function of the id, so it is evaluated once per
distinct id in the batch (or once over the whole vocabulary when the batch holds at least V ids)
and the result is gathered; autograd then sums the gradients per distinct id. No per-position
[N, d_s, knots] temporaries exist. The per-head spline/product work (models/spline_modes.py)
runs in a fused Triton kernel on CUDA (models/leviathan_triton.py); elsewhere a blocked torch
path with a hand-written backward builds phi from the 3 non-zero knots one cache-sized block at
a time and recomputes it in the backward, keeping only t, Delta and M for autograd.

Tensor parallel: heads are split across the TP ranks (like a row-parallel linear) and the
per-rank partial sums are all-reduced (or reduce-scattered over the sequence under sequence
parallelism). The codebooks are replicated; their gradients are made whole inside autograd.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.spline_modes import (bspline_basis, spline_modes, spline_modes_reference,  # noqa: F401
                                 spline_modes_torch)


# ----------------------------------------------------------------------------- size & digits

def digit_base(vocab_size: int, coords: int = 3) -> int:
    """b = ceil(V ** (1/k)), computed in integers (float roots misround at perfect powers)."""
    if vocab_size < 1 or coords < 1:
        raise ValueError(f"need vocab_size >= 1 and coords >= 1, got {vocab_size}, {coords}")
    b = max(1, round(vocab_size ** (1.0 / coords)))
    while b ** coords < vocab_size:
        b += 1
    while b > 1 and (b - 1) ** coords >= vocab_size:
        b -= 1
    return b


def leviathan_param_count(vocab_size: int, hidden_size: int, coords: int = 3, seed_dim: int = 128,
                          heads: int = 8, knots: int = 16, modes: int = 64) -> int:
    """The spec's size formula: k*b*d_s + h*(d_s^2 + 2 d_s) + h*d_s*kappa*r + h*r*D (all heads,
    i.e. the whole model, whatever the TP split)."""
    b = digit_base(vocab_size, coords)
    return (coords * b * seed_dim + heads * (seed_dim ** 2 + 2 * seed_dim)
            + heads * seed_dim * knots * modes + heads * modes * hidden_size)


# ----------------------------------------------------------------------------- spline modes
# (the per-head product of spline expansions: models/spline_modes.py)

# ----------------------------------------------------------------------------- TP helpers

def _auto_tp_group():
    """megatron parallel_state's TP group when it is initialised, else None. parallel_state is
    only consulted if something already imported it (it cannot be initialised otherwise), so a
    single-process model does not pay megatron's import time."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_group()


class _ReduceScatterFirstDim(torch.autograd.Function):
    """Reduce-scatter along dim 0 (backward: all-gather). Only for CPU tensors: megatron's
    version allocates its output on torch.cuda.current_device(), which does not exist there."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((x.shape[0] // group.size(), *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        out = grad.new_empty((grad.shape[0] * group.size(), *grad.shape[1:]))
        dist.all_gather_into_tensor(out, grad.contiguous(), group=group)
        return out, None


def _copy_to_tp(x, group):
    """Identity forward, all-reduce backward (megatron's copy_to_tensor_model_parallel_region)."""
    if group is None or group.size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
    return copy_to_tensor_model_parallel_region(x, group=group)


def _reduce_from_tp(x, group):
    """All-reduce forward, identity backward (reduce_from_tensor_model_parallel_region)."""
    if group is None or group.size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
    # contiguous first: megatron all-reduces x.contiguous() in place but returns x itself
    return reduce_from_tensor_model_parallel_region(x.contiguous(), group=group)


def _reduce_scatter_seq(x, group):
    """Reduce-scatter along dim 0 (sequence parallelism), all-gather backward."""
    if group is None or group.size() == 1:
        return x
    if x.is_cuda:
        from megatron.core.tensor_parallel import mappings
        return mappings.reduce_scatter_to_sequence_parallel_region(x, group=group)
    return _ReduceScatterFirstDim.apply(x, group)


# ----------------------------------------------------------------------------- the module

class LeviathanGenerator(nn.Module):
    """ids (any shape) -> embeddings (*ids.shape, hidden_size), in place of nn.Embedding.

    Parameters (per-head ones stacked with a leading head dim holding this TP rank's heads):
      codebooks    [k, b, d_s]          replicated on all TP ranks
      seed_proj    [h, d_s, d_s]        W_seed, no bias
      norm_weight  [h, d_s], norm_bias [h, d_s]   per-head LayerNorm (eps 1e-5)
      spline_delta [h, d_s, kappa, r]   Delta: spline weights are 1 + Delta
      out_proj     [h, r, D]            W_out

    Megatron attributes: per-head params carry tensor_model_parallel=True, partition_dim=0,
    partition_stride=1 (they are shards). The codebooks carry tensor_model_parallel=False (a
    duplicate on every TP rank: count once in the grad norm), allreduce=True (ordinary data-
    parallel gradient reduction) and sequence_parallel=False: their TP gradient reduction already
    happens inside autograd (they pass through copy_to_tensor_model_parallel_region), so a
    trainer must NOT all-reduce them over TP again.

    ids must be the same on every TP rank (as for megatron's VocabParallelEmbedding).
    sequence_parallel=True: ids are [s, b] (the full sequence on every TP rank) and the output is
    this rank's sequence slice [s/tp, b, D], as megatron's embedding produces under SP.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, coords: int = 3, seed_dim: int = 128,
                 heads: int = 8, knots: int = 16, modes: int = 64, sigmoid_scale: float = 1.0,
                 normalize_basis: bool = False, tp_group="auto", sequence_parallel: bool = False,
                 use_triton="auto", params_dtype: torch.dtype = torch.float32, init_seed: int = 0):
        super().__init__()
        if knots < 2:
            raise ValueError(f"knots must be >= 2, got {knots}")
        if use_triton not in ("auto", True, False):
            raise ValueError(f"use_triton must be 'auto', True or False, got {use_triton!r}")
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.coords, self.seed_dim, self.knots, self.modes = coords, seed_dim, knots, modes
        self.base = digit_base(vocab_size, coords)
        self.sigmoid_scale, self.normalize_basis = sigmoid_scale, normalize_basis
        self.sequence_parallel, self.use_triton = sequence_parallel, use_triton
        self.init_seed = init_seed

        if isinstance(tp_group, str) and tp_group == "auto":
            tp_group = _auto_tp_group()
        self.tp_group = tp_group
        self.tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        if heads % self.tp_size:
            raise ValueError(f"heads ({heads}) must be divisible by the tensor-parallel size "
                             f"({self.tp_size})")
        self.heads = heads
        h = self.local_heads = heads // self.tp_size

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=params_dtype))

        self.codebooks = param(coords, self.base, seed_dim)
        self.seed_proj = param(h, seed_dim, seed_dim)
        self.norm_weight = param(h, seed_dim)
        self.norm_bias = param(h, seed_dim)
        self.spline_delta = param(h, seed_dim, knots, modes)
        self.out_proj = param(h, modes, hidden_size)
        # powers b^m that split an id into its base-b digits (least significant first)
        self.register_buffer("digit_powers", self.base ** torch.arange(coords, dtype=torch.long),
                             persistent=False)

        for p in (self.seed_proj, self.norm_weight, self.norm_bias, self.spline_delta,
                  self.out_proj):
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        self.codebooks.tensor_model_parallel = False
        self.codebooks.allreduce = True
        self.codebooks.sequence_parallel = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The spec's init, drawn for ALL heads from a CPU generator seeded with init_seed on every
        rank, keeping this rank's head slice: a TP=n model equals the TP=1 model of the same seed,
        and data-parallel replicas start identical."""
        g = torch.Generator().manual_seed(self.init_seed)
        H, ds, D = self.heads, self.seed_dim, self.hidden_size
        full = {
            "codebooks": torch.randn(self.coords, self.base, ds, generator=g) * 0.02,
            "seed_proj": torch.randn(H, ds, ds, generator=g) * 0.02,
            "norm_weight": torch.ones(H, ds),
            "norm_bias": torch.zeros(H, ds),
            "spline_delta": torch.randn(H, ds, self.knots, self.modes, generator=g) * 0.1,
            "out_proj": torch.randn(H, self.modes, D, generator=g) * (0.02 / math.sqrt(H)),
        }
        heads = slice(self.tp_rank * self.local_heads, (self.tp_rank + 1) * self.local_heads)
        for name, value in full.items():
            p = getattr(self, name)
            p.copy_(value if name == "codebooks" else value[heads])

    # -- the generator proper, for a set of rows (distinct ids) -------------------------------

    def seeds(self, rows: torch.Tensor) -> torch.Tensor:
        """z = sum_m C[m, digit_m(id)]: rows [n] -> [n, d_s]. The codebooks pass through
        copy_to_tensor_model_parallel_region: each rank's codebook gradient (from its own heads)
        is all-reduced over TP, so every rank holds the full, identical gradient."""
        codebooks = _copy_to_tp(self.codebooks, self.tp_group)
        digits = (rows.unsqueeze(-1) // self.digit_powers) % self.base          # [n, k]
        return sum(codebooks[m].index_select(0, digits[:, m]) for m in range(self.coords))

    def partial_embed(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's heads' sum for the ids in rows [n] -> [n, D] (the full E at TP=1)."""
        z = self.seeds(rows)
        u = torch.einsum("nd,hde->hne", z, self.seed_proj)                      # [h, n, d_s]
        u = F.layer_norm(u, (self.seed_dim,)) * self.norm_weight[:, None] + self.norm_bias[:, None]
        t = torch.sigmoid(u * self.sigmoid_scale)
        M = spline_modes(t, self.spline_delta, self.normalize_basis, self._triton_for(t))
        return torch.einsum("hnr,hrd->nd", M, self.out_proj)

    def _triton_for(self, t: torch.Tensor) -> bool:
        if self.use_triton == "auto":
            return t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return bool(self.use_triton)

    # -- public ----------------------------------------------------------------------------

    def check_ids(self, ids: torch.Tensor) -> None:
        """Out-of-range ids raise; they are never wrapped into another token's digits."""
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() == 0:
            return
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()   # one host sync
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size} "
                             f"(valid ids are 0..{self.vocab_size - 1})")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids)
        if self.sequence_parallel and (ids.dim() < 1 or ids.shape[0] % self.tp_size):
            raise ValueError(f"sequence parallel needs ids [s, b] with s divisible by the TP size "
                             f"{self.tp_size}, got shape {tuple(ids.shape)}")
        flat = ids.reshape(-1).long()
        if flat.numel() >= self.vocab_size:   # at most N rows either way, and no sort
            rows, inverse = torch.arange(self.vocab_size, device=flat.device), flat
        else:
            rows, inverse = torch.unique(flat, return_inverse=True)
        table = self.partial_embed(rows)                                        # [n, D]
        if not self.sequence_parallel:
            # all-reduce the (small) per-distinct-id table, then gather: n <= N rows to send
            table = _reduce_from_tp(table, self.tp_group)
            return table.index_select(0, inverse).view(*ids.shape, self.hidden_size)
        out = table.index_select(0, inverse).view(*ids.shape, self.hidden_size)
        return _reduce_scatter_seq(out, self.tp_group)

    @torch.no_grad()
    def materialize(self, chunk_size: int = 8192) -> torch.Tensor:
        """The full V x D table (identical on every TP rank), evaluated in chunks of ids: export
        to a plain nn.Embedding for inference or a dense checkpoint."""
        device = self.codebooks.device
        table = torch.empty(self.vocab_size, self.hidden_size, dtype=self.out_proj.dtype,
                            device=device)
        for start in range(0, self.vocab_size, chunk_size):
            rows = torch.arange(start, min(start + chunk_size, self.vocab_size), device=device)
            table[start:start + rows.numel()] = self.partial_embed(rows)
        if self.tp_size > 1:
            dist.all_reduce(table, group=self.tp_group)
        return table

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size}, hidden={self.hidden_size}, base={self.base}, "
                f"coords={self.coords}, seed_dim={self.seed_dim}, heads={self.local_heads}/"
                f"{self.heads}, knots={self.knots}, modes={self.modes}, "
                f"sigmoid_scale={self.sigmoid_scale}, normalize_basis={self.normalize_basis}, "
                f"sequence_parallel={self.sequence_parallel}")
