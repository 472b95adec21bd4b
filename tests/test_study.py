"""The study (bench/study.py) at its smoke scale, in process, on a small user corpus (--data,
--vocab, --large-vocab): every stage runs, a point that raises is recorded and skipped, a rerun
resumes without rerunning anything, and the report accounts table-optimizer state right. Plus
the lr ladder and the widening rule on their own."""
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.study import ladder, spec_key, widen  # noqa: E402


def test_ladder_and_widening():
    assert [ladder(3e-3, k) for k in (-2, -1, 0, 1, 2)] == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert ladder(1e-1, 1) == 0.3 and ladder(1.0, -1) == 0.3
    g = [3e-3, 1e-2, 3e-2, 1e-1]
    assert widen(g, [3.0, 2.9, 2.8, 2.7], 0, 3) == (g + [0.3], True)        # best at the top
    assert widen(g, [2.0, 2.9, 2.8, 2.7], 0, 3) == ([1e-3] + g, True)       # at the bottom
    assert widen(g, [3.0, 2.5, 2.8, 2.7], 0, 3) == (g, False)               # interior: done
    assert widen(g, [3.0, 2.9, 2.8, 2.7], 3, 3) == (g, False)               # budget spent
    assert widen(g, [None, 2.9, 2.8, None], 0, 3) == (g, False)             # failed never win
    assert widen(g, [None] * 4, 0, 3) == (g, False)


def test_study_smoke(tmp_path):
    # a small corpus of the first 60 chapters (documents are blank-line separated)
    text = lzma.open(ROOT / "launch" / "corpus" / "kjv.txt.xz", "rt").read()
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(text.split("\n\n")[:60]))
    out = tmp_path / "study"
    env = dict(os.environ, STUDY_THREADS="1", EMBER_DATA_CACHE=str(tmp_path / "cache"),
               STUDY_FAIL_ON="lev-reimpl")
    cmd = [sys.executable, "bench/study.py", "--scale", "smoke", "--inline", "--data", str(corpus),
           "--vocab", "256", "--large-vocab", "320", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FAILED lev-reimpl" in proc.stdout
    for name in ("results.json", "results.md", "study_lr_sweep.png", "study_curves.png",
                 "study_leviathan_gap.png", "study_loss_by_frequency.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["settings"]["data"] == [str(corpus)]
    assert set(res["sweeps"]) == {"256", "320"}
    assert set(res["sweeps"]["320"]) == {"adamw", "ember", "adafactor"}
    assert set(res["sweeps"]["256"]) == {"adamw", "ember", "adafactor", "ember b2=0.95",
                                         "adamw b2=0.999"}
    for s in res["sweeps"]["256"].values():
        assert len(s["grid"]) >= 2 and s["best_lr"] in s["grid"]
        assert s["best_lr"] == min((t, lr) for t, lr in zip(s["tune"], s["grid"]))[1]
    arms = {(a["name"], a["vocab"]): a for a in res["arms"]}
    beta2 = {(f"dense+{t}, beta2 {c['beta2']:g}", 256) for t, c in res["choices"]["beta2"].items()}
    assert set(arms) == beta2 | {(f"dense+{t}{x}", V) for t in ("adamw", "ember", "adafactor")
                                 for V, x in ((256, ""), (320, ""), (256, ", 12 steps"))}
    D = 128
    for (name, vocab), a in arms.items():
        V = 128 * -(-vocab // 128)         # the model pads the vocabulary to a multiple of 128
        n = 2
        assert a["n"] == n and a["test_loss"]["n"] == n and 0 < a["test_loss"]["mean"] < 10
        name = name.split(",")[0]
        assert len(a["loss_by_frequency"]) == 5
        # two tables (embedding, head); Ember: 4 (V + D + 1) each, Adafactor 4 (V + D), AdamW 8 V D
        assert a["table_state_bytes"] == {"dense+adamw": 2 * 8 * V * D,
                                          "dense+ember": 2 * 4 * (V + D + 1),
                                          "dense+adafactor": 2 * 4 * (V + D)}[name]
    lev = {(p["name"], p["vocab"]): p for p in res["leviathan"]}
    assert "test_loss" not in lev[("reimpl", 256)]          # the failed point: reported missing
    assert res["budget"]["failed"] == [k for k in res["budget"]["failed"] if "lev-reimpl" in k]
    assert res["budget"]["failed"]
    p = lev[("preset", 256)]
    from models.leviathan import leviathan_param_count
    assert p["params"]["embedding"] == leviathan_param_count(256, D, seed_dim=32, modes=16)
    assert p["gap"]["n"] == 1 and p["gap_curve"]
    assert lev[("preset, 2 seeds", 256)]["gap"]["n"] == 2
    assert ("preset", 320) in lev and ("preset, 12 steps", 256) in lev
    md = (out / "results.md").read_text()
    assert "| dense+ember | 256 |" in md and "Failed: " in md

    # a rerun resumes: nothing is trained again, the failed point is not retried
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tune " not in proc.stdout and "FAILED" not in proc.stdout
    assert json.loads((out / "results.json").read_text())["arms"] == res["arms"]


def test_spec_key_names_what_differs():
    base = dict(embedding="dense", tables="ember", vocab=4096, table_lr=0.03, body_lr=3e-3,
                steps=300, seed=1)
    assert spec_key(base) == "dense_ember_V4096_tlr0.03_blr0.003_T300_s1"
    lev = dict(base, embedding="leviathan", tables="adamw", variant="spec", iso=True,
               gen_lr=0.01, gen_wd=0.0)
    assert spec_key(lev) == "lev-spec-iso_adamw_V4096_tlr0.03_glr0.01_gwd0_blr0.003_T300_s1"
    assert (spec_key(dict(base, table_beta2=0.95))
            == "dense_ember_V4096_tlr0.03_b20.95_blr0.003_T300_s1")
