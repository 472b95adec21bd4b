"""A LLaMA-style decoder on megatron-core's tensor-parallel layers, readable top to bottom.

    ids [b, s] -> embedding (dense vocab-parallel table, or the Leviathan generator)
               -> num_layers x [ x + Attention(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x)) ]
                  (grouped-query attention; optional activation recompute: per layer, or
                  selectively the attention core or the MLP's wide hidden activations)
               -> RMSNorm -> untied LM head (column-parallel over the padded vocabulary)
               -> per-token loss [b, s] (vocab-parallel cross-entropy) or this rank's logits

Tensor parallelism (TP) is Megatron's: QKV and gate/up are column-parallel (heads and FFN
columns split across TP ranks), the attention output and down projections row-parallel (one
all-reduce each), the vocabulary split across ranks in the input table and in the LM head.
Inside the model activations are [s, b, h] (Megatron's layout); with ``sequence_parallel``
the residual stream between the TP regions is [s/tp, b, h].

Initialisation does not depend on TP: every weight is drawn in full from a CPU generator seeded
by (init_seed, parameter name) and each rank copies in its own shard, so a TP=2 model is the
TP=1 model split in two.

The vocabulary is padded like Megatron's (a multiple of make_vocab_size_divisible_by * TP);
the padded rows of the LM head get -inf logits, so they never win the softmax and get no
gradient.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember_ds.tables import mark_token_table


# ------------------------------------------------------------------------------------------
# Configuration and presets
# ------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_query_groups: Optional[int] = None    # grouped-query attention; None: num_heads (MHA)
    ffn_hidden_size: Optional[int] = None     # None: LLaMA's 8/3 * hidden, rounded up to 64
    seq_length: int = 128
    embedding: str = "dense"                  # "dense" | "leviathan"
    leviathan: dict = field(default_factory=dict)   # extra LeviathanGenerator kwargs
    make_vocab_size_divisible_by: int = 128
    init_std: float = 0.02
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    recompute: str = "none"                   # "none" | "full" (per layer) | "attention" | "mlp"
    init_seed: int = 1234

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        if self.embedding not in ("dense", "leviathan"):
            raise ValueError(f"embedding must be 'dense' or 'leviathan', got {self.embedding!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} does not divide hidden_size "
                             f"{self.hidden_size}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_heads
        if self.num_query_groups < 1 or self.num_heads % self.num_query_groups:
            raise ValueError(f"num_query_groups {self.num_query_groups} must divide num_heads "
                             f"{self.num_heads}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if isinstance(self.params_dtype, str):
            self.params_dtype = getattr(torch, self.params_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's padding: round the vocabulary up to a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return multiple * math.ceil(self.vocab_size / multiple)

    def check_tensor_parallel(self, tp: int) -> None:
        if self.num_heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide num_heads "
                             f"{self.num_heads}")
        if self.num_query_groups % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide num_query_groups "
                             f"{self.num_query_groups} (each rank needs whole key/value groups)")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide ffn_hidden_size "
                             f"{self.ffn_hidden_size}")

    def param_count(self) -> dict:
        """Parameter counts from the shape alone (no allocation), as GPT.param_counts():
        embedding (the dense table; see models.leviathan for the generator), body, head."""
        D, F, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        qkv = (self.num_heads + 2 * self.num_query_groups) * self.head_dim * D
        layer = qkv + D * D + 3 * D * F + 2 * D
        VD = self.vocab_size * D
        return dict(embedding=VD, body=L * layer + D, head=VD)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; presets: {', '.join(PRESETS)}")
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


PRESETS = {
    # trains on 2 CPU cores in minutes (with a small sentencepiece vocabulary)
    "tiny": dict(vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4,
                 ffn_hidden_size=384, seq_length=128,
                 # Leviathan generator scaled to D = 128: d_s = D/4 and r = D/8 as in the spec
                 # (128 and 64 at D = 512), h = 8 and kappa = 16 kept. 92,640 parameters, 11x
                 # fewer than the 8192 x 128 table, about +3% step time on CPU (bench/results/
                 # leviathan_cpu.json). The spec defaults are sized for D >= 512 (60m, 410m keep
                 # them): here they would outgrow the table (1.26M) and cost ~+50% per step.
                 leviathan=dict(seed_dim=32, heads=8, knots=16, modes=16)),
    # the paper's / Pythia-like shapes (GPT-2 BPE vocabulary; override vocab_size for others)
    "60m": dict(vocab_size=50257, hidden_size=512, num_layers=6, num_heads=8,
                ffn_hidden_size=1408, seq_length=512),
    "410m": dict(vocab_size=50257, hidden_size=1024, num_layers=24, num_heads=16,
                 ffn_hidden_size=2816, seq_length=512),
    # LLaMA-style ~1.1B (TinyLlama's shape): grouped-query attention (32 heads, 4 key/value
    # groups), untied head, 32k vocabulary
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
               num_query_groups=4, ffn_hidden_size=5632, seq_length=2048),
}
RECOMPUTE = ("none", "full", "attention", "mlp")


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------

def _megatron_config(cfg: GPTConfig, tp: int):
    from megatron.core import ModelParallelConfig
    # Weights are created empty and filled by GPT._init_weights (TP-independent draws).
    return ModelParallelConfig(tensor_model_parallel_size=tp,
                               sequence_parallel=cfg.sequence_parallel and tp > 1,
                               use_cpu_initialization=True, perform_initialization=False,
                               params_dtype=cfg.params_dtype)


def _no_init(_weight):  # megatron layers want an init_method; _init_weights does the work
    pass


def _split(layer, dim: int, stride: int = 1):
    """Give a megatron layer's weight the tensor-parallel attributes (tensor_model_parallel,
    partition_dim, partition_stride) that megatron only sets when it initialises the weight
    itself (perform_initialization=True); Ember, DeepSpeed and _init_weights read them."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    if not hasattr(layer.weight, "partition_dim"):
        set_tensor_model_parallel_attributes(layer.weight, True, dim, stride)
    return layer


def column_parallel(d_in: int, d_out: int, mcfg, tp_group, stride: int = 1):
    """Bias-free ColumnParallelLinear (output split across TP, not gathered). ``stride`` > 1
    for fused projections ([q; k; v], [gate; up]): each rank gets its part of every block."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    return _split(ColumnParallelLinear(d_in, d_out, config=mcfg, init_method=_no_init, bias=False,
                                       gather_output=False, stride=stride, tp_group=tp_group),
                  0, stride)


def row_parallel(d_in: int, d_out: int, mcfg, tp_group):
    """Bias-free RowParallelLinear on a TP-split input; its output is all-reduced (or
    reduce-scattered along the sequence under sequence parallelism)."""
    from megatron.core.tensor_parallel import RowParallelLinear
    return _split(RowParallelLinear(d_in, d_out, config=mcfg, init_method=_no_init, bias=False,
                                    input_is_parallel=True, skip_bias_add=False,
                                    tp_group=tp_group), 1)


try:  # NVIDIA apex where present (built from source on GPU machines): fused RMSNorm kernel.
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:  # not installed, or the unrelated PyPI package of that name
    _apex_rms_norm = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, sequence_parallel: bool, tp_group):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        # Under sequence parallelism each TP rank normalises a different part of the sequence,
        # so the weight's gradient must be summed over the TP group: route the weight through
        # megatron's copy_to_tensor_model_parallel_region (identity forward, all-reduce backward).
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group

    def forward(self, x):
        w = self.weight
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
            w = copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        if _apex_rms_norm is not None and x.is_cuda:
            return _apex_rms_norm(x, w, (x.shape[-1],), self.eps)
        # x * rsqrt(mean(x^2) + eps) * w, computed in fp32 and rounded once to x's dtype:
        # one fused kernel on CUDA (no fp32 copy of x in a bf16 run; it needs w in x's dtype),
        # the same fp32 ops as written out here on CPU, decomposed and fused under compile
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), self.eps)


def rope_tables(seq_length: int, head_dim: int, base: float, dtype=torch.float32):
    """cos, sin [s, 1, 1, head_dim] for rotate-half rotary embeddings (LLaMA / GPT-NeoX): the
    angles in float64, cos and sin rounded once to ``dtype``, the model's compute dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: [s, b, heads, head_dim], rotated in its own dtype (as Hugging Face's LLaMA does; a
    bf16 run makes no fp32 copy of q and k). The tables are cast only if they differ."""
    s = x.shape[0]
    cos, sin = cos[:s].to(x.dtype), sin[:s].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query attention: num_heads
    query heads share num_query_groups key/value heads (MHA when equal). Heads and groups are
    split across TP ranks."""

    def __init__(self, cfg: GPTConfig, mcfg, tp: int, tp_group):
        super().__init__()
        D, H, G, hd = cfg.hidden_size, cfg.num_heads, cfg.num_query_groups, cfg.head_dim
        self.local_heads, self.local_groups, self.head_dim = H // tp, G // tp, hd
        self.recompute = cfg.recompute == "attention"
        # Full weight [q; k; v] ((H + 2G) hd x D); each rank holds its part of every block,
        # [q_r; k_r; v_r] (for MHA that is megatron's partition stride 3).
        self.qkv = column_parallel(D, (H + 2 * G) * hd, mcfg, tp_group, stride=3 if G == H else 1)
        self.qkv.weight.partition_blocks = (H * hd, G * hd, G * hd)
        self.proj = row_parallel(H * hd, D, mcfg, tp_group)

    def forward(self, x, cos, sin):
        qkv, _ = self.qkv(x)                            # [s, b, (heads + 2 groups) * hd]
        s, b = qkv.shape[:2]
        hd, nh, ng = self.head_dim, self.local_heads, self.local_groups
        q, k, v = qkv.split([nh * hd, ng * hd, ng * hd], dim=-1)
        q, k, v = q.reshape(s, b, nh, hd), k.reshape(s, b, ng, hd), v.reshape(s, b, ng, hd)
        if self.recompute and torch.is_grad_enabled():
            # selective recompute: keep q, k, v; redo rotary + attention in the backward
            y = checkpoint(self._core, q, k, v, cos, sin, use_reentrant=False)
        else:
            y = self._core(q, k, v, cos, sin)
        out, _ = self.proj(y)                           # all-reduce (or reduce-scatter)
        return out

    def _core(self, q, k, v, cos, sin):
        s, b, nh, hd = q.shape
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k.shape[2] != nh:                            # query head i uses group i // (nh/ng)
            k = k.repeat_interleave(nh // k.shape[2], dim=2)
            v = v.repeat_interleave(nh // v.shape[2], dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))   # [b, heads, s, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.permute(2, 0, 1, 3).reshape(s, b, nh * hd)


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig, mcfg, tp_group):
        super().__init__()
        D, Fh = cfg.hidden_size, cfg.ffn_hidden_size
        # Full weight [gate; up] (2F x D); stride 2 gives each rank [gate_r; up_r].
        self.gate_up = column_parallel(D, 2 * Fh, mcfg, tp_group, stride=2)
        self.down = row_parallel(Fh, D, mcfg, tp_group)
        self.recompute = cfg.recompute == "mlp"

    def forward(self, x):
        if self.recompute and torch.is_grad_enabled():
            # selective recompute: keep the input; redo gate/up (2F wide) and SiLU in the
            # backward (under sequence parallelism that replays the input's all-gather)
            h = checkpoint(self._hidden, x, use_reentrant=False)
        else:
            h = self._hidden(x)
        out, _ = self.down(h)
        return out

    def _hidden(self, x):
        gate_up, _ = self.gate_up(x)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, mcfg, tp: int, tp_group):
        super().__init__()
        sp = mcfg.sequence_parallel
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.params_dtype, sp, tp_group)
        self.attn = Attention(cfg, mcfg, tp, tp_group)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.params_dtype, sp, tp_group)
        self.mlp = SwiGLU(cfg, mcfg, tp_group)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return x


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """LLaMA-style decoder. ``forward(input_ids [b, s], labels=None)`` returns the per-token
    loss [b, s] (fp32) when labels are given, else this rank's logits [b, s, padded_vocab/tp]
    (padded columns are -inf).

    Uses megatron-core parallel_state's tensor-parallel group; when parallel_state is not
    initialised, a TP=1 world over the default process group is set up. Parameters are built
    on the CPU (params_dtype); move the model with ``.to(device)``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            _init_tp1_world(cfg.init_seed)
        self.cfg = cfg
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        cfg.check_tensor_parallel(self.tp)
        self.sequence_parallel = cfg.sequence_parallel and self.tp > 1
        if self.sequence_parallel and cfg.seq_length % self.tp:
            raise ValueError(f"sequence parallelism needs TP {self.tp} to divide seq_length "
                             f"{cfg.seq_length}")
        mcfg = _megatron_config(cfg, self.tp)
        self.padded_vocab = cfg.padded_vocab_size(self.tp)
        self.vocab_per_rank = self.padded_vocab // self.tp
        self.vocab_start = self.tp_rank * self.vocab_per_rank

        self.embedding_kind = cfg.embedding
        if cfg.embedding == "dense":
            self.embedding = self._dense_embedding(mcfg)
        else:
            from models.leviathan import LeviathanGenerator
            kw = dict(cfg.leviathan)
            kw.setdefault("params_dtype", cfg.params_dtype)
            kw.setdefault("init_seed", cfg.init_seed)
            self.embedding = LeviathanGenerator(cfg.vocab_size, cfg.hidden_size,
                                                tp_group=self.tp_group,
                                                sequence_parallel=self.sequence_parallel, **kw)
        self.layers = nn.ModuleList(Block(cfg, mcfg, self.tp, self.tp_group)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.params_dtype,
                            self.sequence_parallel, self.tp_group)
        self.lm_head = column_parallel(cfg.hidden_size, self.padded_vocab, mcfg, self.tp_group)
        self._mark_table(self.lm_head.weight, "lm_head.weight")
        cos, sin = rope_tables(cfg.seq_length, cfg.head_dim, cfg.rope_base, cfg.params_dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    # -- construction helpers -------------------------------------------------------------

    def _dense_embedding(self, mcfg):
        from megatron.core.tensor_parallel import VocabParallelEmbedding
        emb = _split(VocabParallelEmbedding(self.padded_vocab, self.cfg.hidden_size,
                                            init_method=_no_init, config=mcfg,
                                            tp_group=self.tp_group,
                                            reduce_scatter_embeddings=self.sequence_parallel), 0)
        self._mark_table(emb.weight, "embedding.weight")
        return emb

    def _mark_table(self, weight, name):
        mark_token_table(weight, global_rows=self.padded_vocab, row_offset=self.vocab_start,
                         row_group=self.tp_group if self.tp > 1 else None, name=name)

    @torch.no_grad()
    def _init_weights(self):
        """Draw each weight in full from a generator seeded by (init_seed, name) and copy in this
        rank's shard: the result does not depend on TP. Projections into the residual stream
        get std / sqrt(2 * num_layers); norms 1; padded vocabulary rows 0. The Leviathan
        generator initialises itself (from init_seed)."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            if name.startswith("embedding.") and self.embedding_kind == "leviathan":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = cfg.init_std
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
            full_shape = list(p.shape)
            dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) \
                else -1
            if dim >= 0:
                full_shape[dim] *= self.tp
            g = torch.Generator().manual_seed(_name_seed(cfg.init_seed, name))
            if name in ("embedding.weight", "lm_head.weight"):
                # draw the real rows only: the padding (which depends on TP) stays 0
                full = torch.zeros(full_shape, dtype=torch.float32)
                full[:cfg.vocab_size].normal_(0.0, std, generator=g)
            else:
                full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=g)
            if dim >= 0:
                full = shard(full, dim, self.tp_rank, self.tp, getattr(p, "partition_stride", 1),
                             getattr(p, "partition_blocks", None))
            p.copy_(full.to(p.dtype))

    # -- forward ----------------------------------------------------------------------------

    def embed(self, input_ids):
        """[b, s] ids -> [s, b, D] (under sequence parallelism [s/tp, b, D])."""
        if self.embedding_kind == "dense" and self.sequence_parallel:
            return self.embedding(input_ids)            # transposes and reduce-scatters itself
        return self.embedding(input_ids.t().contiguous())

    def forward(self, input_ids, labels=None):
        """input_ids, labels: [b, s] token ids in [0, vocab_size) (mask unwanted positions in
        the returned per-token loss). Sequence parallelism needs s divisible by TP."""
        s = input_ids.shape[1]
        if s > self.cfg.seq_length:
            raise ValueError(f"sequence length {s} exceeds seq_length {self.cfg.seq_length}")
        x = self.embed(input_ids)
        full = self.cfg.recompute == "full" and torch.is_grad_enabled()
        for layer in self.layers:
            if full:   # keep only each layer's input; redo the layer in the backward
                x = checkpoint(layer, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = layer(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)
        logits, _ = self.lm_head(x)                     # [s, b, padded_vocab / tp]
        logits = self._mask_padded_vocab(logits)
        if labels is None:
            return logits.transpose(0, 1)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        loss = vocab_parallel_cross_entropy(logits, labels.t().contiguous())   # [s, b] fp32
        return loss.t()

    def _mask_padded_vocab(self, logits):
        """-inf on the padded vocabulary columns held by this rank (only the last ranks)."""
        first_pad = self.cfg.vocab_size - self.vocab_start   # local index of the first pad
        if first_pad >= self.vocab_per_rank:
            return logits
        mask = torch.arange(self.vocab_per_rank, device=logits.device) >= first_pad
        return logits.masked_fill(mask, float("-inf"))

    # -- accounting and export --------------------------------------------------------------

    def param_counts(self) -> dict:
        """Global parameter counts, independent of TP: embedding (the V x D table, or the
        Leviathan generator), body (blocks + final norm) and head (V x D). The vocabulary
        padding (zero rows, masked, never trained; its size depends on TP) is not counted."""
        VD = self.cfg.vocab_size * self.cfg.hidden_size
        if self.embedding_kind == "dense":
            embedding = VD
        else:
            embedding = _global_numel(self.embedding.parameters(), self.tp)
        body = _global_numel([p for n, p in self.named_parameters()
                              if not n.startswith(("embedding.", "lm_head."))], self.tp)
        return dict(embedding=embedding, body=body, head=VD)

    @torch.no_grad()
    def swap_embedding_for_table(self) -> None:
        """Replace the Leviathan generator by a dense VocabParallelEmbedding holding
        generator.materialize() (the inference export: the same logits, a standard table)."""
        if self.embedding_kind != "leviathan":
            raise ValueError("the model already has a dense embedding table")
        table = self.embedding.materialize()               # [V, D], full on every rank
        mcfg = _megatron_config(self.cfg, self.tp)
        emb = self._dense_embedding(mcfg)
        full = torch.zeros(self.padded_vocab, self.cfg.hidden_size, dtype=torch.float32)
        full[:self.cfg.vocab_size] = table.detach().float().cpu()
        emb.weight.copy_(full[self.vocab_start:self.vocab_start + self.vocab_per_rank])
        emb.to(device=table.device)
        self.embedding = emb
        self.embedding_kind = "dense"
        self.cfg = dataclasses.replace(self.cfg, embedding="dense")   # rebuilds as exported


def _init_tp1_world(seed: int) -> None:
    """megatron parallel_state with TP = 1 over the default process group (a world of one
    for a plain process), RNG trackers seeded without touching torch.cuda."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from models.parallel import init_distributed
    init_distributed()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def shard(full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1, blocks=None):
    """This rank's piece of ``full`` split along ``dim`` like megatron-core: ``stride`` *
    ``world`` equal chunks, rank r taking chunks r, r + world, ... (stride > 1 for fused
    projections such as [q; k; v] or [gate; up]). ``blocks`` (sizes along ``dim``) splits
    each block of a fused projection whose blocks differ in size ([q; k; v] under GQA)."""
    if blocks is not None:
        return torch.cat([torch.chunk(part, world, dim=dim)[rank]
                          for part in torch.split(full, list(blocks), dim=dim)], dim=dim)
    chunks = torch.chunk(full, stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim).contiguous()


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _global_numel(params, tp: int) -> int:
    """Sum of full (unsharded) sizes: megatron tensor-parallel params count tp times."""
    total = 0
    for p in params:
        split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
        total += p.numel() * (tp if split else 1)
    return total
