"""The study's report (bench/study.py): results.json, results.md and the plots, rebuilt from
whatever points have finished, so a partial or interrupted study still reports.

Spread is the sample standard deviation over seeds (n - 1); a gap is Leviathan minus its dense
reference of the same seed (same data order, same head optimizer and lr), averaged over seeds.
"""
from __future__ import annotations

import json
import math
import statistics as st
from pathlib import Path

BUCKETS = 5


def ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return dict(mean=st.fmean(vals), spread=st.stdev(vals) if len(vals) > 1 else 0.0,
                n=len(vals))


def fmt(m, f="{:.3f}"):
    if m is None:
        return "n/a"
    if m["n"] == 1:
        return f.format(m["mean"])
    return f"{f.format(m['mean'])} ± {f.format(m['spread'])} (n={m['n']})"


def load_points(out: Path) -> dict:
    pts = {}
    for p in sorted((out / "points").glob("*.json")):
        if p.name.endswith(".failed.json"):
            continue
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        pts[r["key"]] = r
    return pts


def failed_points(out: Path) -> list:
    return sorted(p.name[:-len(".failed.json")] for p in (out / "points").glob("*.failed.json"))


def arm_summary(a: dict, pts: dict) -> dict:
    rs = [pts[k] for k in a["keys"] if k in pts]
    d = dict(name=a["name"], vocab=a["vocab"], n_planned=len(a["keys"]), n=len(rs))
    if not rs:
        return d
    r0 = rs[0]
    p = r0["params"]
    total = p["embedding"] + p["body"] + p["head"]
    d.update(table_lr=r0["spec"]["table_lr"], test_loss=ms([r["test_loss"] for r in rs]),
             tune_loss=ms([r["tune_loss"] for r in rs]),
             test_ppl=ms([math.exp(r["test_loss"]) for r in rs]),
             tokens_per_s=ms([r["tokens_per_s"] for r in rs]), params=p, layers=r0["layers"],
             table_share=(p["head"] + (p["embedding"] if r0["spec"]["embedding"] == "dense"
                                       else 0)) / total,
             table_state_bytes=r0["table_state_bytes"],
             loss_by_frequency=[ms([r["loss_by_frequency"][k]["loss"] for r in rs])
                                for k in range(BUCKETS)],
             bucket_info=[dict(val_tokens=b["val_tokens"], train_count_max=b["train_count_max"])
                          for b in r0["loss_by_frequency"]],
             train_tokens=r0["train_tokens"], tokens=r0["tokens"])
    return d


def pair_summary(pr: dict, pts: dict) -> dict:
    d = dict(name=pr["name"], vocab=pr["vocab"])
    both = [(pts[k], pts[r]) for k, r in zip(pr["keys"], pr["ref_keys"]) if k in pts and r in pts]
    mine = [pts[k] for k in pr["keys"] if k in pts]
    if not mine:
        return d
    r0 = mine[0]
    s = r0["spec"]
    d.update(variant=s["variant"], iso=s["iso"], gen_lr=s["gen_lr"], gen_wd=s["gen_wd"],
             steps=s["steps"], layers=r0["layers"], params=r0["params"],
             test_loss=ms([r["test_loss"] for r in mine]),
             tune_loss=ms([r["tune_loss"] for r in mine]),
             tokens_per_s=ms([r["tokens_per_s"] for r in mine]),
             gap=ms([a["test_loss"] - b["test_loss"] for a, b in both]),
             gap_by_frequency=[ms([a["loss_by_frequency"][k]["loss"]
                                   - b["loss_by_frequency"][k]["loss"] for a, b in both
                                   if a["loss_by_frequency"][k]["loss"] is not None
                                   and b["loss_by_frequency"][k]["loss"] is not None])
                               for k in range(BUCKETS)],
             gap_curve=_gap_curve(both[0]) if both else None)
    return d


def _gap_curve(pair):
    a, b = pair
    ref = dict(map(tuple, b["val_curve"]))
    return [(s, l - ref[s]) for s, l in a["val_curve"] if s in ref]


def summarize(meta: dict, choices: dict, out: Path) -> dict:
    pts = load_points(out)
    sweeps = {}
    for V, arms in choices.get("sweeps", {}).items():
        sweeps[str(V)] = arms
    return dict(meta=meta, choices={k: v for k, v in choices.items()
                                    if k not in ("arms", "lev", "sweeps")},
                sweeps=sweeps, gen_sweep=choices.get("gen_sweep", {}),
                arms=[arm_summary(a, pts) for a in choices.get("arms", [])],
                leviathan=[pair_summary(p, pts) for p in choices.get("lev", [])],
                budget=dict(points=len(pts), failed=failed_points(out),
                            run_seconds=round(sum(r["seconds"] for r in pts.values())),
                            train_steps=sum(r["spec"]["steps"] for r in pts.values()),
                            tokens=sum(r["tokens"] for r in pts.values())),
                points={k: {x: r[x] for x in ("tune_loss", "test_loss", "seconds",
                                              "tokens_per_s", "layers", "params")}
                        for k, r in pts.items()})


def markdown(S: dict) -> str:
    m, st_ = S["meta"], S["meta"]["settings"]
    b = S["budget"]
    L = [f"# Study at scale `{m['scale']}`", "",
         f"{m['date']}, {m['machine']}, {m['jobs']} run(s) at a time x {m['threads_per_run']} "
         f"thread(s); commit {m.get('commit') or '?'}; `{m['command']}`.", "",
         f"Model: preset `{st_['preset']}`, {st_['layers'] or 'preset'} layers; "
         f"{st_['steps']} steps x {st_['micro']} x {st_['seq']} tokens; body AdamW lr "
         f"{st_['body_lr']:g} (betas 0.9/0.95, weight decay 0.1 on matrices); warmup 10%, cosine "
         f"to 10%, clip 1.0. Data: {', '.join(st_['data'] or ['the shipped corpus'])}; "
         f"vocabularies {st_['vocab']}"
         + (f" and {st_['large_vocab']}" if st_['large_vocab'] else "")
         + ". Tuning split: first half of the held-out windows; reported: the second half (test).",
         "",
         f"Budget: {b['points']} finished runs, {b['train_steps']:,} training steps, "
         f"{b['tokens']:,} training tokens, {b['run_seconds']:,} run-seconds; wall "
         f"{m.get('wall_seconds', 0) / 60:.0f} min "
         "(the last invocation's)." + (f" Failed: {', '.join(b['failed'])}."
                                                         if b["failed"] else ""), ""]
    for V, arms in S["sweeps"].items():
        grid = sorted({lr for a in arms.values() for lr in a["grid"]})
        L += [f"## Table lr sweep, vocabulary {V} (seed 0; tuning-split loss, test in brackets)",
              "", "| table lr | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for lr in grid:
            row = []
            for a in arms.values():
                if lr in a["grid"]:
                    i = a["grid"].index(lr)
                    t, te = a["tune"][i], a["test"][i]
                    cell = "failed" if t is None else f"{t:.3f} ({te:.3f})"
                    row.append(f"**{cell}**" if lr == a["best_lr"] else cell)
                else:
                    row.append("")
            L.append(f"| {lr:g} | " + " | ".join(row) + " |")
        L += ["", "Best: " + "; ".join(
            f"{n} {a['best_lr']:g} ({'interior' if a['interior'] else 'AT AN EDGE'})"
            if a["best_lr"] else f"{n} none" for n, a in arms.items()), ""]
    if S["arms"]:
        L += ["## Tuned arms (test split)", "",
              "| arm | vocab | table lr | tables' share of params | table opt. state | "
              "test loss | test ppl | tune loss | tokens/s |", "|---" * 9 + "|"]
        for a in S["arms"]:
            if not a.get("test_loss"):
                L.append(f"| {a['name']} | {a['vocab']} | not run | | | | | | |")
                continue
            L.append(f"| {a['name']} | {a['vocab']} | {a['table_lr']:g} | "
                     f"{a['table_share']:.0%} | {a['table_state_bytes']:,} B | "
                     f"{fmt(a['test_loss'])} | {fmt(a['test_ppl'], '{:.1f}')} | "
                     f"{fmt(a['tune_loss'])} | {fmt(a['tokens_per_s'], '{:.0f}')} |")
        L += ["", "Test loss by token-frequency bucket (types ranked by training count, "
              f"{BUCKETS} equal groups, 0 = rarest; test tokens and max training count per "
              "group in the header row of each vocabulary):", ""]
        for V in dict.fromkeys(a["vocab"] for a in S["arms"]):
            arms = [a for a in S["arms"] if a["vocab"] == V and a.get("test_loss")]
            if not arms:
                continue
            info = arms[0]["bucket_info"]
            L += [f"| V={V} | " + " | ".join(f"{k} ({i['val_tokens']} tok; <= "
                                             f"{i['train_count_max']}x)"
                                             for k, i in enumerate(info)) + " |",
                  "|---|" + "---|" * BUCKETS]
            for a in arms:
                L.append(f"| {a['name']} | " + " | ".join(fmt(x, "{:.2f}")
                                                         for x in a["loss_by_frequency"]) + " |")
            L.append("")
    if S["gen_sweep"]:
        L += ["## Leviathan generator lr x weight decay (preset variant, seed 0, tuning loss)", "",
              "| generator lr | " + " | ".join(S["gen_sweep"]) + " |",
              "|---|" + "---|" * len(S["gen_sweep"])]
        grid = sorted({lr for a in S["gen_sweep"].values() for lr in a["grid"]})
        for lr in grid:
            row = []
            for a in S["gen_sweep"].values():
                if lr in a["grid"] and a["tune"][a["grid"].index(lr)] is not None:
                    row.append(f"{a['tune'][a['grid'].index(lr)]:.3f}")
                else:
                    row.append("")
            L.append(f"| {lr:g} | " + " | ".join(row) + " |")
        L += ["", f"Chosen: {S['choices'].get('best_gen')}.", ""]
    if S["leviathan"]:
        L += ["## Leviathan against the tuned dense table (AdamW on both heads, same lr)", "",
              "| Leviathan arm | vocab | steps | layers | generator params | test loss | "
              "gap to dense (test) | gap, rarest bucket | gap, most frequent | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for p in S["leviathan"]:
            if not p.get("test_loss"):
                L.append(f"| {p['name']} | {p['vocab']} | not run | | | | | | | |")
                continue
            g = p["gap_by_frequency"]
            L.append(f"| {p['name']}{' (iso-param.)' if p['iso'] else ''} | {p['vocab']} | "
                     f"{p['steps']} | {p['layers']} | {p['params']['embedding']:,} | "
                     f"{fmt(p['test_loss'])} | {fmt(p['gap'])} | {fmt(g[0], '{:.2f}')} | "
                     f"{fmt(g[-1], '{:.2f}')} | {fmt(p['tokens_per_s'], '{:.0f}')} |")
        L += ["", "Gap over training (tuning-split subset, seed 0): step: gap", ""]
        for p in S["leviathan"]:
            if p.get("gap_curve"):
                L.append(f"- {p['name']} (V={p['vocab']}): " + ", ".join(
                    f"{s}: {g:+.3f}" for s, g in p["gap_curve"]))
        L.append("")
    return "\n".join(L) + "\n"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw(S: dict, out: Path, pts: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. loss against table lr per arm (and the generator sweep)
    panels = [(f"table lr, V={V}", arms) for V, arms in S["sweeps"].items()]
    if S["gen_sweep"]:
        panels.append(("Leviathan generator lr (weight decay)", S["gen_sweep"]))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (title, arms) in zip(axes[0], panels):
            for i, (n, a) in enumerate(arms.items()):
                xs = [lr for lr, t in zip(a["grid"], a["tune"]) if t is not None]
                ax.plot(xs, [t for t in a["tune"] if t is not None], "o-", color=f"C{i}",
                        label=f"{n} (tuning)")
                ax.plot(xs, [t for t in a["test"] if t is not None], "x--", color=f"C{i}",
                        alpha=0.5, label=f"{n} (test)")
            ax.set_xscale("log")
            ax.set_xlabel(title)
            ax.set_ylabel("loss after training (seed 0)")
        _save(fig, out / "study_lr_sweep.png")

    # 2. loss curves: tuned dense arms and Leviathan arms, per vocabulary
    vocabs = list(dict.fromkeys([a["vocab"] for a in S["arms"]] +
                                [p["vocab"] for p in S["leviathan"]]))
    if vocabs:
        fig, axes = plt.subplots(1, len(vocabs), figsize=(6 * len(vocabs), 4.5), squeeze=False)
        for ax, V in zip(axes[0], vocabs):
            drawn, i = set(), 0
            series = [(a["name"], k) for a in S.get("_arms_raw", []) if a["vocab"] == V
                      for k in a["keys"][:1]]
            series += [(None, k) for p in S.get("_lev_raw", []) if p["vocab"] == V
                       for k in p["ref_keys"][:1]]
            series += [("Leviathan " + p["name"], k) for p in S.get("_lev_raw", [])
                       if p["vocab"] == V for k in p["keys"][:1]]
            for name, k in series:
                if k in drawn or k not in pts:
                    continue
                drawn.add(k)
                sp = pts[k]["spec"]
                name = name or f"dense+{sp['tables']}, {sp['steps']} steps"
                s, l = zip(*pts[k]["val_curve"])
                ax.plot(s, l, color=f"C{i % 10}", ls="--" if name.startswith("Lev") else "-",
                        label=name)
                i += 1
            ax.set_title(f"vocabulary {V}: seed 0, tuning-split subset")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
        _save(fig, out / "study_curves.png")

    # 3. Leviathan's gap to the dense table over training
    firsts = [p["keys"][0] for p in S.get("_lev_raw", [])]
    gaps = [p for i, p in enumerate(S["leviathan"])       # one line per seed-0 run
            if p.get("gap_curve") and (i >= len(firsts) or firsts[i] not in firsts[:i])]
    if gaps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, p in enumerate(gaps):
            s, g = zip(*p["gap_curve"])
            ax.plot(s, g, "o-", color=f"C{i % 10}", ms=3, label=f"{p['name']} (V={p['vocab']})")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("Leviathan loss - dense loss (nats)")
        ax.set_title("Does the generator catch up with the table?")
        _save(fig, out / "study_leviathan_gap.png")

    # 4. loss by frequency bucket, tuned arms
    arms = [a for a in S["arms"] if a.get("loss_by_frequency")]
    if arms:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(arms)
        for i, a in enumerate(arms):
            means = [m["mean"] if m else float("nan") for m in a["loss_by_frequency"]]
            errs = [m["spread"] if m else 0 for m in a["loss_by_frequency"]]
            ax.bar([k + i * width for k in range(BUCKETS)], means, width, yerr=errs,
                   label=f"{a['name']} V={a['vocab']}")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(BUCKETS)])
        ax.set_xticklabels(["rarest"] + [str(k) for k in range(1, BUCKETS - 1)]
                           + ["most frequent"])
        ax.set_ylabel("test loss")
        ax.set_title("Test loss by token-frequency bucket, tuned arms")
        _save(fig, out / "study_loss_by_frequency.png")


def write(out: Path, meta: dict, choices: dict, plots: bool = True) -> dict:
    S = summarize(meta, choices, out)
    (out / "results.json").write_text(json.dumps(S, indent=1))
    (out / "results.md").write_text(markdown(S))
    if plots:
        S["_arms_raw"], S["_lev_raw"] = choices.get("arms", []), choices.get("lev", [])
        draw(S, out, load_points(out))
    return S
