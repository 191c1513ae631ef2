#!/usr/bin/env bash
# The one GPU script: run it first whenever a GPU is at hand (bench/RESULTS.md records what it printed,
# with the card's name). Bare GPU machine: one GPU, its own torch, no package registry.
#
#   bench/gpu.sh OUT_DIR            # on the GPU machine, from the repository root (budget: <= 7 min)
#   GPU_SH_SMOKE=1 bench/gpu.sh OUT # on a CPU: the same steps on tiny models, to check the plumbing
#
# Writes OUT_DIR/<step>.json for each step and OUT_DIR/summary.txt (card, each step's exit status and
# its headline figures). A step that fails is recorded and the next one runs: one lease, every figure
# that can be had. Steps, in order of what the open issues need most:
#   kernels   bench/kernels.py: every custom kernel against the PyTorch reference (+ timings on CUDA)
#   pipeline  bench/pipeline.py: DINO-T + SAM-H and DINO-T + SAM 2.1-L fast paths, LS's example path
#             (the anchor) in the same run, per-stage ms per image
#   syncs     bench/syncs.py: host waits per batch (1 vs 8 images) and synchronizing CUDA calls by origin
#   click     bench/click_bench.py: first vs second smart-tool click (ViT-H), server path included
#   compile   bench/compile_start.py: COMPILE=1 worker start, cold then warm (same COMPILE_CACHE_DIR),
#             DINO-T + SAM-H at batch 8
#   attention bench/attention.py: SAM ViT-H rel-pos attention, SDPA (each backend) vs FlexAttention
#   video     bench/video.py: streaming tracker vs transformers' whole-clip session, 1-20 objects
# The last three run in what is left of the 7 minutes (compile at most 4 min, skipped under 1 min;
# attention and video skipped when under 40 / 60 s are left).
set -uo pipefail
OUT="${1:?usage: bench/gpu.sh OUT_DIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
[ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$REPO/.venv/bin/python"
mkdir -p "$OUT"
MODELS="${GPU_SH_MODELS:-/tmp/gsam-gpu-models}"   # random-weight checkpoints, built once per machine
SUMMARY="$OUT/summary.txt"
cd "$REPO"

if [ "${GPU_SH_SMOKE:-0}" = "1" ]; then
  DEVICE=cpu; MODELS_FLAG=(--models tiny); IMAGES=2; ANCHOR=1; CLICK=(--size vit-b --repeat 1 --second-clicks 2)
  VIDEO=(--lengths 20 --objects 1); KERNEL=(--encoder-queries 64 --batches 1 --dtypes fp32 --no-compile)
  COMPILE=(--engine sam3 --batch-size 1 --models-dir "$MODELS/compile"); COMPILE_LIMIT=150
else
  DEVICE=cuda; MODELS_FLAG=(); IMAGES=128; ANCHOR=8; CLICK=(--size vit-h --repeat 3 --second-clicks 20 --pipeline)
  VIDEO=(--lengths 250 --objects 1,5,10,20 --anchor-max-frames 50); KERNEL=()
  COMPILE=(--models-dir "$MODELS/pipeline" --batch-size 8); COMPILE_LIMIT=""  # set before its step
fi

card="$("$PY" - <<'EOF' 2>/dev/null
import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU smoke run)")
EOF
)"
{
  echo "bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "card: ${card:-unknown}"
  echo "torch: $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, keep its log, record its exit status
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - started)) s" | tee -a "$SUMMARY"
  tail -n 12 "$OUT/$name.log" | sed "s/^/  $name | /" >> "$SUMMARY"
}

step kernels 90 "$PY" bench/kernels.py --device "$DEVICE" "${KERNEL[@]}" --json "$OUT/kernels.json"
step pipeline 180 "$PY" bench/pipeline.py --device "$DEVICE" "${MODELS_FLAG[@]}" --images "$IMAGES" \
  --anchor-images "$ANCHOR" --engine grounded-sam,sam2 --models-dir "$MODELS/pipeline" --json "$OUT/pipeline.json"
step syncs 45 "$PY" bench/syncs.py --device "$DEVICE" --json "$OUT/syncs.json"
step click 60 "$PY" bench/click_bench.py --device "$DEVICE" "${CLICK[@]}" --json "$OUT/click.json"
# The compile step gets what is left of the 7 minutes but 40 s (at most 4 min), the pipeline step's models.
[ -z "$COMPILE_LIMIT" ] && COMPILE_LIMIT=$(( 380 - SECONDS < 240 ? 380 - SECONDS : 240 ))
if [ "$COMPILE_LIMIT" -ge 60 ]; then
  step compile "$COMPILE_LIMIT" "$PY" bench/compile_start.py --device "$DEVICE" "${COMPILE[@]}" \
    --budget $((COMPILE_LIMIT - 20)) --json "$OUT/compile.json"
else
  echo "compile: skipped, $COMPILE_LIMIT s left of the 7 min budget" | tee -a "$SUMMARY"
fi
if [ $(( 420 - SECONDS )) -ge 40 ] || [ "${GPU_SH_SMOKE:-0}" = "1" ]; then
  step attention 40 "$PY" bench/attention.py --device "$DEVICE" --json "$OUT/attention.json"
else
  echo "attention: skipped, $(( 420 - SECONDS )) s left of the 7 min budget" | tee -a "$SUMMARY"
fi
if [ $(( 420 - SECONDS )) -ge 60 ] || [ "${GPU_SH_SMOKE:-0}" = "1" ]; then
  step video 60 "$PY" bench/video.py --device "$DEVICE" "${VIDEO[@]}" --models-dir "$MODELS/video" \
    --out "$OUT/video.json"
else
  echo "video: skipped, $(( 420 - SECONDS )) s left of the 7 min budget" | tee -a "$SUMMARY"
fi
echo "done: $SUMMARY"
