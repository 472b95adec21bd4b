"""GPT at TP=2 equals GPT at TP=1 (same seed): per-token loss and every gradient, fp32, for the
dense and the Leviathan embedding, with and without sequence parallelism, and with grouped-query
attention (2 key/value groups for 4 heads: one group per rank) and per-layer recompute.

One launch, two ranks (gloo). Phase 1 builds the TP=2 models and keeps losses and local
gradient shards; phase 2 re-initialises megatron parallel_state with TP=1 (data parallel 2)
in the same processes, builds the TP=1 models from the same seed and compares: sharded
gradients are all-gathered (undoing megatron's partition stride), replicated ones compared as
they are. Both ranks run the same tokens.
"""
import torch
import torch.distributed as dist

from _common import finish

# Test-only: megatron's sequence-parallel all-gather / reduce-scatter allocate their buffers on
# torch.cuda.current_device(); on a CPU machine that must be the CPU.
if not torch.cuda.is_available():
    torch.cuda.current_device = lambda: torch.device("cpu")

from megatron.core import parallel_state as ps                      # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from ember_ds.tables import table_meta, tag_module_tables            # noqa: E402
from models.gpt import GPT, GPTConfig                                # noqa: E402
from models.parallel import init_distributed                         # noqa: E402

LEV = dict(seed_dim=16, heads=4, knots=8, modes=8)
# (embedding, sequence parallel, grouped-query attention with per-layer recompute at TP=2)
CASES = [("dense", False, False), ("leviathan", False, False), ("dense", True, False),
         ("leviathan", True, False), ("dense", True, True)]


def config(embedding, sp, gqa=False, recompute="none"):
    # vocab 300 -> padded 512 at TP=2 (rank 1 holds 44 real rows, 212 padded ones), 384 at TP=1
    return GPTConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                     num_query_groups=2 if gqa else None, recompute=recompute,
                     ffn_hidden_size=96, seq_length=16, embedding=embedding, leviathan=dict(LEV),
                     sequence_parallel=sp, init_seed=7)


def key(emb, sp, gqa):
    return f"{emb}{'_sp' if sp else ''}{'_gqa_recompute' if gqa else ''}"


def run(model, ids, labels):
    loss = model(ids, labels=labels)
    # a non-uniform weighting so that every position's gradient is distinct
    w = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)
    (loss * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach().clone(), grads


def init_tp(tp):
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1, inference_rng_tracker=True)


def unshard(local, full_shape, stride, blocks=None):
    """All-gather a TP=2 shard over the world (= the TP group in phase 1) into the full tensor
    (``blocks``: the full sizes of a fused projection's blocks, each split across ranks)."""
    dim = next(d for d in range(local.dim()) if local.shape[d] != full_shape[d])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    if blocks is not None:
        local_sizes = [b // len(parts) for b in blocks]
        pieces = [p.split(local_sizes, dim=dim) for p in parts]
        stride = len(blocks)
    else:
        pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def main():
    init_distributed()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 16), generator=g)
    labels = torch.randint(0, 300, (3, 16), generator=g)
    labels[0, :4] = 299                     # the last real row lives on rank 1 next to padding

    init_tp(2)
    tp2 = {}
    for emb, sp, gqa in CASES:
        model = GPT(config(emb, sp, gqa, "full" if gqa else "none"))
        assert model.padded_vocab == 512 and model.lm_head.weight.shape[0] == 256
        strides = {n: (getattr(p, "partition_stride", 1), getattr(p, "partition_blocks", None))
                   for n, p in model.named_parameters()}
        logits = model(ids)
        pad_ok = bool(torch.isinf(logits[..., 300 - model.vocab_start:]).all()) \
            if model.vocab_start + 256 > 300 else True
        tables = tag_module_tables(model)
        rank = dist.get_rank()
        tables_ok = tables == ([model.embedding.weight] if emb == "dense" else []) \
            + [model.lm_head.weight]
        for t in tables:
            meta = table_meta(t)
            tables_ok &= (meta.global_rows, meta.row_offset) == (512, 256 * rank) \
                and meta.row_groups == [ps.get_tensor_model_parallel_group()]
        tp2[(emb, sp, gqa)] = (*run(model, ids, labels), strides, pad_ok, tables_ok,
                          model.param_counts())

    init_tp(1)
    result = {}
    for emb, sp, gqa in CASES:
        model = GPT(config(emb, False, gqa))
        loss1, grads1 = run(model, ids, labels)
        loss2, grads2, strides, pad_ok, tables_ok, counts2 = tp2[(emb, sp, gqa)]
        grad_err, names = 0.0, 0
        for name, g1 in grads1.items():
            g2 = grads2[name]
            if g2.shape != g1.shape:
                if name in ("lm_head.weight", "embedding.weight"):
                    # TP=2 pads to 512 rows, TP=1 to 384: padded rows must have zero gradient
                    g2 = unshard(g2, (512,) + tuple(g1.shape[1:]), 1)
                    grad_err = max(grad_err, g2[300:].abs().max().item())
                    g2 = g2[:g1.shape[0]]
                else:
                    g2 = unshard(g2, g1.shape, *strides[name])
            scale = g1.abs().max().item() + 1e-12
            grad_err = max(grad_err, (g2 - g1).abs().max().item() / scale)
            names += 1
        result[key(emb, sp, gqa)] = dict(
            loss_err=(loss2 - loss1).abs().max().item(), loss=loss1.mean().item(),
            grad_err=grad_err, params=names, pad_ok=pad_ok, tables_ok=bool(tables_ok),
            counts_ok=counts2 == model.param_counts())
    finish(result)


if __name__ == "__main__":
    main()
