#!/usr/bin/env bash
# The project's GPU checks in one go (issues 13 and 20), sized for one 9-minute run on one H200:
# no step starts after 500 s, each runs under its cap (seconds, below; at most the time left) and
# one past it is recorded as timed out; the caps add up to 525 s, what the steps should take
# about 400 (a 1B model built on the CPU ~15 s, torch.compile of it ~1 min per process).
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU and a CUDA torch
#   bash bench/gpu_check.sh --dry-run       # the same steps, tiny, on CPU (tests this script)
#
# The default steps, in this order (cap in seconds):
#   triton_ember     25  Ember's Triton kernels (stats, update; fp32, bf16) against the torch
#                        path, values, up to a 50304 x 768 table
#   ember            35  Ember vs fused AdamW table step at 32000x512, 50304x768, 131072x1024
#                        (bench/bench_ember.py, --cuda-graph when it has it; target <= 0.35x)
#   leviathan        35  Leviathan whole-step overhead at the 60m preset, bf16, eager
#                        (bench/bench_leviathan.py; target <= +5%)
#   data_1b          25  the shipped corpus with a 32000 SentencePiece vocabulary (the 1b
#                        preset's; launch/data.py, cached for the runs below)
#   train_1b_eager_ember, train_1b_compile_ember, train_1b_eager_adamw, train_1b_compile_adamw
#                    50, 90, 45, 60: launch/train.py itself at the 1b preset (hidden 2048, 22
#                        layers, 32 heads, 4 query groups, FFN 5632, V 32000, seq 2048), dense
#                        table, one GPU, bf16, ZeRO-1, micro batch 4: 5 warm-up + 30 timed steps,
#                        eager and --compile, Ember or AdamW on the tables
#                        (ds_configs/{ember,adamw}_zero1_bf16.json); tokens/s and MFU of the
#                        timed steps (metrics.csv). Targets: --compile >= 55% MFU and >= 1.15x HF
#                        compiled tokens/s; eager no slower than HF eager
#   peers_1b        100  HF LlamaForCausalLM at the same shape and batch, eager and torch.compile
#                        (bench/bench_peers.py --arms hf_llama --modes eager compile)
#   leviathan_compiled 60  the Leviathan overhead under torch.compile (target <= +5%)
# More, run only when named in --only:
#   triton_leviathan 60  Leviathan's Triton spline-mode kernel against the torch path
#                        (tests/test_leviathan.py -k triton with the interpreter off)
#   peers            90  the project's GPT vs HF LlamaForCausalLM and megatron-core GPTModel at
#                        the tiny and 60m shapes, bf16, eager (bench/bench_peers.py)
#   quickstart      150  200 steps of launch/quickstart.sh (bf16 on every visible GPU)
# MFU is model FLOPs (6 x parameters + 12 x layers x hidden x seq per token, both tables
# counted) over GPU_CHECK_PEAK_TFLOPS (default 989, an H100 / H200 in dense bf16).
#
# Writes bench/results/gpu_check_<device>_<UTC date>.json and .md (device name, date, every
# step's status, seconds and figures, targets met / missed); logs and each step's own JSON go to
# bench/results/gpu_check_<UTC stamp>/. A step that fails or runs past its time cap is recorded
# as such and the others still run. Uses the active Python environment (install a CUDA build of
# torch there first: README, "Install"); PYTHON overrides the interpreter.
#
# Options: --dry-run (alias --cpu-smoke): CPU, tiny sizes and fp32 (train.py at the tiny
# preset), torch.compile turned off (TORCH_COMPILE_DISABLE=1: the compiled steps run their
# plumbing eagerly), the Triton kernels under the interpreter, the quick start skipped.
# --out DIR (default bench/results). --logs DIR (the logs and each step's JSON; default
# DIR/gpu_check_<UTC stamp>). --only a,b (a subset of the step
# names above, default or not). -h / --help.
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

usage() { sed -n '2,58p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
OUT=bench/results
LOGS=""
ONLY=""
DEFAULT_STEPS="triton_ember ember leviathan data_1b train_1b_eager_ember train_1b_compile_ember
  peers_1b train_1b_eager_adamw train_1b_compile_adamw leviathan_compiled"
STEPS="$(echo $DEFAULT_STEPS) triton_leviathan peers quickstart"
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
DEADLINE=$(( $(date +%s) + 500 ))   # 9 minutes in all, with room for the set-up and summary
PEAK=${GPU_CHECK_PEAK_TFLOPS:-989}

selected() {
  if [ -z "$ONLY" ]; then
    case " $(echo $DEFAULT_STEPS) " in *" $1 "*) return 0 ;; esac; return 1
  fi
  case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1
}

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
  PEER_1B_ARGS=(--shapes tiny --rounds 1 --warmup 1 --batch 1 --seq 32)
  # train.py refuses bf16 on CPU: fp32, the tiny preset cut down, a vocabulary quick to train
  VOCAB_1B=4096
  TRAIN_ARGS=(--preset tiny --model num_layers=1 --model seq_length=32 --steps 3
              --ds train_micro_batch_size_per_gpu=1)
  PRECISION=fp32
  WARM=1
  export TORCH_COMPILE_DISABLE=1      # the compiled steps' plumbing, run eagerly
else
  EMBER_SIZES=32000x512,50304x768,131072x1024
  EMBER_ARGS=(--seconds 1.5 --no-memory)
  LEV_ARGS=(--presets 60m --device cuda --bf16 --steps 10 --warmup 3)
  PEER_ARGS=(--shapes tiny 60m --rounds 10 --warmup 3)
  PEER_1B_ARGS=(--shapes 1b --rounds 10 --warmup 3 --batch 4)
  VOCAB_1B=32000
  TRAIN_ARGS=(--preset 1b --steps 35 --ds train_micro_batch_size_per_gpu=4)
  PRECISION=bf16
  WARM=5                              # warm-up steps (a compiled run compiles in the first)
fi
# what the other engineers' scripts offer (flags added later are used once they exist)
grep -q -- '"--cuda-graph"' bench/bench_ember.py && EMBER_ARGS+=(--cuda-graph)
TRAIN_PEAK=()
grep -q -- '"--peak-tflops"' launch/settings.py launch/train.py \
  && TRAIN_PEAK=(--peak-tflops "$PEAK")

run_step triton_ember 25 "$PY" - "$DEVICE" "$RUN/triton_ember.json" "$DRY" <<'EOF'
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

run_step ember 35 "$PY" bench/bench_ember.py --device "$DEVICE" --sizes "$EMBER_SIZES" \
  "${EMBER_ARGS[@]}" --out "$RUN/ember.json"

run_step leviathan 35 "$PY" bench/bench_leviathan.py "${LEV_ARGS[@]}" --out "$RUN/leviathan.json"

DATA=(--data launch/corpus/kjv.txt.xz --vocab-size "$VOCAB_1B")
run_step data_1b 25 "$PY" launch/data.py "${DATA[@]}"

# train_step NAME CAP OPTIMIZER MODE: launch/train.py at the 1b shape (dry run: tiny), its
# metrics.csv and summary.json in $RUN/NAME/
train_step() {
  local name=$1 cap=$2 opt=$3 mode=$4 extra=()
  if [ "$mode" = compile ]; then
    if selected "$name" && ! grep -q -- '"--compile"' launch/settings.py launch/train.py; then
      printf '%s\tskipped: launch/train.py has no --compile\t0\n' "$name" >> "$RUN/steps.tsv"
      return
    fi
    extra=(--compile)
  fi
  run_step "$name" "$cap" "$PY" launch/train.py "${TRAIN_ARGS[@]}" --embedding dense \
    --deepspeed_config "ds_configs/${opt}_zero1_$PRECISION.json" "${DATA[@]}" \
    --eval-interval 0 --eval-samples 2 --no-progress --out "$RUN/$name" "${extra[@]}" \
    "${TRAIN_PEAK[@]}"
}
train_step train_1b_eager_ember 50 ember eager
train_step train_1b_compile_ember 90 ember compile

run_step peers_1b 100 "$PY" bench/bench_peers.py --device "$DEVICE" "${PEER_1B_ARGS[@]}" \
  --arms hf_llama --modes eager compile --peak-tflops "$PEAK" --out "$RUN/peers_1b.json"

train_step train_1b_eager_adamw 45 adamw eager
train_step train_1b_compile_adamw 60 adamw compile

run_step leviathan_compiled 60 "$PY" bench/bench_leviathan.py "${LEV_ARGS[@]}" --compile \
  --out "$RUN/leviathan_compiled.json"

# not in the default set: run when named in --only
run_step triton_leviathan 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_leviathan.py \
  -k triton

run_step peers 90 "$PY" bench/bench_peers.py --device "$DEVICE" "${PEER_ARGS[@]}" \
  --out "$RUN/peers.json"

if [ "$DRY" = 1 ]; then
  selected quickstart && printf 'quickstart\tskipped (dry run)\t0\n' >> "$RUN/steps.tsv" \
    || printf 'quickstart\tnot selected\t0\n' >> "$RUN/steps.tsv"
else
  run_step quickstart 150 env EMBER_NO_SETUP=1 QUICKSTART_STEPS=200 QUICKSTART_MINUTES=2 \
    QUICKSTART_OUT="$RUN/quickstart" bash launch/quickstart.sh
fi

"$PY" - "$RUN" "$OUT" "$DEVICE" "$DRY" "$WARM" "$PEAK" <<'EOF'
"""Collect the steps' results into one JSON and one markdown file, targets met / missed."""
import csv, json, re, statistics, sys, time
from pathlib import Path
run, out, device, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
warm, peak = int(sys.argv[5]), float(sys.argv[6])
sys.path.insert(0, ".")


def load(name):
    p = run / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok):
    return "met" if ok else "MISSED"


name = "cpu (dry run)"
if device == "cuda":
    import torch
    name = torch.cuda.get_device_name(0)
date = time.strftime("%Y-%m-%d", time.gmtime())
steps = {}
for line in (run / "steps.tsv").read_text().splitlines():
    step, status, secs = line.split("\t")
    steps[step] = dict(status=status, seconds=int(secs), log=str(run / f"{step}.log"))
figures = {}

t = load("triton_ember.json")
if t:
    figures["triton_ember"] = dict(
        ok=t["ok"], cases=len(t["cases"]),
        worst_stats_rel_err=max(c["stats_max_rel_err"] for c in t["cases"]),
        worst_update_ulps=max(c["update_max_ulps"] for c in t["cases"]))
e = load("ember.json")
if e:
    limit = 0.35 if device == "cuda" else 0.7
    rows = []
    for s in e["sizes"]:
        r = s["results"]["ember"]
        ratio = r["paired_ratio_vs_adamw_fused"]["median"]
        rows.append(dict(table=f"{s['V']}x{s['D']}", threads=s.get("threads"),
                         ember_ms=r["median_ms"],
                         adamw_fused_ms=s["results"]["adamw_fused"]["median_ms"],
                         ratio=ratio, target=limit, met=ratio <= limit))
    figures["ember_vs_fused_adamw"] = rows
rows = []
for file in ("leviathan.json", "leviathan_compiled.json"):
    lv = load(file)
    for p in (lv or {}).get("results", []):
        for v in p["leviathan"]:
            rows.append(dict(preset=p["preset"], variant=v["variant"], dtype=p["dtype"],
                             compiled=bool(p.get("compiled")), dense_ms=p["dense"]["step_s"] * 1e3,
                             leviathan_ms=v["step_s"] * 1e3, overhead=v["overhead"],
                             target=0.05, met=v["overhead"] <= 0.05))
if rows:
    figures["leviathan_overhead"] = rows
for file in ("peers.json", "peers_1b.json"):
    pe = load(file)
    if pe:
        figures[file[:-5]] = [
            dict(shape=s["shape"], dtype=s["dtype"], batch=s["batch"], params=s["params"],
                 ratio_to_base={n: r["ratio_to_dense"]["median"] for n, r in s["results"].items()},
                 ms={n: r["median_ms"] for n, r in s["results"].items()},
                 tokens_per_s={n: r.get("tokens_per_s") for n, r in s["results"].items()},
                 mfu={n: r.get("mfu") for n, r in s["results"].items()},
                 first_step_s={n: r.get("first_step_s") for n, r in s["results"].items()},
                 targets=s["targets"]) for s in pe["shapes"]]


def train_figures(step):
    """tokens/s and MFU of a train.py run's timed steps (metrics.csv rows after the warm-up)."""
    folder = run / step
    try:
        summary = json.loads((folder / "summary.json").read_text())
        with open(folder / "metrics.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("train_loss") and r.get("tokens_per_s")]
    except (OSError, ValueError):
        return None
    from models.gpt import GPTConfig
    cfg = GPTConfig.from_preset(summary["preset"], vocab_size=summary["vocab_size"],
                                seq_length=summary["seq_length"])
    layers = summary.get("num_layers", cfg.num_layers)
    hidden = summary.get("hidden_size", cfg.hidden_size)
    if summary["preset"] == "tiny" and dry:
        layers = 1                                      # the dry run's --model num_layers=1
    params = sum(summary["param_counts"].values())
    fpt = 6.0 * params + 12.0 * layers * hidden * summary["seq_length"]
    timed = rows[warm:] or rows
    tokens_per_step = summary["global_batch"] * summary["seq_length"]
    seconds = sum(tokens_per_step / float(r["tokens_per_s"]) for r in timed)
    tok_s = len(timed) * tokens_per_step / seconds
    step_ms = [1e3 * tokens_per_step / float(r["tokens_per_s"]) for r in timed]
    return dict(optimizer=summary["optimizer"], compiled="compile" in step,
                precision=summary["precision"], zero_stage=summary["zero_stage"],
                preset=summary["preset"], global_batch=summary["global_batch"],
                seq_length=summary["seq_length"], params=params, timed_steps=len(timed),
                warmup_steps=len(rows) - len(timed), tokens_per_s=tok_s,
                median_step_ms=statistics.median(step_ms), flops_per_token=fpt,
                tflops=tok_s * fpt / 1e12, mfu=tok_s * fpt / 1e12 / peak,
                first_step_ms=1e3 * tokens_per_step / float(rows[0]["tokens_per_s"]),
                val_loss_after=summary.get("val_loss_after"),
                reported={k: summary.get(k) for k in ("tokens_per_s", "tflops", "mfu",
                                                      "flops_per_token", "compile_seconds")})


train = {s: f for s in ("train_1b_eager_ember", "train_1b_compile_ember",
                        "train_1b_eager_adamw", "train_1b_compile_adamw")
         if (f := train_figures(s))}
if train:
    hf = {}
    for s in figures.get("peers_1b", []):
        hf = {n: v for n, v in s["tokens_per_s"].items() if n.startswith("hf_llama")}
    for step, f in train.items():
        targets = {}
        if f["compiled"]:
            targets["mfu >= 0.55"] = f["mfu"] >= 0.55
            if "hf_llama_compiled" in hf:
                f["vs_hf_compiled"] = f["tokens_per_s"] / hf["hf_llama_compiled"]
                targets[">= 1.15x HF compiled tokens/s"] = f["vs_hf_compiled"] >= 1.15
        elif "hf_llama" in hf:
            f["vs_hf_eager"] = f["tokens_per_s"] / hf["hf_llama"]
            targets[">= HF eager tokens/s"] = f["vs_hf_eager"] >= 1.0
        f["targets"] = targets
    figures["train_1b"] = train
q = load("quickstart/summary.json")
if q:
    figures["quickstart"] = {k: q.get(k) for k in ("end_step", "val_loss_before", "val_loss_after",
                                                   "tokens_per_s", "train_seconds", "precision",
                                                   "device")}

result = dict(device=name, date=date, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              dry_run=dry, run_folder=str(run), peak_tflops=peak, steps=steps, figures=figures)
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
           "| table | threads | Ember ms | fused AdamW ms | ratio | target |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['table']} | {r['threads']} | {r['ember_ms']:.2f} | {r['adamw_fused_ms']:.2f} | "
           f"{r['ratio']:.2f}x | <= {r['target']}x {verdict(r['met'])} |"
           for r in figures["ember_vs_fused_adamw"]]
if "leviathan_overhead" in figures:
    md += ["", "**Leviathan whole-step overhead**", "",
           "| preset | generator | dtype | mode | dense ms | Leviathan ms | overhead | target |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['preset']} | {r['variant']} | {r['dtype']} | "
           f"{'compiled' if r['compiled'] else 'eager'} | {r['dense_ms']:.1f} | "
           f"{r['leviathan_ms']:.1f} | {100 * r['overhead']:+.1f}% | <= +5% "
           f"{verdict(r['met'])} |" for r in figures["leviathan_overhead"]]
if "train_1b" in figures:
    md += ["", f"**launch/train.py, timed steps after {warm} warm-up** (MFU of {peak:g} TFLOP/s; "
           "HF: bench_peers.py, the same shape and batch, fused AdamW on every parameter, no "
           "ZeRO or clipping)", "",
           "| run | optimizer | mode | steps | median step ms | tokens/s | TFLOP/s | MFU | "
           "first step s | vs HF | targets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for step, f in figures["train_1b"].items():
        vs = f.get("vs_hf_compiled", f.get("vs_hf_eager"))
        md.append(f"| {step} | {f['optimizer']} | {'compile' if f['compiled'] else 'eager'} | "
                  f"{f['timed_steps']} | {f['median_step_ms']:.1f} | {f['tokens_per_s']:,.0f} | "
                  f"{f['tflops']:.1f} | {100 * f['mfu']:.1f}% | {f['first_step_ms'] / 1e3:.1f} | "
                  f"{'-' if vs is None else f'{vs:.2f}x'} | " + (", ".join(
                      f"{k} {verdict(v)}" for k, v in f["targets"].items()) or "-") + " |")
for key, title in (("peers_1b", "HF LlamaForCausalLM at the train.py shape"),
                   ("peers", "Whole step vs peers (ratio to the first arm, paired median)")):
    if key not in figures:
        continue
    md += ["", f"**{title}**", "", "| shape | dtype | batch | model | ms | ratio | tokens/s | "
           "MFU | first step s |", "|---|---|---|---|---|---|---|---|---|"]
    for s in figures[key]:
        for n in s["ms"]:
            mfu = s["mfu"][n]
            md.append(f"| {s['shape']} | {s['dtype']} | {s['batch']} | {n} | {s['ms'][n]:.1f} | "
                      f"{s['ratio_to_base'][n]:.2f}x | {s['tokens_per_s'][n] or 0:,.0f} | "
                      f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                      f"{s['first_step_s'][n] or 0:.1f} |")
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
