"""Checkpoints that outlive the job's shape (launch/reshard.py), fp32 on CPU over gloo, with a
tiny dense GPT (2 layers, so that PP = 2 puts one on each stage; one case with Leviathan) and
Ember from the ds_config:

- seven source runs of 5 steps save at step 3: DP 2 x ZeRO 2, DP 2 x ZeRO 3, TP 2 (ZeRO 1),
  PP 2 (ZeRO 1), TP 2 x PP 2 on 4 ranks (ZeRO 1), one rank without ZeRO, and TP 2 with
  Leviathan; the six dense ones give the same losses (one global batch);
- ``train.py --resume`` of a step-3 checkpoint at another shape converts it (DP 2 -> 1,
  ZeRO 2 -> 3 with the optimizer offloaded to the CPU, ZeRO 3 -> 1, TP 2 -> 1 with DP 1 -> 2
  (dense and Leviathan), TP 1 -> 2, PP 2 -> 1 onto one rank without ZeRO, PP 1 -> 2, and
  TP 2 x PP 2 -> one rank, which checks DeepSpeed's model-parallel file numbering) and its
  losses, final weights and final Ember state equal those of a plain single-process
  continuation: models.gpt.GPT and ember_ds.Ember, no DeepSpeed, loaded from the checkpoint's
  consolidated fp32 weights and optimizer state and stepped on the same batches;
- the consolidated weights equal those launch/consolidate.py reads from the module files (an
  independent reader), and Ember's r covers the whole vocabulary;
- at the same shape --resume stays DeepSpeed's own loader, bitwise (tests/test_train.py).
"""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from launch import data as D
from test_train import run, tiny, torchrun  # noqa: F401  (tiny: a fixture)

STEPS, SAVED = 5, 3
MODEL = ["--embedding", "dense", "--vocab-size", "256", "--model", "hidden_size=32",
         "--model", "num_layers=2", "--model", "num_heads=2", "--model", "ffn_hidden_size=64",
         "--model", "seq_length=32", "--eval-samples", "8",
         "--ds", "train_micro_batch_size_per_gpu=4", "--no-progress"]
# (ranks, ds_config, extra args) of each job shape; the global batch is 8 in all of them
SHAPES = {
    "dp2-z2": (2, "ember_zero2_fp32.json", []),
    "dp2-z3": (2, "ember_zero3_fp32.json", []),
    "dp2-z3-offload": (2, "ember_zero3_fp32.json", [
        "--ds", 'zero_optimization.offload_optimizer={"device":"cpu"}',
        "--ds", "zero_force_ds_cpu_optimizer=false"]),
    "dp2-z1": (2, "ember_zero1_fp32.json", []),
    "dp1-z2": (1, "ember_zero2_fp32.json", ["--ds", "gradient_accumulation_steps=2"]),
    "dp1-z0": (1, "ember_zero1_fp32.json", ["--ds", "zero_optimization.stage=0",
                                            "--ds", "gradient_accumulation_steps=2"]),
    "tp2-z1": (2, "ember_zero1_fp32.json", ["--tp", "2", "--ds", "gradient_accumulation_steps=2"]),
    "pp2-z1": (2, "ember_zero1_fp32.json", ["--pp", "2", "--ds", "gradient_accumulation_steps=2"]),
    "tp2-pp2-z1": (4, "ember_zero1_fp32.json", ["--tp", "2", "--pp", "2",
                                                "--ds", "gradient_accumulation_steps=2"]),
    "tp2-z1-leviathan": (2, "ember_zero1_fp32.json", ["--tp", "2", "--embedding", "leviathan",
                                                      "--ds", "gradient_accumulation_steps=2"]),
    "dp2-z2-leviathan": (2, "ember_zero2_fp32.json", ["--embedding", "leviathan"]),
}
SOURCES = ("dp2-z2", "dp2-z3", "tp2-z1", "pp2-z1", "tp2-pp2-z1", "dp1-z0", "tp2-z1-leviathan")
CHANGES = [("dp2-z2", "dp1-z2"), ("dp2-z2", "dp2-z3-offload"), ("dp2-z3", "dp2-z1"),
           ("tp2-z1", "dp2-z2"), ("dp1-z0", "tp2-z1"),
           ("pp2-z1", "dp1-z0"), ("dp1-z0", "pp2-z1"), ("tp2-pp2-z1", "dp1-z0"),
           ("tp2-z1-leviathan", "dp2-z2-leviathan")]


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory):
    """(corpus, cache, prepared data, a work folder)."""
    corpus, cache = tiny
    prepared = D.prepare_data([corpus], cache, D.DataSettings(vocab_size=256), log=lambda m: None)
    return corpus, cache, prepared, tmp_path_factory.mktemp("reshard")


def train(data, shape, out, *extra):
    corpus, cache, _, _ = data
    n, config, args = SHAPES[shape]
    run(torchrun(n, ["--data", str(corpus), "--cache-dir", str(cache), "--out", str(out),
                     "--steps", str(STEPS), "--deepspeed_config",
                     str(ROOT / "ds_configs" / config), *MODEL, *args, *extra]))
    with open(Path(out) / "metrics.csv") as fh:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(fh)
                if r["train_loss"]}


@pytest.fixture(scope="module")
def sources(data):
    """Each source shape trains 5 steps and keeps its step-3 checkpoint."""
    root = data[3]
    out = {}
    for shape in SOURCES:
        losses = train(data, shape, root / f"out-{shape}", "--save", str(root / f"ckpt-{shape}"),
                       "--save-interval", str(SAVED), "--keep", "5")
        out[shape] = (root / f"ckpt-{shape}" / f"step{SAVED:08d}", losses)
    return out


def plain_continuation(folder: Path, prepared):
    """Steps SAVED+1 .. STEPS of the run saved in ``folder``, in one process without DeepSpeed:
    the consolidated state loaded into GPT (TP = 1) and Ember, the same global batches, the
    ds_config's clipping and schedule. Returns (losses by step, model, optimizer)."""
    from deepspeed.runtime import lr_schedules

    from ember_ds import Ember
    from ember_ds.ds_config import parse_params
    from launch.reshard import read_universal
    from models.gpt import GPT
    state = read_universal(folder)
    ts = json.loads((folder / "train_state.json").read_text())
    ds = _ds_config(folder)
    cfg = _config(ts)
    model = GPT(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.zero_()[:state.params[name].shape[0]].copy_(state.params[name])
    opt = Ember(model, **parse_params(ds["optimizer"]["params"]))
    sched = getattr(lr_schedules, ds["scheduler"]["type"])(opt, **ds["scheduler"]["params"])
    sched.load_state_dict(state.engine["lr_scheduler"])
    for g in opt.param_groups:
        g["lr"] = state.groups[bool(g.get("token_table"))]["lr"]
    for name, moments in state.optim.items():
        opt.state[params[name]] = {**{k: v.clone() for k, v in moments.items()},
                                   "step": state.optim_step[name].clone()}
    tables = []
    for t, p in enumerate(opt.token_tables):
        src = state.tables[opt._table_info(t)[3].name]
        r = torch.zeros(p.shape[0])
        r[:src["r"].numel()] = src["r"]
        tables.append(dict(name=None, shape=list(p.shape), global_rows=p.shape[0], row_offset=0,
                           state=dict(src, r=r)))
    opt.load_table_state(dict(version=1, tables=tables))

    windows = D.TokenWindows(prepared.tokens("train"), cfg.seq_length, "train")
    sampler = D.DeterministicSampler(len(windows), ts["seed"], ts["global_batch"], 1, 1, 0)
    losses = {}
    for step in range(SAVED, STEPS):
        ids, labels = windows.batch(sampler.global_batch_indices(step))
        loss = model(ids, labels=labels).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ds["gradient_clipping"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step + 1] = float(loss)
    return losses, model, opt


def _ds_config(folder: Path) -> dict:
    f = folder / "mp_rank_00_model_states.pt"
    if not f.is_file():
        f = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)["ds_config"]


def test_every_source_shape_trains_the_same_run(sources):
    """One global batch of the same samples per step, whatever the shape: the dense source runs
    agree, so any of them is a reference for a resume at another shape."""
    base = sources["dp2-z2"][1]
    assert len(base) == STEPS
    for shape, (_, losses) in sources.items():
        if shape.endswith("leviathan"):
            continue
        assert all(math.isclose(losses[s], base[s], rel_tol=1e-5) for s in base), shape


def test_consolidated_weights_equal_the_module_files(sources, tmp_path):
    """read_universal's fp32 masters (from the optimizer partitions) against DeepSpeed's module
    files, read and joined by launch/consolidate.py's separate reader; Ember's ember_tables.pt
    against the tables' per-rank state in the optimizer files."""
    from launch.consolidate import join, shard_state_dicts
    from launch.reshard import read_universal
    from models.gpt import GPT
    for shape in ("dp2-z2", "tp2-z1", "pp2-z1", "tp2-pp2-z1", "dp1-z0"):
        folder, tmp = sources[shape][0], tmp_path
        state = read_universal(folder)
        ts = json.loads((folder / "train_state.json").read_text())
        shards = shard_state_dicts(folder, ts)
        model = GPT(_config(ts))
        for name, p in model.named_parameters():
            full = join([s[name].float() for s in shards], p)
            assert torch.equal(state.params[name], full[:state.params[name].shape[0]]), \
                (shape, name)
        # Ember's layout-free file equals the join of the per-rank states in DeepSpeed's files
        copy = tmp / shape
        shutil.copytree(folder, copy)
        (copy / "ember_tables.pt").unlink()
        joined = read_universal(copy, optimizer=False, verified=True).tables  # an older save
        assert set(state.tables) == set(joined) == {"embedding.weight", "lm_head.weight"}
        for name, st in state.tables.items():
            assert st["r"].shape == (256,) and st["step"] == SAVED and (st["r"] > 0).any()
            for key in ("r", "c", "s"):
                assert torch.equal(st[key], joined[name][key]), (shape, name, key)
        assert state.optim and all(set(m) == {"exp_avg", "exp_avg_sq"}
                                   for m in state.optim.values())


def _config(ts: dict):
    from launch.consolidate import model_config
    cfg = model_config(ts)
    cfg.params_dtype = torch.float32
    return cfg


@pytest.mark.parametrize("source,target", CHANGES, ids=[f"{a}-to-{b}" for a, b in CHANGES])
def test_resume_at_another_shape_equals_the_plain_continuation(sources, data, source, target):
    from launch.consolidate import load_consolidated
    from launch.reshard import read_universal
    folder, uninterrupted = sources[source]
    root = data[3] / f"{source}-to-{target}"
    losses = train(data, target, root / "out", "--resume", str(folder), "--save",
                   str(root / "ckpt"))
    ref_losses, ref_model, ref_opt = plain_continuation(folder, data[2])
    for step in range(SAVED + 1, STEPS + 1):
        assert math.isclose(losses[step], ref_losses[step], rel_tol=1e-5), (step, losses,
                                                                            ref_losses)
        assert math.isclose(losses[step], uninterrupted[step], rel_tol=1e-5)
    model, _ = load_consolidated(root / "ckpt")
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    final = read_universal(Path(root / "ckpt") / f"step{STEPS:08d}")
    for t, p in enumerate(ref_opt.token_tables):
        name = ref_opt._table_info(t)[3].name
        ref = ref_opt.table_state(t)
        assert final.tables[name]["step"] == ref["step"] == STEPS
        torch.testing.assert_close(final.tables[name]["r"], ref["r"][:256], rtol=1e-5, atol=0)
        torch.testing.assert_close(final.tables[name]["c"], ref["c"], rtol=1e-5, atol=0)
