#!/usr/bin/env bash
# Baseline Clip-Higher (eps_low 0.2, eps_high 0.28) on the hybrid data (paper Tables 2/7).
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/clip_higher.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_clip_higher "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
