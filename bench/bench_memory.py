"""What Ember and Leviathan buy in memory: the project's GPT in a real DeepSpeed engine, per rank.

For each preset (default ``tiny`` and ``60m``) and each arm

  dense + AdamW        ds_configs/adamw_zero1_fp32.json, the dense V x D input table
  dense + Ember        ds_configs/ember_zero1_fp32.json (Ember on both tables, AdamW on the body)
  Leviathan + AdamW    the input table replaced by Leviathan's generator (spec defaults at 60m)
  Leviathan + Ember    ... and Ember on the (untied) output head

this builds the model and a DeepSpeed engine (ZeRO 1, fp32, one process over gloo), takes two
training steps so that every optimizer state exists, then saves a checkpoint, and reports:

  params        parameters of the model
  optim state   bytes of every optimizer state tensor on the rank (AdamW's exp_avg and
                exp_avg_sq; under Ember its r, c, s per table plus the body AdamW's moments)
  checkpoint    bytes ``engine.save_checkpoint`` wrote (weights, fp32 master, optimizer state)
  peak RSS      the process's peak resident memory over the whole run (each arm runs in its
                own process; it includes torch, DeepSpeed and the activations, the same for
                every arm of a preset)

ZeRO 1 over N data-parallel ranks splits AdamW's moments N ways; Ember's table state (4·(V+D+1)
bytes per table) stays whole on every rank, so the optimizer state per rank is about
(2·4·P_adamw) / N + 4·(V+D+1) per table, where P_adamw counts the parameters AdamW updates.
Prints a table with ratios to dense + AdamW and writes JSON.

    python bench/bench_memory.py                  # tiny and 60m -> bench/results/memory_cpu.json
    python bench/bench_memory.py --presets tiny --out r.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = {  # name -> (embedding, ds_config)
    "dense+AdamW": ("dense", "adamw_zero1_fp32.json"),
    "dense+Ember": ("dense", "ember_zero1_fp32.json"),
    "Leviathan+AdamW": ("leviathan", "adamw_zero1_fp32.json"),
    "Leviathan+Ember": ("leviathan", "ember_zero1_fp32.json"),
}


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state: torch's per-parameter state (AdamW's
    moments, Ember's body optimizer) plus Ember's table state, which Ember keeps apart."""
    import torch
    total = 0
    for st in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values()
                     if torch.is_tensor(v) and v.dim() > 0)
    for st in getattr(optimizer, "_table_state", {}).values():
        total += sum(st[k].numel() * st[k].element_size() for k in ("r", "c", "s"))
    return total


def one(preset: str, arm: str, micro: int, seq: int | None) -> dict:
    """One arm in this process: build, two steps, save; the measurements as a dict."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed
    import torch

    import ember_ds
    from launch.settings import finalize_ds_config, load_ds_config
    from models.gpt import GPT, GPTConfig
    from models.parallel import init_model_parallel

    embedding, config = ARMS[arm]
    ember_ds.disable_cpu_shm_build()
    init_model_parallel(1)
    overrides = dict(embedding=embedding)
    if seq:
        overrides["seq_length"] = seq
    cfg = GPTConfig.from_preset(preset, **overrides)
    model = GPT(cfg)
    ds = finalize_ds_config(load_ds_config(ROOT / "ds_configs" / config),
                            dict(micro=micro, accum=1, global_batch=micro, steps=100))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_length + 1), generator=g)
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).mean()
        engine.backward(loss)
        engine.step()
    basic = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") \
        else engine.optimizer
    tables = [tuple(p.shape) for p in getattr(basic, "token_tables", [])]
    folder = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        engine.save_checkpoint(str(folder), tag="t")
        ckpt = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return dict(preset=preset, arm=arm, embedding=embedding, ds_config=config,
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                seq_length=cfg.seq_length, micro_batch=micro,
                params=sum(p.numel() for p in model.parameters()),
                ember_tables=tables, optim_state_bytes=state_bytes(basic),
                checkpoint_bytes=ckpt,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_table(rows: list[dict]) -> str:
    head = (f"{'preset':>7} {'arm':>16} {'params':>12} {'optim state':>13} {'/ AdamW':>8} "
            f"{'checkpoint':>13} {'/ AdamW':>8} {'peak RSS':>12}")
    lines = [head, "-" * len(head)]
    base = {r["preset"]: r for r in rows if r["arm"] == "dense+AdamW"}
    for r in rows:
        b = base.get(r["preset"])
        so = f"{r['optim_state_bytes'] / b['optim_state_bytes']:.3f}" if b else "-"
        sc = f"{r['checkpoint_bytes'] / b['checkpoint_bytes']:.3f}" if b else "-"
        lines.append(f"{r['preset']:>7} {r['arm']:>16} {r['params']:>12,} "
                     f"{mib(r['optim_state_bytes']):>13} {so:>8} {mib(r['checkpoint_bytes']):>13} "
                     f"{sc:>8} {mib(r['peak_rss_bytes']):>12}")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "60m"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--micro", type=int, default=1, help="micro batch (default 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_cpu.json"))
    p.add_argument("--one", nargs=2, metavar=("PRESET", "ARM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # a child: one arm, its result as the last line of stdout
        print(json.dumps(one(*args.one, args.micro, args.seq)))
        return 0
    rows = []
    for preset in args.presets:
        for arm in args.arms:
            cmd = [sys.executable, __file__, "--one", preset, arm, "--micro", str(args.micro)]
            if args.seq:
                cmd += ["--seq", str(args.seq)]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + len(rows)),
                       RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"bench_memory: {preset} {arm} failed (exit {proc.returncode})")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {preset} {arm}: params {r['params']:,}, optim state "
                  f"{mib(r['optim_state_bytes'])}, checkpoint {mib(r['checkpoint_bytes'])}, "
                  f"peak RSS {mib(r['peak_rss_bytes'])}", flush=True)
    text = print_table(rows)
    meta = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=platform.machine(),
                python=platform.python_version(), loadavg=list(os.getloadavg()),
                zero_stage=1, dtype="fp32", data_parallel=1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows, table=text), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
