#!/usr/bin/env bash
# Baseline KL-Cov (k = 0.02%, beta = 1) on the hybrid data (paper Tables 2/7).
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/kl_cov.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_kl_cov "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
