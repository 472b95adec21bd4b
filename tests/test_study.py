"""The study's pipeline end to end at its smoke scale (two arms, a few steps): runs, aggregates,
writes results.json / results.md / both plots, and accounts table-optimizer state right."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_study_smoke(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, STUDY_THREADS="1", EMBER_DATA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "bench/study.py", "--scale", "smoke", "--arms",
                           "dense-ember", "leviathan-adamw", "--steps", "4", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("results.json", "results.md", "loss_curves.png", "loss_by_frequency.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    arms = res["arms"]
    assert set(arms) == {"dense-ember", "leviathan-adamw"}
    V, D = res["meta"]["vocab"], 128
    # Ember: two tables (embedding, head) of O(V + D) each; AdamW on the head alone: 2 V D fp32
    assert arms["dense-ember"]["table_state_bytes"] == 2 * 4 * (V + D + 1)
    assert arms["leviathan-adamw"]["table_state_bytes"] == 2 * 4 * V * D
    assert arms["leviathan-adamw"]["params"]["embedding"] < V * D
    for a in arms.values():
        assert 0 < a["val_loss"]["mean"] < 10 and len(a["loss_by_frequency"]) == 5
    assert "| dense-ember |" in (out / "results.md").read_text()
