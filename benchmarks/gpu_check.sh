#!/usr/bin/env bash
# One GPU: mimjax's ViT-L/16 MAE step against HF PyTorch's (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh            # on one H100/H200, <= 8 minutes
#   bash benchmarks/gpu_check.sh --tiny     # the same code, tiny, on CPU
#
# Needs python with jax (CUDA), flax, optax; torch and transformers for the
# peer. No tensorflow, tfds, clu or ml_collections. Wheels (*.whl) put next
# to this script are installed first with `pip install --no-deps` (none are
# needed by default). PYTHON picks the interpreter.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
shopt -s nullglob
wheels=("$HERE"/*.whl)
if (( ${#wheels[@]} )); then
  "$PYTHON" -m pip install -q --no-deps "${wheels[@]}"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
