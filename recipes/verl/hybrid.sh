#!/usr/bin/env bash
# Hybrid: GRPO on the hybrid file (K target + general questions in every batch), no EDA reward (paper Table 1).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/hybrid.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_grpo HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
