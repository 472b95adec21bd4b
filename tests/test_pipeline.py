"""Pipeline parallelism (models/pipeline.py on DeepSpeed's pipeline engine) against the
single-stage run: losses and every parameter after 4 steps of gradient accumulation, fp32,
ZeRO-1, for the dense table and Leviathan, Ember and AdamW; TP = 2 x PP = 2 and PP = 2 x DP = 2
on 4 ranks. Each stage's token table must be stepped by Ember itself (its step count), never by
another update. Rank scripts: tests/dist/gpt_pp.py."""
import os

import pytest
import torch

from conftest import ROOT, torchrun

REFERENCE = ["dense:ember:1:1:1", "leviathan:ember:1:1:1", "dense:adamw:1:1:1",
             "leviathan:adamw:1:1:1"]
TWO = ["dense:ember:1:2:1", "leviathan:ember:1:2:1", "dense:adamw:1:2:1"]
FOUR = ["dense:ember:2:2:1", "leviathan:adamw:2:2:1", "leviathan:ember:1:2:2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    out = {}
    for nproc, cases in ((1, REFERENCE), (2, TWO), (4, FOUR)):
        torchrun("gpt_pp.py", nproc, *cases, tmp_path=tmp, timeout=900)
        for case in cases:
            files = sorted((tmp / "out_gpt_pp").glob(f"{case.replace(':', '_')}-rank*.pt"))
            assert len(files) == nproc, case
            out[case] = [torch.load(f, weights_only=False) for f in files]
    return out


def reference_of(case):
    embedding, optimizer = case.split(":")[:2]
    return f"{embedding}:{optimizer}:1:1:1"


@pytest.mark.dist
@pytest.mark.parametrize("case", TWO + FOUR)
def test_pipeline_equals_single_stage(runs, case):
    ref = runs[reference_of(case)][0]
    ranks = runs[case]
    for r in ranks:                                  # every rank reports the pipeline's loss
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    params = {}
    for r in ranks:
        params.update(r["params"])
    assert set(params) == set(ref["params"])
    # after 4 steps at lr <= 3e-3 a wrong update (a lost micro-batch, a table stepped by
    # AdamW, a stage's gradient not reduced) moves weights by ~1e-3; TP's other reduction
    # order moves AdamW's near-zero-gradient elements by ~1e-6
    for name, want in ref["params"].items():
        err = (params[name] - want).abs().max().item()
        assert err < 4e-5, (case, name, err)
    # the weights moved (the comparison is not between two untouched models)
    assert ref["losses"][0] != ref["losses"][-1]


@pytest.mark.dist
@pytest.mark.parametrize("case", [c for c in TWO + FOUR if ":ember:" in c])
def test_each_stage_table_gets_embers_update(runs, case):
    dense = case.startswith("dense")
    by_stage = {}
    for r in runs[case]:
        by_stage.setdefault(r["stage"], set()).update(
            (t["name"], t["steps"]) for t in r["tables"])
    # first stage: the input table (Leviathan has none); last stage: the head; 4 Ember steps
    assert by_stage[0] == ({("embedding.weight", 4)} if dense else set())
    assert by_stage[1] == {("lm_head.weight", 4)}
    assert all(r["wrapper"] == "DeepSpeedZeroOptimizer" for r in runs[case])


# ------------------------------------------------------------------ launch/train.py --pp

def _validate(argv, world, ds_over=None):
    from launch.settings import load_ds_config, parse_args, validate
    cfg = load_ds_config(ROOT / "ds_configs" / "ember_zero1_fp32.json")
    cfg.update(ds_over or {})
    return validate(parse_args(argv), cfg, world, False)


def test_pipeline_layout_errors_are_one_line():
    from launch.errors import ConfigError
    plan = _validate(["--pp", "2", "--tp", "2"], 8)
    assert (plan["tp"], plan["pp"], plan["dp"]) == (2, 2, 2)
    assert _validate([], 4, {"pipeline": {"stages": 2}})["pp"] == 2     # DeepSpeed's own key
    for argv, world, over, message in [
            (["--pp", "3"], 3, None, "--pp 3 does not divide num_layers 4"),
            (["--pp", "2", "--tp", "2"], 6, None, "--tp 2 x --pp 2 does not divide the world "
                                                  "size 6"),
            (["--pp", "2"], 2, {"zero_optimization": {"stage": 2}},
             "ZeRO stage 2 cannot be combined with pipeline parallelism"),
            (["--pp", "0"], 2, None, "pipeline stages must be an integer >= 1")]:
        with pytest.raises(ConfigError) as e:
            _validate(argv, world, over)
        assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.dist
def test_train_py_pp2_resumes_exactly(tmp_path):
    """launch/train.py --pp 2 on 2 ranks (Ember, ZeRO-1, 2 micro-batches): a run resumed from
    its step-2 checkpoint continues with the uninterrupted run's losses."""
    import subprocess
    import sys

    from conftest import free_port
    from launch import data as D
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(list(D.iter_file_documents(D.DEFAULT_CORPUS))[:40]) + "\n")
    lev = '{"seed_dim":16,"modes":8,"heads":2,"knots":4}'

    def train(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(ROOT / "launch" / "train.py"), "--data", str(corpus), "--cache-dir",
               str(tmp_path / "cache"), "--out", str(out), "--steps", str(steps),
               "--deepspeed_config", str(ROOT / "ds_configs" / "ember_zero1_fp32.json"),
               "--vocab-size", "256", "--model", "hidden_size=32", "--model", "num_layers=2",
               "--model", "num_heads=2", "--model", "ffn_hidden_size=64", "--model",
               "seq_length=32", "--model", f"leviathan={lev}", "--eval-samples", "4",
               "--ds", "train_micro_batch_size_per_gpu=2", "--ds",
               "gradient_accumulation_steps=2", "--no-progress", "--pp", "2",
               "--eval-interval", "0", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        rows = (out / "metrics.csv").read_text().splitlines()
        head = rows[0].split(",")
        return proc.stdout, {int(r.split(",")[0]): r.split(",")[head.index("train_loss")]
                             for r in rows[1:] if r.split(",")[head.index("train_loss")]}

    log, full = train(tmp_path / "full", 4, "--save", str(tmp_path / "ckpt"),
                      "--save-interval", "2")
    assert "TP 1 x PP 2 x DP 1" in log
    import shutil
    shutil.copytree(tmp_path / "ckpt" / "step00000002", tmp_path / "from2" / "step00000002")
    (tmp_path / "from2" / "latest").write_text("step00000002")
    _, resumed = train(tmp_path / "resumed", 4, "--resume", str(tmp_path / "from2"))
    assert set(full) >= {3, 4} and {k: full[k] for k in (3, 4)} == {k: resumed[k] for k in (3, 4)}
