#!/usr/bin/env bash
# One script for a lent GPU machine: the CUDA test suite, then every benchmark, results under
# benchmarks/results/ (named after the device). Usage from the repo root:
#   bash benchmarks/gpu_run.sh [OUT_DIR]
# Torch and Triton must already be installed there; heal is used from the source tree.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu-info.txt"
status=0
python -m pytest -q -x tests/heal_kernels 2>&1 | tee "$out/gpu-tests.log" || status=1
python -m heal bench entropy --output-dir "$out" 2>&1 | tee "$out/gpu-bench-entropy.log" || status=1
python -m heal bench eda --output-dir "$out" 2>&1 | tee "$out/gpu-bench-eda.log" || status=1
python -m heal bench linear --output-dir "$out" 2>&1 | tee "$out/gpu-bench-linear.log" || status=1
exit $status
