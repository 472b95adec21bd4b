"""launch/train.py end to end on CPU (gloo), with a tiny corpus (60 KJV chapters, vocabulary 256)
and a tiny model (the "tiny" preset shrunk through --model overrides), a few steps per run:

- settings errors stop at start-up with a clear message (in-process, and through the CLI);
- every ds_configs/*.json runs 2 steps on 2 ranks (one torchrun launch for all of them; the
  bf16 / GPU files are validated only on a machine without a GPU, and run when one is present),
  plus TP = 2 matching TP = 1;
- plain ``python`` (one process): the metrics CSV, summary and loss plot;
- one node with 2 ranks (deepspeed launcher) == two "nodes" on loopback, step for step, through
  launch/multinode/torchrun_multinode.sh (torchrun --nnodes 2 --node_rank 0/1
  --nproc_per_node 1), deepspeed_no_ssh.sh and slurm.sbatch (with stand-ins for srun/scontrol);
  deepspeed_hostfile.sh (ssh/pdsh) is not run: it needs ssh between hosts;
- a run killed while saving a checkpoint resumes from the previous complete checkpoint and
  continues with the uninterrupted run's losses (fp32, ZeRO 2, 2 ranks);
- launch/quickstart.sh end to end with its knobs turned down.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from launch import data as D
from launch import train as T

TRAIN = str(ROOT / "launch" / "train.py")
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
LEVIATHAN = json.dumps({"seed_dim": 16, "modes": 8, "heads": 2, "knots": 4}, separators=(",", ":"))
MODEL = ["--vocab-size", "256", "--model", "hidden_size=32", "--model", "num_layers=1",
         "--model", "num_heads=2", "--model", "ffn_hidden_size=64", "--model", "seq_length=32",
         "--model", f"leviathan={LEVIATHAN}", "--eval-samples", "8",
         "--ds", "train_micro_batch_size_per_gpu=4", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(corpus file, prepared cache folder): prepared once here so that ranks only read it."""
    d = tmp_path_factory.mktemp("train_data")
    corpus = d / "tiny.txt"
    corpus.write_text("\n\n".join(list(D.iter_file_documents(D.DEFAULT_CORPUS))[:60]) + "\n")
    cache = d / "cache"
    D.prepare_data([corpus], cache, D.DataSettings(vocab_size=256), log=lambda m: None)
    return corpus, cache


def common(tiny, out, steps, config="ember_zero2_fp32.json", *extra):
    corpus, cache = tiny
    return ["--data", str(corpus), "--cache-dir", str(cache), "--out", str(out),
            "--steps", str(steps), "--deepspeed_config", str(ROOT / "ds_configs" / config),
            *MODEL, *extra]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    e.pop("EMBER_FAULT", None)
    e.update(extra)
    return e


def run(cmd, ok=True, timeout=300, **env_extra):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)
    if ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd[:8]))} ... failed ({proc.returncode})\n--- stdout\n"
                    f"{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def torchrun(nproc, args, nnodes=1, node_rank=0, port=None):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--node_rank", str(node_rank), "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port or free_port()), TRAIN, *args]


def summary(out) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def close(a, b, rtol=1e-5):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------

def _validate(argv, world=1, cuda=False, ds=None, **ds_over):
    args = T.parse_args(argv)
    cfg = ds or T.load_ds_config(ROOT / "ds_configs" / "ember_zero1_fp32.json")
    cfg = {**cfg, **ds_over}
    return T.validate(args, cfg, world, cuda)


@pytest.mark.parametrize("argv,world,cuda,ds_over,message", [
    (["--preset", "huge"], 1, False, {}, "unknown preset 'huge'"),
    (["--tp", "3"], 3, False, {}, "does not divide the number of attention heads 4"),
    (["--tp", "2"], 3, False, {}, "does not divide the world size 3"),
    ([], 4, False, {"train_batch_size": 16},
     "train_batch_size 16 != micro batch 8 x gradient accumulation 1 x data-parallel size 4"),
    (["--tp", "2"], 4, False, {"train_batch_size": 24, "gradient_accumulation_steps": None},
     "train_batch_size 24 is not a multiple of micro batch 8 x data-parallel size 2"),
    ([], 1, False, {"bf16": {"enabled": True}}, "no GPU is visible"),
    ([], 1, True, {"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
    (["--model", "hiden_size=3"], 1, False, {}, "unknown GPTConfig field(s) in --model: hiden_size"),
    (["--model", "num_heads=3"], 1, False, {}, "num_heads 3 does not divide hidden_size"),
    (["--steps", "0"], 1, False, {}, "--steps must be >= 1"),
    (["--resume"], 1, False, {}, "--resume without a folder needs --save"),
    ([], 1, False, {"zero_optimization": {"stage": 4}},
     "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ([], 1, False, {"optimizer": {"type": "Ember", "params": {"lr": "3e-3x"}}},
     "optimizer.params.lr must be a number, got '3e-3x'"),
    ([], 1, False, {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, "x"]}}},
     "optimizer.params.betas must be a number pair"),
    ([], 1, False, {"optimizer": {"type": "Embr", "params": {}}},
     "unknown optimizer type 'Embr'; did you mean 'Ember'?"),
    ([], 1, False, {"optimizer": {"type": "adamw", "params": {}}}, None),
    (["--save", __file__], 1, False, {}, f"--save {__file__} is a file, not a folder"),
    (["--out", __file__], 1, False, {}, f"--out {__file__} is a file, not a folder"),
    (["--max-skipped-steps", "-1"], 1, False, {}, "--max-skipped-steps must be >= 0"),
])
def test_settings_errors_stop_at_startup(argv, world, cuda, ds_over, message):
    if message is None:                          # the control: accepted as is
        _validate(argv, world, cuda, **ds_over)
        return
    with pytest.raises(T.ConfigError) as e:
        _validate(argv, world, cuda, **ds_over)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_settings_resolve_and_fill_in(tmp_path):
    plan = _validate(["--tp", "2", "--tokens", "100000"], world=8,
                     train_batch_size=64, gradient_accumulation_steps=None)
    assert (plan["dp"], plan["micro"], plan["accum"], plan["global_batch"]) == (4, 8, 2, 64)
    assert plan["steps"] == math.ceil(100000 / (64 * 128))
    ds = T.finalize_ds_config(T.load_ds_config(ROOT / "ds_configs" / "ember_zero1_fp32.json"), plan)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["scheduler"]["params"]["total_num_steps"] == plan["steps"]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 2
    own = T.load_ds_config(ROOT / "ds_configs" / "adamw_zero1_fp32.json")
    own["scheduler"] = {"type": "WarmupCosineLR",
                        "params": {"total_num_steps": "auto", "warmup_num_steps": 5}}
    params = T.finalize_ds_config(own, plan)["scheduler"]["params"]
    assert params["total_num_steps"] == plan["steps"] and params["warmup_num_steps"] == 5
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(T.ConfigError, match="not valid JSON"):
        T.load_ds_config(bad)
    with pytest.raises(T.ConfigError, match="ds_config not found"):
        T.load_ds_config(tmp_path / "missing.json")
    over = T.load_ds_config(ROOT / "ds_configs" / "ember_zero1_fp32.json",
                            [("optimizer.params.lr", 0.5), ("zero_optimization.stage", 2)])
    assert over["optimizer"]["params"]["lr"] == 0.5 and over["zero_optimization"]["stage"] == 2


def test_cli_reports_settings_errors_quickly(tiny, tmp_path):
    proc = run([sys.executable, TRAIN, "--preset", "huge"], ok=False)
    assert proc.returncode == 2
    assert "error: unknown preset 'huge'; presets: tiny" in proc.stderr
    bf16 = run([sys.executable, TRAIN, "--deepspeed_config",
                str(ROOT / "ds_configs" / "ember_zero1_bf16.json")], ok=False)
    assert bf16.returncode == 2 and "no GPU is visible" in bf16.stderr
    data = run([sys.executable, TRAIN, "--data", str(tmp_path / "none.txt")], ok=False)
    assert data.returncode == 2 and f"data path not found: {tmp_path / 'none.txt'}" in data.stderr
    # DeepSpeed's own config parser, before the data and the model: one line, the close key
    typo = run([sys.executable, TRAIN, *common(tiny, tmp_path / "o", 2), "--ds",
                "zero_optimization.overlap_com=true"], ok=False)
    errors = [x for x in typo.stderr.splitlines() if x.startswith("error:")]
    assert typo.returncode == 2 and len(errors) == 1, typo.stderr[-3000:]
    assert "zero_optimization.overlap_com: extra inputs are not permitted (did you mean " \
           "'overlap_comm'?)" in errors[0]


@pytest.mark.dist
def test_bad_data_stops_every_rank(tmp_path):
    """A data error found by the rank that prepares the data stops all ranks with its message
    (nobody is left waiting in a barrier)."""
    bad = tmp_path / "scan.txt"
    bad.write_bytes(b"%PDF-1.4\n\x00\x01\x02" * 40)
    proc = run(torchrun(2, ["--data", str(bad), "--cache-dir", str(tmp_path / "cache"),
                            "--no-progress"]), ok=False, timeout=120)
    assert proc.returncode != 0
    assert f"error: {bad} looks like a binary file" in proc.stderr + proc.stdout


def test_ds_configs_are_complete():
    names = {p.stem for p in CONFIGS}
    for stage in (1, 2, 3):
        assert {f"ember_zero{stage}_fp32", f"ember_zero{stage}_bf16"} <= names
    assert {"adamw_zero1_fp32", "adamw_zero1_bf16"} <= names
    for p in CONFIGS:
        cfg = json.loads(p.read_text())
        assert "gradient_clipping" in cfg, p.name
        assert cfg["optimizer"]["type"] in ("Ember", "AdamW"), p.name
        if cfg["optimizer"]["type"] == "AdamW":
            assert cfg["optimizer"]["params"].get("torch_adam") is True, p.name
        assert ("bf16" in p.stem) == cfg["bf16"]["enabled"], p.name
        assert "auto" not in p.read_text(), p.name     # usable as is by deepspeed.initialize
        assert f"zero{cfg['zero_optimization']['stage']}" in p.stem, p.name


@pytest.mark.dist
def test_every_ds_config_trains(run_dist, tiny, tmp_path):
    """2 steps from every file on 2 ranks. Without a GPU the bf16 files (meant for GPUs) are
    validated only: train.validate accepts them for a GPU and rejects them on CPU."""
    import torch
    cuda = torch.cuda.is_available()
    runnable = [p for p in CONFIGS if cuda or "bf16" not in p.stem]
    for p in CONFIGS:
        if "bf16" in p.stem:
            cfg = T.load_ds_config(p)
            assert _validate([], world=2, cuda=True, ds=cfg)["precision"] == "bf16"
            if not cuda:
                with pytest.raises(T.ConfigError, match="no GPU is visible"):
                    _validate([], world=2, cuda=False, ds=cfg)
    corpus, cache = tiny
    ember1 = str(ROOT / "ds_configs" / "ember_zero1_fp32.json")
    ordered = [ember1] + [str(p) for p in runnable if str(p) != ember1]
    res = run_dist("train_configs.py", 2, tmp_path / "runs", cache, corpus, "--tp2", *ordered,
                   "--", "--steps", "2", "--eval-interval", "0", *MODEL, timeout=420)
    runs = {(r["config"], r["tp"]): r["summary"] for r in res[0]}
    assert {name for name, _ in runs} == {Path(p).stem for p in runnable}
    for (name, tp), s in runs.items():
        cfg = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        assert s["zero_stage"] == cfg["zero_optimization"]["stage"]
        assert s["optimizer"] == cfg["optimizer"]["type"]
        assert len(s["train_losses"]) == 2 and s["world"] == 2 and s["tp"] == tp
        assert all(math.isfinite(x) for x in s["train_losses"] + [s["val_loss_after"]])
        assert s["val_loss_after"] < s["val_loss_before"], name
    # ZeRO stages partition the same maths; TP = 2 splits the same (TP-independent) model
    ember = [runs[(f"ember_zero{k}_fp32", 1)]["train_losses"] for k in (1, 2, 3)]
    assert close(ember[0], ember[1]) and close(ember[0], ember[2]), ember
    assert close(runs[("ember_zero1_fp32", 2)]["train_losses"], ember[0], rtol=1e-4)
    assert runs[("ember_zero1_fp32", 2)]["dp"] == 1


def test_plain_python_process_writes_metrics_and_plot(tiny, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, TRAIN, *common(tiny, out, 4, "ember_zero1_fp32.json",
                                        "--eval-interval", "2")])
    s = summary(out)
    assert s["world"] == 1 and s["device"] == "cpu" and s["precision"] == "fp32"
    assert s["val_loss_after"] < s["val_loss_before"] and len(s["train_losses"]) == 4
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(T.CSV_FIELDS)
    rows = [dict(zip(T.CSV_FIELDS, line.split(","))) for line in lines[1:]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [bool(r["val_loss"]) for r in rows] == [True, False, True, False, True]
    assert float(rows[4]["val_ppl"]) == pytest.approx(math.exp(s["val_loss_after"]), rel=1e-4)
    assert all(float(r["tokens_per_s"]) > 0 and float(r["lr"]) > 0 for r in rows[1:])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One node, 2 ranks, through the deepspeed launcher: 6 uninterrupted steps (ZeRO 2)."""
    out = tmp_path_factory.mktemp("reference")
    run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr",
         "127.0.0.1", "--master_port", str(free_port()), TRAIN,
         *common(tiny, out, 6, "ember_zero2_fp32.json", "--eval-interval", "3")])
    s = summary(out)
    assert s["world"] == 2 and len(s["train_losses"]) == 6
    return s


SRUN_STUB = """#!/usr/bin/env bash
# test stand-in for srun: options are skipped, the command runs once per node, here
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def slurm_job(tmp_path, args) -> tuple[list, dict]:
    """(command, environment) of a 2-node ``sbatch launch/multinode/slurm.sbatch ARGS`` job
    (torchrun mode, 1 rank per node as on a CPU partition) under stand-ins for srun/scontrol."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "srun").write_text(SRUN_STUB)
    # two writes with a pause: a script that reads the first line through "| head" under
    # pipefail dies silently of the SIGPIPE (the old flake of this test, now every time)
    (stub / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\nsleep 0.3\n"
                                   "echo localhost\n")
    for f in stub.iterdir():
        f.chmod(0o755)
    return (["bash", "launch/multinode/slurm.sbatch", *args],
            env(MASTER_PORT=str(free_port()), EMBER_NO_SETUP="1", SLURM_SUBMIT_DIR=str(ROOT),
                SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="1",
                PATH=f"{stub}{os.pathsep}{env()['PATH']}"))


@pytest.mark.dist
@pytest.mark.parametrize("how", ["torchrun", "deepspeed_no_ssh", "slurm"])
def test_two_nodes_match_one_node(how, tiny, tmp_path, reference):
    """Two single-rank "nodes" on loopback through the launch/multinode scripts train step for
    step like one node with 2 ranks: torchrun_multinode.sh (torchrun --nnodes 2 --node_rank 0/1
    --nproc_per_node 1, same master), deepspeed_no_ssh.sh (deepspeed --hostfile --no_ssh
    --node_rank 0/1) and slurm.sbatch (its torchrun mode, under stand-ins for srun / scontrol)."""
    out = tmp_path / "two_nodes"
    args = common(tiny, out, 6, "ember_zero2_fp32.json", "--eval-interval", "3")
    base = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), EMBER_NO_SETUP="1",
                NPROC_PER_NODE="1")
    if how == "slurm":
        cmds = [slurm_job(tmp_path, args)]
    else:
        script = {"torchrun": "torchrun_multinode.sh", "deepspeed_no_ssh": "deepspeed_no_ssh.sh"}
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
        cmds = [(["bash", f"launch/multinode/{script[how]}", *args],
                 env(**base, NNODES="2", NODE_RANK=str(r), HOSTFILE=str(hostfile)))
                for r in range(2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, e in cmds]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(x[-4000:] for x in logs)
    s = summary(out)
    assert s["world"] == 2 and s["dp"] == 2
    assert close(s["train_losses"], reference["train_losses"], rtol=1e-6), \
        (s["train_losses"], reference["train_losses"])
    assert s["val_loss_after"] == pytest.approx(reference["val_loss_after"], rel=1e-6)


@pytest.mark.dist
def test_resume_after_a_kill_mid_save_matches_uninterrupted(tiny, tmp_path, reference):
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = common(tiny, out, 6, "ember_zero2_fp32.json", "--eval-interval", "3", "--save",
                  str(ckpt), "--save-interval", "2")
    # the job dies while writing the step-4 checkpoint (after DeepSpeed wrote its files)
    crashed = run(torchrun(2, args), ok=False, EMBER_FAULT="kill:save-written@4")
    assert crashed.returncode != 0
    assert (ckpt / ".tmp-step00000004" / "step00000004").is_dir()      # the partial save
    assert not (ckpt / "step00000004").exists()
    assert (ckpt / "latest").read_text() == "step00000002"
    assert T.find_checkpoint(ckpt)[0] == "step00000002"
    # resume: picks the previous complete checkpoint and matches the uninterrupted run
    run(torchrun(2, [*args, "--resume"]))
    s = summary(out)
    assert s["start_step"] == 2 and s["resumed_from"].endswith("step00000002")
    assert close(s["train_losses"], reference["train_losses"][2:], rtol=1e-6), \
        (s["train_losses"], reference["train_losses"])
    assert s["val_loss_after"] == pytest.approx(reference["val_loss_after"], rel=1e-6)
    assert (ckpt / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == \
        ["step00000004", "step00000006"]                                  # --keep 2
    assert not list(ckpt.glob(".tmp-*"))
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [0, 1, 2, 3, 4, 5, 6]      # the crashed run's steps 3-4 were replaced


def test_quickstart_script(tiny, tmp_path):
    corpus, cache = tiny
    proc = run(["bash", str(ROOT / "launch" / "quickstart.sh")], timeout=300,
               QUICKSTART_STEPS="3", QUICKSTART_DATA=str(corpus), QUICKSTART_VOCAB="256",
               QUICKSTART_OUT=str(tmp_path / "qs"), EMBER_DATA_CACHE=str(cache), EMBER_NO_SETUP="1",
               QUICKSTART_ARGS=" ".join(MODEL[2:]))
    out = proc.stdout
    assert "validation loss before" in out and "validation loss after" in out
    assert str(tmp_path / "qs" / "metrics.csv") in out and str(tmp_path / "qs" / "loss.png") in out
    assert (tmp_path / "qs" / "loss.png").is_file()
    # it ends with a sample of the trained model (launch/generate.py), not the fallback line
    sample = out.split("a sample from the trained model")[1]
    assert "And God said" in sample and "generation failed" not in sample
