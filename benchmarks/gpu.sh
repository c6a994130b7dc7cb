#!/usr/bin/env bash
# The real-scale benchmarks on one CUDA device, in one go (at most 8 minutes): SD 1.5 at 512x512 and SDXL at
# 1024x1024, float16, 20 steps, models with random weights built on the device (benchmarks/bench_scale.py):
# top-1 / plain diffusers (fused and not), noise k=2 / top-1 (target <= 1.15), merge / top-1, peak VRAM with 32
# experts in the catalog against 1, the LRU under --max-memory, and SD 1.5 under torch.compile with hotswap
# (a switch must add no graph). Writes $OUT/gpu.json and $OUT/gpu.md, the table for README's "Real scale".
#
#   benchmarks/gpu.sh          # on a CUDA machine; OUT defaults to build/gpu
#   benchmarks/gpu.sh --dry    # the same script on this CPU at reduced scale, 2 steps (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "${1:-}" = "--dry" ]; then
  export MIXDIFF_SCALE_CACHE=${MIXDIFF_SCALE_CACHE:-$OUT/cache}
  args=(--device cpu --reduced --steps 2 --reps 1 --counts 1 4)
  limit=300
else
  export MIXDIFF_SCALE_CACHE=${MIXDIFF_SCALE_CACHE:-/tmp/mixdiff-scale-gpu}
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here (use --dry)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" || true
  # 8 minutes in all: building the models (~1 min), SD 1.5 (~2 min with compile), SDXL (~3 min); sections
  # still waiting when --budget-s runs out are skipped and listed under "skipped" in the JSON
  args=(--device cuda --dtype float16 --reps 3 --counts 1 32 --compile sd15 --budget-s 390)
  limit=470
fi

timeout "$limit" "$PY" benchmarks/bench_scale.py "${args[@]}" --arch sd15 sdxl --json "$OUT/gpu.json" --md "$OUT/gpu.md"
echo "wrote $OUT/gpu.json and $OUT/gpu.md"
