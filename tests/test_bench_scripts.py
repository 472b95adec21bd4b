"""The CPU side of bench/gpu_check.sh (the script a session lent a GPU runs as is): argument
handling, the refusal without a GPU, and a dry run's result files (one step on CPU, tiny)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["triton_ember", "ember", "leviathan", "data_1b", "train_1b_eager_ember",
         "train_1b_compile_ember", "peers_1b", "train_1b_eager_adamw", "train_1b_compile_adamw",
         "leviathan_compiled", "triton_leviathan", "peers", "quickstart"]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_arguments():
    assert _run("--help").returncode == 0
    bad = _run("--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    assert "--dry-run" in bad.stderr                       # the usage follows
    step = _run("--dry-run", "--only", "ember,nope")
    assert step.returncode == 2 and "unknown step 'nope'" in step.stderr
    assert _run("--out").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_refuses_without_a_gpu():
    proc = _run()
    assert proc.returncode == 3 and "--dry-run" in proc.stderr, proc.stderr


def _bare_path(tmp_path) -> str:
    """A PATH like a bare GPU machine's: the usual tools and a python3, no ``python``."""
    import shutil
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "sh", "env", "date", "mkdir", "mktemp", "ln", "ls", "wc", "tail", "grep",
                 "sed", "cat", "timeout", "dirname", "rm", "c++", "g++"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python3").chmod(0o755)
    return str(bindir)


def test_dry_run_writes_json_and_markdown(tmp_path):
    """On a PATH with python3 but no python (PYTHON unset): the script answers ``python`` with
    python3 itself; --logs puts the logs apart from the results."""
    env = dict(os.environ, PATH=_bare_path(tmp_path), OMP_NUM_THREADS="1")
    env.pop("PYTHON", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "ember", "--out",
                           str(tmp_path / "res"), "--logs", str(tmp_path / "logs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    date = time.strftime("%Y-%m-%d", time.gmtime())
    base = tmp_path / "res" / f"gpu_check_cpu_dry_run_{date}"
    result = json.loads(Path(str(base) + ".json").read_text())
    assert result["device"] == "cpu (dry run)" and result["date"] == date and result["dry_run"]
    steps = result["steps"]
    assert list(steps) == STEPS
    assert steps["ember"]["status"] == "ok"
    assert all(s["status"] == "not selected" for k, s in steps.items() if k != "ember")
    rows = result["figures"]["ember_vs_fused_adamw"]
    assert [r["table"] for r in rows] == ["512x64", "1000x96"]
    assert all(r["ember_ms"] > 0 and r["target"] == 0.7 for r in rows)
    run = Path(result["run_folder"])
    assert run == tmp_path / "logs"
    assert (run / "ember.json").is_file() and (run / "ember.log").is_file()
    md = Path(str(base) + ".md").read_text()
    assert md.startswith(f"# GPU check: cpu (dry run), {date}")
    assert "| ember | ok |" in md and "Ember vs fused AdamW" in md


def test_dry_run_train_and_compiled_steps(tmp_path):
    """The issue-20 steps, tiny on CPU (compile turned off): launch/train.py eager (and with
    --compile once train.py has it), HF eager and compiled, Leviathan compiled; their figures
    and targets reach the JSON and the markdown."""
    only = "data_1b,train_1b_eager_ember,train_1b_compile_adamw,peers_1b,leviathan_compiled"
    proc = _run("--dry-run", "--only", only, "--out", str(tmp_path / "res"), "--logs",
                str(tmp_path / "logs"))
    date = time.strftime("%Y-%m-%d", time.gmtime())
    result = json.loads((tmp_path / "res" / f"gpu_check_cpu_dry_run_{date}.json").read_text())
    steps = result["steps"]
    assert list(steps) == STEPS
    has_compile = '"--compile"' in (ROOT / "launch" / "settings.py").read_text() + \
        (ROOT / "launch" / "train.py").read_text()
    compiled = steps.pop("train_1b_compile_adamw")["status"]
    assert compiled == ("ok" if has_compile else "skipped: launch/train.py has no --compile")
    assert proc.returncode == (0 if has_compile else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = only.split(",")
    assert all(s["status"] == "ok" for k, s in steps.items() if k in chosen), steps
    assert all(s["status"] == "not selected" for k, s in steps.items() if k not in chosen)
    train = result["figures"]["train_1b"]
    assert set(train) == ({"train_1b_eager_ember", "train_1b_compile_adamw"} if has_compile
                          else {"train_1b_eager_ember"})
    eager = train["train_1b_eager_ember"]
    assert eager["optimizer"] == "Ember" and not eager["compiled"] and eager["timed_steps"] == 2
    assert eager["tokens_per_s"] > 0 and 0 < eager["mfu"] < 1 and eager["flops_per_token"] > 0
    assert list(eager["targets"]) == [">= HF eager tokens/s"]
    (hf,) = result["figures"]["peers_1b"]
    assert set(hf["ms"]) == {"hf_llama", "hf_llama_compiled"}
    assert all(v > 0 for v in hf["tokens_per_s"].values())
    modes = {r["compiled"] for r in result["figures"]["leviathan_overhead"]}
    assert modes == {True}
    md = (tmp_path / "res" / f"gpu_check_cpu_dry_run_{date}.md").read_text()
    assert "**launch/train.py, timed steps after 1 warm-up**" in md
    assert "| train_1b_eager_ember | Ember | eager | 2 |" in md and "hf_llama_compiled" in md


def test_missing_packages_are_named_with_the_fix(tmp_path):
    """Where an import the checks need fails (and no wheels install it), one line names it and
    how to bring the wheels."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_IMPORTS="import no_such_module_here",
               GPU_WHEELS=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "ember"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "no_such_module_here" in line and "bench/gpu_wheels.sh" in line, line
