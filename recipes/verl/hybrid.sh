#!/usr/bin/env bash
# Hybrid: GRPO on target + general data mixed, no EDA reward (paper Table 1).
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/hybrid.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_grpo "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
