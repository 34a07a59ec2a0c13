#!/usr/bin/env bash
# Baseline Entropy Loss (entropy_coeff 0.001) on the hybrid file (paper Tables 2/7: 32 target + 384 general).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/entropy_loss.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_entropy_loss HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
