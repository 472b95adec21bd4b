"""Leviathan generator under tensor parallelism (run by tests/test_leviathan.py on 2 ranks).

Each rank builds the TP=2 model (heads split over megatron's TP group) and, in-process, the TP=1
reference with the same init seed; it writes the largest differences in outputs, in every
parameter's gradient (its head slice of the reference's) and in materialize()."""
import os

from _common import finish  # also puts the repo root on sys.path
import torch
import torch.distributed as dist

from models.leviathan import LeviathanGenerator
from models.parallel import init_distributed, tp_rank, tp_size

torch.set_num_threads(1)


def compare(vocab, seq, batch, sequence_parallel, normalize, seed):
    kw = dict(coords=3, seed_dim=8, heads=4, knots=6, modes=8, normalize_basis=normalize,
              sigmoid_scale=0.5 if normalize else 1.0, init_seed=seed)
    ref = LeviathanGenerator(vocab, 16, tp_group=None, **kw)
    tp = LeviathanGenerator(vocab, 16, tp_group="auto", sequence_parallel=sequence_parallel, **kw)
    rank, world = tp_rank(), tp_size()
    assert tp.tp_size == world == 2 and tp.local_heads == 2

    g = torch.Generator().manual_seed(100 + seed)                # same ids/weights on all ranks
    ids = torch.randint(1, vocab, (seq, batch), generator=g)
    weight = torch.randn(seq, batch, 16, generator=g)

    out_ref = ref(ids)
    (out_ref * weight).sum().backward()
    out = tp(ids)
    if sequence_parallel:
        part = slice(rank * seq // world, (rank + 1) * seq // world)
        out_ref, weight = out_ref[part], weight[part]
    assert out.shape == out_ref.shape, (out.shape, out_ref.shape)
    (out * weight).sum().backward()

    heads = slice(rank * tp.local_heads, (rank + 1) * tp.local_heads)
    res = {"out": (out - out_ref).abs().max().item(), "out_scale": out_ref.abs().max().item()}
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        r = ref_params[name]
        if getattr(p, "tensor_model_parallel", False):
            r_val, r_grad = r.detach()[heads], r.grad[heads]
        else:
            r_val, r_grad = r.detach(), r.grad
        res[f"init.{name}"] = (p.detach() - r_val).abs().max().item()
        res[f"grad.{name}"] = (p.grad - r_grad).abs().max().item()
        res[f"gradscale.{name}"] = r_grad.abs().max().item()
    # replicated params: gradients identical on every TP rank
    cb = tp.codebooks.grad.clone()
    dist.all_reduce(cb, op=dist.ReduceOp.MAX)
    res["codebook_grad_rank_spread"] = (cb - tp.codebooks.grad).abs().max().item()
    res["materialize"] = (tp.materialize(chunk_size=64) - ref.materialize()).abs().max().item()
    return res


def main():
    # parallel_state directly: no RNG-tracker seeding is needed (init comes from init_seed)
    from megatron.core import parallel_state as ps
    init_distributed()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    results = {
        "plain": compare(vocab=300, seq=8, batch=3, sequence_parallel=False, normalize=False,
                         seed=0),
        "sp": compare(vocab=300, seq=8, batch=3, sequence_parallel=True, normalize=True, seed=1),
        # at least V ids: the whole-vocabulary path
        "whole_vocab": compare(vocab=20, seq=8, batch=3, sequence_parallel=False, normalize=False,
                               seed=2),
        "whole_vocab_sp": compare(vocab=20, seq=8, batch=3, sequence_parallel=True, normalize=False,
                                  seed=3),
    }
    try:
        LeviathanGenerator(300, 16, seed_dim=8, heads=3, knots=6, modes=8)
        results["bad_heads_error"] = None
    except ValueError as e:
        results["bad_heads_error"] = str(e)
    finish(results)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
