#!/usr/bin/env bash
# Shared launcher for the HEAL paper's verl runs. Sourced by the recipe scripts; not run directly.
#
# Environment (verl-format parquet files; see recipes/verl/README.md, section "Data"):
#   HYBRID_TRAIN     hybrid file from `heal mix` (K target + general questions in every batch,
#                    row order = batch order)                 [Hybrid, HEAL, every entropy baseline]
#   FEWSHOT_TRAIN    few-shot file from `heal mix --general-per-batch 0` (target questions only,
#                    row order = batch order)                 [Few-shot]
#   GENERAL_TRAIN    general-domain data (e.g. the 384 selected CommonsenseQA questions) [Only-General]
#   VAL_FILES        validation data, comma-separated list of parquet files           (required)
#   BATCH_SIZE       prompts per training batch for HYBRID_TRAIN / FEWSHOT_TRAIN (default: the
#                    batch size `heal mix` stored in the file; also the PPO mini-batch)
#   MODEL_PATH       policy to train                            (default Qwen/Qwen3-1.7B-Base)
#   GENERAL_SOURCES  data_source names of the general data, comma-separated (default commonsense_qa)
#   N_GPUS           GPUs on the node                           (default 8)
#   TOTAL_EPOCHS     training epochs                            (default: verl's)
#   FUSED_ENTROPY    1: actor workers use heal_kernels' fused entropy/log-prob op (default 0)
#   EXPERIMENT       experiment name                            (default: the recipe's)
#   HEAL_PYTHON      the Python that has heal and verl installed (default: $VIRTUAL_ENV/bin/python,
#                    else the first of python3 / python on PATH that imports heal, verl and pyarrow)
#   HEAL_RECIPE_DRY_RUN  1: print verl's arguments, one per line, instead of launching
# Extra arguments are passed to verl as Hydra overrides (e.g. trainer.logger='[console,wandb]').
set -euo pipefail

_HEAL_PY_CHECK='import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ("heal", "verl", "pyarrow")) else 1)'
_heal_python() {  # prints the interpreter to run verl with (see HEAL_PYTHON above)
    if [[ -n "${HEAL_PYTHON:-}" ]]; then
        if ! "$HEAL_PYTHON" -c "$_HEAL_PY_CHECK" 2>/dev/null; then
            echo "HEAL_PYTHON=$HEAL_PYTHON cannot import heal, verl and pyarrow; point it at the venv's python (e.g. /path/to/venv/bin/python)" >&2
            return 1
        fi
        printf '%s\n' "$HEAL_PYTHON"
        return 0
    fi
    local candidate
    for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"} python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$_HEAL_PY_CHECK" 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "no Python with heal, verl and pyarrow found (tried \$VIRTUAL_ENV/bin/python, python3, python on PATH); set HEAL_PYTHON to the python of the environment heal is installed in, e.g. HEAL_PYTHON=/path/to/venv/bin/python" >&2
    return 1
}
HEAL_PY="$(_heal_python)" || exit 1

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
    config_path="$("$HEAL_PY" -c 'from heal.integrations.verl.config_dir import config_dir; print(config_dir())')"
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
        if [[ "$config_name" == "paper_heal" || "$config_name" == "paper_high_entropy_tokens" ]]; then
            args+=("heal.fused_entropy=true")  # trainer mode heal_sync: its actor workers switch it on
        else  # plain verl trainer: heal's plugin applies it in every Ray worker from the environment
            args+=("+ray_kwargs.ray_init.runtime_env.env_vars.HEAL_FUSED_ENTROPY='1'")
        fi
    fi
    if [[ "${HEAL_RECIPE_DRY_RUN:-0}" == "1" ]]; then
        echo "heal recipe: python $HEAL_PY" >&2
        printf '%s\n' "${args[@]}" "$@"
        return 0
    fi
    set -x
    "$HEAL_PY" -m verl.trainer.main_ppo "${args[@]}" "$@"
}

need() { : "${!1:?set $1 (see recipes/verl/README.md)}"; }

# The `heal mix` commands that write the ordered training files (paths are placeholders).
HEAL_MIX_HYBRID="heal mix --target target32.parquet --general general384.parquet --k 32 --general-per-batch 96 --output hybrid.parquet"
HEAL_MIX_FEWSHOT="heal mix --target target32.parquet --k 32 --repeat 4 --general-per-batch 0 --output fewshot.parquet"

_heal_mix_batch_size() {  # _heal_mix_batch_size VAR FILE MAKE_CMD -> prints the batch size (BATCH_SIZE or the file's)
    "$HEAL_PY" - "$1" "$2" "$3" "${BATCH_SIZE:-}" <<'PY'
import json, sys
var, path, make, override = sys.argv[1:5]
def fail(msg):
    sys.exit(f"{msg}\nmake it with: {make}   (see recipes/verl/README.md, section Data)")
if override:
    if not override.isdigit() or int(override) < 1:
        sys.exit(f"BATCH_SIZE must be a positive integer, got {override!r}")
meta = None
if "://" not in path:
    import pyarrow.parquet as pq
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        fail(f"{var}={path} is not a readable parquet file ({e})")
    raw = (schema.metadata or {}).get(b"heal.mix")
    meta = json.loads(raw) if raw else None
if override:
    batch = int(override)
    if meta is not None and meta["batch_size"] != batch:
        print(f"warning: BATCH_SIZE={batch} but {path} was mixed for batches of {meta['batch_size']}: "
              "its batches will not line up with the training batches", file=sys.stderr)
elif meta is not None:
    batch = int(meta["batch_size"])
elif "://" in path:
    batch = 128
    print(f"note: cannot read {path} here; assuming heal mix batches of 128 (set BATCH_SIZE otherwise)",
          file=sys.stderr)
else:
    fail(f"{var}={path} was not written by `heal mix` (no 'heal.mix' metadata), so its batch size is "
         "unknown; set BATCH_SIZE to it, or")
if meta is not None and meta["rows"] % batch:
    print(f"warning: {path} has {meta['rows']} rows, not a multiple of {batch}: verl drops the last "
          "incomplete batch", file=sys.stderr)
print(batch)
PY
}

heal_run_mixed() {  # heal_run_mixed CONFIG_NAME VAR MAKE_CMD [overrides...]: train on a `heal mix` file in its order
    local config_name="$1" var="$2" make="$3" file batch
    shift 3
    file="${!var:-}"
    if [[ -z "$file" ]]; then
        echo "set $var to the parquet file written by: $make   (see recipes/verl/README.md, section Data)" >&2
        exit 1
    fi
    if [[ "$file" != *://* && ! -f "$file" ]]; then
        echo "$var=$file does not exist; make it with: $make   (see recipes/verl/README.md, section Data)" >&2
        exit 1
    fi
    batch="$(_heal_mix_batch_size "$var" "$file" "$make")" || exit 1
    # The file's row order is the batch order: no shuffling, batches of the mix's size (one PPO update
    # per batch, as in the paper), and no length filter (verl's filter drops rows, which would shift
    # every later batch; verl 0.9.1's agent loop left-truncates a prompt longer than max_prompt_length).
    heal_run "$config_name" "$file" \
        "data.shuffle=False" \
        "data.train_batch_size=$batch" \
        "actor_rollout_ref.actor.ppo_mini_batch_size=$batch" \
        "data.filter_overlong_prompts=False" \
        "$@"
}
