#!/usr/bin/env bash
# Few-shot: GRPO on the few-shot target-domain data only (paper Table 1).
# Usage: TARGET_TRAIN=... VAL_FILES=... bash recipes/verl/fewshot.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN

heal_run paper_grpo "$TARGET_TRAIN" "$@"
