"""``heal bench NAME``: run one of heal's benchmarks (see ``heal.bench``)."""

from __future__ import annotations

import importlib

HELP = ("time heal's ops against the baselines (entropy, linear, eda, reward), the code sandbox (sandbox), the "
        "rollout engines (rollout), predict the Triton kernels' GPU speed without a GPU (static); results in "
        "./heal-bench-results/ (--output-dir DIR)")

# benchmark name -> module; each module has add_arguments(parser) and run(args) -> int
BENCHMARKS = {
    "entropy": ("heal.bench.entropy", "token entropy + log-probs from logits vs PyTorch / torch.compile / verl"),
    "linear": ("heal.bench.linear", "entropy + log-probs from hidden states and a linear head vs unfused / verl / Liger"),
    "eda": ("heal.bench.eda", "all-pairs entropy-dynamics similarity + EDA reductions vs the reference loop"),
    "reward": ("heal.bench.reward_step", "the trainer's whole EDA reward step for a full batch"),
    "sandbox": ("heal.bench.sandbox", "runs/s of the code sandbox: kernel isolation (+ pool) vs the process-only path"),
    "static": ("heal.bench.static", "static performance model of the Triton kernels from their compiled SASS (no GPU)"),
    "rollout": ("heal.bench.rollout", "rollouts + exact entropies: vLLM + heal's processor vs vLLM + teacher-forced "
                "pass vs transformers generate + pass (needs vLLM)"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME")
    sub.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_bench_module=module_name)
        # benchmark modules keep torch & co. inside run(), so importing them here stays cheap
        try:
            importlib.import_module(module_name).add_arguments(p)
        except ImportError:
            # the benchmark module could not be imported (missing optional dependency);
            # `heal bench NAME` will report it when run
            pass


def run(args) -> int:
    module = importlib.import_module(args._bench_module)
    return int(module.run(args) or 0)
