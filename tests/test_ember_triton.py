"""Ember's Triton kernels (ember_ds.triton_kernels) against the torch reference path
(ember_ds.factored), run on CPU tensors under the Triton interpreter.

Shapes are small on purpose: the interpreter runs each program in numpy, one after another.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from ember_ds import factored  # noqa: E402
from ember_ds import triton_kernels as tk  # noqa: E402

if not isinstance(tk._update_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("ember_ds.triton_kernels was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

# odd sizes, a single row, a single column, several column blocks, several stats programs
SHAPES = [(37, 53), (300, 130), (1, 7), (7, 1), (5, 300), (129, 257)]
FLOATS = [torch.float32, torch.bfloat16]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``x`` (fp32 values) in ``dtype``."""
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, e = torch.frexp(x.abs().clamp_min(torch.finfo(dtype).tiny))  # x = m * 2**e, m in [.5, 1)
    return torch.ldexp(torch.ones_like(x), e - 1 - mant)


def _gen(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)


def _stats_pair(g):
    rows, cols = g.shape
    r0, c0 = _gen(rows, 1).abs(), _gen(cols, 2).abs()  # nonzero start: the passes *add*
    r_ref, c_ref = r0.clone(), c0.clone()
    factored.piece_stats(g, r_ref, c_ref)
    r_tri, c_tri = r0.clone(), c0.clone()
    tk.piece_stats_triton(g, r_tri, c_tri)
    return (r_ref, c_ref), (r_tri, c_tri)


def _close32(actual, expected, terms):
    # fp32 sums of `terms` nonnegative values: relative error of order terms * 2**-24
    rtol = max(1e-6, 4 * terms * 2.0 ** -24)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6)


def test_available_under_interpreter():
    assert tk.available()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS + [torch.float16])
def test_stats_matches_torch(shape, dtype):
    g = (_gen(shape, 0) * 3).to(dtype)
    (r_ref, c_ref), (r_tri, c_tri) = _stats_pair(g)
    _close32(r_tri, r_ref, shape[1])
    _close32(c_tri, c_ref, shape[0])
    # also against an fp64 oracle
    q = g.double().square()
    r0, c0 = _gen(shape[0], 1).abs().double(), _gen(shape[1], 2).abs().double()
    _close32(r_tri.double(), r0 + q.sum(1), shape[1])
    _close32(c_tri.double(), c0 + q.sum(0), shape[0])


@pytest.mark.parametrize("max_programs", [1, 2, 3, 64])
@pytest.mark.parametrize("shape", [(301, 70), (150, 600)])
def test_stats_grid_sizes(max_programs, shape):
    g = _gen(shape, 3)
    rows, cols = g.shape
    r, c = torch.zeros(rows), torch.zeros(cols)
    tk.piece_stats_triton(g, r, c, max_programs=max_programs)
    q = g.double().square()
    _close32(r.double(), q.sum(1), cols)
    _close32(c.double(), q.sum(0), rows)


def _update_case(shape, wdtype, gdtype, seed, lr=0.05, decay=0.99):
    w = _gen(shape, seed).to(wdtype)
    g = _gen(shape, seed + 1).to(gdtype)
    a = _gen(shape[0], seed + 2).abs() + 0.05
    b = _gen(shape[1], seed + 3).abs() + 0.05
    return w, g, a, b, lr, 1e-8, decay


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [1.0, 0.99])
def test_update_fp32_matches_torch(shape, decay):
    w, g, a, b, lr, eps, decay = _update_case(shape, torch.float32, torch.float32, 10,
                                              decay=decay)
    w_ref, w_tri = w.clone(), w.clone()
    factored.piece_update(w_ref, g, a, b, lr, eps, decay)
    tk.piece_update_triton(w_tri, g, a, b, lr, eps, decay)
    torch.testing.assert_close(w_tri, w_ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_update_low_precision_weights(shape, wdtype, gdtype):
    # lr large enough that the step is many ulps of w, so a wrong update cannot hide in rounding
    w, g, a, b, lr, eps, decay = _update_case(shape, wdtype, gdtype, 20, lr=0.2)
    denom = torch.outer(a, b) + eps
    exact = w.float() * decay + (-lr) * (g.float() / denom)  # fp32 math, rounded once
    w_tri = w.clone()
    tk.piece_update_triton(w_tri, g, a, b, lr, eps, decay)
    assert w_tri.dtype == wdtype
    # compiled CUDA rounds to nearest even, the interpreter truncates bf16: one ulp either way,
    # plus fp32 rounding of the operands where w and the step nearly cancel
    slack = 4 * 2.0 ** -24 * (w.float().abs() + (exact - w.float() * decay).abs())
    err = (w_tri.float() - exact).abs()
    assert bool((err <= _ulp(exact, wdtype) + slack).all()), float(err.max())
    # the torch path with decay == 1 also rounds once (decay != 1 rounds w*decay first)
    w_ref, w_tri = w.clone(), w.clone()
    factored.piece_update(w_ref, g, a, b, lr, eps, 1.0)
    tk.piece_update_triton(w_tri, g, a, b, lr, eps, 1.0)
    err = (w_tri.float() - w_ref.float()).abs()
    assert bool((err <= _ulp(w_ref.float(), wdtype) + slack).all()), float(err.max())


def test_strided_views():
    """Pieces as Ember's ZeRO path forms them: a block of whole rows of a larger table, a
    partial row [1, n] cut at a partition edge, and a column-sliced view (row stride != cols);
    g and w with different strides; rowsum / a slices of a longer vector."""
    V, D = 41, 67
    gt = _gen((V, D), 30)
    wbase = _gen((V, D + 5), 31)  # the weights' row stride is D + 5
    wt = wbase[:, 2:D + 2]
    views = {
        "rows": (gt[5:29], wt[5:29]),
        "partial_row": (gt[3, 10:50].view(1, -1), wt[3, 10:50].view(1, -1)),
        "col_slice": (gt[:, 4:60], wt[:, 4:60]),
    }
    for name, (g, w) in views.items():
        rows, cols = g.shape
        rlong = _gen(rows + 9, 32).abs()
        r_ref, c_ref = rlong.clone(), torch.zeros(cols)
        factored.piece_stats(g, r_ref[4:4 + rows], c_ref)
        r_tri, c_tri = rlong.clone(), torch.zeros(cols)
        tk.piece_stats_triton(g, r_tri[4:4 + rows], c_tri)
        _close32(r_tri, r_ref, cols)
        _close32(c_tri, c_ref, rows)

        along = _gen(rows + 9, 33).abs() + 0.1
        a, b = along[3:3 + rows], _gen(cols, 34).abs() + 0.1
        geom = (w.shape, w.stride(), w.storage_offset())
        base_ref, base_tri = wbase.clone(), wbase.clone()
        factored.piece_update(base_ref.as_strided(*geom), g, a, b, 0.05, 1e-8, 0.98)
        tk.piece_update_triton(base_tri.as_strided(*geom), g, a, b, 0.05, 1e-8, 0.98)
        torch.testing.assert_close(base_tri, base_ref, rtol=2e-6, atol=1e-6, msg=name)
        inside = torch.zeros_like(wbase, dtype=torch.bool)
        inside.as_strided(*geom).fill_(True)
        assert not torch.equal(base_tri[inside], wbase[inside]), name
        assert torch.equal(base_tri[~inside], wbase[~inside]), name  # nothing else moved


@pytest.mark.parametrize("wdtype", FLOATS)
def test_bitwise_deterministic(wdtype):
    shape = (129, 257)

    def run():
        g = _gen(shape, 40).to(wdtype)
        w = _gen(shape, 41).to(wdtype)
        r, c = torch.zeros(shape[0]), torch.zeros(shape[1])
        tk.piece_stats_triton(g, r, c)
        a, b = (r / shape[1]).sqrt(), (c / shape[0]).sqrt()
        tk.piece_update_triton(w, g, a, b, 1e-3, 1e-8, 0.999)
        return r, c, w

    r1, c1, w1 = run()
    r2, c2, w2 = run()
    assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert torch.equal(w1.view(torch.int16 if wdtype != torch.float32 else torch.int32),
                       w2.view(torch.int16 if wdtype != torch.float32 else torch.int32))


def test_stats_buffer_is_small():
    # the fp32 partial buffers ([row programs, cols] and, with several column blocks,
    # [column blocks, rows]) stay far below 1/8 of the piece for whole-row pieces
    for rows, cols in [(4096, 64), (100, 1000), (50304, 768), (262144, 4096), (64, 17),
                       (32000, 512), (131072, 1024), (1, 5000)]:
        for cap in (8, 132 * 4, 10 ** 6):
            block_m, block_n, progs, col_blocks, rows_per_prog = tk._stats_plan(rows, cols, cap)
            assert progs * rows_per_prog >= rows > (progs - 1) * rows_per_prog
            assert rows_per_prog % block_m == 0 and col_blocks * block_n >= cols
            assert progs * col_blocks <= max(cap, col_blocks)
            extra = progs * cols + (rows * col_blocks if col_blocks > 1 else 0)
            if rows >= 64 * tk._MIN_TILES * block_m:
                assert extra * 32 <= rows * cols, (rows, cols, cap, progs, col_blocks)
            else:
                assert extra <= 2 * cols + rows * cols // 100, (rows, cols, cap)


def test_empty_and_bad_args():
    tk.piece_stats_triton(torch.zeros(0, 4), torch.zeros(0), torch.zeros(4))
    tk.piece_update_triton(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3), torch.zeros(0),
                           1e-3, 1e-8, 1.0)
    with pytest.raises(ValueError):
        tk.piece_stats_triton(torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64),
                              torch.zeros(4))
    with pytest.raises(ValueError):
        tk.piece_update_triton(torch.zeros(3, 4), torch.zeros(4, 3), torch.zeros(3),
                               torch.zeros(4), 1e-3, 1e-8, 1.0)
