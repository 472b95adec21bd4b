"""Ember's token-table step against torch AdamW (foreach default and fused), per table size.

For each table size V x D (fp32 weights by default) this times one optimizer step with a fixed
dense gradient:
  ember_math   Ember's per-table math for an unsharded table, exactly as the optimizer does it:
               ember_ds.factored.piece_stats on the whole table into zero rowsum/colsum, the
               r/c/s EMA with bias correction, ember_ds.factored.piece_update
  ember        ember_ds.Ember([{"params": [w], "token_table": True}], lr=...).step()
               (when ember_ds.Ember exists)
  adamw        torch.optim.AdamW(lr=...)             (default implementation: foreach)
  adamw_fused  torch.optim.AdamW(lr=..., fused=True)

and reports the median step time (candidates are timed in interleaved rounds, one step each,
order rotated, so load from other processes hits all alike), Ember / AdamW ratios (of the
medians, and the median of same-round ratios), optimizer state bytes (the actual state
tensors: Ember's r, c, s; AdamW's exp_avg + exp_avg_sq) and the peak extra memory during one
steady-state step (CUDA: max_memory_allocated minus the allocation before the step; CPU: the
high-water mark of the allocation / free events torch.profiler records with
profile_memory=True). Targets (from the issue): Ember's state is exactly 4*(V+D+1) bytes per
table, its peak step transient is <= 1/8 of the table's fp32 size, and its step takes <= 0.7x
AdamW's time on CPU (<= 0.6x fused AdamW's on GPU).

    python bench/bench_ember.py                       # 32000x512, 50304x768, largest that fits
    python bench/bench_ember.py --sizes 32000x512,50304x768 --device cuda --out r.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ember_ds import factored  # noqa: E402

try:
    from ember_ds import Ember  # noqa: E402
except ImportError:  # the optimizer class is not there yet: time the math only
    Ember = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = [(32000, 512), (50304, 768)]
# candidates for "the largest that fits", biggest first
LARGE_CANDIDATES = [(262144, 8192), (262144, 4096), (131072, 4096), (131072, 2048),
                    (131072, 1024), (65536, 1024), (65536, 768)]
LR, BETA2, EPS = 1e-3, 0.999, 1e-8


# ----------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def largest_fitting(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """Largest candidate that fits comfortably: weights + grad + two AdamW states (foreach and
    fused, alive together: 4 fp32 tables) + foreach AdamW's table-sized temporaries + slack,
    in at most half of the free memory (CPU: also keep a step to a few seconds on one core)."""
    el = torch.empty(0, dtype=dtype).element_size()
    budget = free_bytes(device) // 2
    for V, D in LARGE_CANDIDATES:
        n = V * D
        if device.type == "cpu" and n > (1 << 27):  # 134M elements: ~1-3 s per CPU step
            continue
        need = n * (2 * el + 6 * 4) + (256 << 20)
        if need <= budget:
            return V, D
    return LARGE_CANDIDATES[-1]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok:
            v, d = tok.split("x")
            out.append((int(v), int(d)))
    return out


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory allocated during ``fn()`` above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda x: x[0])
    cur = peak = 0
    for _, nb in events:
        cur += nb
        peak = max(peak, cur)
    return int(peak)


def time_interleaved(steps: dict, device: torch.device, warmup: int, min_reps: int,
                     max_reps: int, target_s: float) -> dict:
    """Time one step of each candidate per round, rotating the order every round, so that
    load from other processes on a shared machine hits every candidate alike. Returns
    name -> list of seconds (one per round)."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync(device)
    times = {n: [] for n in names}
    t_end = time.perf_counter() + target_s * len(names)
    rnd = 0
    while rnd < max_reps and (rnd < min_reps or time.perf_counter() < t_end):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rnd += 1
    return times


# ----------------------------------------------------------------------------- candidates
class EmberMath:
    """Ember's table step for one unsharded table, as ember_ds.Ember does it (normalize=rows,
    weight decay 0): stats pass, state EMA, update pass."""

    def __init__(self, w: torch.Tensor, lr=LR, beta2=BETA2, eps=EPS, weight_decay=0.0):
        V, D = w.shape
        self.w, self.lr, self.b2, self.eps = w, lr, beta2, eps
        self.decay = 1.0 - lr * weight_decay
        dev = w.device
        self.state = dict(r=torch.zeros(V, device=dev), c=torch.zeros(D, device=dev),
                          s=torch.zeros(1, device=dev))
        self.t = 0

    @torch.no_grad()
    def step(self):
        w, g = self.w, self.w.grad
        V, D = w.shape
        rowsum = torch.zeros(V, dtype=torch.float32, device=w.device)
        colsum = torch.zeros(D, dtype=torch.float32, device=w.device)
        factored.piece_stats(g, rowsum, colsum)
        st, b2 = self.state, self.b2
        self.t += 1
        bc = 1.0 - b2 ** self.t
        st["r"].mul_(b2).add_(rowsum, alpha=(1.0 - b2) / D)
        st["c"].mul_(b2).add_(colsum / V, alpha=1.0 - b2)
        st["s"].mul_(b2).add_(colsum.sum() / (V * D), alpha=1.0 - b2)
        row_f = (st["r"] / (st["s"].clamp_min(1e-30) * bc)).sqrt_()
        col_f = st["c"].sqrt()
        factored.piece_update(w.data, g, row_f, col_f, self.lr, self.eps, self.decay)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def ember_state_bytes(opt) -> int:
    total = 0
    for st in getattr(opt, "_table_state", {}).values():
        total += sum(st[k].numel() * st[k].element_size() for k in ("r", "c", "s"))
    return total


def adam_state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                total += st[k].numel() * st[k].element_size()
    return total


def make_candidates(w: torch.Tensor, include_ember_opt: bool) -> dict:
    """name -> (step fn, state-bytes fn). All share ``w`` and its gradient (the weights drift
    under four optimizers at once, which does not change the work a step does)."""
    out = {}
    m = EmberMath(w)
    out["ember_math"] = (m.step, m.state_bytes)
    if include_ember_opt and Ember is not None:
        opt = Ember([{"params": [w], "token_table": True}], lr=LR, beta2=BETA2, eps=EPS)
        out["ember"] = (opt.step, lambda: ember_state_bytes(opt))
    a = torch.optim.AdamW([w], lr=LR)
    out["adamw"] = (a.step, lambda: adam_state_bytes(a))
    f = torch.optim.AdamW([w], lr=LR, fused=True)
    out["adamw_fused"] = (f.step, lambda: adam_state_bytes(f))
    return out


# ----------------------------------------------------------------------------- main
def bench_size(V: int, D: int, device: torch.device, dtype: torch.dtype, args) -> dict:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(V, D, device=device).mul_(0.02).to(dtype))
    w.grad = torch.randn(V, D, device=device).mul_(1e-3).to(dtype)
    table_fp32 = 4 * V * D
    res = dict(V=V, D=D, dtype=str(dtype).replace("torch.", ""), table_fp32_bytes=table_fp32,
               results={})
    cands = make_candidates(w, not args.no_ember_opt)
    times = time_interleaved({n: c[0] for n, c in cands.items()}, device, args.warmup,
                             args.min_reps, args.max_reps, args.seconds)
    for name, (step, state_fn) in cands.items():
        ts = times[name]
        peak = peak_extra_bytes(step, device) if not args.no_memory else None
        r = dict(median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), reps=len(ts),
                 state_bytes=int(state_fn()), peak_extra_bytes=peak)
        res["results"][name] = r
        print(f"  {V}x{D} {name:12s} median {r['median_ms']:9.2f} ms  min {r['min_ms']:9.2f} ms"
              f"  (n={len(ts)})", flush=True)
    expected_state = 4 * (V + D + 1)
    rs = res["results"]
    for name in ("ember", "ember_math"):
        if name not in rs:
            continue
        e = rs[name]
        e["expected_state_bytes"] = expected_state
        e["ratio_vs_adamw"] = e["median_ms"] / rs["adamw"]["median_ms"]
        e["ratio_vs_adamw_fused"] = e["median_ms"] / rs["adamw_fused"]["median_ms"]
        # same-round ratios (robust to load that changes over time); medians of them
        for other in ("adamw", "adamw_fused"):
            e[f"paired_ratio_vs_{other}"] = statistics.median(
                x / y for x, y in zip(times[name], times[other]))
        if device.type == "cuda":
            time_ok = e["ratio_vs_adamw_fused"] <= 0.6
        else:
            time_ok = e["ratio_vs_adamw"] <= 0.7
        e["targets"] = dict(
            state_exact=e["state_bytes"] == expected_state,
            peak_le_eighth=None if e["peak_extra_bytes"] is None
            else e["peak_extra_bytes"] <= table_fp32 / 8,
            time=time_ok)
    del w, cands, times
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: list[dict], device: torch.device) -> str:
    target = "<=0.6x fused" if device.type == "cuda" else "<=0.7x AdamW"
    head = (f"{'table':>12} {'optimizer':>12} {'median ms':>10} {'min ms':>9} {'/AdamW':>7} "
            f"{'/fused':>7} {'pair/A':>7} {'pair/F':>7} "
            f"{'state':>11} {'peak extra':>11} {'peak/table':>10}  targets(state, peak<=1/8, "
            f"time {target})")
    lines = [head, "-" * len(head)]
    for res in rows:
        for name, r in res["results"].items():
            ratio_a = f"{r['ratio_vs_adamw']:.2f}" if "ratio_vs_adamw" in r else ""
            ratio_f = f"{r['ratio_vs_adamw_fused']:.2f}" if "ratio_vs_adamw_fused" in r else ""
            pair_a = f"{r['paired_ratio_vs_adamw']:.2f}" if "paired_ratio_vs_adamw" in r else ""
            pair_f = (f"{r['paired_ratio_vs_adamw_fused']:.2f}"
                      if "paired_ratio_vs_adamw_fused" in r else "")
            pk = r["peak_extra_bytes"]
            frac = "-" if pk is None else f"{pk / res['table_fp32_bytes']:.4f}"
            tg = ""
            if "targets" in r:
                tg = "  " + " ".join("ok" if v else ("-" if v is None else "MISS")
                                     for v in r["targets"].values())
            lines.append(f"{str(res['V']) + 'x' + str(res['D']):>12} {name:>12} "
                         f"{r['median_ms']:10.2f} {r['min_ms']:9.2f} {ratio_a:>7} {ratio_f:>7} "
                         f"{pair_a:>7} {pair_f:>7} "
                         f"{fmt_bytes(r['state_bytes']):>11} {fmt_bytes(pk):>11} {frac:>10}{tg}")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated VxD list (default: 32000x512,50304x768 and the "
                        "largest candidate that fits)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weight and gradient dtype (state is fp32 regardless)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--seconds", type=float, default=3.0,
                   help="time rounds (one step of every candidate, order rotated) until "
                        "this many seconds per candidate have passed, or --max-reps rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-ember-opt", action="store_true",
                   help="time only the math, not the ember_ds.Ember optimizer")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/ember_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sizes = args.sizes or DEFAULT_SIZES + [largest_fitting(device, dtype)]
    print(f"device={device} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} sizes={sizes} "
          f"triton_path={device.type == 'cuda' and factored._use_triton(torch.empty(0, device=device))}",
          flush=True)
    rows = [bench_size(V, D, device, dtype, args) for V, D in sizes]
    text = print_table(rows, device)

    dev_name = device.type
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device).replace(" ", "_")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"ember_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=dev_name, torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(), machine=platform.machine(),
                processor=platform.processor(), dtype=args.dtype, lr=LR, beta2=BETA2, eps=EPS,
                ember_optimizer=Ember is not None and not args.no_ember_opt,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out.write_text(json.dumps(dict(meta=meta, sizes=rows, table=text), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
