"""Ember's fused CPU passes (ember_ds.cpu_fused, C++) against the torch path (ember_ds.factored
with EMBER_DS_CPU_FUSED=0): the update bitwise, the sums to fp32 rounding, any thread count the
same bits, ZeRO-style flat partitions cut mid-row, the whole optimizer, and the fallback.

Skipped, with the reason, where the library cannot be built (no C++ compiler)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ember_ds import Ember, cpu_fused, factored
from ember_ds.layout import pieces

ROOT = Path(__file__).resolve().parents[1]

if not cpu_fused.enabled() or not cpu_fused.available():
    pytest.skip(cpu_fused.describe(), allow_module_level=True)

SHAPES = [(37, 53), (300, 130), (1, 7), (7, 1), (5, 300), (1037, 96), (64, 4099)]
PAIRS = sorted(cpu_fused._UPDATE_PAIRS, key=str)


@pytest.fixture
def torch_path(monkeypatch):
    """A context that runs the torch path: ``with torch_path: ...``."""
    class _Ctx:
        def __enter__(self):
            monkeypatch.setenv(cpu_fused.ENV, "0")

        def __exit__(self, *exc):
            monkeypatch.delenv(cpu_fused.ENV)
    return _Ctx()


def _gen(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _stats(g, fused, torch_path, rownz=True):
    rows, cols = g.shape
    r, c = _gen(rows, 1).abs(), _gen(cols, 2).abs()  # the passes add into what is there
    nz = torch.zeros(rows) if rownz else None
    if fused:
        assert cpu_fused.use_for_stats(g, r, c, nz)
        factored.piece_stats(g, r, c, nz)
    else:
        with torch_path:
            factored.piece_stats(g, r, c, nz)
    return r, c, nz


def _update(w, g, a, b, lr, eps, decay, fused, torch_path):
    w = w.clone()
    if fused:
        assert cpu_fused.use_for_update(w, g, a, b)
        factored.piece_update(w, g, a, b, lr, eps, decay)
    else:
        with torch_path:
            factored.piece_update(w, g, a, b, lr, eps, decay)
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stats_equal_torch_path(shape, dtype, torch_path):
    g = (_gen(shape, 0, 3.0)).to(dtype)
    g[0, 0] = 0.0  # a zero counts as inactive
    (r1, c1, n1), (r2, c2, n2) = _stats(g, False, torch_path), _stats(g, True, torch_path)
    # sums of nonnegative fp32 terms in two orders: relative error of order terms * 2**-24
    torch.testing.assert_close(r2, r1, rtol=max(1e-6, 4 * shape[1] * 2.0 ** -24), atol=0)
    torch.testing.assert_close(c2, c1, rtol=max(1e-6, 4 * shape[0] * 2.0 ** -24), atol=0)
    assert torch.equal(n1, n2)
    q = g.double().square()  # and against an fp64 oracle
    torch.testing.assert_close(r2.double(), _gen(shape[0], 1).abs().double() + q.sum(1),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("decay", [1.0, 1.0 - 3e-3 * 0.1])
def test_update_bitwise_equal_torch_path(shape, pair, decay, torch_path):
    wdt, gdt = pair
    w = _gen(shape, 3).to(wdt)
    g = _gen(shape, 4, 1e-2).to(gdt)
    a, b = _gen(shape[0], 5).abs() * 1e-3, _gen(shape[1], 6).abs()
    a[0] = 0.0  # a row whose factor is 0: the update is g*lr/eps
    for eps in (1e-8, 1e-30):
        ref = _update(w, g, a, b, 3e-3, eps, decay, False, torch_path)
        out = _update(w, g, a, b, 3e-3, eps, decay, True, torch_path)
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


def test_strided_views_and_state_slices(torch_path):
    """A block of rows inside a wider tensor (row stride > cols), sums into slices of larger
    buffers, as the optimizer's pieces do."""
    base = _gen((40, 70), 7)
    g = base[3:33, 5:60]
    assert g.stride(0) == 70 and not g.is_contiguous()
    rbuf, cbuf = torch.zeros(50), torch.zeros(80)
    rref, cref = rbuf.clone(), cbuf.clone()
    factored.piece_stats(g, rbuf[4:34], cbuf[10:65])
    with torch_path:
        factored.piece_stats(g, rref[4:34], cref[10:65])
    torch.testing.assert_close(rbuf, rref, rtol=1e-6, atol=0)
    torch.testing.assert_close(cbuf, cref, rtol=1e-6, atol=0)
    wbase, a, b = _gen((40, 70), 8), _gen(30, 9).abs(), _gen(55, 10).abs()
    wref = wbase.clone()
    factored.piece_update(wbase[3:33, 5:60], g, a, b, 0.05, 1e-8, 0.98)
    with torch_path:
        factored.piece_update(wref[3:33, 5:60], g, a, b, 0.05, 1e-8, 0.98)
    assert torch.equal(wbase, wref)


def test_bitwise_same_for_any_thread_count():
    g = _gen((2053, 300), 11)  # several stats blocks and update blocks, ragged streams
    w0, a, b = _gen((2053, 300), 12), _gen(2053, 13).abs(), _gen(300, 14).abs()
    saved = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            r, c, nz = torch.zeros(2053), torch.zeros(300), torch.zeros(2053)
            factored.piece_stats(g, r, c, nz)
            w = w0.clone()
            factored.piece_update(w, g, a, b, 1e-3, 1e-8, 0.999)
            outs.append((r, c, nz, w))
    finally:
        torch.set_num_threads(saved)
    for other in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_partitions_cut_mid_row(dtype, torch_path):
    """A table flattened and cut into 3 'rank' partitions at offsets inside rows (ZeRO-1/2):
    partial sums of every partition's pieces add up to the whole table's, and updating each
    partition's pieces gives the whole table's update, bitwise."""
    V, D = 97, 41
    G, W = _gen((V, D), 15).to(dtype), _gen((V, D), 16).to(dtype)
    a, b = _gen(V, 17).abs(), _gen(D, 18).abs()
    cuts = [0, 1000, 2345, V * D]
    flat_g, flat_w = G.reshape(-1), W.clone().reshape(-1)
    r, c = torch.zeros(V), torch.zeros(D)
    for lo, hi in zip(cuts, cuts[1:]):
        rr, cc = torch.zeros(V), torch.zeros(D)  # this rank's partial sums
        for row0, nrows, col0, ncols, o in pieces(lo, hi - lo, D):
            gv = flat_g[lo + o:lo + o + nrows * ncols].view(nrows, ncols)
            factored.piece_stats(gv, rr[row0:row0 + nrows], cc[col0:col0 + ncols])
            wv = flat_w[lo + o:lo + o + nrows * ncols].view(nrows, ncols)
            factored.piece_update(wv, gv, a[row0:row0 + nrows], b[col0:col0 + ncols],
                                  1e-2, 1e-8, 0.99)
        r += rr  # the all-reduce
        c += cc
    q = G.double().square()
    torch.testing.assert_close(r.double(), q.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(c.double(), q.sum(0), rtol=1e-5, atol=0)
    ref = W.clone()
    with torch_path:
        factored.piece_update(ref, G, a, b, 1e-2, 1e-8, 0.99)
    assert torch.equal(flat_w.view(V, D), ref)


@pytest.mark.parametrize("normalize", ["rows", "active_rows"])
def test_optimizer_fused_equals_torch_path(normalize, monkeypatch):
    def run(fused: bool):
        monkeypatch.setenv(cpu_fused.ENV, "1" if fused else "0")
        torch.manual_seed(0)
        emb, head = nn.Parameter(torch.randn(300, 48)), nn.Parameter(torch.randn(300, 48))
        body = nn.Parameter(torch.randn(48))
        opt = Ember([{"params": [emb, head], "token_table": True}, {"params": [body]}],
                    lr=1e-2, weight_decay=0.1, eps=1e-8, normalize=normalize)
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            for p in (emb, head, body):
                p.grad = torch.randn(p.shape, generator=gen)
            emb.grad[:50] = 0.0  # inactive rows
            opt.step()
        return [emb.detach().clone(), head.detach().clone(),
                *(opt.table_state(i)[k].clone() for i in (0, 1) for k in ("r", "c", "s"))]

    ref, out = run(False), run(True)
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-7)
    assert all(torch.equal(x, y) for x, y in zip(run(True), out))


@pytest.mark.parametrize("rows,cols,active", [(300, 48, None), (37, 53, 12.0), (1, 7, 0.0),
                                             (1037, 96, None)])
def test_state_step_equals_torch_ops(rows, cols, active):
    """cpu_fused.state_step against the torch path's ops in optimizer._table_step: r and c
    bitwise; the column factors equal the correctly rounded square root (computed in fp64 and
    rounded once: exact for sqrt, since 53 >= 2*24 + 2 bits), not torch's CPU sqrt, which is one
    ulp off on some CPU models; s and the row factors to fp32 rounding (the total is summed in
    another order); a non-finite total writes nothing."""
    b2, V, step = 0.95, rows * 3, 4
    st = dict(r=_gen(rows, 1).abs(), c=_gen(cols, 2).abs(), s=_gen(1, 3).abs())
    rowsum, colsum = _gen(rows, 4).square(), _gen(cols, 5).square()
    ref = {k: v.clone() for k, v in st.items()}
    denom_c = V if active is None else max(active, 1.0)
    total = colsum.sum()
    ref["r"].mul_(b2).add_(rowsum, alpha=(1.0 - b2) / cols)
    ref["c"].mul_(b2).add_(colsum / (V if active is None else torch.tensor([active]).clamp_min(
        1.0)), alpha=1.0 - b2)
    ref["s"].mul_(b2).add_(total / (V * cols), alpha=1.0 - b2)
    ref_row = (ref["r"] / (ref["s"].clamp_min(1e-30) * (1.0 - b2 ** step))).double().sqrt()
    ref_row = ref_row.float()
    row_f, col_f = torch.full((rows,), -1.0), torch.full((cols,), -1.0)
    assert cpu_fused.use_for_state(st, rowsum, colsum)
    assert cpu_fused.state_step(st, rowsum, colsum, denom_c, b2, V, step, row_f, col_f)
    assert torch.equal(st["r"], ref["r"]) and torch.equal(st["c"], ref["c"])
    assert torch.equal(col_f, ref["c"].double().sqrt().float())
    torch.testing.assert_close(st["s"], ref["s"], rtol=4 * cols * 2.0 ** -24, atol=0)
    torch.testing.assert_close(row_f, ref_row, rtol=4 * cols * 2.0 ** -24, atol=0)
    for bad in (float("nan"), float("inf")):
        before = {k: v.clone() for k, v in st.items()}
        colsum[cols // 2] = bad
        assert not cpu_fused.state_step(st, rowsum, colsum, denom_c, b2, V, step, row_f, col_f)
        assert all(torch.equal(st[k], before[k]) for k in st)


def test_sum_of_squares_past_fp32_range_skips_the_step():
    """Every gradient finite, but the squares sum past fp32's range: s would become inf, so the
    table's step is skipped on both paths, as for a NaN."""
    for fused in ("1", "0"):
        w = nn.Parameter(torch.randn(2, 2))
        opt = Ember([{"params": [w], "token_table": True}], lr=1e-2)
        w.grad = torch.full((2, 2), 1.2e19)  # squares 1.44e38, row and column sums 2.88e38,
        # all finite; the total, 5.76e38, is not
        before = w.detach().clone()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(cpu_fused.ENV, fused)
            with pytest.warns(UserWarning, match="non-finite"):
                opt.step()
        assert torch.equal(w.detach(), before) and opt.table_state(0)["nonfinite_skips"] == 1


_SCRIPT = r"""
import importlib.util, os, resource, sys, torch

def fresh(name):  # a new copy of ember_ds/cpu_fused.py (its own state; torch is all it needs)
    spec = importlib.util.spec_from_file_location(name, "ember_ds/cpu_fused.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

torch.set_num_threads(2)
V, D = 4096, 1024                        # 16 MiB per fp32 tensor
g, w = torch.randn(V, D), torch.randn(V, D)
r, c, a, b = torch.zeros(V), torch.zeros(D), torch.rand(V), torch.rand(D)
fused = fresh("fused")
assert fused.use_for_stats(g, r, c, None) and fused.use_for_update(w, g, a, b)
fused.piece_stats(g[:8], r[:8], c)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    fused.piece_stats(g, r, c)
    fused.piece_update(w, g, a, b, 1e-3, 1e-8, 0.99)
print("grew", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
os.environ["EMBER_DS_CPU_FUSED"] = "0"
print("forced", fresh("forced").use_for_update(w, g, a, b), flush=True)
os.environ["EMBER_DS_CPU_FUSED"] = "1"
os.environ["CXX"] = sys.argv[1] + "/no-such-c++"
os.environ["TORCH_EXTENSIONS_DIR"] = sys.argv[1] + "/ext"
print("nocxx", fresh("nocxx").use_for_update(w, g, a, b), flush=True)
"""


def test_notice_scratch_and_fallbacks(tmp_path):
    """One process, three fresh copies of the module: the default (fused, said once), forced
    off by the environment, and no compiler with nothing cached (the torch path, saying why).
    The fused steps build no table-sized temporaries: their scratch is at most 256 column
    partials (1 MiB here), where one V x D fp32 temporary would be 16 MiB."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(ln.split() for ln in proc.stdout.strip().splitlines())
    notices = [ln for ln in proc.stderr.splitlines() if ln.startswith("[ember_ds]")]
    assert len(notices) == 3, proc.stderr[-3000:]
    assert "fused C++" in notices[0]
    assert int(out["grew"]) < 2 * 1024, f"max RSS grew by {out['grew']} KiB in fused steps"
    assert out["forced"] == "False" and f"{cpu_fused.ENV}=0" in notices[1]
    assert out["nocxx"] == "False" and "no C++ compiler" in notices[2], notices
