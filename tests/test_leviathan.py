"""Leviathan embedding generator: the spec's formulas, distinct-id evaluation, tensor parallelism,
materialisation, bad input, and the Triton kernel's arithmetic (under TRITON_INTERPRET=1)."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import pytest
import torch

from models.leviathan import (LeviathanGenerator, digit_base, leviathan_param_count,
                              spline_modes_torch)

torch.set_num_threads(1)

SMALL = dict(coords=3, seed_dim=6, heads=2, knots=5, modes=4)
# the Triton tests run on CPU tensors under the interpreter; with it switched off, on a GPU
TRITON_DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
needs_triton_device = pytest.mark.skipif(
    TRITON_DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="TRITON_INTERPRET is off and there is no GPU")


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _zero(module):
    for p in module.parameters():
        p.grad = None


# ----------------------------------------------------------------------------- size

def test_param_count_formula_and_module():
    assert digit_base(200_376) == 59 and digit_base(27) == 3 and digit_base(28) == 4
    assert leviathan_param_count(200_376, 512) == 1_466_496
    gen = LeviathanGenerator(200_376, 512, tp_group=None)
    assert sum(p.numel() for p in gen.parameters()) == 1_466_496
    other = dict(coords=2, seed_dim=4, heads=4, knots=3, modes=5)
    for V, D, kw in [(1000, 24, SMALL), (50, 8, other)]:
        gen = LeviathanGenerator(V, D, tp_group=None, **kw)
        assert sum(p.numel() for p in gen.parameters()) == leviathan_param_count(V, D, **kw)


def test_init_matches_spec():
    gen = LeviathanGenerator(200_376, 512, tp_group=None)
    assert abs(gen.codebooks.std().item() - 0.02) < 1e-3
    assert abs(gen.seed_proj.std().item() - 0.02) < 1e-3
    assert abs(gen.spline_delta.std().item() - 0.1) < 2e-3
    assert abs(gen.out_proj.std().item() - 0.02 / math.sqrt(8)) < 2e-4
    assert torch.all(gen.norm_weight == 1) and torch.all(gen.norm_bias == 0)
    assert gen.codebooks.shape == (3, 59, 128) and gen.spline_delta.shape == (8, 128, 16, 64)
    # megatron attributes: per-head params are shards, the codebooks a replicated duplicate
    assert gen.out_proj.tensor_model_parallel and gen.out_proj.partition_dim == 0
    assert not gen.codebooks.tensor_model_parallel and not gen.codebooks.sequence_parallel
    # same seed -> same model; another seed -> another
    again = LeviathanGenerator(200_376, 512, tp_group=None)
    assert torch.equal(again.spline_delta, gen.spline_delta)
    seed0 = LeviathanGenerator(1000, 8, tp_group=None, **SMALL)
    seed1 = LeviathanGenerator(1000, 8, tp_group=None, init_seed=1, **SMALL)
    assert not torch.equal(seed0.codebooks, seed1.codebooks)


# ----------------------------------------------------------------------------- the formulas

def naive_generator(gen, ids):
    """The spec written out per token, per head, per coordinate, per knot (float64, autograd)."""
    V, k, b = gen.vocab_size, gen.coords, gen.base
    kappa, H = gen.knots, gen.local_heads
    out = []
    for token in ids.reshape(-1).tolist():
        z = 0
        rest = token
        for m in range(k):                       # base-b digits, least significant first
            z = z + gen.codebooks[m, rest % b]
            rest //= b
        E = 0
        for l in range(H):
            u = z @ gen.seed_proj[l]
            mean = u.mean()
            var = ((u - mean) ** 2).mean()
            u = (u - mean) / torch.sqrt(var + 1e-5) * gen.norm_weight[l] + gen.norm_bias[l]
            t = torch.sigmoid(u * gen.sigmoid_scale)
            phis = []
            for d in range(gen.seed_dim):
                basis = []
                for j in range(kappa):
                    x = (t[d] - j / (kappa - 1)) * (kappa - 1)
                    if abs(x) < 0.5:
                        basis.append(0.75 - x ** 2)
                    elif abs(x) < 1.5:
                        basis.append(0.5 * (1.5 - abs(x)) ** 2)
                    else:
                        basis.append(x * 0)
                if gen.normalize_basis:
                    total = sum(basis)
                    basis = [v / total for v in basis]
                phis.append(sum(basis[j] * (1 + gen.spline_delta[l, d, j]) for j in range(kappa)))
            M = torch.stack(phis).prod(0)        # the plain product: fine in float64
            E = E + M @ gen.out_proj[l]
        out.append(E)
    return torch.stack(out).view(*ids.shape, gen.hidden_size)


@pytest.mark.parametrize("sigmoid_scale,normalize", [(1.0, False), (0.5, True)])
def test_float64_matches_naive_spec(sigmoid_scale, normalize):
    gen = LeviathanGenerator(40, 8, tp_group=None, sigmoid_scale=sigmoid_scale,
                             normalize_basis=normalize, params_dtype=torch.float64, **SMALL)
    with torch.no_grad():                     # non-trivial LayerNorm affine and larger splines
        gen.norm_weight.normal_(1.0, 0.3)
        gen.norm_bias.normal_(0.0, 0.3)
        gen.spline_delta.mul_(20.0)           # some phi < 0: exercises the sign handling
    ids = torch.tensor([[3, 17, 39, 17], [5, 22, 3, 31]])
    w = torch.randn(*ids.shape, 8, dtype=torch.float64)
    out = gen(ids)
    (out * w).sum().backward()
    got = _grads(gen)
    _zero(gen)
    ref = naive_generator(gen, ids)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, g in _grads(gen).items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_spline_modes_handles_sign_and_long_products():
    """The log-space product equals the direct product, negative factors included, and stays
    finite where a running fp32 product overflows."""
    t = torch.rand(2, 7, 9, dtype=torch.float64)
    delta = torch.randn(2, 9, 5, 3, dtype=torch.float64) * 2.0
    from models.leviathan import bspline_basis
    phi = torch.einsum("hndk,hdkr->hndr", bspline_basis(t, 5), 1 + delta)
    assert (phi < 0).any()
    torch.testing.assert_close(spline_modes_torch(t, delta), phi.prod(2))
    # phi = 1000 for 100 coordinates then 0.001 for 100: the running fp32 product overflows,
    # the log-space one gives the true M ~ 1 (at t = 0.5 on 4 knots the basis sums to 1)
    t = torch.full((1, 3, 200), 0.5)
    delta = torch.cat([torch.full((1, 100, 4, 2), 999.0), torch.full((1, 100, 4, 2), -0.999)], 1)
    assert torch.isinf(torch.prod(1 + delta[:, :, 1], dim=1)).all()
    exact = (1 + delta[0, :, 1, 0].double()).prod().item()    # ~1 (0.001 is inexact in fp32)
    # fp32 logs of size ~7 summed 200 times: ~1e-4 relative, the log-space method's own rounding
    torch.testing.assert_close(spline_modes_torch(t, delta), torch.full((1, 3, 2), exact),
                               rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- fast torch path

def _modes_and_grads(fn, t, delta, g, normalize=False):
    t = t.detach().clone().requires_grad_()
    delta = delta.detach().clone().requires_grad_()
    M = fn(t, delta, normalize)
    (M * g).sum().backward()
    return M.detach(), t.grad, delta.grad


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Work sizes so small that small tensors span several id ranges, chunks and blocks."""
    import models.spline_modes as sm
    monkeypatch.setattr(sm, "_BLOCK", 192)
    monkeypatch.setattr(sm, "_CHUNK", 48)
    return sm


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 9, 5, 6), (3, 29, 3, 4, 7), (1, 23, 17, 16, 3)])
def test_blocked_spline_modes_match_definition(tiny_blocks, shape, normalize):
    """The blocked torch path (3-knot basis, grouped log-product, hand-written backward) equals
    the plain definition, values and gradients, however the work is split."""
    lev = tiny_blocks
    h, n, ds, kappa, r = shape
    torch.manual_seed(4)
    t = torch.rand(h, n, ds, dtype=torch.float64)
    t[0, 0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)   # the ends of the knot range
    delta = torch.randn(h, ds, kappa, r, dtype=torch.float64) * 2.0      # negative factors too
    g = torch.randn(h, n, r, dtype=torch.float64)
    blocks = lev._Blocks(t, kappa, r, normalize, grad=True)
    assert blocks.nb < n and sum(len(c[-1]) for c in blocks.chunks) > 1
    got = _modes_and_grads(spline_modes_torch, t, delta, g, normalize)
    ref = _modes_and_grads(lev.spline_modes_reference, t, delta, g, normalize)
    assert (ref[0] < 0).any()
    for name, a, b in zip(("M", "dt", "ddelta"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_modes_zero_tiny_and_huge_factors(tiny_blocks, dtype):
    """An exactly-zero factor gives M = 0 and zero (not NaN) gradients; a group of factors whose
    product is below the grouped log-product's guard, and a Delta beyond its bound, take the
    factor-by-factor path: all as the definition."""
    lev = tiny_blocks
    torch.manual_seed(5)
    h, n, ds, kappa, r = 2, 30, 9, 6, 5
    t = torch.rand(h, n, ds, dtype=dtype)
    g = torch.randn(h, n, r, dtype=dtype)
    base = torch.randn(h, ds, kappa, r, dtype=dtype) * 0.3
    zero, tiny_group, huge = base.clone(), base.clone(), base.clone()
    zero[0, 3, :, 1] = -1.0                       # phi[0, :, 3, 1] = 0 exactly
    tiny_group[1, :4, :, 2] = 1e-4 - 1.0          # 4 factors ~1e-4: group product ~1e-16
    huge[0, 5, 2, 0] = 3.0 * lev._GROUP_WMAX      # beyond the bound: no grouping at all
    assert not lev._grouping_safe(huge) and lev._grouping_safe(tiny_group)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for delta in (zero, tiny_group, huge):
        got = _modes_and_grads(spline_modes_torch, t, delta, g)
        ref = _modes_and_grads(lev.spline_modes_reference, t, delta, g)
        for name, a, b in zip(("M", "dt", "ddelta"), got, ref):
            assert torch.isfinite(a).all(), name
            scale = b.abs().max()
            torch.testing.assert_close(a / scale, b / scale, **tol, msg=name)
    M, dt, dd = _modes_and_grads(spline_modes_torch, t, zero, g)
    assert torch.all(M[0, :, 1] == 0) and torch.all(dd[0, 3, :, 1] == 0)


def test_spline_modes_outside_unit_interval():
    """t outside [0, 1] (no sigmoid ever gives it) still follows the definition."""
    torch.manual_seed(6)
    from models.leviathan import bspline_basis
    t = torch.rand(2, 11, 4, dtype=torch.float64) * 1.6 - 0.3
    delta = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    phi = torch.einsum("hndk,hdkr->hndr", bspline_basis(t, 5), 1 + delta)
    torch.testing.assert_close(spline_modes_torch(t, delta), phi.prod(2))


def test_spline_modes_saves_only_small_tensors():
    """Autograd keeps t, delta and M: nothing of size [h, d_s, n, r] or [h, d_s, n, kappa]
    (the old path kept several, ~400 MB for the spec's generator on 403 ids)."""
    h, n, ds, kappa, r = 4, 300, 32, 16, 32
    t = torch.rand(h, n, ds, requires_grad=True)
    delta = (torch.randn(h, ds, kappa, r) * 0.1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x,
                                                  lambda x: x):
        M = spline_modes_torch(t, delta)
    assert sum(saved) <= t.numel() + delta.numel() + M.numel()
    # either input alone
    M.sum().backward(inputs=[t])
    assert t.grad is not None and delta.grad is None
    spline_modes_torch(t, delta).sum().backward(inputs=[delta])
    assert delta.grad is not None and torch.isfinite(delta.grad).all()


# ----------------------------------------------------------------------------- distinct ids

@pytest.mark.parametrize("vocab", [500, 30])     # distinct-id path; whole-vocabulary path
def test_distinct_ids_equal_per_position(vocab):
    torch.manual_seed(0)
    gen = LeviathanGenerator(vocab, 12, tp_group=None, **SMALL)
    ids = torch.randint(1, vocab, (4, 10))
    ids[1, :5] = ids[0, :5]                      # plenty of repeats
    w = torch.randn(4, 10, 12)
    evaluated = []                               # rows the generator is evaluated on
    partial_embed = gen.partial_embed
    gen.partial_embed = lambda rows: evaluated.append(rows.numel()) or partial_embed(rows)
    out = gen(ids)
    assert evaluated == [vocab if ids.numel() >= vocab else ids.unique().numel()]
    assert evaluated[0] < ids.numel()
    (out * w).sum().backward()
    got = _grads(gen)
    _zero(gen)
    per_position = partial_embed(ids.reshape(-1)).view(4, 10, 12)   # no dedup at all
    (per_position * w).sum().backward()
    torch.testing.assert_close(out, per_position, rtol=1e-5, atol=1e-7)
    for name, g in _grads(gen).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_materialize_as_embedding():
    torch.manual_seed(1)
    gen = LeviathanGenerator(300, 16, tp_group=None, **SMALL)
    table = gen.materialize(chunk_size=64)
    assert table.shape == (300, 16) and not table.requires_grad
    emb = torch.nn.Embedding.from_pretrained(table)
    ids = torch.randint(1, 300, (3, 7))
    torch.testing.assert_close(emb(ids), gen(ids), rtol=1e-5, atol=1e-7)


def test_shapes_dtypes_and_empty():
    gen = LeviathanGenerator(100, 8, tp_group=None, **SMALL)
    assert gen(torch.tensor(7)).shape == (8,)
    assert gen(torch.randint(1, 100, (2, 3, 4), dtype=torch.int32)).shape == (2, 3, 4, 8)
    assert gen(torch.empty(0, 5, dtype=torch.long)).shape == (0, 5, 8)
    half = LeviathanGenerator(100, 8, tp_group=None, params_dtype=torch.bfloat16, **SMALL)
    ids = torch.randint(1, 100, (5,))
    out = half(ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), gen(ids), rtol=0.1, atol=2e-3)


# ----------------------------------------------------------------------------- bad input

def test_out_of_range_ids_raise():
    gen = LeviathanGenerator(100, 8, tp_group=None, **SMALL)
    with pytest.raises(ValueError, match=r"-1 .*vocab_size 100"):
        gen(torch.tensor([3, -1, 5]))
    with pytest.raises(ValueError, match=r"\b100\b.*vocab_size 100"):
        gen(torch.tensor([[3, 100]]))
    with pytest.raises(ValueError, match=r"1000000.*vocab_size 100"):
        gen(torch.tensor([1_000_000]))           # would silently wrap into valid digits
    with pytest.raises(ValueError, match="integer"):
        gen(torch.tensor([1.0]))


def test_heads_must_divide_tp():
    class FakeGroup:                            # a TP group of 3 that is never communicated on
        def size(self):
            return 3

        def rank(self):
            return 0

    with pytest.raises(ValueError, match=r"heads \(2\).*tensor-parallel size \(3\)"):
        LeviathanGenerator(100, 8, tp_group=FakeGroup(), **SMALL)


# ----------------------------------------------------------------------------- tensor parallel

@pytest.mark.dist
def test_tensor_parallel_matches_single_rank(run_dist):
    results = run_dist("leviathan_tp.py", 2)
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} wrote nothing"
        assert res["bad_heads_error"] and "divisible" in res["bad_heads_error"]
        for case in ("plain", "sp", "whole_vocab", "whole_vocab_sp"):
            r = res[case]
            assert r["out"] <= 1e-6 * max(1.0, r["out_scale"]), (rank, case, r)
            assert r["materialize"] <= 1e-6, (rank, case, r)
            assert r["codebook_grad_rank_spread"] == 0.0, (rank, case, r)
            for key, value in r.items():
                if key.startswith("init."):
                    assert value == 0.0, (rank, case, key, value)
                if key.startswith("grad."):
                    scale = r["gradscale." + key[5:]]
                    assert value <= 1e-5 * max(1.0, scale), (rank, case, key, value)


# ----------------------------------------------------------------------------- Triton kernel

@needs_triton_device
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_kernel_matches_torch(normalize):
    from models.leviathan_triton import spline_modes_triton
    torch.manual_seed(2)
    # h=1 with 3 coordinates gives 2 id-chunks in the backward (partial dDelta reduction)
    for h, n, ds, kappa, r in [(2, 37, 5, 4, 6), (1, 70, 3, 16, 20)]:
        t = torch.rand(h, n, ds, device=TRITON_DEVICE).requires_grad_()
        delta = (torch.randn(h, ds, kappa, r, device=TRITON_DEVICE) * 0.3).requires_grad_()
        g = torch.randn(h, n, r, device=TRITON_DEVICE)
        M = spline_modes_triton(t, delta, normalize)
        (M * g).sum().backward()
        dt, dd = t.grad, delta.grad
        t.grad = delta.grad = None
        ref = spline_modes_torch(t, delta, normalize)
        (ref * g).sum().backward()
        torch.testing.assert_close(M, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dt, t.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dd, delta.grad, rtol=1e-4, atol=1e-5)
    M2 = spline_modes_triton(t[0].detach(), delta[0].detach(), normalize)   # [n, d_s] form
    torch.testing.assert_close(M2, ref[0].detach(), rtol=1e-5, atol=1e-6)


@needs_triton_device
def test_module_with_triton_matches_torch_path():
    torch.manual_seed(3)
    kw = dict(coords=2, seed_dim=4, heads=2, knots=6, modes=5)
    fast = LeviathanGenerator(60, 8, tp_group=None, use_triton=True, **kw)
    plain = LeviathanGenerator(60, 8, tp_group=None, use_triton=False, **kw)
    auto = LeviathanGenerator(60, 8, tp_group=None, **kw)
    assert not auto._triton_for(torch.zeros(1))      # never selected on CPU by default
    fast.to(TRITON_DEVICE)
    plain.to(TRITON_DEVICE)
    ids = torch.randint(1, 60, (3, 5), device=TRITON_DEVICE)
    w = torch.randn(3, 5, 8, device=TRITON_DEVICE)
    outs, grads = [], []
    for gen in (fast, plain):
        out = gen(ids)
        (out * w).sum().backward()
        outs.append(out)
        grads.append(_grads(gen))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-7)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
