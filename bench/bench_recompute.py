"""Activation recompute in the project's GPT: peak memory and step time against none.

    python bench/bench_recompute.py                          # CPU default shape
    python bench/bench_recompute.py --hidden 512 --layers 8 --seq 1024 --batch 4

Each mode ("none"; "attention": the attention core recomputed; "mlp": the MLP's gate/up and
SiLU recomputed; "full": every layer recomputed from its input) runs in its own fresh process, so peak memory is that process's
alone: on CUDA torch.cuda.max_memory_allocated during the steps; on CPU the peak resident set
(ru_maxrss) during the steps minus the resident set after the model, optimizer state and batch
exist (what the activations add). One step = forward + backward + AdamW step on a fixed batch;
the median of the timed steps after warm-up is reported. Ratios are against "none" in the same
run. Prints a table and writes JSON (default bench/results/recompute_<device>.json).

What it does not show: the saving with tensor/sequence parallelism (each rank holds 1/TP of
the activations either way), or with bf16 activations on a GPU unless run there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "attention", "mlp", "full")


def measure(args) -> dict:
    """One mode, in this process."""
    sys.path.insert(0, str(ROOT))
    import torch
    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = GPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, seq_length=args.seq, recompute=args.mode)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        model(ids[:, :-1], labels=ids[:, 1:]).mean().backward()
        opt.step()

    step()                                  # creates AdamW state and gradients: not activations
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(mode=args.mode, device=device, step_s=statistics.median(times),
                activation_bytes=max(peak - base, 0))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)   # child process
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)))
        return {}
    forwarded = [f"--{k}={getattr(args, k)}" for k in
                 ("vocab", "hidden", "layers", "heads", "seq", "batch", "steps", "warmup")]
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *forwarded, "--mode", mode],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    none = rows[0]
    print(f"GPT hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
          f"{rows[0]['device']}")
    print(f"{'recompute':<10} {'step':>9} {'vs none':>8} {'activations':>12} {'vs none':>8}")
    for r in rows:
        r["step_ratio"] = r["step_s"] / none["step_s"]
        r["memory_ratio"] = r["activation_bytes"] / max(none["activation_bytes"], 1)
        print(f"{r['mode']:<10} {r['step_s'] * 1e3:>7.0f}ms {r['step_ratio']:>7.2f}x "
              f"{r['activation_bytes'] / 2**20:>9.0f}MiB {r['memory_ratio']:>7.2f}x")
    result = dict(date=datetime.date.today().isoformat(), machine=platform.machine(),
                  processor=platform.processor(), shape=dict(
                      vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                      heads=args.heads, seq=args.seq, batch=args.batch), rows=rows)
    out = args.out or ROOT / "bench" / "results" / f"recompute_{rows[0]['device']}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
