"""Ember in one process: the math against the dense reference, table detection, state dtype
and checkpoints, non-finite gradients, chunking and determinism."""
import copy

import pytest
import torch
from torch import nn

import ember_ds
from ember_ds import Ember, mark_not_token_table, mark_token_table
from ember_ds import factored
from tests.ember_reference import ReferenceEmber


class TinyLM(nn.Module):
    def __init__(self, V=97, D=24, tied=False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.body = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D))
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        else:
            mark_token_table(self.head.weight, name="head")

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("normalize,wd", [("rows", 0.0), ("rows", 0.1), ("active_rows", 0.0)])
def test_matches_reference_and_adamw(normalize, wd):
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    opt = Ember(model, lr=3e-3, beta2=0.99, weight_decay=wd, normalize=normalize,
                body_lr=1e-3, body_betas=(0.9, 0.95), body_weight_decay=0.05)
    ref_tables = ReferenceEmber([ref.emb.weight, ref.head.weight], lr=3e-3, beta2=0.99,
                                weight_decay=wd, normalize=normalize)
    ref_body = torch.optim.AdamW(ref.body.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                 weight_decay=0.05)
    for step in range(6):
        ids = torch.randint(0, 50, (4, 9))  # ids < 50: rows 50..96 of emb get no gradient
        for m, o in ((model, [opt]), (ref, [ref_body])):
            for oo in o:
                oo.zero_grad(set_to_none=True)
            m.zero_grad(set_to_none=True)
            lm_loss(m, ids).backward()
        opt.step()
        ref_tables.step()
        ref_body.step()
    assert rel_err(model.emb.weight, ref.emb.weight) < 1e-5
    assert rel_err(model.head.weight, ref.head.weight) < 1e-5
    for p, q in zip(model.body.parameters(), ref.body.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    # the tables really moved, and rows without gradient moved only by decay
    assert rel_err(model.emb.weight, TinyLM().emb.weight) > 1e-3
    st = opt.table_state(0)
    assert st["step"] == 6 and st["r"].dtype == torch.float32 and st["r"].shape == (97,)


def test_active_rows_takes_smaller_steps():
    torch.manual_seed(1)
    w1 = nn.Parameter(torch.randn(200, 16))
    w2 = nn.Parameter(w1.detach().clone())
    g = torch.zeros(200, 16)
    g[:50] = torch.randn(50, 16)  # a quarter of the rows active
    for w, norm in ((w1, "rows"), (w2, "active_rows")):
        opt = Ember([{"params": [w], "token_table": True}], lr=1e-2, normalize=norm)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        w.delta = (w.detach() - before).norm()
    ratio = (w2.delta / w1.delta).item()
    assert abs(ratio - (50 / 200) ** 0.5) < 0.05 * ratio


def test_table_detection_rules():
    model = TinyLM(tied=True)
    pos = nn.Embedding(16, 24)
    mark_not_token_table(pos.weight)
    model.pos = pos
    opt = Ember(model, lr=1e-3)
    assert opt.token_tables == [model.emb.weight]  # tied: once; positional: body
    # tagged tensors and "token_table" groups
    w = nn.Parameter(torch.randn(10, 4))
    b = nn.Parameter(torch.randn(4))
    mark_token_table(w)
    assert Ember([w, b]).token_tables == [w]
    v = nn.Parameter(torch.randn(6, 3))
    assert Ember([{"params": [v], "token_table": True}, {"params": [b]}]).token_tables == [v]
    with pytest.raises(ValueError, match="2-D"):
        Ember([{"params": [b], "token_table": True}])
    with pytest.raises(ValueError, match="2-D"):
        mark_token_table(nn.Parameter(torch.randn(2, 3, 4)))
    with pytest.raises(ValueError, match="body_optimizer"):
        Ember(model, body_optimizer="NoSuchOptimizer")
    with pytest.raises(ValueError, match="takes no"):
        Ember(TinyLM(), body_optimizer="SGD", body_betas=(0.9, 0.99))


def test_other_body_optimizer():
    torch.manual_seed(2)
    model = TinyLM()
    ref = copy.deepcopy(model)
    opt = Ember(model, lr=1e-3, body_optimizer="SGD", body_lr=0.1, body_kwargs={"momentum": 0.9})
    sgd = torch.optim.SGD(ref.body.parameters(), lr=0.1, momentum=0.9)
    tables = ReferenceEmber([ref.emb.weight, ref.head.weight], lr=1e-3)
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 8))
        for m in (model, ref):
            m.zero_grad()
            lm_loss(m, ids).backward()
        opt.step()
        sgd.step()
        tables.step()
    for p, q in zip(model.body.parameters(), ref.body.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


def test_state_stays_fp32_through_checkpoint_with_bf16_tables():
    torch.manual_seed(3)
    model = TinyLM().to(torch.bfloat16)
    opt = Ember(model, lr=1e-3)
    for _ in range(2):
        model.zero_grad()
        lm_loss(model, torch.randint(0, 97, (2, 8))).float().backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = Ember(model, lr=1e-3)
    opt2.load_state_dict(sd)
    for t in (0, 1):
        for key in ("r", "c", "s"):
            assert opt2.table_state(t)[key].dtype == torch.float32
            assert torch.equal(opt2.table_state(t)[key], opt.table_state(t)[key])
        assert opt2.table_state(t)["step"] == 2
    # a state that does not fit is a clear error
    other = Ember(TinyLM(V=64), lr=1e-3)
    with pytest.raises(ValueError, match="64x24"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="not an Ember state dict"):
        opt2.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_nonfinite_gradient_skips_table_and_keeps_state():
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(30, 8))
    opt = Ember([{"params": [w], "token_table": True}], lr=1e-2)
    w.grad = torch.randn(30, 8)
    opt.step()
    before_w = w.detach().clone()
    before = {k: v.clone() for k, v in opt.table_state(0).items() if torch.is_tensor(v)}
    g = torch.randn(30, 8)
    g[3, 5] = float("nan")
    w.grad = g
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert torch.equal(w.detach(), before_w)
    st = opt.table_state(0)
    assert st["step"] == 1 and st["nonfinite_skips"] == 1
    for k, v in before.items():
        assert torch.equal(st[k], v)
    w.grad = torch.randn(30, 8)
    opt.step()  # recovers
    assert st["step"] == 2 and torch.isfinite(w).all()
    strict = Ember([{"params": [w], "token_table": True}], nonfinite="raise")
    w.grad = torch.full((30, 8), float("inf"))
    with pytest.raises(FloatingPointError):
        strict.step()


def test_chunked_pieces_equal_one_block_and_runs_are_bitwise_equal(monkeypatch):
    torch.manual_seed(5)
    w0 = torch.randn(301, 37)
    grads = [torch.randn(301, 37) for _ in range(3)]

    def run():
        w = nn.Parameter(w0.clone())
        opt = Ember([{"params": [w], "token_table": True}], lr=1e-2, weight_decay=0.01)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach().clone(), opt.table_state(0)["c"].clone()

    big_w, big_c = run()
    monkeypatch.setattr(factored, "CHUNK_ELEMS", 37 * 7)  # many chunks, last one ragged
    w_a, c_a = run()
    w_b, c_b = run()
    assert torch.equal(w_a, w_b) and torch.equal(c_a, c_b)
    assert rel_err(w_a, big_w) < 1e-6 and rel_err(c_a, big_c) < 1e-6


def test_chunk_transient_is_bounded():
    assert factored._chunk_rows(50_000, 768) * 768 <= 50_000 * 768 // 8
    assert factored._chunk_rows(10, 768) >= 1


def test_unmappable_tensor_is_an_error():
    w = nn.Parameter(torch.randn(12, 5))
    opt = Ember([{"params": [w], "token_table": True}])
    flat = torch.zeros(30, requires_grad=True)
    flat.grad = torch.randn(30)
    opt.param_groups[0]["params"] = [flat]  # what a wrapper Ember does not know would do
    with pytest.raises(RuntimeError, match="refuses to fall back"):
        opt.step()


def test_pieces_cover_a_run_exactly():
    from ember_ds.layout import pieces
    for start, length, cols in [(0, 60, 6), (5, 20, 6), (7, 3, 6), (6, 12, 6), (11, 1, 6)]:
        covered = []
        for row0, nrows, col0, ncols, off in pieces(start, length, cols):
            assert nrows == 1 or (col0 == 0 and ncols == cols)
            for i in range(nrows):
                for j in range(ncols):
                    covered.append(((row0 + i) * cols + col0 + j, off + i * ncols + j))
        assert [e for e, _ in covered] == list(range(start, start + length))
        assert [o for _, o in covered] == list(range(length))


def test_registered_with_deepspeed():
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    assert ember_ds.register_deepspeed() is True
    assert Ember in ZERO_SUPPORTED_OPTIMIZERS


def test_float64_tables_are_updated_in_float64():
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(40, 8, dtype=torch.float64))
    ref_w = nn.Parameter(w.detach().clone())
    opt = Ember([{"params": [w], "token_table": True}], lr=1e-2, beta2=0.9)
    ref = ReferenceEmber([ref_w], lr=1e-2, beta2=0.9)
    w.grad, ref_w.grad = torch.zeros_like(w), torch.zeros_like(w)  # a zero-gradient step
    before = w.detach().clone()
    opt.step()
    ref.step()
    assert torch.equal(w.detach(), before)                          # moves nothing
    for _ in range(3):
        g = torch.randn(40, 8, dtype=torch.float64)
        w.grad, ref_w.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert w.dtype == torch.float64
    # not rounded to fp32 (almost no float64 value is an fp32 one), and the reference's math
    assert (w.detach() != w.detach().float().double()).float().mean() > 0.9
    assert rel_err(w.detach(), ref_w.detach()) < 1e-6


def test_active_rows_counts_gradients_whose_square_underflows():
    torch.manual_seed(5)
    w = nn.Parameter(torch.randn(100, 16))
    ref_w = nn.Parameter(w.detach().clone())
    g = torch.zeros(100, 16)
    g[:40] = torch.randn(40, 16)
    g[40:70] = 1e-25 * torch.randn(30, 16)          # |g| > 0 but g*g == 0 in fp32
    opt = Ember([{"params": [w], "token_table": True}], lr=1e-2, normalize="active_rows")
    ref = ReferenceEmber([ref_w], lr=1e-2, normalize="active_rows")
    w.grad, ref_w.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    assert rel_err(w.detach(), ref_w.detach()) < 1e-5


def test_body_takes_ember_lr_eps_and_weight_decay_unless_told():
    body = lambda opt: opt._body.param_groups[0]                      # noqa: E731
    g = body(Ember(TinyLM(), lr=2e-3))
    assert (g["lr"], g["eps"], g["weight_decay"]) == (2e-3, 1e-8, 0.0)  # no hidden 0.01 decay
    g = body(Ember(TinyLM(), lr=2e-3, eps=1e-6, weight_decay=0.1))
    assert (g["eps"], g["weight_decay"]) == (1e-6, 0.1)
    g = body(Ember(TinyLM(), weight_decay=0.1, body_weight_decay=0.05, body_lr=1e-4))
    assert (g["lr"], g["weight_decay"]) == (1e-4, 0.05)
    sgd = Ember(TinyLM(), lr=0.1, eps=1e-6, body_optimizer="SGD")._body  # only what SGD takes
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 0.1


def test_a_table_listed_twice_is_stepped_once():
    torch.manual_seed(6)
    model = TinyLM(tied=True)
    ref = copy.deepcopy(model)
    # tied weights passed by hand: the same table in two groups, and twice in one group
    groups = [{"params": [model.emb.weight, model.head.weight], "token_table": True},
              {"params": [model.emb.weight], "token_table": True},
              {"params": list(model.body.parameters())}]
    opt = Ember(groups, lr=1e-2)
    assert opt.token_tables == [model.emb.weight]
    ref_tables = ReferenceEmber([ref.emb.weight], lr=1e-2)
    ids = torch.randint(0, 97, (4, 9))
    for m in (model, ref):
        lm_loss(m, ids).backward()
    opt.step()
    ref_tables.step()
    assert rel_err(model.emb.weight, ref.emb.weight) < 1e-5


def test_untagged_tensors_are_said_out_loud():
    model = TinyLM(tied=True)                      # TinyLM(tied) tags nothing itself
    plain = [p for p in model.parameters()]
    for p in plain:
        ember_ds.tables.mark_not_token_table(p)    # start from an untagged, unruled state
        delattr(p, ember_ds.tables._BODY_ATTR)
    with pytest.warns(UserWarning, match="none of the parameters it was given is a token table"):
        opt = Ember(plain)
    assert opt.token_tables == []
    from ember_ds.deepspeed_integration import _check_client_tables
    with pytest.raises(ValueError, match=r"factors no table, but the model has token tables "
                                         r"\(emb.weight\)"):
        _check_client_tables(opt, model)
    _check_client_tables(Ember(TinyLM()), TinyLM())          # tables found: nothing to say
