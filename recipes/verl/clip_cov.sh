#!/usr/bin/env bash
# Baseline Clip-Cov (verl's defaults: ratio 0.0002, bounds [1, 5]) on the hybrid file (not in the paper's tables).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/clip_cov.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_clip_cov HYBRID_TRAIN "$HEAL_MIX_HYBRID" "$@"
