"""What Ember and Leviathan buy: the side-by-side study (issue 5), rerunnable by users.

Grid {dense table, Leviathan} x {AdamW on the tables, Ember on the tables}, plus Leviathan
isoparametric (depth raised to spend the parameters the generator frees) and
torch.optim.Adafactor on the tables as a second factored baseline. Same body optimizer (AdamW),
same data order and token budget per seed, several seeds. Each run is a subprocess (clean peak
memory), single process, plain torch loop: the comparison is of optimizers and embeddings, not
of parallelism (the distributed paths are proven equal to this single-process math by tests).

    python bench/study.py --scale cpu            # ~40 min on 2 CPU cores
    python bench/study.py --scale gpu            # 60M preset, bf16 autocast, on one GPU
    python bench/study.py --scale smoke          # a minute: checks the pipeline end to end

Writes <out>/results.json, results.md, loss_curves.png, loss_by_frequency.png and one JSON per
run; docs/RESULTS.md reads them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {
    "dense-adamw": dict(embedding="dense", tables="adamw"),
    "dense-ember": dict(embedding="dense", tables="ember"),
    "leviathan-adamw": dict(embedding="leviathan", tables="adamw"),
    "leviathan-ember": dict(embedding="leviathan", tables="ember"),
    "leviathan-iso-adamw": dict(embedding="leviathan", tables="adamw", iso=True),
    "dense-adafactor": dict(embedding="dense", tables="adafactor"),
}

SCALES = {
    # micro-batch x seq tokens per step; lr for AdamW / Ember; Adafactor uses torch's default lr
    "smoke": dict(preset="tiny", vocab=1024, layers=2, steps=12, micro=4, seq=64, lr=3e-3,
                  eval_every=6, eval_windows=16, seeds=[0], arms=list(ARMS)),
    "cpu": dict(preset="tiny", vocab=4096, layers=4, steps=600, micro=16, seq=128, lr=3e-3,
                eval_every=50, eval_windows=128, seeds=[0, 1, 2], arms=list(ARMS)),
    "gpu": dict(preset="60m", vocab=32768, layers=None, steps=2000, micro=32, seq=512,
                lr=1e-3, eval_every=200, eval_windows=256, seeds=[0, 1, 2], arms=list(ARMS)),
}
BUCKETS = 5
BODY_WD = 0.1
BETAS = (0.9, 0.95)


# ------------------------------------------------------------------------------ one run
def build_model(scale: dict, arm: dict, vocab: int, seed: int):
    from models.gpt import GPT, GPTConfig
    over = dict(vocab_size=vocab, seq_length=scale["seq"], embedding=arm["embedding"],
                init_seed=1000 + seed)
    if scale["layers"]:
        over["num_layers"] = scale["layers"]
    if arm.get("iso"):
        over["num_layers"] = iso_layers(scale, vocab)
    return GPT(GPTConfig.from_preset(scale["preset"], **over))


def iso_layers(scale: dict, vocab: int) -> int:
    """Depth at which a Leviathan model spends the parameters its generator frees."""
    from models.gpt import GPTConfig
    from models.leviathan import leviathan_param_count
    cfg = GPTConfig.from_preset(scale["preset"], vocab_size=vocab, seq_length=scale["seq"],
                                **({"num_layers": scale["layers"]} if scale["layers"] else {}))
    D, F = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 4 * D * D + 3 * D * F + 2 * D           # attention, SwiGLU, two norms
    gen = {k: v for k, v in cfg.leviathan.items()
           if k in ("coords", "seed_dim", "heads", "knots", "modes")}
    freed = vocab * D - leviathan_param_count(vocab, D, **gen)
    return cfg.num_layers + max(0, round(freed / per_layer))


def make_optimizers(model, arm: dict, lr: float):
    """(optimizers to step, the tables' optimizer, the tables) for one arm."""
    import torch
    import ember_ds
    tables = ember_ds.tag_module_tables(model)
    table_ids = {id(p) for p in tables}
    body = [p for p in model.parameters() if id(p) not in table_ids]
    decay = [p for p in body if p.dim() >= 2]
    no_decay = [p for p in body if p.dim() < 2]
    body_groups = [dict(params=decay, weight_decay=BODY_WD), dict(params=no_decay, weight_decay=0.0)]
    if arm["tables"] == "adamw":
        opt = torch.optim.AdamW(body_groups + [dict(params=tables, weight_decay=0.0)], lr=lr,
                                betas=BETAS)
        return [opt], opt, tables
    if arm["tables"] == "ember":
        opt = ember_ds.Ember([dict(params=tables, token_table=True)] + body_groups, lr=lr,
                             body_betas=BETAS)
        return [opt], opt, tables
    if arm["tables"] == "adafactor":
        body_opt = torch.optim.AdamW(body_groups, lr=lr, betas=BETAS)
        tab_opt = torch.optim.Adafactor(tables)  # torch's defaults, lr 1e-2 (relative to RMS)
        return [body_opt, tab_opt], tab_opt, tables
    raise ValueError(arm["tables"])


def table_state_bytes(opt, tables) -> int:
    import torch
    import ember_ds
    if isinstance(opt, ember_ds.Ember):
        return ember_ds.state_bytes(opt)
    total = 0
    for p in tables:
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v) and v.numel() > 1:
                total += v.numel() * v.element_size()
    return total


def run_one(spec: dict) -> dict:
    import numpy as np
    import torch
    from launch.data import DataSettings, DeterministicSampler, TokenWindows, prepare_data

    scale, arm, seed = spec["scale"], ARMS[spec["arm"]], spec["seed"]
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", os.cpu_count() or 1)))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    prepared = prepare_data(None, settings=DataSettings(vocab_size=scale["vocab"]),
                            log=lambda m: None)
    train = TokenWindows(prepared.tokens("train"), scale["seq"], "train")
    valid = TokenWindows(prepared.tokens("valid"), scale["seq"], "valid")
    torch.manual_seed(seed)
    model = build_model(scale, arm, prepared.vocab_size, seed).to(device)
    optimizers, table_opt, tables = make_optimizers(model, arm, scale["lr"])
    steps, warm = scale["steps"], max(1, scale["steps"] // 10)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
        for o in optimizers]
    sampler = DeterministicSampler(len(train), seed, scale["micro"], 1, 1, 0)
    n_val = min(scale["eval_windows"], len(valid))
    counts = np.bincount(prepared.tokens("train"), minlength=prepared.vocab_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def evaluate(per_token=False):
        model.eval()
        losses, targets = [], []
        for i in range(0, n_val, scale["micro"]):
            x, y = valid.batch(range(i, min(n_val, i + scale["micro"])))
            with amp:
                losses.append(model(x.to(device), y.to(device)).float().cpu())
            targets.append(y)
        model.train()
        loss, tgt = torch.cat(losses).flatten(), torch.cat(targets).flatten()
        return (loss.mean().item(), loss, tgt) if per_token else loss.mean().item()

    curve = [(0, evaluate())]
    train_curve, train_time, tokens = [], 0.0, 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        x, y = train.batch(sampler.micro_batch_indices(step, 0))
        t0 = time.perf_counter()
        with amp:
            loss = model(x.to(device), y.to(device)).mean()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in optimizers:
            o.step()
        for s in sched:
            s.step()
        if cuda:
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        train_curve.append((step + 1, loss.item()))
        if (step + 1) % scale["eval_every"] == 0 and step + 1 < steps:
            curve.append((step + 1, evaluate()))
    final, per_tok, tgt = evaluate(per_token=True)
    curve.append((steps, final))

    # loss by token frequency: types ranked by training-set count, BUCKETS equal-size groups
    order = np.argsort(counts, kind="stable")          # rarest first
    bucket_of = np.empty(prepared.vocab_size, dtype=np.int64)
    bucket_of[order] = np.arange(prepared.vocab_size) * BUCKETS // prepared.vocab_size
    b = torch.from_numpy(bucket_of)[tgt]
    by_bucket = []
    for k in range(BUCKETS):
        sel = b == k
        by_bucket.append(dict(bucket=k, val_tokens=int(sel.sum()),
                              loss=per_tok[sel].mean().item() if sel.any() else None,
                              train_count_max=int(counts[order[(k + 1) * prepared.vocab_size // BUCKETS - 1]])))
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(arm=spec["arm"], seed=seed, val_loss=final, val_ppl=math.exp(final),
                params=model.param_counts(), layers=model.cfg.num_layers,
                table_state_bytes=table_state_bytes(table_opt, tables),
                tokens=tokens, tokens_per_s=tokens / train_time, peak_memory_bytes=peak,
                peak_memory_kind="cuda max allocated" if cuda else "process max RSS",
                val_curve=curve, train_curve=train_curve, loss_by_frequency=by_bucket,
                vocab=prepared.vocab_size, device=str(device))


# ------------------------------------------------------------------------------ the grid
def aggregate(runs: list) -> dict:
    import statistics as st

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return dict(mean=st.fmean(vals), spread=st.pstdev(vals) if len(vals) > 1 else 0.0,
                    n=len(vals))

    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        out[arm] = dict(
            val_loss=ms([r["val_loss"] for r in rs]), val_ppl=ms([r["val_ppl"] for r in rs]),
            tokens_per_s=ms([r["tokens_per_s"] for r in rs]),
            peak_memory_bytes=ms([r["peak_memory_bytes"] for r in rs]),
            table_state_bytes=rs[0]["table_state_bytes"], params=rs[0]["params"],
            layers=rs[0]["layers"],
            loss_by_frequency=[ms([r["loss_by_frequency"][k]["loss"] for r in rs])
                               for k in range(BUCKETS)])
    return out


def markdown(agg: dict, meta: dict) -> str:
    def f(m, fmt="{:.4f}"):
        return "n/a" if m is None else (fmt.format(m["mean"]) + " ± " + fmt.format(m["spread"]))

    lines = [f"Study at scale `{meta['scale']}`: {meta['date']}, {meta['machine']}, "
             f"{meta['steps']} steps x {meta['tokens_per_step']} tokens, seeds {meta['seeds']}, "
             f"vocabulary {meta['vocab']}.", "",
             "| arm | layers | params emb / body / head | table opt. state | val loss | val ppl | "
             "tokens/s | peak mem (MB) |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in agg.items():
        p = a["params"]
        lines.append(f"| {arm} | {a['layers']} | {p['embedding']:,} / {p['body']:,} / "
                     f"{p['head']:,} | {a['table_state_bytes']:,} B | {f(a['val_loss'])} | "
                     f"{f(a['val_ppl'], '{:.2f}')} | {f(a['tokens_per_s'], '{:.0f}')} | "
                     f"{f({k: v / 2**20 for k, v in a['peak_memory_bytes'].items() if k != 'n'}, '{:.0f}')} |")
    lines += ["", "Validation loss by token-frequency bucket (types ranked by training count, "
              f"{BUCKETS} equal groups, 0 = rarest):", "",
              "| arm | " + " | ".join(f"bucket {k}" for k in range(BUCKETS)) + " |",
              "|---|" + "---|" * BUCKETS]
    for arm, a in agg.items():
        lines.append(f"| {arm} | " + " | ".join(f(m, "{:.3f}") for m in a["loss_by_frequency"])
                     + " |")
    return "\n".join(lines) + "\n"


def plots(runs: list, agg: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, arm in enumerate(agg):
        for j, r in enumerate(x for x in runs if x["arm"] == arm):
            s, l = zip(*r["val_curve"])
            ax.plot(s, l, color=f"C{i}", alpha=0.8, label=arm if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss per arm (one line per seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / len(agg)
    for i, (arm, a) in enumerate(agg.items()):
        means = [m["mean"] if m else float("nan") for m in a["loss_by_frequency"]]
        errs = [m["spread"] if m else 0 for m in a["loss_by_frequency"]]
        ax.bar([k + i * width for k in range(BUCKETS)], means, width, yerr=errs, label=arm)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(BUCKETS)])
    ax.set_xticklabels(["rarest"] + [str(k) for k in range(1, BUCKETS - 1)] + ["most frequent"])
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss by token-frequency bucket")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_by_frequency.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--arms", nargs="*", help=f"subset of {list(ARMS)}")
    ap.add_argument("--seeds", nargs="*", type=int)
    ap.add_argument("--steps", type=int, help="override the scale's step count")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec (JSON) and exit
    args = ap.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        Path(spec["result"]).write_text(json.dumps(run_one(spec)))
        return 0
    scale = dict(SCALES[args.scale])
    if args.steps:
        scale["steps"] = args.steps
    arms = args.arms or scale["arms"]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    seeds = args.seeds if args.seeds is not None else scale["seeds"]
    out = args.out or ROOT / "bench" / "results" / f"study_{args.scale}"
    out.mkdir(parents=True, exist_ok=True)
    runs, t0 = [], time.time()
    for seed in seeds:
        for arm in arms:
            path = out / f"run_{arm}_seed{seed}.json"
            if not path.exists():
                spec = dict(scale=scale, arm=arm, seed=seed, result=str(path))
                t = time.time()
                subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=True,
                               cwd=ROOT)
                print(f"[study] {arm} seed {seed}: {time.time() - t:.0f}s", flush=True)
            r = json.loads(path.read_text())
            print(f"[study] {arm:22s} seed {seed}: val loss {r['val_loss']:.4f} "
                  f"({r['tokens_per_s']:.0f} tok/s)", flush=True)
            runs.append(r)
    agg = aggregate(runs)
    import torch
    meta = dict(scale=args.scale, date=time.strftime("%Y-%m-%d"), seeds=seeds,
                steps=scale["steps"], tokens_per_step=scale["micro"] * scale["seq"],
                vocab=runs[0]["vocab"], wall_seconds=round(time.time() - t0),
                machine=(torch.cuda.get_device_name() if torch.cuda.is_available() else
                         f"{platform.processor() or platform.machine()} CPU, "
                         f"{os.cpu_count()} cores"),
                command=" ".join(["python", "bench/study.py"] + (argv or sys.argv[1:])))
    (out / "results.json").write_text(json.dumps(dict(meta=meta, arms=agg, runs=runs), indent=1))
    (out / "results.md").write_text(markdown(agg, meta))
    plots(runs, agg, out)
    print(markdown(agg, meta))
    print(f"[study] wrote {out}/results.json, results.md, loss_curves.png, loss_by_frequency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
