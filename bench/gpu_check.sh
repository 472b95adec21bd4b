#!/usr/bin/env bash
# The project's GPU checks in one go (issue 13), sized for at most 8 minutes on one GPU:
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU and a CUDA torch
#   bash bench/gpu_check.sh --dry-run       # the same steps, tiny, on CPU (tests this script)
#
#   1. triton_ember      Ember's Triton kernels (stats, update; fp32, bf16) against the torch
#                        path, values, up to a 50304 x 768 table
#   2. triton_leviathan  Leviathan's Triton spline-mode kernel against the torch path
#                        (tests/test_leviathan.py -k triton with the interpreter off)
#   3. ember             Ember vs fused AdamW step time at 32000x512, 50304x768, 131072x1024
#                        (bench/bench_ember.py; target <= 0.6x)
#   4. leviathan         Leviathan whole-step overhead at the 60m preset in bf16
#                        (bench/bench_leviathan.py; target <= +5%)
#   5. peers             the project's GPT vs HF LlamaForCausalLM and megatron-core GPTModel,
#                        bf16 (bench/bench_peers.py)
#   6. quickstart        200 steps of launch/quickstart.sh (bf16 on every visible GPU)
#
# Writes bench/results/gpu_check_<device>_<UTC date>.json and .md (device name, date, every
# step's status, seconds and figures, targets met / missed); logs and each step's own JSON go to
# bench/results/gpu_check_<UTC stamp>/. A step that fails or runs past its time cap is recorded
# as such and the others still run. Uses the active Python environment (install a CUDA build of
# torch there first: README, "Install"); PYTHON overrides the interpreter.
#
# Options: --dry-run (alias --cpu-smoke): CPU, tiny sizes, the Triton kernels under the
# interpreter, the quick start skipped. --out DIR (default bench/results). --logs DIR (the logs
# and each step's JSON; default DIR/gpu_check_<UTC stamp>). --only a,b (a subset of the step
# names above). -h / --help.
#
# On a lent machine that starts bare (no DeepSpeed or megatron-core, no package index, Python
# maybe named python3 only): run `bash bench/gpu_wheels.sh` here first (it fills .whl/, which
# the machine receives when the call carries it); this script installs those wheels into
# /tmp/site when the imports it needs fail, and answers `python` with the interpreter it uses.
# With the device tool, one call (results back through $OUT, the logs packed into one file):
#   run(carry=[".whl"], timeout_s=600, command='bash bench/gpu_check.sh --out "$OUT"
#       --logs /tmp/gc; tar czf "$OUT/gpu_check_logs.tgz" --exclude=checkpoints -C /tmp gc')
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
OUT=bench/results
LOGS=""
ONLY=""
STEPS="triton_ember triton_leviathan ember leviathan peers quickstart"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--cpu-smoke) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --only) [ $# -ge 2 ] || { echo "gpu_check: --only needs step names" >&2; exit 2; }; ONLY=$2; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --logs) [ $# -ge 2 ] || { echo "gpu_check: --logs needs a folder" >&2; exit 2; }; LOGS=$2; shift ;;
    --logs=*) LOGS=${1#--logs=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for s in ${ONLY//,/ }; do
  case " $STEPS " in *" $s "*) ;; *) echo "gpu_check: unknown step '$s' (steps: $STEPS)" >&2; exit 2 ;; esac
done

# A bare GPU machine may call its Python python3 only: the steps (and launch/quickstart.sh)
# say "python", so a shim on PATH points that name at the interpreter used here.
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
if ! command -v python > /dev/null; then
  SHIM=$(mktemp -d)
  ln -s "$(command -v "$PY")" "$SHIM/python"
  export PATH="$SHIM:$PATH"
fi
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1
else
  DEVICE=cuda
  export TRITON_INTERPRET=0
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run with --dry-run to check the script on CPU" >&2
    exit 3
  fi
fi
# What a bare machine lacks (DeepSpeed, megatron-core, hjson, pydantic): the wheels that
# bench/gpu_wheels.sh put into .whl/ (GPU_WHEELS) beforehand, installed into /tmp/site (GPU_SITE)
# for this run; GPU_CHECK_IMPORTS replaces the import line that decides it.
NEEDED=${GPU_CHECK_IMPORTS:-"import deepspeed, megatron.core, hjson, pydantic, sentencepiece, transformers, triton"}
WHEELS=${GPU_WHEELS:-.whl}
if ! "$PY" -c "$NEEDED" > /dev/null 2>&1 && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  SITE=${GPU_SITE:-/tmp/site}
  echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || { echo "gpu_check: installing $WHEELS/ failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
fi
if ! MISSING=$("$PY" -c "$NEEDED" 2>&1 > /dev/null); then
  echo "gpu_check: $PY cannot import what the checks need ($(echo "$MISSING" | tail -1)); on a machine without a package index run 'bash bench/gpu_wheels.sh' where pip works and carry .whl/" >&2
  exit 3
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=${LOGS:-"$OUT/gpu_check_$STAMP"}
mkdir -p "$RUN" "$OUT"
: > "$RUN/steps.tsv"
DEADLINE=$(( $(date +%s) + 470 ))   # 8 minutes in all, with room for the summary

selected() { [ -z "$ONLY" ] && return 0; case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }

# run_step NAME CAP_SECONDS COMMAND...: log to $RUN/NAME.log, record status and seconds
run_step() {
  local name=$1 cap=$2; shift 2
  if ! selected "$name"; then
    printf '%s\tnot selected\t0\n' "$name" >> "$RUN/steps.tsv"; return
  fi
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -le 5 ]; then
    printf '%s\tskipped: out of time\t0\n' "$name" >> "$RUN/steps.tsv"; return
  fi
  echo "[gpu_check] $name (up to ${cap} s) ..."
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$RUN/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${cap} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$RUN/steps.tsv"
  echo "[gpu_check] $name: $status ($(( $(date +%s) - t0 )) s; log $RUN/$name.log)"
}

if [ "$DRY" = 1 ]; then
  EMBER_SIZES=512x64,1000x96
  EMBER_ARGS=(--threads 1 --seconds 0.05 --min-reps 2 --max-reps 3 --warmup 1 --no-memory)
  LEV_ARGS=(--presets tiny --steps 1 --warmup 0 --batch 1 --device cpu)
  PEER_ARGS=(--shapes tiny --rounds 1 --warmup 0 --batch 1 --seq 16)
else
  EMBER_SIZES=32000x512,50304x768,131072x1024
  EMBER_ARGS=(--seconds 2)
  LEV_ARGS=(--presets 60m --device cuda --bf16 --steps 10 --warmup 3)
  PEER_ARGS=(--shapes tiny 60m --rounds 10 --warmup 3)
fi

run_step triton_ember 60 "$PY" - "$DEVICE" "$RUN/triton_ember.json" "$DRY" <<'EOF'
"""Ember's Triton kernels on the device against the plain torch path on CPU."""
import json, os, sys
os.environ["EMBER_DS_CPU_FUSED"] = "0"        # the reference: the torch path itself
import torch
from ember_ds import factored, triton_kernels as tk
dev, out, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
assert tk.available(), "Triton kernels unavailable"
shapes = [(37, 53), (300, 130), (1, 7), (7, 1), (129, 257)]
if not dry:
    shapes += [(4099, 1000), (32000, 512), (50304, 768)]
cases, ok = [], True
for V, D in shapes:
    for dt in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(V * 7 + D)
        g = (torch.randn(V, D, generator=gen) * 3).to(dt)
        w = torch.randn(V, D, generator=gen).to(dt)
        a, b = torch.rand(V, generator=gen) + 0.05, torch.rand(D, generator=gen) + 0.05
        r0, c0 = torch.zeros(V), torch.zeros(D)
        factored.piece_stats(g, r0, c0)
        r1, c1 = torch.zeros(V, device=dev), torch.zeros(D, device=dev)
        tk.piece_stats_triton(g.to(dev), r1, c1)
        rel = max(float(((r1.cpu() - r0).abs() / r0.clamp_min(1e-30)).max()),
                  float(((c1.cpu() - c0).abs() / c0.clamp_min(1e-30)).max()))
        w0 = w.clone()
        factored.piece_update(w0, g, a, b, 0.05, 1e-8, 0.99)
        w1 = w.to(dev)
        tk.piece_update_triton(w1, g.to(dev), a.to(dev), b.to(dev), 0.05, 1e-8, 0.99)
        diff = (w1.cpu().float() - w0.float()).abs()
        ulp = torch.finfo(dt).eps * w0.float().abs().clamp_min(torch.finfo(dt).tiny)
        worst_ulps = float((diff / ulp).max())
        # sums: fp32 rounding of up to max(V, D) terms in another order; update: one ulp (the
        # interpreter truncates bf16 stores), bitwise in fp32 on a GPU is not required
        case_ok = rel <= max(1e-6, 4 * max(V, D) * 2.0 ** -24) and worst_ulps <= 1.0
        ok &= case_ok
        cases.append(dict(shape=[V, D], dtype=str(dt).replace("torch.", ""),
                          stats_max_rel_err=rel, update_max_ulps=worst_ulps,
                          update_bitwise=bool(torch.equal(w1.cpu(), w0)), ok=case_ok))
        print(cases[-1], flush=True)
json.dump(dict(device=dev, ok=ok, cases=cases), open(out, "w"), indent=1)
sys.exit(0 if ok else 1)
EOF

run_step triton_leviathan 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_leviathan.py -k triton

run_step ember 75 "$PY" bench/bench_ember.py --device "$DEVICE" --sizes "$EMBER_SIZES" \
  "${EMBER_ARGS[@]}" --out "$RUN/ember.json"

run_step leviathan 60 "$PY" bench/bench_leviathan.py "${LEV_ARGS[@]}" --out "$RUN/leviathan.json"

run_step peers 90 "$PY" bench/bench_peers.py --device "$DEVICE" "${PEER_ARGS[@]}" \
  --out "$RUN/peers.json"

if [ "$DRY" = 1 ]; then
  selected quickstart && printf 'quickstart\tskipped (dry run)\t0\n' >> "$RUN/steps.tsv" \
    || printf 'quickstart\tnot selected\t0\n' >> "$RUN/steps.tsv"
else
  run_step quickstart 150 env EMBER_NO_SETUP=1 QUICKSTART_STEPS=200 QUICKSTART_MINUTES=2 \
    QUICKSTART_OUT="$RUN/quickstart" bash launch/quickstart.sh
fi

"$PY" - "$RUN" "$OUT" "$DEVICE" "$DRY" <<'EOF'
"""Collect the steps' results into one JSON and one markdown file."""
import json, re, sys, time
from pathlib import Path
run, out, device, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"


def load(name):
    p = run / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


name = "cpu (dry run)"
if device == "cuda":
    import torch
    name = torch.cuda.get_device_name(0)
date = time.strftime("%Y-%m-%d", time.gmtime())
steps = {}
for line in (run / "steps.tsv").read_text().splitlines():
    step, status, secs = line.split("\t")
    steps[step] = dict(status=status, seconds=int(secs), log=str(run / f"{step}.log"))
figures, lines = {}, []

t = load("triton_ember.json")
if t:
    figures["triton_ember"] = dict(ok=t["ok"], cases=len(t["cases"]),
                                   worst_stats_rel_err=max(c["stats_max_rel_err"] for c in t["cases"]),
                                   worst_update_ulps=max(c["update_max_ulps"] for c in t["cases"]))
e = load("ember.json")
if e:
    limit = 0.6 if device == "cuda" else 0.7
    rows = []
    for s in e["sizes"]:
        r = s["results"]["ember"]
        ratio = r["paired_ratio_vs_adamw_fused"]["median"]
        rows.append(dict(table=f"{s['V']}x{s['D']}", threads=s.get("threads"),
                         ember_ms=r["median_ms"],
                         adamw_fused_ms=s["results"]["adamw_fused"]["median_ms"],
                         ratio=ratio, target=limit, met=ratio <= limit))
    figures["ember_vs_fused_adamw"] = rows
lv = load("leviathan.json")
if lv:
    rows = []
    for p in lv["results"]:
        for v in p["leviathan"]:
            rows.append(dict(preset=p["preset"], variant=v["variant"], dtype=p["dtype"],
                             dense_ms=p["dense"]["step_s"] * 1e3, leviathan_ms=v["step_s"] * 1e3,
                             overhead=v["overhead"], target=0.05, met=v["overhead"] <= 0.05))
    figures["leviathan_overhead"] = rows
pe = load("peers.json")
if pe:
    figures["peers"] = [dict(shape=s["shape"], dtype=s["dtype"], params=s["params"],
                             ratio_to_gpt_dense={n: r["ratio_to_dense"]["median"]
                                                 for n, r in s["results"].items()},
                             ms={n: r["median_ms"] for n, r in s["results"].items()},
                             targets=s["targets"]) for s in pe["shapes"]]
q = load("quickstart/summary.json")
if q:
    figures["quickstart"] = {k: q.get(k) for k in ("end_step", "val_loss_before", "val_loss_after",
                                                   "tokens_per_s", "train_seconds", "precision",
                                                   "device")}

result = dict(device=name, date=date, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              dry_run=dry, run_folder=str(run), steps=steps, figures=figures)
slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "device"
base = out / f"gpu_check_{slug}_{date}"
Path(str(base) + ".json").write_text(json.dumps(result, indent=1) + "\n")

md = [f"# GPU check: {name}, {date}", "",
      f"`bash bench/gpu_check.sh{' --dry-run' if dry else ''}` ({result['time_utc']}; logs in "
      f"`{run}`)", "", "| step | status | seconds |", "|---|---|---|"]
md += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in steps.items()]
if "triton_ember" in figures:
    f = figures["triton_ember"]
    md += ["", f"**Ember Triton kernels vs torch path**: {'all equal' if f['ok'] else 'MISMATCH'} "
           f"({f['cases']} cases; worst stats relative error {f['worst_stats_rel_err']:.2e}, "
           f"worst update {f['worst_update_ulps']:.2f} ulp)"]
if "ember_vs_fused_adamw" in figures:
    md += ["", "**Ember vs fused AdamW** (table step, paired median ratio)", "",
           "| table | threads | Ember ms | fused AdamW ms | ratio | target |", "|---|---|---|---|---|---|"]
    md += [f"| {r['table']} | {r['threads']} | {r['ember_ms']:.2f} | {r['adamw_fused_ms']:.2f} | "
           f"{r['ratio']:.2f}x | <= {r['target']}x {'met' if r['met'] else 'MISSED'} |"
           for r in figures["ember_vs_fused_adamw"]]
if "leviathan_overhead" in figures:
    md += ["", "**Leviathan whole-step overhead**", "",
           "| preset | generator | dtype | dense ms | Leviathan ms | overhead | target |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['preset']} | {r['variant']} | {r['dtype']} | {r['dense_ms']:.1f} | "
           f"{r['leviathan_ms']:.1f} | {100 * r['overhead']:+.1f}% | <= +5% "
           f"{'met' if r['met'] else 'MISSED'} |" for r in figures["leviathan_overhead"]]
if "peers" in figures:
    md += ["", "**Whole step vs peers** (ratio to the project's dense GPT, paired median)", "",
           "| shape | dtype | " + " | ".join(figures["peers"][0]["ms"]) + " |",
           "|---|---|" + "---|" * len(figures["peers"][0]["ms"])]
    for s in figures["peers"]:
        md.append(f"| {s['shape']} | {s['dtype']} | " + " | ".join(
            f"{s['ms'][n]:.1f} ms ({s['ratio_to_gpt_dense'][n]:.2f}x)" for n in s["ms"]) + " |")
if "quickstart" in figures:
    f = figures["quickstart"]
    md += ["", f"**Quick start, 200 steps**: validation loss {f['val_loss_before']:.3f} -> "
           f"{f['val_loss_after']:.3f}, {f['tokens_per_s']:,.0f} tokens/s, "
           f"{f['train_seconds']:.0f} s ({f['precision']}, {f['device']})"]
Path(str(base) + ".md").write_text("\n".join(md) + "\n")
print("\n".join(md))
print(f"[gpu_check] wrote {base}.json and {base}.md")
EOF
rc=$?
[ $rc -ne 0 ] && { echo "gpu_check: the summary failed (exit $rc)" >&2; exit $rc; }
grep -qv $'\tok\t\|\tnot selected\t\|\tskipped (dry run)\t' "$RUN/steps.tsv" && exit 1
exit 0
