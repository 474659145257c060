#!/usr/bin/env bash
# GPU check of the scale-up features on one CUDA device, 1 process, under 8 minutes; prints one table:
# tiny and GPT-2-small/medium-shape kd_offpolicy runs in fp32 and mixed_precision=bf16, the fused loss
# vs the logits path, and student generation vs transformers' generate (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                       # CUDA (needs a GPU)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh             # CPU, tiny shapes, every step (seconds)
#   OUT=figures.json bash benchmarks/gpu_check.sh      # also write the figures as JSON
#
# Run from a checkout (the package need not be installed): PYTHONPATH gets the repository root.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
ARGS=()
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  ARGS+=(--dry-run)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
if [[ -n "${OUT:-}" ]]; then
  ARGS+=(--json "$OUT")
fi
# 480 s: the budget the check is sized for; a run past it is a failure to report, not a result
exec timeout "${GPU_CHECK_TIMEOUT:-480}" python "$HERE/gpu_check.py" "${ARGS[@]}" "$@"
