#!/usr/bin/env bash
# Baseline entropy advantage (alpha 0.4, kappa 2; seed 004) on the hybrid file (not in the paper's tables).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/entropy_advantage.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_entropy_advantage HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
