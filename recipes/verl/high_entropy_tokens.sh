#!/usr/bin/env bash
# Baseline 80/20 (policy loss high_entropy_tokens, top 20% entropy tokens) on the hybrid data (paper Tables 2/7).
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/high_entropy_tokens.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_high_entropy_tokens "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
