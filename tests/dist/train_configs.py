"""Rank script (torchrun): a short launch/train.py run from each ds_config named on the command
line, all in one process group, then optionally the first again with TP = 2 (DP = 1, with twice
the gradient accumulation, so the global batch is the same samples as with DP = 2).

    train_configs.py OUT_DIR CACHE DATA [--tp2] CONFIG.json ... -- TRAIN_ARGS...

Writes, per rank, a list of {config, tp, summary} (summary: train.main's return value).
"""
import os
import sys

from _common import finish  # noqa: E402  (puts the repository root on sys.path)

from launch import train  # noqa: E402


def main():
    argv = sys.argv[1:]
    out, cache, data = argv[:3]
    rest = argv[3:]
    split = rest.index("--")
    configs, extra = rest[:split], rest[split + 1:]
    tp2 = "--tp2" in configs
    configs = [c for c in configs if c != "--tp2"]
    results = []
    runs = [(c, 1) for c in configs] + ([(configs[0], 2)] if tp2 else [])
    for cfg, tp in runs:
        name = os.path.splitext(os.path.basename(cfg))[0]
        summary = train.main(["--deepspeed_config", cfg, "--tp", str(tp), "--data", data,
                              "--cache-dir", cache, "--out", os.path.join(out, f"{name}-tp{tp}"),
                              "--no-progress", *extra,
                              # same global batch as TP 1 with 2 data-parallel ranks
                              *(["--ds", "gradient_accumulation_steps=2"] if tp == 2 else [])])
        results.append({"config": name, "tp": tp, "summary": summary})
    finish(results)


if __name__ == "__main__":
    main()
