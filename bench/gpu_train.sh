#!/usr/bin/env bash
# Tokens/s, MFU and the profiler breakdown of the real training loop (train_loop, FSDP2 on a
# process group of 1) for the 1b preset on one GPU in bf16, eager and with torch.compile.
# A few minutes on one H100/H200. JSON goes to $OUT/gpu_train.json when OUT is set.
#   bash bench/gpu_train.sh                     # the GPU benchmark
#   bash bench/gpu_train.sh --device cpu --preset debug --seq-len 64 --micro-batch 2 \
#       --warmup 1 --steps 2 --profile-steps 2 --log-every 2 --modes eager   # CPU check
#
# Needs torch, numpy and pyarrow (no Ray) and pydantic, which builds the loop's LoopSpec. A GPU
# box without pydantic gets it from wheels carried in .whl/ (pins from constraints.txt), made
# on any machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/pydantic-*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/lmforge-bench-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_inspection*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_train.sh: $PY has no pydantic and .whl/ holds no pydantic wheels: download them" \
      "as this script's header says, or install pydantic" >&2
    exit 2
  fi
fi
export PYTHONPATH="platform${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 540 "$PY" bench/gpu_train.py "$@"
