#!/usr/bin/env bash
# Sets up a fresh machine: pinned torch + dependencies, then builds and installs rspeft_fast (editable,
# with its C++ extension; CUDA sources too where torch has CUDA and nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}
if ! $PY -c "import torch, torchvision" 2>/dev/null || [ -n "${CI:-}" ]; then
  $PY -m pip install -q $TORCH_PIN
fi
$PY -m pip install -q -r requirements-ci.txt
$PY -m pip install -q --no-build-isolation -e .
# The Triton releases of the other supported torch versions (torch 2.11 -> 3.6, torch 2.15 -> 3.9) as side
# packages for the AOT compile matrix (tests/test_aot.py, tools/aot_compile.py with PYTHONPATH=DIR):
# no dependencies, nothing else changes in this environment.
SIDE=${RSPEFT_TRITON_SIDE:-.triton-side}
for v in 3.6.0 3.9.0; do
  if [ ! -f "$SIDE/$v/triton-$v.dist-info/METADATA" ]; then
    $PY -m pip install -q --no-deps --target "$SIDE/$v" "triton==$v"
  fi
done
$PY -c "import torch, rspeft_fast._native as n; C = n.extension(); print('torch', torch.__version__, '| rspeft_fast._C built with CUDA sources:', C.with_cuda(), '| CUDA device:', torch.cuda.is_available())"
