"""Leviathan vs a dense input table in the same GPT: parameters and training-step time.

    python bench/bench_leviathan.py                      # tiny preset on CPU (60m too on CUDA)
    python bench/bench_leviathan.py --presets tiny 60m --steps 10 --out results.json
    python bench/bench_leviathan.py --presets 60m --device cuda --bf16 --compile

For each preset the GPT is built once with embedding="dense" (a VocabParallelEmbedding) and
once per Leviathan variant, everything else identical. Default variants: "spec", the spec's
generator (d_s=128 h=8 kappa=16 r=64), and "preset", the generator the preset itself sets
(PRESETS[preset]["leviathan"], e.g. the tiny preset's D-scaled one) where it sets one;
--leviathan-json to choose others. One training step = forward + backward + AdamW step on a
fixed batch of token ids; after warm-up steps the median of the timed steps is reported, plus
the input embedding's own forward + backward and the memory autograd keeps for its backward
(the storages saved during the embedding's forward, parameters excluded). The tokens are drawn
from a Zipf(1.1) distribution over the vocabulary by default (like text: many repeats, and the
generator is evaluated once per distinct id), or uniformly (--tokens uniform, the worst case:
almost every id distinct). The models are timed in alternation so that machine noise hits them
alike. ``--compile`` steps every model under torch.compile (the whole model; the first step,
its compilation, is a warm-up step and reported as first_step_s; the embedding's own timing
stays eager).

Prints a table and writes JSON (default bench/results/leviathan_<device>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def sample_tokens(kind: str, vocab: int, shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, vocab, shape, generator=g)
    # Zipf(1.1) over ranks, ranks mapped to ids by a fixed random permutation
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = ranks ** -1.1
    draws = torch.multinomial(probs / probs.sum(), int(torch.tensor(shape).prod()),
                              replacement=True, generator=g)
    perm = torch.randperm(vocab, generator=g)
    return perm[draws].view(*shape)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def default_variants(preset: str) -> dict:
    """The spec's generator, and the preset's own where it sets one (label -> kwargs)."""
    from models.gpt import PRESETS
    variants = {"spec": {}}
    own = dict(PRESETS[preset].get("leviathan") or {})
    if own:
        variants["preset"] = own
    return variants


def saved_for_backward_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs (parameters excluded)."""
    seen = {}

    def pack(x):
        if not isinstance(x, torch.nn.Parameter):
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


def bench_preset(preset: str, args, device, variants: dict) -> dict:
    """Time the dense GPT and one Leviathan GPT per variant (label -> generator kwargs)."""
    from models.gpt import GPT, GPTConfig
    from models.leviathan import leviathan_param_count

    variants = variants or default_variants(preset)

    overrides = {}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    if device.type == "cuda" and args.bf16:
        overrides["params_dtype"] = torch.bfloat16
    batch = args.batch or (8 if device.type == "cpu" else 16)
    models, opts, stepped = {}, {}, {}
    for name, lev in [("dense", None)] + list(variants.items()):
        cfg = GPTConfig.from_preset(preset, embedding="dense" if lev is None else "leviathan",
                                    leviathan=dict(lev or {}), **overrides)
        model = GPT(cfg).to(device)
        models[name] = model
        stepped[name] = torch.compile(model) if args.compile else model
        opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    cfg = models["dense"].cfg
    seq = cfg.seq_length
    ids = sample_tokens(args.tokens, cfg.vocab_size, (batch, seq + 1)).to(device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    distinct = int(torch.unique(inputs).numel())

    def step(name):
        model, opt = stepped[name], opts[name]
        opt.zero_grad(set_to_none=True)
        loss = model(inputs, labels=labels).mean()
        loss.backward()
        opt.step()

    def embed_only(name):   # the input embedding alone, forward + backward
        models[name].embed(inputs).float().square().mean().backward()

    times = {name: [] for name in models}
    emb_times = {name: [] for name in models}
    first = {}
    for i in range(args.warmup + args.steps):
        for name in models:            # alternate, so that machine noise hits all alike
            sync(device)
            t0 = time.perf_counter()
            step(name)
            sync(device)
            t1 = time.perf_counter()
            embed_only(name)
            sync(device)
            t2 = time.perf_counter()
            if i == 0:
                first[name] = t1 - t0
            if i >= args.warmup:
                times[name].append(t1 - t0)
                emb_times[name].append(t2 - t1)
    saved = {name: saved_for_backward_bytes(lambda m=m: m.embed(inputs))
             for name, m in models.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    emb_med = {k: statistics.median(v) for k, v in emb_times.items()}
    rows = []
    for name, lev in variants.items():
        counts = models[name].param_counts()
        lev_kw = {k: v for k, v in lev.items()
                  if k in ("coords", "seed_dim", "heads", "knots", "modes")}
        rows.append(dict(
            variant=name, leviathan_kwargs=lev,
            generator_params=counts["embedding"],
            generator_params_formula=leviathan_param_count(cfg.vocab_size, cfg.hidden_size,
                                                           **lev_kw),
            step_s=med[name], step_s_all=times[name], embed_fwd_bwd_s=emb_med[name],
            embed_fwd_bwd_s_all=emb_times[name], embed_saved_bytes=saved[name],
            first_step_s=first[name], overhead=med[name] / med["dense"] - 1.0))
    return dict(
        preset=preset, vocab_size=cfg.vocab_size, padded_vocab=models["dense"].padded_vocab,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seq_length=seq, batch=batch,
        tokens=args.tokens, tokens_per_step=batch * seq, distinct_ids=distinct,
        dtype=str(cfg.params_dtype).replace("torch.", ""), compiled=bool(args.compile),
        table_params=cfg.vocab_size * cfg.hidden_size,
        dense_model_params=models["dense"].param_counts(),
        dense=dict(step_s=med["dense"], step_s_all=times["dense"], first_step_s=first["dense"],
                   embed_fwd_bwd_s=emb_med["dense"], embed_fwd_bwd_s_all=emb_times["dense"],
                   embed_saved_bytes=saved["dense"]),
        leviathan=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=None,
                    help="default: tiny, plus 60m when CUDA is available")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the preset's")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", choices=("zipf", "uniform"), default="zipf")
    ap.add_argument("--leviathan-json", action="append", default=None,
                    help='generator kwargs as JSON (repeatable), e.g. \'{"heads": 4}\'; '
                         "default: the spec defaults ({}) and the preset's own generator")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters on CUDA")
    ap.add_argument("--compile", action="store_true", help="step the models under torch.compile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.compile:
        args.warmup = max(args.warmup, 1)          # the compiling step is never timed

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    presets = args.presets or (["tiny", "60m"] if device.type == "cuda" else ["tiny"])
    variants = {j: json.loads(j) for j in args.leviathan_json or []}   # {}: per-preset default
    torch.manual_seed(0)
    results = [bench_preset(p, args, device, variants) for p in presets]

    print(f"\ndevice {device} ({_device_name(device)}), torch threads {torch.get_num_threads()}, "
          f"tokens {args.tokens}, median of {args.steps} steps after {args.warmup} warm-up"
          + (", torch.compile" if args.compile else ""))
    head = (f"{'preset':7} {'embedding':34} {'tokens':>6} {'distinct':>8} {'params':>10} "
            f"{'step':>9} {'overhead':>9} {'emb fwd+bwd':>12} {'emb saved':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        d = r["dense"]
        print(f"{r['preset']:7} {'dense table':34} {r['tokens_per_step']:6d} "
              f"{r['distinct_ids']:8d} {r['table_params']:10,d} {d['step_s'] * 1e3:7.1f}ms "
              f"{'':>9} {d['embed_fwd_bwd_s'] * 1e3:10.1f}ms "
              f"{d['embed_saved_bytes'] / 2**20:7.1f}MiB")
        for v in r["leviathan"]:
            label = f"leviathan {v['variant']}"
            if v["leviathan_kwargs"] and v["variant"] != json.dumps(v["leviathan_kwargs"]):
                label += " " + ",".join(f"{k[0]}{x}" for k, x in v["leviathan_kwargs"].items())
            print(f"{r['preset']:7} {label[:34]:34} {r['tokens_per_step']:6d} "
                  f"{r['distinct_ids']:8d} {v['generator_params']:10,d} "
                  f"{v['step_s'] * 1e3:7.1f}ms {v['overhead'] * 100:8.1f}% "
                  f"{v['embed_fwd_bwd_s'] * 1e3:10.1f}ms "
                  f"{v['embed_saved_bytes'] / 2**20:7.1f}MiB")

    out = Path(args.out) if args.out else \
        ROOT / "bench" / "results" / f"leviathan_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=str(device), device_name=_device_name(device), threads=torch.get_num_threads(),
        torch=torch.__version__, python=platform.python_version(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), steps=args.steps, warmup=args.warmup,
        compiled=bool(args.compile), results=results), indent=1))
    print(f"wrote {out}")
    return results


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
