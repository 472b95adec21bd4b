"""The project's GPT against what a user would otherwise run: one whole training step.

    python bench/bench_peers.py                          # tiny and 60m shapes, CPU, fp32
    python bench/bench_peers.py --shapes tiny --rounds 10 --out r.json
    python bench/bench_peers.py --device cuda --dtype bf16
    python bench/bench_peers.py --device cuda --shapes 1b --batch 4 --arms gpt_dense hf_llama \
        --modes eager compile --peak-tflops 989      # eager and torch.compile, tokens/s, MFU

For each shape (a preset of models/gpt.py: width, depth, heads, FFN, vocabulary, sequence) the
same step (forward, mean token cross-entropy, backward, AdamW step, zero_grad) is timed for:

  gpt_dense      models.gpt.GPT, dense input table (embedding="dense")
  gpt_leviathan  the same GPT with the Leviathan generator (spec defaults at 60m; at the tiny
                 preset its own D-scaled generator, as the quick start trains)
  hf_llama       transformers LlamaForCausalLM, the config launch/export.py maps GPTConfig to
                 (RMSNorm, RoPE, SwiGLU, untied head; its default attention: SDPA)
  megatron_gpt   megatron-core GPTModel with the local layer spec: RMSNorm, RoPE, SwiGLU
                 (gated_linear_unit), no biases, untied output layer

The vocabulary is the preset's padded to a multiple of 128 (the project's GPT pads to that
anyway), so all dense models have exactly the same parameters; the counts are printed and
checked equal. Every model gets torch.optim.AdamW(fused=True). Models are stepped in
interleaved rounds (order rotated), and the ratios to gpt_dense are the median (and quartiles)
of same-round ratios, so load from other processes hits all alike. Targets (issue 13): the
project's dense GPT no slower than the faster peer; Leviathan within +10% of dense at 60m.
``--profile NAME`` prints the top operators of NAME's step (torch.profiler).

``--modes eager compile`` adds each arm under torch.compile (the whole model; named
``NAME_compiled``, the same weights, its own AdamW) to the same rounds; the first step of every
arm (its compilation, for a compiled one) is reported as first_step_s. Each arm's tokens/s is
batch x seq / its median step; its model FLOPs per token are 6 x parameters (both tables
counted, as a matmul-equivalent) + 12 x layers x hidden x seq (attention scores and values),
and ``--peak-tflops`` turns them into MFU.

Writes JSON (default bench/results/peers_<device>.json).
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
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from bench_leviathan import sample_tokens  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARMS = ("gpt_dense", "gpt_leviathan", "hf_llama", "megatron_gpt")
MODES = ("eager", "compile")


def flops_per_token(cfg, params: int) -> float:
    """Model FLOPs per trained token (forward + backward): 6 per parameter and 12 * L * D * s
    for attention's scores and weighted values (PaLM's count; causal masking not discounted)."""
    return 6.0 * params + 12.0 * cfg.num_layers * cfg.hidden_size * cfg.seq_length


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def shape_config(shape: str, dtype, seq=None):
    """The GPTConfig of a preset, vocabulary padded to the GPT's multiple (128)."""
    from models.gpt import GPTConfig
    cfg = GPTConfig.from_preset(shape, params_dtype=dtype)
    over = dict(vocab_size=cfg.padded_vocab_size(1))
    if seq:
        over["seq_length"] = seq
    return GPTConfig.from_preset(shape, params_dtype=dtype, **over)


def build_gpt(cfg, leviathan: bool, shape: str):
    import dataclasses

    from models.gpt import GPT, PRESETS
    lev = dict(PRESETS[shape].get("leviathan") or {}) if shape == "tiny" else {}
    return GPT(dataclasses.replace(cfg, embedding="leviathan" if leviathan else "dense",
                                   leviathan=lev))


def build_hf(cfg, device):
    from transformers import LlamaForCausalLM

    from launch.export import llama_config
    hcfg = llama_config(cfg)
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):      # initialised where it runs (a 1B model: seconds on a GPU)
        return LlamaForCausalLM(hcfg).to(cfg.params_dtype)


def build_megatron(cfg, device):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    if device.type != "cuda":   # megatron's rotary embedding asks torch.cuda for a device
        torch.cuda.current_device = lambda: torch.device("cpu")
    tcfg = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads, num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.head_dim,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        params_dtype=cfg.params_dtype, bf16=cfg.params_dtype == torch.bfloat16,
        use_cpu_initialization=True)
    return GPTModel(tcfg, get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
                    position_embedding_type="rope", rotary_base=int(cfg.rope_base),
                    share_embeddings_and_output_weights=False)


def make_step(name: str, model, inputs, labels):
    """One training step of ``model``: the mean per-token loss, backward, AdamW, zero_grad."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    if name.startswith("gpt_"):
        def loss_fn():
            return model(inputs, labels=labels).mean()
    elif name == "hf_llama":
        def loss_fn():
            logits = model(input_ids=inputs).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     labels.flatten())
    else:
        s = inputs.shape[1]
        pos = torch.arange(s, device=inputs.device).expand_as(inputs)
        # megatron's convention: True = masked (its default mask is built on "cuda")
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=inputs.device), 1)[None, None]

        def loss_fn():
            return model(inputs, pos, mask, labels=labels).mean()

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_shape(shape: str, batch, args, device, dtype) -> dict:
    cfg = shape_config(shape, dtype, args.seq)
    batch = batch or (2 if shape != "tiny" else 8)
    ids = sample_tokens("zipf", cfg.vocab_size, (batch, cfg.seq_length + 1)).to(device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    models, steps = {}, {}
    for name in args.arms:
        if name == "gpt_dense":
            m = build_gpt(cfg, False, shape)
        elif name == "gpt_leviathan":
            m = build_gpt(cfg, True, shape)
        elif name == "hf_llama":
            m = build_hf(cfg, device)
        else:
            m = build_megatron(cfg, device)
        models[name] = m.to(device).train()
        if "eager" in args.modes:
            steps[name] = make_step(name, models[name], inputs, labels)
        if "compile" in args.modes:
            steps[f"{name}_compiled"] = make_step(name, torch.compile(models[name]), inputs,
                                                  labels)
    params = {n: n_params(m) for n, m in models.items()}
    dense_like = {n: c for n, c in params.items() if n != "gpt_leviathan"}
    equal = len(set(dense_like.values())) <= 1
    print(f"[{shape}] D={cfg.hidden_size} L={cfg.num_layers} heads={cfg.num_heads} "
          f"ffn={cfg.ffn_hidden_size} V={cfg.vocab_size} seq={cfg.seq_length} batch={batch} "
          f"{str(dtype).replace('torch.', '')} params: " +
          ", ".join(f"{n} {c:,}" for n, c in params.items()) +
          ("" if equal else "  <- NOT EQUAL"), flush=True)
    if not equal and not args.allow_unequal:
        raise SystemExit(f"parameter counts differ: {dense_like}")

    names = list(steps)
    first = {}
    for n in names:                  # the first step (a compiled arm's compilation), timed
        sync(device)
        t0 = time.perf_counter()
        steps[n]()
        sync(device)
        first[n] = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        for n in names:
            steps[n]()
    sync(device)
    times = {n: [] for n in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            steps[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    res = dict(shape=shape, modes=list(args.modes), peak_tflops=args.peak_tflops,
               hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
               num_heads=cfg.num_heads, ffn_hidden_size=cfg.ffn_hidden_size,
               vocab_size=cfg.vocab_size, seq_length=cfg.seq_length, batch=batch,
               dtype=str(dtype).replace("torch.", ""), params=params, params_equal=equal,
               results={})
    base = "gpt_dense" if "gpt_dense" in times else names[0]
    tokens = batch * cfg.seq_length
    for n in names:
        ratios = sorted(x / y for x, y in zip(times[n], times[base]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        med = statistics.median(times[n])
        fpt = flops_per_token(cfg, params[n.removesuffix("_compiled")])
        res["results"][n] = dict(median_ms=1e3 * med,
                                 min_ms=1e3 * min(times[n]), all_ms=[1e3 * t for t in times[n]],
                                 ratio_to_dense=dict(median=statistics.median(ratios),
                                                     q1=q[0], q3=q[2]),
                                 first_step_s=first[n], compiled=n.endswith("_compiled"),
                                 tokens_per_s=tokens / med, flops_per_token=fpt,
                                 tflops=tokens * fpt / med / 1e12,
                                 mfu=(tokens * fpt / med / 1e12 / args.peak_tflops
                                      if args.peak_tflops else None))
    r = res["results"]
    peers = [r[n]["ratio_to_dense"]["median"] for n in ("hf_llama", "megatron_gpt") if n in r]
    compiled = [r[n]["median_ms"] / r["gpt_dense_compiled"]["median_ms"]
                for n in ("hf_llama_compiled", "megatron_gpt_compiled")
                if n in r and "gpt_dense_compiled" in r]
    res["targets"] = dict(
        dense_not_slower_than_faster_peer=None if not peers else min(peers) >= 1.0,
        compiled_dense_not_slower_than_faster_compiled_peer=None if not compiled
        else min(compiled) >= 1.0,
        leviathan_within_10pct=None if "gpt_leviathan" not in r or shape == "tiny"
        else r["gpt_leviathan"]["ratio_to_dense"]["median"] <= 1.10)
    if args.profile and args.profile in steps:
        res["profile"] = profile_step(steps[args.profile], device, args.profile)
    del models, steps
    return res


def profile_step(step, device, name: str, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    print(f"--- profile of one {name} step ---\n{table}", flush=True)
    return table


def _verdict(ok) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def print_table(rows) -> str:
    head = (f"{'shape':>6} {'model':>23} {'params':>13} {'median ms':>10} {'min ms':>9} "
            f"{'/ base [q1, q3]':>22} {'tokens/s':>10} {'MFU':>6} {'1st step s':>10}")
    lines = [head, "-" * len(head)]
    for res in rows:
        for n, r in res["results"].items():
            q = r["ratio_to_dense"]
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            count = res["params"][n.removesuffix("_compiled")]
            lines.append(f"{res['shape']:>6} {n:>23} {count:>13,} "
                         f"{r['median_ms']:10.1f} {r['min_ms']:9.1f} "
                         f"{q['median']:>8.3f} [{q['q1']:.3f}, {q['q3']:.3f}] "
                         f"{r['tokens_per_s']:10,.0f} {mfu:>6} {r['first_step_s']:10.1f}")
        t = res["targets"]
        lines.append(f"{'':>6} targets: dense <= faster peer: "
                     f"{_verdict(t['dense_not_slower_than_faster_peer'])}; compiled: "
                     f"{_verdict(t['compiled_dense_not_slower_than_faster_compiled_peer'])}"
                     f"; Leviathan <= +10% (60m): {_verdict(t['leviathan_within_10pct'])}")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "60m"])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=MODES,
                    help="eager, and/or every arm under torch.compile (NAME_compiled)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak (e.g. 989 for an H100/H200 in bf16): MFU per arm")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="parameter dtype (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="sequences per step, one for all shapes or one per shape (default 8 "
                         "at tiny, 2 at larger shapes)")
    ap.add_argument("--seq", type=int, default=None, help="override the preset's seq_length")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--profile", default=None, choices=ARMS)
    ap.add_argument("--allow-unequal", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.warmup = max(args.warmup, 1)       # the first step is always run (and timed) apart

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    load0 = list(os.getloadavg())
    print(f"device={dev_name} threads={torch.get_num_threads()} load={load0}", flush=True)
    batches = args.batch or [None]
    if len(batches) not in (1, len(args.shapes)):
        ap.error("--batch takes one value, or one per shape")
    batches = batches * len(args.shapes) if len(batches) == 1 else batches
    rows = [bench_shape(s, b, args, device, dtype) for s, b in zip(args.shapes, batches)]
    text = print_table(rows)
    import transformers
    meta = dict(device=dev_name, device_type=device.type, threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                loadavg_start=load0, loadavg_end=list(os.getloadavg()))
    try:
        from importlib.metadata import version
        meta["megatron_core"] = version("megatron-core")
    except Exception:  # pragma: no cover
        pass
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"peers_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, shapes=rows, table=text), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
