"""Ember through the real Hugging Face Trainer (transformers + Accelerate) with an HF-style
ds_config (``"auto"`` for lr, betas, eps, weight_decay and the scheduler), 2 CPU ranks, gloo:
ZeRO-2 and ZeRO-3 (parameters partitioned at construction by zero.Init) on a LLaMA, ZeRO-3 on a
GPT-NeoX, both with untied heads, built from configs (no weights, no hub); and the same
ds_config through Accelerate alone (DeepSpeedPlugin, DummyOptim / DummyScheduler)."""
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

CASES = ["2:llama", "3:llama", "3:neox", "2:llama:accelerate"]
WRAPPERS = {2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conftest import torchrun
    return torchrun("hf_trainer.py", 2, *CASES, tmp_path=tmp_path_factory.mktemp("hf"),
                    timeout=400)


@pytest.fixture(params=CASES)
def case(request, results):
    stage = int(request.param.split(":")[0])
    return [r[request.param] for r in results], stage, WRAPPERS[stage]


def expected_lr(step, hp):
    """DeepSpeed WarmupDecayLR (linear warm-up) as HF fills it: peak = learning_rate, warm-up =
    warmup_steps, total = max_steps; the lr in force after ``step`` optimizer steps."""
    lr, w, total = hp["lr"], hp["warmup"], hp["steps"]
    return lr * step / w if step < w else lr * (total - step) / (total - w)


@pytest.mark.dist
def test_ember_factors_exactly_the_token_tables(case):
    ranks, stage, wrapper = case
    for r in ranks:
        assert r["zero_stage"] == stage and r["wrapper"] == wrapper
        # the input embedding and the untied head, by name, and nothing else
        assert r["factored"] == sorted(r["expected"]), r["factored"]


@pytest.mark.dist
def test_loss_goes_down(case):
    ranks, _, _ = case
    losses = ranks[0]["losses"]
    assert len(losses) == ranks[0]["hp"]["steps"]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert ranks[1]["losses"] == losses  # the loss averaged over ranks


@pytest.mark.dist
def test_hf_lr_weight_decay_betas_eps_reach_every_group(case):
    ranks, _, _ = case
    for r in ranks:
        hp = r["hp"]
        kinds = {g["token_table"] for g in r["groups"]}
        assert kinds == {True, False}  # tables and body both present
        for g in r["groups"]:
            # HF's single weight_decay / adam_epsilon hold for the tables and the body alike
            assert g["weight_decay"] == hp["weight_decay"] and g["eps"] == hp["eps"], g
            if not g["token_table"]:
                assert g["betas"] == hp["betas"], g  # "betas": "auto" = adam_beta1, adam_beta2
        # HF's learning_rate, warmup_steps and max_steps drive the schedule of every group:
        # tables and body share one lr at every step
        assert len(r["table_lrs"]) == hp["steps"]
        for step, (t, b) in enumerate(zip(r["table_lrs"], r["body_lrs"])):
            assert len(t) == 1 and t == b, (step, t, b)
            assert t[0] == pytest.approx(expected_lr(step, hp), rel=1e-9, abs=1e-15), step
        assert max(lrs[0] for lrs in r["table_lrs"]) == pytest.approx(hp["lr"], rel=1e-12)
