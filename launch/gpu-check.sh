#!/usr/bin/env bash
# One GPU, ≤ 8 minutes: sd15 at 256 px in bf16 (random weights) — training img/s and MFU, basis pass vs plain
# inference on 32 images, one_step vs ddim-10 latency, per-step projection overhead, SDPA vs xformers, peak
# memory of each — into one JSON (default runs/gpu-check.json). Never part of CI.
# Usage: bash launch/gpu-check.sh [--out FILE] [--batch 8]   (smoke test on a CPU: --device cpu --preset tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python -m cdad_dist.bench.gpu_check "$@"
