#!/usr/bin/env bash
# Baseline entropy advantage (alpha 0.4, kappa 2; seed 004) on the hybrid data.
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/entropy_advantage.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_entropy_advantage "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
