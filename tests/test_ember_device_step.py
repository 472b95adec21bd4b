"""Ember's device path (the step an accelerator runs: stats kernel, one state kernel, update
kernel with its factors made inside; no host read) on CPU tensors under the Triton
interpreter (EMBER_DS_DEVICE_STEP=1), against the host-checked torch path of the same math."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ember_ds import Ember, cpu_fused  # noqa: E402
from ember_ds import triton_kernels as tk  # noqa: E402

SHAPES = ((37, 19), (41, 300))   # a narrow table and one wider than a column block


def _tables(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in SHAPES]


def _run(device_path: bool, steps=5, dtype=torch.float32, bad=None, mp=None, **kw):
    """Ember on two tables for ``steps`` steps; ``bad``: {step: value} put into table 0's
    gradient at that step. Returns (tables, states)."""
    mp.setenv(tk.DEVICE_STEP_ENV, "1" if device_path else "0")
    mp.setenv(cpu_fused.ENV, "0")          # the reference: the plain torch path
    tabs = _tables(dtype)
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2, weight_decay=0.1,
                beta2=0.95, **kw)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        for t in tabs:
            t.grad = torch.randn(t.shape, generator=gen).to(dtype)
        if bad and i in bad:
            tabs[0].grad[3, :4] = bad[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    return tabs, opt


def _states(opt):
    return [opt.table_state(i) for i in range(2)]


@pytest.mark.parametrize("kw", [{}, {"normalize": "active_rows"}])
def test_device_path_equals_host_path(monkeypatch, kw):
    (ref_t, ref_o), (dev_t, dev_o) = (_run(d, mp=monkeypatch, **kw) for d in (False, True))
    for a, b in zip(dev_t, ref_t):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-6)
    for sa, sb in zip(_states(dev_o), _states(ref_o)):
        for k in ("r", "c", "s"):
            torch.testing.assert_close(sa[k], sb[k], rtol=2e-6, atol=0)
        assert sa["step"] == sb["step"] == 5 and sa["nonfinite_skips"] == 0
    assert not torch.equal(dev_t[0].detach(), _tables()[0])   # it moved


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.2e19])
def test_nonfinite_table_skipped_on_the_device(monkeypatch, value):
    """NaNs / infs in table 0's gradient at step 2, or squares past fp32's range (four of
    1.2e19: each square, 1.44e38, is finite, their sum is not): that table's step is skipped, the other table's is not,
    and the counts match the host path; the warning comes from check_nonfinite."""
    bad = {2: value}
    (ref_t, ref_o), (dev_t, dev_o) = (_run(d, mp=monkeypatch, bad=bad) for d in (False, True))
    for a, b in zip(dev_t, ref_t):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-6)
    assert [s["step"] for s in _states(dev_o)] == [s["step"] for s in _states(ref_o)] == [4, 5]
    assert [s["nonfinite_skips"] for s in _states(dev_o)] == [1, 0]
    dev_o._table_state[0]["reported_skips"] = 0
    with pytest.warns(UserWarning, match="non-finite gradient in token table"):
        assert dev_o.check_nonfinite() == 1
    assert dev_o.check_nonfinite() == 0                      # reported once


def test_skipped_step_leaves_weights_and_state_unchanged(monkeypatch):
    monkeypatch.setenv(tk.DEVICE_STEP_ENV, "1")
    tabs = _tables()
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2, weight_decay=0.1)
    for t in tabs:
        t.grad = torch.randn(t.shape)
    opt.step()
    before = [t.detach().clone() for t in tabs]
    st_before = {k: v.clone() for k, v in opt.table_state(0).items() if torch.is_tensor(v)}
    for t in tabs:
        t.grad = torch.randn(t.shape)
    tabs[0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(tabs[0].detach(), before[0])
    assert not torch.equal(tabs[1].detach(), before[1])
    st = opt.table_state(0)
    assert all(torch.equal(st[k], st_before[k]) for k in ("r", "c", "s"))
    assert st["step"] == 1 and st["nonfinite_skips"] == 1


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, on purpose
def test_raise_mode(monkeypatch):
    monkeypatch.setenv(tk.DEVICE_STEP_ENV, "1")
    tabs = _tables()
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2, nonfinite="raise")
    for t in tabs:
        t.grad = torch.randn(t.shape)
    tabs[1].grad[2, 2] = float("inf")
    before = tabs[1].detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(tabs[1].detach(), before)


def _host_read_guard(monkeypatch):
    """Make every host read of a tensor made from ember_ds' own code raise (the interpreter's
    own conversions, which stand for the GPU's kernel launches, are allowed)."""
    def guarded(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}ember_ds{os.sep}" in caller:
                raise AssertionError(f"host read Tensor.{name} in {caller}")
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
                 "numpy"):
        guarded(name)


@pytest.mark.parametrize("kw", [{}, {"normalize": "active_rows"}])
def test_step_makes_no_host_read(monkeypatch, kw):
    monkeypatch.setenv(tk.DEVICE_STEP_ENV, "1")
    tabs = _tables()
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2, **kw)
    for i in range(3):
        for t in tabs:
            t.grad = torch.randn(t.shape)
        if i == 1:
            tabs[0].grad[1, 1] = float("nan")
        with monkeypatch.context() as m:
            _host_read_guard(m)
            opt.step()
    assert opt.table_state(0)["nonfinite_skips"] == 1           # read here, when asked


def test_host_read_guard_catches_the_host_checked_path(monkeypatch):
    """The guard above can fail: the host-checked path (the torch ops an accelerator ran
    before) decides each table's finite check with a host read, and is caught."""
    monkeypatch.setenv(tk.DEVICE_STEP_ENV, "0")
    monkeypatch.setenv(cpu_fused.ENV, "0")
    tabs = _tables()
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2)
    for t in tabs:
        t.grad = torch.randn(t.shape)
    _host_read_guard(monkeypatch)
    with pytest.raises(AssertionError, match="host read Tensor.__bool__"):
        opt.step()


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that launch a kernel on a device (not views, allocations or the
    profiler's markers) made outside the Triton launches, and the Triton launches."""
    FREE = ("empty", "view", "slice", "as_strided", "alias", "detach", "_reshape_alias",
            "select", "t", "expand", "unsqueeze", "squeeze", "split", "narrow", "lift_fresh")

    def __init__(self):
        super().__init__()
        self.ops, self.triton, self.inside = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and name not in self.FREE and not name.startswith("_record_"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _count_launches(monkeypatch, opt):
    counter = _Counter()
    for name in ("_stats_rows_kernel", "_state_kernel", "_update_factored_kernel",
                 "_stats_kernel", "_update_kernel"):
        kernel = getattr(tk, name)

        class Wrapped:
            def __init__(self, k):
                self.k = k

            def __getitem__(self, grid, k=kernel):
                launch = k[grid]

                def run(*a, **kw):
                    counter.triton += 1
                    counter.inside += 1
                    try:
                        return launch(*a, **kw)
                    finally:
                        counter.inside -= 1
                return run
        monkeypatch.setattr(tk, name, Wrapped(kernel))
    with counter:
        opt.step()
    return counter


def test_at_most_three_launches_per_whole_table(monkeypatch):
    """One table on one device: stats, state, update (the all-reduce is the fourth where a
    group partitions the table): no torch op in between."""
    monkeypatch.setenv(tk.DEVICE_STEP_ENV, "1")
    tabs = _tables()
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2, weight_decay=0.1)
    for step in range(2):           # the first step also creates the state
        for t in tabs:
            t.grad = torch.randn(t.shape)
        counter = _count_launches(monkeypatch, opt)
    assert counter.triton == 3 * len(tabs), counter.triton
    assert counter.ops == [], counter.ops


def test_state_round_trip_resumes_exactly(monkeypatch):
    """state_dict after 3 device steps, loaded into a new optimizer (also one on the host
    path's counts), continues exactly as the uninterrupted run."""
    monkeypatch.setenv(tk.DEVICE_STEP_ENV, "1")
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(6)]

    def steps(opt, tabs, gs):
        for g in gs:
            for t, gt in zip(tabs, g):
                t.grad = gt.clone()
            opt.step()

    tabs = _tables()
    opt = Ember([{"params": tabs, "token_table": True}], lr=1e-2)
    steps(opt, tabs, grads[:3])
    sd = opt.state_dict()
    saved = [t.detach().clone() for t in tabs]
    steps(opt, tabs, grads[3:])
    tabs2 = [torch.nn.Parameter(w.clone()) for w in saved]
    opt2 = Ember([{"params": tabs2, "token_table": True}], lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.table_state(0)["step"] == 3
    steps(opt2, tabs2, grads[3:])
    for a, b in zip(tabs, tabs2):
        assert torch.equal(a.detach(), b.detach())
    assert opt2.table_state(1)["step"] == 6
