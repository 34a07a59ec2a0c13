#!/usr/bin/env bash
# Baseline KL-Cov (k = 0.02%, beta = 1) on the hybrid file (paper Tables 2/7: 32 target + 384 general).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/kl_cov.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_kl_cov HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
