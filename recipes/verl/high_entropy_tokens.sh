#!/usr/bin/env bash
# Baseline 80/20 (policy loss high_entropy_tokens, top 20% entropy tokens) on the hybrid file (paper Tables 2/7: 32 target + 384 general).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/high_entropy_tokens.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_high_entropy_tokens HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
