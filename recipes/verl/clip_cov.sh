#!/usr/bin/env bash
# Baseline Clip-Cov (verl's defaults: ratio 0.0002, bounds [1, 5]) on the hybrid data.
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/clip_cov.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_clip_cov "$TARGET_TRAIN,$GENERAL_TRAIN" "$@"
