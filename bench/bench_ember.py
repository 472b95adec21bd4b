"""Ember's token-table step against torch AdamW (foreach default and fused), per table size.

For each table size V x D (fp32 weights by default) this times one optimizer step with a fixed
dense gradient:
  ember        ember_ds.Ember([{"params": [w], "token_table": True}], lr=...).step(), on CPU
               with the fused C++ passes (ember_ds.cpu_fused) when they build
  ember_torch  the same optimizer on the plain torch path (EMBER_DS_CPU_FUSED=0; CPU only)
  adamw        torch.optim.AdamW(lr=...)             (default implementation: foreach)
  adamw_fused  torch.optim.AdamW(lr=..., fused=True)
  ember_graph, adamw_fused_graph  (``--cuda-graph``, CUDA) Ember's step and fused AdamW's
               (capturable=True) each captured once in a CUDA graph and replayed: the step
               without Python and launch overhead (Ember's device step makes no host read,
               so it captures)

with 1 thread and with every core (``--threads 1,all``), and reports the median step time
(candidates are timed in interleaved rounds, one step each, order rotated, so load from other
processes hits all alike), Ember / AdamW ratios (of the medians, and the median and spread of
same-round ratios), optimizer state bytes (the actual state tensors: Ember's r, c, s; AdamW's
exp_avg + exp_avg_sq) and the peak extra memory during one steady-state step (CUDA:
max_memory_allocated minus the allocation before the step; CPU: the high-water mark of the
allocation / free events torch.profiler records with profile_memory=True, plus the fused C++
path's own column-partial scratch, which torch does not see). Targets (issue 13): Ember's state
is exactly 4*(V+D+1) bytes per table, its peak step transient is <= 1/8 of the table's fp32
size, and its step takes <= 0.7x fused AdamW's time on CPU (<= 0.6x on GPU).

``--sweep`` adds how cost grows: step time of ember, ember_torch, adamw_fused and adamw over
table sizes V*D from 2^20 to 2^27 (two orders of magnitude), the bytes each moves per step
(Ember: reads G twice, reads and writes W: 4 V*D elements; AdamW: reads G, W, m, v and writes
W, m, v: 7), hence its achieved bandwidth, against the machine's, measured in the same rounds
by a plain tensor copy of the same size (reads and writes V*D: 2). JSON and a PNG plot.

    python bench/bench_ember.py                       # 32000x512, 50304x768, 131072x1024; 1 and all threads
    python bench/bench_ember.py --sweep               # ... and the size sweep (+ plot)
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

from ember_ds import Ember, cpu_fused, factored  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = [(32000, 512), (50304, 768), (131072, 1024)]
# the sweep: V*D from 2^20 to 2^27
SWEEP_SIZES = [(4096, 256), (8192, 512), (16384, 1024), (32768, 1024), (65536, 1024),
               (131072, 1024)]
# elements of V*D each step reads + writes (algorithmic, fp32 state): Ember reads G twice and
# reads and writes W; AdamW reads G, W, m, v and writes W, m, v; a copy reads and writes once
PASSES = {"ember": 4, "ember_torch": 4, "adamw": 7, "adamw_fused": 7, "copy": 2}
LR, BETA2, EPS = 1e-3, 0.999, 1e-8


# ----------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok:
            v, d = tok.split("x")
            out.append((int(v), int(d)))
    return out


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_threads(text: str) -> list[int]:
    return [all_cores() if t.strip() == "all" else int(t) for t in text.split(",") if t.strip()]


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory torch allocates during ``fn()`` above what was allocated before it."""
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


def paired(times: dict, name: str, other: str) -> dict:
    """Median and quartiles of the same-round ratios name / other."""
    r = sorted(x / y for x, y in zip(times[name], times[other]))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return dict(median=statistics.median(r), q1=q[0], q3=q[2])


# ----------------------------------------------------------------------------- candidates
def on_torch_path(step):
    """``step`` with the fused CPU passes switched off (EMBER_DS_CPU_FUSED=0 while it runs)."""
    def run():
        old = os.environ.get(cpu_fused.ENV)
        os.environ[cpu_fused.ENV] = "0"
        try:
            step()
        finally:
            if old is None:
                del os.environ[cpu_fused.ENV]
            else:
                os.environ[cpu_fused.ENV] = old
    return run


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


def fused_cpu(w: torch.Tensor) -> bool:
    """Whether Ember steps ``w`` with the fused C++ passes."""
    return w.device.type == "cpu" and cpu_fused.use_for_update(w, w, w[0], w[0])


def captured(step):
    """``step`` recorded once into a CUDA graph (after two eager warm-up steps that create the
    state on a side stream, as torch's docs ask); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def make_candidates(w: torch.Tensor, names=("ember", "ember_torch", "adamw", "adamw_fused"),
                    cuda_graph: bool = False):
    """name -> (step fn, state-bytes fn, scratch bytes torch does not see). All share ``w`` and
    its gradient (the weights drift under several optimizers at once, which does not change the
    work a step does). ``cuda_graph`` (CUDA): also ember_graph and adamw_fused_graph, each step
    captured in a CUDA graph (AdamW with capturable=True), what a graph-captured training step
    pays without Python and launch overhead."""
    out = {}
    if cuda_graph and w.is_cuda:
        e = Ember([{"params": [w], "token_table": True}], lr=LR, beta2=BETA2, eps=EPS)
        out["ember_graph"] = (captured(e.step), (lambda o=e: ember_state_bytes(o)), 0)
        a = torch.optim.AdamW([w], lr=LR, fused=True, capturable=True)
        out["adamw_fused_graph"] = (captured(a.step), (lambda o=a: adam_state_bytes(o)), 0)
    V, D = w.shape
    scratch = cpu_fused.scratch_bytes(V, D) if fused_cpu(w) else 0
    for name in names:
        if name in ("ember", "ember_torch"):
            if name == "ember_torch" and w.device.type != "cpu":
                continue
            opt = Ember([{"params": [w], "token_table": True}], lr=LR, beta2=BETA2, eps=EPS)
            step = opt.step if name == "ember" else on_torch_path(opt.step)
            out[name] = (step, (lambda o=opt: ember_state_bytes(o)),
                         scratch if name == "ember" else 0)
        elif name in ("adamw", "adamw_fused"):
            a = torch.optim.AdamW([w], lr=LR, fused=name == "adamw_fused")
            out[name] = (a.step, (lambda o=a: adam_state_bytes(o)), 0)
        elif name == "copy":
            buf = torch.empty_like(w.grad)
            out[name] = ((lambda b=buf: b.copy_(w.grad)), (lambda: 0), 0)
    return out


# ----------------------------------------------------------------------------- main table
def make_table(V: int, D: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Parameter:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(V, D, device=device).mul_(0.02).to(dtype))
    w.grad = torch.randn(V, D, device=device).mul_(1e-3).to(dtype)
    return w


def bench_size(V: int, D: int, device: torch.device, dtype: torch.dtype, args) -> dict:
    w = make_table(V, D, device, dtype)
    table_fp32 = 4 * V * D
    res = dict(V=V, D=D, dtype=str(dtype).replace("torch.", ""), table_fp32_bytes=table_fp32,
               threads=torch.get_num_threads(), ember_fused_cpu=fused_cpu(w), results={})
    cands = make_candidates(w, cuda_graph=args.cuda_graph)
    times = time_interleaved({n: c[0] for n, c in cands.items()}, device, args.warmup,
                             args.min_reps, args.max_reps, args.seconds)
    for name, (step, state_fn, scratch) in cands.items():
        ts = times[name]
        peak = None if args.no_memory else peak_extra_bytes(step, device) + scratch
        r = dict(median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), reps=len(ts),
                 state_bytes=int(state_fn()), peak_extra_bytes=peak)
        res["results"][name] = r
        print(f"  {V}x{D} threads={res['threads']} {name:12s} median {r['median_ms']:9.2f} ms"
              f"  min {r['min_ms']:9.2f} ms  (n={len(ts)})", flush=True)
    expected_state = 4 * (V + D + 1)
    rs = res["results"]
    limit = 0.35 if device.type == "cuda" else 0.7      # issue 20 on a GPU, issue 13 on CPU
    for name in ("ember", "ember_torch", "ember_graph"):
        if name not in rs:
            continue
        e = rs[name]
        e["expected_state_bytes"] = expected_state
        # each Ember against AdamW run the same way (the graph against the graph)
        others = ("adamw_fused_graph",) if name == "ember_graph" else ("adamw", "adamw_fused")
        for other in others:
            e[f"ratio_vs_{other}"] = e["median_ms"] / rs[other]["median_ms"]
            # same-round ratios (robust to load that changes over time), with their spread
            e[f"paired_ratio_vs_{other}"] = paired(times, name, other)
        e["targets"] = dict(
            state_exact=e["state_bytes"] == expected_state,
            peak_le_eighth=None if e["peak_extra_bytes"] is None
            else e["peak_extra_bytes"] <= table_fp32 / 8,
            time=e[f"paired_ratio_vs_{others[-1]}"]["median"] <= limit)
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
    target = "<=0.35x fused" if device.type == "cuda" else "<=0.7x fused"
    head = (f"{'table':>12} {'thr':>3} {'optimizer':>17} {'median ms':>10} {'min ms':>9} "
            f"{'/AdamW':>7} {'/fused':>7} {'pair/F [q1, q3]':>19} {'state':>11} "
            f"{'peak extra':>11} {'peak/table':>10}  targets(state, peak<=1/8, time {target})")
    lines = [head, "-" * len(head)]
    for res in rows:
        for name, r in res["results"].items():
            ratio_a = f"{r['ratio_vs_adamw']:.2f}" if "ratio_vs_adamw" in r else ""
            fused = ("ratio_vs_adamw_fused_graph" if name == "ember_graph"
                     else "ratio_vs_adamw_fused")       # the graph against the graph
            ratio_f = f"{r[fused]:.2f}" if fused in r else ""
            pf = r.get("paired_" + fused)
            pair_f = f"{pf['median']:.2f} [{pf['q1']:.2f}, {pf['q3']:.2f}]" if pf else ""
            pk = r["peak_extra_bytes"]
            frac = "-" if pk is None else f"{pk / res['table_fp32_bytes']:.4f}"
            tg = ""
            if "targets" in r:
                tg = "  " + " ".join("ok" if v else ("-" if v is None else "MISS")
                                     for v in r["targets"].values())
            lines.append(f"{str(res['V']) + 'x' + str(res['D']):>12} {res['threads']:>3} "
                         f"{name:>17} {r['median_ms']:10.2f} {r['min_ms']:9.2f} {ratio_a:>7} "
                         f"{ratio_f:>7} {pair_f:>19} {fmt_bytes(r['state_bytes']):>11} "
                         f"{fmt_bytes(pk):>11} {frac:>10}{tg}")
    text = "\n".join(lines)
    print(text)
    return text


# ----------------------------------------------------------------------------- sweep
def sweep(sizes, device: torch.device, dtype: torch.dtype, args) -> list[dict]:
    """Step time and bytes moved per second of each candidate and of a plain copy, per size."""
    out = []
    el = torch.empty(0, dtype=dtype).element_size()
    names = ("ember", "ember_torch", "adamw_fused", "adamw", "copy")
    for V, D in sizes:
        w = make_table(V, D, device, dtype)
        cands = make_candidates(w, names)
        times = time_interleaved({n: c[0] for n, c in cands.items()}, device, 1,
                                 args.min_reps, args.max_reps, args.sweep_seconds)
        row = dict(V=V, D=D, elements=V * D, threads=torch.get_num_threads(), results={})
        for name, ts in times.items():
            med = statistics.median(ts)
            # bytes: the table and its gradient in ``dtype``, Adam's m and v in fp32
            nbytes = V * D * (3 * el + 4 * 4 if name.startswith("adamw") else PASSES[name] * el)
            row["results"][name] = dict(median_ms=1e3 * med, reps=len(ts), bytes=nbytes,
                                        gbytes_per_s=nbytes / med / 1e9)
        copy_bw = row["results"]["copy"]["gbytes_per_s"]
        for name in names:
            row["results"][name]["fraction_of_copy_bandwidth"] = \
                row["results"][name]["gbytes_per_s"] / copy_bw
        row["ember_vs_adamw_fused"] = paired(times, "ember", "adamw_fused")
        out.append(row)
        r = row["results"]
        print(f"  sweep {V}x{D} ({V * D / 2**20:.0f}M) threads={row['threads']}: " + "  ".join(
            f"{n} {r[n]['median_ms']:.2f} ms {r[n]['gbytes_per_s']:.1f} GB/s" for n in names),
            flush=True)
        del w, cands, times
        gc.collect()
    return out


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["elements"] for r in rows]
    for name in ("ember", "ember_torch", "adamw_fused", "adamw", "copy"):
        ms = [r["results"][name]["median_ms"] for r in rows]
        bw = [r["results"][name]["gbytes_per_s"] for r in rows]
        style = "--" if name == "copy" else "-"
        ax1.plot(x, ms, style, marker="o", label=name)
        ax2.plot(x, bw, style, marker="o", label=name)
    ax1.set(xscale="log", yscale="log", xlabel="table size V*D (elements)",
            ylabel="step time (ms)", title="step time")
    ax2.set(xscale="log", xlabel="table size V*D (elements)",
            ylabel="bytes moved per second (GB/s)",
            title="achieved bandwidth (algorithmic bytes / step time)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_meta(device: torch.device) -> dict:
    name = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f
                             if ln.startswith("model name")), name)
        except OSError:
            pass
    return dict(device=name, cores=all_cores(), torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(),
                loadavg_start=list(os.getloadavg()), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                ember_cpu_path=cpu_fused.describe() if device.type == "cpu" else "triton")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated VxD list (default: 32000x512,50304x768,131072x1024)")
    p.add_argument("--threads", default="1,all",
                   help="CPU thread counts to run every size with (default 1,all)")
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
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: also each step captured in a CUDA graph (ember_graph vs "
                        "adamw_fused_graph); ignored on CPU")
    p.add_argument("--sweep", action="store_true", help="also the size sweep (JSON + PNG)")
    p.add_argument("--sweep-only", action="store_true", help="only the size sweep")
    p.add_argument("--sweep-sizes", type=parse_sizes, default=SWEEP_SIZES)
    p.add_argument("--sweep-threads", default="all")
    p.add_argument("--sweep-seconds", type=float, default=1.0)
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/ember_<device>.json; the sweep "
                        "writes ember_sweep_<device>.json and .png beside it)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sizes = args.sizes or DEFAULT_SIZES
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"ember_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = machine_meta(device)
    meta.update(dtype=args.dtype, lr=LR, beta2=BETA2, eps=EPS)
    threads = parse_threads(args.threads) if device.type == "cpu" else [torch.get_num_threads()]
    print(f"device={meta['device']} dtype={args.dtype} torch={torch.__version__} "
          f"threads={threads} sizes={sizes} load={meta['loadavg_start']}\n"
          f"{meta['ember_cpu_path']}", flush=True)
    saved = torch.get_num_threads()
    try:
        if not args.sweep_only:
            rows = []
            for n in threads:
                torch.set_num_threads(n)
                rows += [bench_size(V, D, device, dtype, args) for V, D in sizes]
            text = print_table(rows, device)
            meta["loadavg_end"] = list(os.getloadavg())
            out.write_text(json.dumps(dict(meta=meta, sizes=rows, table=text), indent=2) + "\n")
            print(f"wrote {out}")
        if args.sweep or args.sweep_only:
            result = []
            for n in (parse_threads(args.sweep_threads) if device.type == "cpu"
                      else [torch.get_num_threads()]):
                torch.set_num_threads(n)
                result += sweep(args.sweep_sizes, device, dtype, args)
            smeta = dict(meta, loadavg_end=list(os.getloadavg()), passes=PASSES)
            sout = out.with_name(out.name.replace("ember_", "ember_sweep_", 1))
            sout.write_text(json.dumps(dict(meta=smeta, sweep=result), indent=2) + "\n")
            plot_sweep(result, sout.with_suffix(".png"),
                       f"Ember vs AdamW table step, {args.dtype}, {meta['device']}, "
                       f"{sorted({r['threads'] for r in result})} thread(s), {meta['time']}, "
                       f"load {meta['loadavg_start'][0]:.1f}")
            print(f"wrote {sout} and {sout.with_suffix('.png')}")
    finally:
        torch.set_num_threads(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
