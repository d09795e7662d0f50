#!/usr/bin/env bash
# Tokens/s and MFU of the 1b preset on one GPU in bf16, eager and with torch.compile.
# Needs only torch with CUDA (no Ray, no pydantic): uses the python on PATH, or $PYTHON.
# Under 5 minutes on one H100/H200. JSON goes to $OUT/gpu_train.json when OUT is set.
#   bash bench/gpu_train.sh            # the GPU benchmark
#   bash bench/gpu_train.sh --smoke    # tiny preset, 2 steps, runs on CPU too
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="platform${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 290 "${PYTHON:-python3}" bench/gpu_train.py "$@"
