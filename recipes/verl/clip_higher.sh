#!/usr/bin/env bash
# Baseline Clip-Higher (eps_low 0.2, eps_high 0.28) on the hybrid file (paper Tables 2/7: 32 target + 384 general).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/clip_higher.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_clip_higher HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
