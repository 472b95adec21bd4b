"""What Ember and Leviathan buy, measured fairly: the side-by-side study (issues 5 and 14).

Every table optimizer runs at its own tuned learning rate, Leviathan's variants and training
recipe are swept, and a second, larger vocabulary puts the tables at most of the parameters:

  1. sweep      table lr of AdamW / Ember / Adafactor (dense embedding, the body fixed), seed 0,
                on a ~3x ladder widened until the best value is interior (or max_widen is spent);
  2. tuned      each arm at its best lr, more seeds; Leviathan's generator lr x weight decay
                sweep (its own param group; the body's lr and decay stay fixed); the same table
                lr sweep (a shorter grid, centred on step 1's best) at the large vocabulary;
  3. variants   Leviathan variants at the best generator setting (sigmoid(u/2) + normalised
                basis as in the public re-implementation, 32 knots, the spec-default generator
                size, isoparametric depth); the large vocabulary's tuned arms with more seeds;
  4. Leviathan's best variant with more seeds, and at the large vocabulary;
  5. longer runs (long_factor x steps): the tuned dense arms (all seeds, at the lrs tuned
     short) and the best Leviathan variant (seed 0);
  6. Adafactor swept and seeded at the large vocabulary too;
  7. the tables' beta2 (Ember's 0.999, AdamW's 0.95) swept with the lr; a winner gets seeds.

Selection uses the TUNING split (the first half of the held-out documents' windows), the reported
numbers the TEST split (the second half), so no reported number picked its own lr. Leviathan's
LM head is a dense table trained like the tuned dense+AdamW arm's, so a gap is the input
embedding's alone.

    python bench/study.py --scale cpu                 # 75 runs, ~1.5 h on 2 busy cores (RESULTS.md)
    python bench/study.py --scale cpu --data my_texts/ --vocab 8192 --large-vocab 0
    python bench/study.py --scale gpu                 # the 60M preset, on one GPU (never run yet)
    python bench/study.py --scale cpu --report-only   # rewrite the report from finished runs
    python bench/study.py --scale smoke --inline      # under a minute: the whole pipeline, tiny

Each run is a subprocess (--inline: in this process) writing <out>/points/<key>.json; a failed
or crashed run writes <key>.failed.json and the study goes on. Rerunning the same command resumes:
finished points are read back, not rerun. After every stage <out>/results.json, results.md and
the plots are rewritten from whatever has finished (bench/study_report.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TABLE_OPTS = ("adamw", "ember", "adafactor")
BODY_WD = 0.1
BETAS = (0.9, 0.95)
BUCKETS = 5
# Leviathan variants, as overrides of the preset's generator (the tiny preset: d_s 32, 8 heads,
# 16 knots, 16 modes, sigmoid(u), unnormalised basis)
VARIANTS = {
    "preset": {},
    "reimpl": dict(sigmoid_scale=0.5, normalize_basis=True),   # the public re-implementation
    "knots32": dict(knots=32),
    "spec": dict(seed_dim=128, heads=8, knots=16, modes=64),   # the spec's default size
}

SCALES = {
    "smoke": dict(preset="tiny", layers=2, micro=4, seq=32, steps=6, body_lr=3e-3, vocab=384,
                  large_vocab=512, eval_every=3, curve_windows=4, eval_windows=8, seeds=2,
                  table_grid=[1e-2, 3e-2], max_widen=1, large_span=0, gen_lrs=[3e-3],
                  gen_wds=[0.0, 0.1], variants=["reimpl", "iso"], long_factor=2, jobs=1,
                  run_timeout=600, stage_plots=False,
                  beta2_sweep=dict(ember=[0.95], adamw=[0.999])),
    "cpu": dict(preset="tiny", layers=4, micro=8, seq=128, steps=250, body_lr=3e-3, vocab=4096,
                large_vocab=16384, eval_every=50, curve_windows=32, eval_windows=0, seeds=3,
                table_grid=[3e-3, 1e-2, 3e-2, 1e-1], max_widen=3, large_span=1,
                gen_lrs=[3e-3, 1e-2, 3e-2], gen_wds=[0.0, 0.1],
                variants=["reimpl", "knots32", "spec", "iso"], long_factor=3, jobs=2,
                run_timeout=2400, stage_plots=True,
                beta2_sweep=dict(ember=[0.95, 0.99], adamw=[0.99, 0.999])),
    "gpu": dict(preset="60m", layers=None, micro=32, seq=512, steps=2000, body_lr=1e-3,
                vocab=32768, large_vocab=0, eval_every=200, curve_windows=64, eval_windows=512,
                seeds=3, table_grid=[1e-3, 3e-3, 1e-2, 3e-2], max_widen=3, large_span=1,
                gen_lrs=[1e-3, 3e-3, 1e-2], gen_wds=[0.0, 0.1],
                variants=["reimpl", "knots32", "preset", "iso"], long_factor=2, jobs=1,
                run_timeout=7200, stage_plots=True,
                beta2_sweep=dict(ember=[0.95, 0.99], adamw=[0.99, 0.999])),
}


# ------------------------------------------------------------------------------ lr ladder
def ladder(x: float, steps: int = 0) -> float:
    """The 1-3-10 ladder (1e-3, 3e-3, 1e-2, ...): x's rung moved by ``steps``."""
    e = math.floor(math.log10(x) + 1e-9)
    idx = 2 * e + (1 if x / 10 ** e >= 2 else 0) + steps
    return float(f"{(3 if idx % 2 else 1) * 10.0 ** (idx // 2):.0e}")


def widen(grid: list, losses: list, widened: int, max_widen: int):
    """(new grid, did widen) after a sweep's losses: one rung beyond the edge holding the
    minimum, until the minimum is interior or max_widen rungs were added. Failed points
    (None) never win."""
    vals = [math.inf if v is None else v for v in losses]
    if len(grid) < 2 or widened >= max_widen or all(math.isinf(v) for v in vals):
        return grid, False
    i = min(range(len(vals)), key=vals.__getitem__)
    if i == 0:
        return [ladder(grid[0], -1)] + grid, True
    if i == len(grid) - 1:
        return grid + [ladder(grid[-1], +1)], True
    return grid, False


# ------------------------------------------------------------------------------ one run
def lev_kwargs(scale: dict, variant: str) -> dict:
    from models.gpt import PRESETS
    return dict(PRESETS[scale["preset"]].get("leviathan", {}), **VARIANTS[variant])


def iso_layers(scale: dict, vocab: int, lev: dict) -> int:
    """Depth at which a Leviathan model spends the parameters its generator frees (never fewer
    layers than the dense model: a generator larger than the table frees nothing)."""
    from models.gpt import GPTConfig
    from models.leviathan import leviathan_param_count
    cfg = GPTConfig.from_preset(scale["preset"], vocab_size=vocab, seq_length=scale["seq"],
                                **({"num_layers": scale["layers"]} if scale["layers"] else {}))
    D, F = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 4 * D * D + 3 * D * F + 2 * D           # attention, SwiGLU, two norms
    gen = {k: v for k, v in lev.items() if k in ("coords", "seed_dim", "heads", "knots", "modes")}
    freed = vocab * D - leviathan_param_count(vocab, D, **gen)
    return cfg.num_layers + max(0, round(freed / per_layer))


def build_model(spec: dict):
    from models.gpt import GPT, GPTConfig
    scale = spec["scale"]
    over = dict(vocab_size=spec["vocab"], seq_length=scale["seq"], embedding=spec["embedding"],
                init_seed=1000 + spec["seed"])
    if scale["layers"]:
        over["num_layers"] = scale["layers"]
    if spec["embedding"] == "leviathan":
        over["leviathan"] = lev_kwargs(scale, spec["variant"])
        if spec.get("iso"):
            over["num_layers"] = iso_layers(scale, spec["vocab"], over["leviathan"])
    return GPT(GPTConfig.from_preset(scale["preset"], **over))


def make_optimizers(model, spec: dict):
    """(optimizers, the tables' optimizer, the tables): AdamW on the body (Leviathan's generator
    in its own group, with its own lr and weight decay) and the arm's optimizer on the tables."""
    import torch
    import ember_ds
    tables = ember_ds.tag_module_tables(model)
    table_ids = {id(p) for p in tables}
    body_lr = spec["body_lr"]
    gen = [p for n, p in model.named_parameters()
           if n.startswith("embedding.") and id(p) not in table_ids]
    gen_ids = {id(p) for p in gen}
    body = [p for p in model.parameters() if id(p) not in table_ids and id(p) not in gen_ids]
    groups = [dict(params=[p for p in body if p.dim() >= 2], weight_decay=BODY_WD, lr=body_lr),
              dict(params=[p for p in body if p.dim() < 2], weight_decay=0.0, lr=body_lr)]
    if gen:
        g_lr = spec.get("gen_lr") or body_lr
        g_wd = BODY_WD if spec.get("gen_wd") is None else spec["gen_wd"]
        groups += [dict(params=[p for p in gen if p.dim() >= 2], weight_decay=g_wd, lr=g_lr),
                   dict(params=[p for p in gen if p.dim() < 2], weight_decay=0.0, lr=g_lr)]
    body_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=body_lr, betas=BETAS)
    lr, kind, b2 = spec["table_lr"], spec["tables"], spec.get("table_beta2")
    if kind == "adamw":
        tab = torch.optim.AdamW(tables, lr=lr, betas=(BETAS[0], b2 or BETAS[1]), weight_decay=0.0)
    elif kind == "ember":
        tab = ember_ds.Ember([dict(params=tables, token_table=True)], lr=lr,
                             **({"beta2": b2} if b2 else {}))
    elif kind == "adafactor":
        if b2:
            raise ValueError("Adafactor's second-moment decay is its own schedule (1 - t^-0.8)")
        # the fair setting: a plain lr (relative step and parameter scaling off), no momentum
        # (factored second moment only, the same O(V + D) state as Ember), update clipping 1.0
        from transformers.optimization import Adafactor
        tab = Adafactor(tables, lr=lr, relative_step=False, scale_parameter=False,
                        warmup_init=False, beta1=None, clip_threshold=1.0)
    else:
        raise ValueError(kind)
    return [body_opt, tab], tab, tables


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


def load_data(scale: dict, vocab: int, log=lambda m: None):
    from launch.data import DataSettings, prepare_data
    return prepare_data(scale.get("data") or None, settings=DataSettings(vocab_size=vocab), log=log)


def run_one(spec: dict) -> dict:
    import numpy as np
    import torch
    from launch.data import DeterministicSampler, TokenWindows

    fail = os.environ.get("STUDY_FAIL_ON")       # test hook: make matching points raise
    if fail and fail in spec["key"]:
        raise RuntimeError(f"STUDY_FAIL_ON={fail}")
    scale, seed = spec["scale"], spec["seed"]
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", os.cpu_count() or 1)))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    from launch.data import PreparedData
    where = (scale.get("prepared") or {}).get(str(spec["vocab"]))
    prepared = (PreparedData(Path(where), json.loads((Path(where) / "meta.json").read_text()))
                if where else load_data(scale, spec["vocab"]))
    V = prepared.vocab_size
    train = TokenWindows(prepared.tokens("train"), scale["seq"], "train")
    valid = TokenWindows(prepared.tokens("valid"), scale["seq"], "valid")
    # held-out windows: first half tunes (lr choice, curves), second half is reported
    half = len(valid) // 2
    if half < 1:
        raise ValueError("the validation split needs at least 2 windows (tuning + test)")
    cap = scale["eval_windows"] or half
    splits = dict(tune=range(0, min(half, cap)), test=range(half, half + min(half, cap)),
                  curve=range(0, min(half, scale["curve_windows"])))
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    optimizers, table_opt, tables = make_optimizers(model, spec)
    steps = spec["steps"]
    warm = max(1, steps // 10)

    def lr_factor(s):          # linear warmup over 10%, cosine decay to 10%
        return min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(
            math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm)))))
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in optimizers]
    sampler = DeterministicSampler(len(train), seed, scale["micro"], 1, 1, 0)
    counts = np.bincount(prepared.tokens("train"), minlength=V)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
           else torch.autocast("cpu", enabled=False))

    @torch.no_grad()
    def evaluate(windows):
        model.eval()
        losses, targets = [], []
        idx = list(windows)
        for i in range(0, len(idx), scale["micro"]):
            x, y = valid.batch(idx[i:i + scale["micro"]])
            with amp:
                losses.append(model(x.to(device), y.to(device)).float().cpu())
            targets.append(y)
        model.train()
        return torch.cat(losses).flatten(), torch.cat(targets).flatten()

    curve = [(0, evaluate(splits["curve"])[0].mean().item())]
    train_curve, train_time, tokens, t_run = [], 0.0, 0, time.perf_counter()
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
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        if step % 10 == 0 or step == steps - 1:
            train_curve.append((step + 1, loss.item()))
        if (step + 1) % scale["eval_every"] == 0 and step + 1 < steps:
            curve.append((step + 1, evaluate(splits["curve"])[0].mean().item()))
    curve.append((steps, evaluate(splits["curve"])[0].mean().item()))
    tune = evaluate(splits["tune"])[0].mean().item()
    per_tok, tgt = evaluate(splits["test"])
    test = per_tok.mean().item()

    # loss by token frequency (test split): types ranked by training count, BUCKETS equal groups
    order = np.argsort(counts, kind="stable")          # rarest first
    bucket_of = np.empty(V, dtype=np.int64)
    bucket_of[order] = np.arange(V) * BUCKETS // V
    b = torch.from_numpy(bucket_of)[tgt]
    by_bucket = []
    for k in range(BUCKETS):
        sel = b == k
        by_bucket.append(dict(bucket=k, val_tokens=int(sel.sum()),
                              loss=per_tok[sel].mean().item() if sel.any() else None,
                              train_count_max=int(counts[order[(k + 1) * V // BUCKETS - 1]])))
    params = model.param_counts()
    return dict(key=spec["key"], spec={k: v for k, v in spec.items() if k != "scale"},
                tune_loss=tune, test_loss=test, params=params, layers=model.cfg.num_layers,
                table_state_bytes=table_state_bytes(table_opt, tables), tokens=tokens,
                tokens_per_s=tokens / train_time, seconds=round(time.perf_counter() - t_run, 1),
                val_curve=curve, train_curve=train_curve, loss_by_frequency=by_bucket,
                train_tokens=int(len(prepared.tokens("train"))), vocab=V, device=str(device),
                windows={k: len(v) for k, v in splits.items()})


# ------------------------------------------------------------------------------ the runner
def spec_key(spec: dict) -> str:
    s = spec
    parts = [s["embedding"] if s["embedding"] == "dense" else f"lev-{s['variant']}"
             + ("-iso" if s.get("iso") else ""),
             s["tables"], f"V{s['vocab']}", f"tlr{s['table_lr']:g}"]
    if s["embedding"] == "leviathan":
        parts += [f"glr{s.get('gen_lr') or s['body_lr']:g}",
                  f"gwd{BODY_WD if s.get('gen_wd') is None else s['gen_wd']:g}"]
    if s.get("table_beta2") is not None:
        parts.append(f"b2{s['table_beta2']:g}")
    parts += [f"blr{s['body_lr']:g}", f"T{s['steps']}", f"s{s['seed']}"]
    return "_".join(parts)


class Runner:
    """Runs specs (subprocess per run, or inline), jobs at a time; results are files, so a
    rerun resumes, and a failed point is recorded, never fatal."""

    def __init__(self, scale: dict, out: Path, jobs: int, inline: bool, threads: int,
                 retry_failed: bool, stop_at: float | None):
        self.scale, self.out, self.jobs, self.inline = scale, out, jobs, inline
        self.threads, self.retry_failed, self.stop_at = threads, retry_failed, stop_at
        self.points = out / "points"
        self.points.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.stopped = False
        self.dry = False                       # --report-only: read back, run nothing

    def spec(self, **kw) -> dict:
        s = dict(embedding="dense", tables="adamw", variant=None, iso=False, gen_lr=None,
                 gen_wd=None, body_lr=self.scale["body_lr"], steps=self.scale["steps"], seed=0,
                 table_beta2=None)
        s.update(kw)
        s["key"] = spec_key(s)
        return s

    def result(self, spec: dict):
        p = self.points / f"{spec['key']}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def loss(self, spec: dict, split: str = "tune"):
        r = self.result(spec)
        return None if r is None else r[f"{split}_loss"]

    def _run(self, spec: dict) -> None:
        key = spec["key"]
        if self.stop_at and time.time() > self.stop_at:
            self.stopped = True
            return
        full = dict(spec, scale=self.scale)
        t = time.time()
        err = None
        if self.inline:
            try:
                res = run_one(full)
                (self.points / f"{key}.json").write_text(json.dumps(res))
            except Exception:
                err = traceback.format_exc()
        else:
            spec_file = self.points / f"{key}.spec"
            spec_file.write_text(json.dumps(full))
            env = dict(os.environ, STUDY_THREADS=str(self.threads))
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", str(spec_file)],
                                      cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=self.scale["run_timeout"])
                if proc.returncode != 0:
                    err = f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
            except subprocess.TimeoutExpired:
                err = f"timed out after {self.scale['run_timeout']} s"
            spec_file.unlink(missing_ok=True)
        if err:
            (self.points / f"{key}.failed.json").write_text(json.dumps(dict(key=key, error=err)))
            print(f"[study] FAILED {key} after {time.time() - t:.0f}s: {err.strip()[-300:]}",
                  flush=True)
            return
        r = self.result(spec)
        print(f"[study] {key}: tune {r['tune_loss']:.4f} test {r['test_loss']:.4f} "
              f"({time.time() - t:.0f}s, {r['tokens_per_s']:.0f} tok/s; "
              f"{(time.time() - self.t0) / 60:.1f} min in)", flush=True)

    def ensure(self, specs: list) -> None:
        if self.dry:
            return
        todo, seen = [], set()
        for s in specs:
            if s is None or s["key"] in seen:
                continue
            seen.add(s["key"])
            failed = self.points / f"{s['key']}.failed.json"
            if self.result(s) is None and (self.retry_failed or not failed.exists()):
                failed.unlink(missing_ok=True)
                todo.append(s)
        if not todo:
            return
        if self.jobs <= 1 or len(todo) == 1:
            for s in todo:
                self._run(s)
            return
        with cf.ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self._run, todo))

    def sweeps(self, families: dict, max_widen: int, extra=()) -> dict:
        """Joint lr sweeps: families {name: (make(lr) -> spec, grid)}; every round runs the
        missing points of all families (and ``extra`` specs) together, then widens each family
        whose best tuning loss sits at an edge of its grid."""
        grids = {n: list(g) for n, (_, g) in families.items()}
        widened = dict.fromkeys(families, 0)
        extra = list(extra)
        while True:
            self.ensure([families[n][0](lr) for n in grids for lr in grids[n]] + extra)
            extra = []
            changed = False
            for n in grids:
                losses = [self.loss(families[n][0](lr)) for lr in grids[n]]
                grid, did = widen(grids[n], losses, widened[n], max_widen)
                if did and self.dry and any(self.result(families[n][0](lr)) is None
                                            for lr in grid):
                    did = False             # --report-only: only as far as the study went
                if did:
                    grids[n] = grid
                widened[n] += did
                changed |= did
            if not changed or self.stopped:
                break
        out = {}
        for n, g in grids.items():
            losses = [self.loss(families[n][0](lr)) for lr in g]
            ok = [(v, lr) for v, lr in zip(losses, g) if v is not None]
            best = min(ok)[1] if ok else None
            out[n] = dict(grid=g, tune=losses, test=[self.loss(families[n][0](lr), "test")
                                                     for lr in g],
                          best_lr=best, interior=best is not None and g[0] < best < g[-1])
        return out


# ------------------------------------------------------------------------------ the plan
def plan(run: Runner, report) -> dict:
    """The study's stages (module docstring); returns the choices it made."""
    sc = run.scale
    V, V2 = sc["vocab"], sc["large_vocab"]
    seeds = list(range(sc["seeds"]))
    ch = dict(sweeps={}, tuned={}, gen_sweep={}, best_gen=None, best_variant=None, arms=[],
              lev=[])

    def arm(name, vocab, specs):           # a reported arm: its points, one per seed
        ch["arms"].append(dict(name=name, vocab=vocab, keys=[s["key"] for s in specs]))

    def pair(name, vocab, specs, refs):    # a Leviathan arm and its dense reference, seed-paired
        ch["lev"].append(dict(name=name, vocab=vocab, keys=[s["key"] for s in specs],
                              ref_keys=[s["key"] for s in refs]))

    def dense(tables, vocab, lr, seed=0, **kw):
        return run.spec(tables=tables, vocab=vocab, table_lr=lr, seed=seed, **kw)

    def lev(vocab, head_lr, variant="preset", gen_lr=None, gen_wd=None, seed=0, iso=False, **kw):
        return run.spec(embedding="leviathan", tables="adamw", vocab=vocab, table_lr=head_lr,
                        variant=variant, gen_lr=gen_lr, gen_wd=gen_wd, seed=seed, iso=iso, **kw)

    def stage(name):
        print(f"[study] === stage {name} ({(time.time() - run.t0) / 60:.1f} min in)", flush=True)

    # 1. table lr sweeps at the main vocabulary
    stage("1: table lr sweeps")
    ch["sweeps"][V] = run.sweeps({t: (lambda lr, t=t: dense(t, V, lr), sc["table_grid"])
                                  for t in TABLE_OPTS}, sc["max_widen"])
    tuned = ch["tuned"][V] = {t: s["best_lr"] for t, s in ch["sweeps"][V].items()}
    report(ch)
    head_lr = tuned.get("adamw")
    if head_lr is None:
        return ch

    # 2. seeds at the tuned lrs; generator lr x wd sweep; large-vocabulary sweep
    stage("2: tuned seeds, generator sweep, large-vocabulary sweep")
    seed_specs = [dense(t, V, lr, s) for t, lr in tuned.items() if lr for s in seeds[1:]]
    for t, lr in tuned.items():
        if lr:
            arm(f"dense+{t}", V, [dense(t, V, lr, s) for s in seeds])
    fams = {f"wd{wd:g}": (lambda lr, wd=wd: lev(V, head_lr, gen_lr=lr, gen_wd=wd), sc["gen_lrs"])
            for wd in sc["gen_wds"]}
    span = sc["large_span"]
    if V2:
        for t in ("adamw", "ember"):
            if tuned.get(t):
                fams[f"V2-{t}"] = (lambda lr, t=t: dense(t, V2, lr),
                                   [ladder(tuned[t], k) for k in range(-span, span + 1)])
    res = run.sweeps(fams, sc["max_widen"] if span else 0, extra=seed_specs)
    ch["gen_sweep"] = {n: s for n, s in res.items() if n.startswith("wd")}
    if V2:
        ch["sweeps"][V2] = {n[3:]: s for n, s in res.items() if n.startswith("V2-")}
        ch["tuned"][V2] = {t: s["best_lr"] for t, s in ch["sweeps"][V2].items()}
    cands = [(s["tune"][s["grid"].index(s["best_lr"])], s["best_lr"], float(n[2:]))
             for n, s in ch["gen_sweep"].items() if s["best_lr"] is not None]
    if cands:
        _, g_lr, g_wd = min(cands)
        ch["best_gen"] = dict(gen_lr=g_lr, gen_wd=g_wd)
    report(ch)
    if run.stopped or not ch["best_gen"]:
        return ch

    # 3. Leviathan variants at the best generator setting; large-vocabulary seeds
    stage("3: Leviathan variants, large-vocabulary seeds")
    g = ch["best_gen"]
    variant_specs = {"preset": lev(V, head_lr, **g)}
    for v in sc["variants"]:
        variant_specs[v] = (lev(V, head_lr, iso=True, **g) if v == "iso"
                            else lev(V, head_lr, variant=v, **g))
    tuned2 = ch["tuned"].get(V2, {})
    large_seeds = [dense(t, V2, lr, s) for t, lr in tuned2.items() if lr for s in seeds[1:]]
    for t, lr in tuned2.items():
        if lr:
            arm(f"dense+{t}", V2, [dense(t, V2, lr, s) for s in seeds])
    ref0 = [dense("adamw", V, head_lr)]
    for v, s in variant_specs.items():
        pair(v, V, [s], ref0)
    run.ensure(list(variant_specs.values()) + large_seeds)
    losses = {v: run.loss(s) for v, s in variant_specs.items()}
    ok = {v: l for v, l in losses.items() if l is not None and v != "iso"}
    ch["variants"] = {v: s["key"] for v, s in variant_specs.items()}
    if ok:
        ch["best_variant"] = min(ok, key=ok.get)
    report(ch)
    if run.stopped or not ch["best_variant"]:
        return ch

    # 4. the best variant with more seeds, and at the large vocabulary
    stage("4: best Leviathan variant: seeds, large vocabulary")
    bv = ch["best_variant"]
    more = [lev(V, head_lr, variant=bv, seed=s, **g) for s in seeds[1:]]
    pair(f"{bv}, {len(seeds)} seeds", V, [lev(V, head_lr, variant=bv, seed=s, **g) for s in seeds],
         [dense("adamw", V, head_lr, s) for s in seeds])
    if V2 and tuned2.get("adamw"):
        more.append(lev(V2, tuned2["adamw"], variant=bv, **g))
        pair(bv, V2, more[-1:], [dense("adamw", V2, tuned2["adamw"])])
    run.ensure(more)
    report(ch)
    if run.stopped or not sc["long_factor"]:
        return ch

    # 5. training length: the tuned dense table and the best variant, long_factor x steps
    stage("5: longer training")
    T = sc["steps"] * sc["long_factor"]
    long = [dense("adamw", V, head_lr, steps=T), lev(V, head_lr, variant=bv, steps=T, **g)]
    pair(f"{bv}, {T} steps", V, long[1:], long[:1])
    for t, lr in tuned.items():     # the tuned dense arms trained longer (at the lr tuned short)
        if lr:
            arm(f"dense+{t}, {T} steps", V, [dense(t, V, lr, s, steps=T) for s in seeds])
            long += [dense(t, V, lr, s, steps=T) for s in seeds]
    run.ensure(long)
    report(ch)
    if run.stopped or not V2 or not tuned.get("adafactor"):
        return ch

    # 6. if time is left: Adafactor at the large vocabulary, swept and seeded like the others
    stage("6: Adafactor at the large vocabulary")
    grid = [ladder(tuned["adafactor"], k) for k in range(-span, span + 1)]
    res = run.sweeps({"adafactor": (lambda lr: dense("adafactor", V2, lr), grid)},
                     sc["max_widen"] if span else 0)
    ch["sweeps"][V2].update(res)
    lr = ch["tuned"][V2]["adafactor"] = res["adafactor"]["best_lr"]
    if lr and not run.stopped:
        arm("dense+adafactor", V2, [dense("adafactor", V2, lr, s) for s in seeds])
        run.ensure([dense("adafactor", V2, lr, s) for s in seeds[1:]])
    report(ch)
    if run.stopped or not sc["beta2_sweep"]:
        return ch

    # 7. the tables' beta2, the one other knob of Ember (default 0.999) and of AdamW (0.95 here;
    # Adafactor's decay is its own schedule 1 - t^-0.8), lr re-swept around its tuned value; a
    # setting that beats the default on the tuning split gets the seeds of a tuned arm
    stage("7: the tables' beta2")
    fams = {f"{t} b2={b:g}": (lambda lr, t=t, b=b: dense(t, V, lr, table_beta2=b),
                              [ladder(tuned[t], k) for k in (-1, 0, 1)])
            for t, betas in sc["beta2_sweep"].items() if tuned.get(t) for b in betas}
    res = run.sweeps(fams, sc["max_widen"])
    ch["sweeps"][V].update(res)
    ch["beta2"] = {}
    for t in sc["beta2_sweep"]:
        best = min(((s["tune"][s["grid"].index(s["best_lr"])], n) for n, s in res.items()
                    if n.startswith(t + " ") and s["best_lr"] is not None), default=None)
        default = run.loss(dense(t, V, tuned[t])) if tuned.get(t) else None
        if best and default is not None and best[0] < default and not run.stopped:
            b = float(best[1].split("=")[1])
            lr = res[best[1]]["best_lr"]
            ch["beta2"][t] = dict(beta2=b, lr=lr)
            arm(f"dense+{t}, beta2 {b:g}", V, [dense(t, V, lr, s, table_beta2=b) for s in seeds])
            run.ensure([dense(t, V, lr, s, table_beta2=b) for s in seeds[1:]])
    report(ch)
    return ch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--data", nargs="+", help="text / jsonl files or folders to train on "
                    "(default: the shipped corpus); see launch/data.py for the formats")
    ap.add_argument("--vocab", type=int, help="the main SentencePiece vocabulary size")
    ap.add_argument("--large-vocab", type=int, help="the second, larger vocabulary (0: skip)")
    ap.add_argument("--steps", type=int, help="override the scale's step count")
    ap.add_argument("--seeds", type=int, help="seeds per tuned arm (default 3)")
    ap.add_argument("--jobs", type=int, help="runs at a time (default: the scale's)")
    ap.add_argument("--threads", type=int, help="torch threads per run (default cores / jobs)")
    ap.add_argument("--stop-after", type=float, metavar="MIN",
                    help="start no run after this many minutes; report what finished")
    ap.add_argument("--retry-failed", action="store_true", help="rerun points that failed")
    ap.add_argument("--inline", action="store_true", help="run points in this process")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite results.json / .md / plots from the finished points")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec file and exit
    args = ap.parse_args(argv)
    if args.one:
        spec = json.loads(Path(args.one).read_text())
        res = run_one(spec)
        out = Path(args.one).with_suffix(".json")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(out)
        return 0

    scale = dict(SCALES[args.scale])
    for name in ("vocab", "large_vocab", "steps", "seeds", "jobs"):
        if getattr(args, name) is not None:
            scale[name] = getattr(args, name)
    scale["data"] = [str(Path(p).resolve()) for p in args.data] if args.data else None
    jobs = max(1, scale["jobs"])
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    out = args.out or ROOT / "bench" / "results" / f"study_{args.scale}"
    out.mkdir(parents=True, exist_ok=True)
    # prepare the data once here (not in every run), the runs open the prepared folders
    scale["prepared"] = {str(v): str(load_data(scale, v, log=lambda m: print(m, flush=True)).path)
                         for v in (scale["vocab"], scale["large_vocab"]) if v}
    stop_at = time.time() + 60 * args.stop_after if args.stop_after else None
    run = Runner(scale, out, jobs, args.inline, threads, args.retry_failed, stop_at)
    from bench import study_report

    meta = dict(scale=args.scale, settings=scale, date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                      time.gmtime()),
                machine=f"{platform.processor() or platform.machine()} CPU, "
                        f"{os.cpu_count()} cores", jobs=jobs, threads_per_run=threads,
                command=" ".join(["python", "bench/study.py"] + (argv or sys.argv[1:])))
    import torch
    meta["torch"] = torch.__version__
    try:
        meta["commit"] = os.environ.get("STUDY_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout.strip()
    except OSError:
        meta["commit"] = None

    def report(choices, final=False):
        if not run.dry:
            meta["wall_seconds"] = round(time.time() - run.t0)
        try:
            study_report.write(out, meta, choices, plots=final or scale["stage_plots"])
        except Exception:                      # a report bug must not stop the runs
            traceback.print_exc()

    run.dry = args.report_only
    if run.dry and (out / "results.json").exists():   # keep the measuring run's own record
        old = json.loads((out / "results.json").read_text()).get("meta", {})
        meta.update({k: old[k] for k in ("date", "command", "commit", "jobs", "threads_per_run",
                                         "torch", "machine", "wall_seconds") if k in old})
    choices = plan(run, report)
    report(choices, final=True)
    print(f"[study] done in {(time.time() - run.t0) / 60:.1f} min"
          + (" (stopped early by --stop-after)" if run.stopped else "")
          + f"; wrote {out}/results.json, results.md and the plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
