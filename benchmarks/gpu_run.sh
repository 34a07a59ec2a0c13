#!/usr/bin/env bash
# One script for a lent GPU machine (H100 / H200, < 10 minutes): the CUDA test suite, the op
# benchmarks, then the static performance model with the measured figures next to its predictions;
# results under benchmarks/results/ (named after the device). Usage from the repo root:
#   bash benchmarks/gpu_run.sh [OUT_DIR]
# Torch and Triton must already be installed there; heal is used from the source tree.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu-info.txt"
status=0
# kernel tests on CUDA (the compile gate included; the sync-free test runs here); the timeouts add up
# to under 10 minutes, the device tool's limit for one command
timeout 200 python -m pytest -q -x tests/heal_kernels 2>&1 | tee "$out/gpu-tests.log" || status=1
timeout 120 python -m heal bench entropy --output-dir "$out" 2>&1 | tee "$out/gpu-bench-entropy.log" || status=1
timeout 90 python -m heal bench eda --output-dir "$out" 2>&1 | tee "$out/gpu-bench-eda.log" || status=1
timeout 90 python -m heal bench linear --output-dir "$out" 2>&1 | tee "$out/gpu-bench-linear.log" || status=1
# predictions from the SASS (sm_80/90/100) next to what was just measured on this GPU
measured=$(ls "$out"/eda-*.json "$out"/entropy-*.json 2>/dev/null | grep -v -- '-cpu\.json' | tr '\n' ' ')
timeout 90 python -m heal bench static --jobs 8 --output-dir "$out" --measured $measured 2>&1 | tee "$out/gpu-bench-static.log" || status=1
exit $status
