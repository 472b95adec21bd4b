"""What checkpoint manifests (size and CRC-32 of every file, written before ``latest`` moves) cost a save.

Builds the ``tiny`` GPT preset (Leviathan embedding, Ember, ZeRO 1, fp32: the quick start's
set-up, vocabulary 8192) in one process, takes a few training steps so the optimizer state is
real, then times launch/checkpoint.py's ``Checkpointer.save`` with and without the manifest (and
DeepSpeed's bare ``engine.save_checkpoint`` for scale), in interleaved rounds (so load from other processes hits both alike), and also times verifying
the manifest (what a resume adds). Prints a table and writes JSON.

    python bench/bench_checkpoint.py                       # 21 rounds -> bench/results/checkpoint_cpu.json
    python bench/bench_checkpoint.py --rounds 30 --embedding dense --out r.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--embedding", choices=("leviathan", "dense"), default="leviathan")
    ap.add_argument("--dir", default=None, help="where to save (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_cpu.json"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed
    import torch
    import torch.distributed as dist

    import ember_ds
    from launch.checkpoint import Checkpointer, rng_state
    from launch.settings import finalize_ds_config, load_ds_config
    from models.gpt import GPT, GPTConfig
    from models.parallel import init_model_parallel

    ember_ds.disable_cpu_shm_build()
    init_model_parallel(1)
    cfg = GPTConfig.from_preset("tiny", embedding=a.embedding)
    model = GPT(cfg)
    ds = finalize_ds_config(load_ds_config(ROOT / "ds_configs" / "ember_zero1_fp32.json"),
                            dict(micro=8, accum=1, global_batch=8, steps=100))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (8, cfg.seq_length + 1), generator=g)
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).mean()
        engine.backward(loss)
        engine.step()
    base = Path(a.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    savers = {m: Checkpointer(base / m, engine, 0, 1, dist, keep=1, manifest=m == "manifest",
                              log=lambda s: None) for m in ("plain", "manifest")}
    state = {"step": 1, "train_loss": 1.0, "val_loss": 1.0}
    times = {m: [] for m in [*savers, "deepspeed"]}
    verify = []

    def bare(step):                        # DeepSpeed's own save alone (no fsync, no manifest)
        shutil.rmtree(base / "deepspeed", ignore_errors=True)
        engine.save_checkpoint(str(base / "deepspeed"), tag=f"step{step}", save_latest=True)
    for r in range(a.rounds + 1):                         # round 0 warms up
        order = [*savers, "deepspeed"]
        order = order[r % 3:] + order[:r % 3]
        for m in order:
            t0 = time.perf_counter()
            if m == "deepspeed":
                bare(r + 1)
                if r:
                    times[m].append(time.perf_counter() - t0)
                continue
            folder = savers[m].save(r + 1, {"step": r + 1}, state, rng_state)
            if r:
                times[m].append(time.perf_counter() - t0)
            if m == "manifest" and r:
                t0 = time.perf_counter()
                assert savers[m].verify(folder) == []
                verify.append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in folder.iterdir())
    med = {m: statistics.median(v) for m, v in times.items()}
    res = dict(
        what="Checkpointer.save of the tiny preset (ZeRO 1, fp32, 1 process), median of "
             f"{a.rounds} interleaved rounds",
        preset="tiny", embedding=a.embedding, params=sum(p.numel() for p in model.parameters()),
        checkpoint_bytes=size, files=len(list(folder.iterdir())),
        save_deepspeed_only_s=round(med["deepspeed"], 4),
        save_plain_s=round(med["plain"], 4), save_manifest_s=round(med["manifest"], 4),
        overhead_pct=round(100 * (med["manifest"] / med["plain"] - 1), 1),
        verify_s=round(statistics.median(verify), 4),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
        date=time.strftime("%Y-%m-%d"))
    if not a.dir:
        shutil.rmtree(base, ignore_errors=True)
    print("| checkpoint | engine.save_checkpoint alone | save (staged, fsync'ed, published), "
          "no manifest | same, with manifest | manifest overhead | verify on resume |")
    print("|---|---|---|---|---|---|")
    print(f"| {size / 2**20:.1f} MiB, {res['files']} files | {med['deepspeed'] * 1e3:.1f} ms | "
          f"{med['plain'] * 1e3:.1f} ms | "
          f"{med['manifest'] * 1e3:.1f} ms | {res['overhead_pct']:+.1f}% | "
          f"{res['verify_s'] * 1e3:.1f} ms |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
