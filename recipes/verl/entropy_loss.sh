#!/usr/bin/env bash
# Baseline Entropy Loss (entropy_coeff 0.001) on the hybrid data (paper Tables 2/7).
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/entropy_loss.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_entropy_loss "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
