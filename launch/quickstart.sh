#!/usr/bin/env bash
# The project's main job: set up the pinned environment, prepare the shipped corpus, train the
# tiny Leviathan + Ember GPT for a few minutes, and report the validation loss before / after
# and where the metrics and the loss plot are.
#
#   bash launch/quickstart.sh
#
# CPU (no GPU visible): one process, fp32 (ds_configs/ember_zero1_fp32.json); 1500 steps take about
# 2.5-3 minutes on 2 idle cores; the training loop is capped at QUICKSTART_MINUTES (default 6), so the
# whole script stays under 10 minutes even on a busy machine (plus about a minute the first time,
# when setup_env.sh creates .venv).
# GPU: torchrun over every visible GPU, bf16 (ds_configs/ember_zero1_bf16.json).
#
# Knobs (environment): QUICKSTART_STEPS (default 1500 on CPU, 2000 on GPU), QUICKSTART_MINUTES
# (time cap of the training loop, default 6), QUICKSTART_DATA (files/folders, default the shipped
# KJV corpus), QUICKSTART_VOCAB (default 4096), QUICKSTART_OUT (default runs/quickstart),
# QUICKSTART_ARGS (extra launch/train.py flags, word-split; e.g. "--pp 2" or "--tp 2" with 2+ GPUs,
# "--model recompute=full"), EMBER_DATA_CACHE (data cache),
# EMBER_NO_SETUP=1 (use the active Python environment instead of sourcing launch/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${EMBER_NO_SETUP:-}" ]; then
  # shellcheck disable=SC1091
  . launch/setup_env.sh
fi
export PYTHONUNBUFFERED=1

OUT=${QUICKSTART_OUT:-runs/quickstart}
VOCAB=${QUICKSTART_VOCAB:-4096}
MINUTES=${QUICKSTART_MINUTES:-6}
read -r -a DATA <<< "${QUICKSTART_DATA:-launch/corpus/kjv.txt.xz}"
read -r -a EXTRA <<< "${QUICKSTART_ARGS:-}"

NGPU=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -gt 0 ]; then
  CONFIG=ds_configs/ember_zero1_bf16.json
  STEPS=${QUICKSTART_STEPS:-2000}
  LAUNCH=(torchrun --standalone --nproc_per_node "$NGPU")
  WHERE="$NGPU GPU(s), bf16"
else
  CONFIG=ds_configs/ember_zero1_fp32.json
  STEPS=${QUICKSTART_STEPS:-1500}
  LAUNCH=(python)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  WHERE="CPU ($OMP_NUM_THREADS threads), fp32"
fi

echo "[quickstart] 1/3 data: ${DATA[*]} -> SentencePiece vocabulary $VOCAB, megatron indexed dataset (cached)"
python launch/data.py --data "${DATA[@]}" --vocab-size "$VOCAB" > /dev/null

echo "[quickstart] 2/3 training the tiny GPT, Leviathan embedding + Ember, on $WHERE: up to $STEPS steps / $MINUTES min"
"${LAUNCH[@]}" launch/train.py --preset tiny --embedding leviathan --deepspeed_config "$CONFIG" \
  --data "${DATA[@]}" --vocab-size "$VOCAB" --steps "$STEPS" --eval-interval 50 \
  --time-limit "$MINUTES" --out "$OUT" --save "$OUT/checkpoints" "${EXTRA[@]}"

echo "[quickstart] 3/3 report"
python - "$OUT/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"  model: {s['preset']} GPT, {s['embedding']} embedding, {s['optimizer']} (ZeRO "
      f"{s['zero_stage']}, {s['precision']}, {s['device']}), params {s['param_counts']}")
print(f"  trained {s['end_step']} steps = {s['tokens']:,} tokens in {s['train_seconds']:.0f} s "
      f"({s['tokens_per_s']:,.0f} tokens/s)" + (" - stopped by the time cap" if s['stopped_early'] else ""))
print(f"  validation loss before: {s['val_loss_before']:.4f} (perplexity {s['val_ppl_before']:.1f})")
print(f"  validation loss after:  {s['val_loss_after']:.4f} (perplexity {s['val_ppl_after']:.1f})")
print(f"  metrics:    {s['metrics_csv']}")
print(f"  loss plot:  {s.get('plot')}")
print(f"  summary:    {sys.argv[1]}")
print(f"  checkpoint: {s['checkpoint']}  (continue with --resume)")
EOF
echo "[quickstart] a sample from the trained model (launch/generate.py; export: launch/export.py):"
python launch/generate.py --checkpoint "$OUT/checkpoints" --prompt "${QUICKSTART_PROMPT:-And God said}" \
  --max-new-tokens 40 --temperature 0.8 --top-k 40 2>/dev/null | grep -v '\] \[WARNING\] \[' | sed 's/^/  /' \
  || echo "  (generation failed: python launch/generate.py --checkpoint $OUT/checkpoints --prompt ...)"
