#!/usr/bin/env bash
# Shared launcher for the HEAL paper's verl runs. Sourced by the recipe scripts; not run directly.
#
# Environment (paths are verl-format parquet files, e.g. written by `heal data ...`):
#   TARGET_TRAIN     target-domain training data (few-shot: the 32 sampled questions)   [Few-shot, Hybrid, HEAL, baselines]
#   GENERAL_TRAIN    general-domain training data (e.g. the 384 selected CommonsenseQA questions) [Hybrid, Only-General, HEAL, baselines]
#   VAL_FILES        validation data, comma-separated list of parquet files           (required)
#   MODEL_PATH       policy to train                            (default Qwen/Qwen3-1.7B-Base)
#   GENERAL_SOURCES  data_source names of the general data, comma-separated (default commonsense_qa)
#   N_GPUS           GPUs on the node                           (default 8)
#   TOTAL_EPOCHS     training epochs                            (default: verl's)
#   FUSED_ENTROPY    1: actor workers use heal_kernels' fused entropy/log-prob op (default 0)
#   EXPERIMENT       experiment name                            (default: the recipe's)
#   HEAL_RECIPE_DRY_RUN  1: print verl's arguments, one per line, instead of launching
# Extra arguments are passed to verl as Hydra overrides (e.g. trainer.logger='[console,wandb]').
set -euo pipefail

_heal_list() {  # "a,b" -> "['a','b']"
    local IFS=, out="" item
    for item in $1; do out="${out:+$out,}'$item'"; done
    printf "[%s]" "$out"
}

heal_run() {  # heal_run CONFIG_NAME "train,files" [overrides...]
    local config_name="$1" train_files="$2"
    shift 2
    : "${VAL_FILES:?set VAL_FILES to the validation parquet file(s)}"
    local config_path
    config_path="$(python -c 'from heal.integrations.verl.config_dir import config_dir; print(config_dir())')"
    local args=(
        --config-path="$config_path"
        --config-name="$config_name"
        "data.train_files=$(_heal_list "$train_files")"
        "data.val_files=$(_heal_list "$VAL_FILES")"
        "actor_rollout_ref.model.path=${MODEL_PATH:-Qwen/Qwen3-1.7B-Base}"
        "trainer.n_gpus_per_node=${N_GPUS:-8}"
    )
    [[ -n "${TOTAL_EPOCHS:-}" ]] && args+=("trainer.total_epochs=$TOTAL_EPOCHS")
    [[ -n "${EXPERIMENT:-}" ]] && args+=("trainer.experiment_name=$EXPERIMENT")
    if [[ "${FUSED_ENTROPY:-0}" == "1" ]]; then
        if [[ "$config_name" == "paper_heal" ]]; then
            args+=("heal.fused_entropy=true")
        else  # plain verl trainer: heal's plugin applies it in every Ray worker from the environment
            args+=("+ray_kwargs.ray_init.runtime_env.env_vars.HEAL_FUSED_ENTROPY='1'")
        fi
    fi
    if [[ "${HEAL_RECIPE_DRY_RUN:-0}" == "1" ]]; then
        printf '%s\n' "${args[@]}" "$@"
        return 0
    fi
    set -x
    python -m verl.trainer.main_ppo "${args[@]}" "$@"
}

need() { : "${!1:?set $1 (see recipes/verl/README.md)}"; }
