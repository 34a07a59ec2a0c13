"""``heal plot``: entropy curves over training steps and entropy-dynamics distance heatmaps from logs."""

from __future__ import annotations

import argparse
import os

HELP = "draw entropy curves per domain (metrics logs) and ED distance heatmaps / dynamics (rollout dumps)"

DESCRIPTION = """\
  heal plot curves METRICS.jsonl    mean entropy per domain over training steps
  heal plot heatmap ROLLOUTS.jsonl  pairwise entropy-dynamics distance d = -s per step (paper Figure 9)
  heal plot dynamics ROLLOUTS.jsonl per-token entropy along the responses, per domain

Metrics log: JSON lines {"step": N, "eda/entropy_mean_target": x, ...} (heal.reward.eda_step metrics
with the step), verl's file logger lines {"step": N, "data": {...}}, or verl console lines
"step:N - key:value - ..." (also as Ray prints them: "(TaskRunner pid=N) step:N - ...", colour codes
and all), or TRL's checkpoint-*/trainer_state.json (its log_history).
--output must name a file in an existing folder (no folder is created).
Rollout dump: JSON lines {"step": N, "data_source": "...", "entropy": [floats], ...} (written by
heal demo, by verl with heal.rollout_dump=PATH, by TRL with heal_rollout_dump=PATH).
See heal.analysis.logs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="plot", metavar="KIND")
    sub.required = True

    c = sub.add_parser("curves", help="entropy (or any metric) per domain over training steps")
    c.add_argument("log", metavar="METRICS.jsonl", help="metrics log (JSONL, verl console text, or TRL trainer_state.json)")
    c.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="metric keys to draw (default: the eda/entropy_mean_<domain> keys the trainers log, "
                   "e.g. eda/entropy_mean_target, else actor/entropy)")
    c.add_argument("--smooth", type=int, default=1, metavar="W", help="moving-average window (default 1: raw)")
    c.add_argument("--title", default=None)
    c.add_argument("--output", default=None, metavar="PNG", help="default: <log>.entropy.png")

    h = sub.add_parser("heatmap", help="pairwise ED distance heatmaps, one per step (Figure 9 style)")
    h.add_argument("dump", metavar="ROLLOUTS.jsonl", help="rollout dump")
    h.add_argument("--data-source", dest="data_source", default=None,
                   help="keep only this data_source (the paper shows the target domain); default: all, grouped")
    h.add_argument("--steps", nargs="+", type=int, default=None, help="steps to show (default: all, at most 6)")
    h.add_argument("--max-per-step", dest="max_per_step", type=int, default=64,
                   help="trajectories per step (default 64, the first ones)")
    h.add_argument("--metric", default="kl", choices=["kl", "hti", "pl"], help="similarity s (default kl)")
    h.add_argument("--first", nargs="+", default=None, metavar="SOURCE", help="data_sources to put first")
    h.add_argument("--output", default=None, metavar="PNG", help="default: <dump>.heatmap.png")

    d = sub.add_parser("dynamics", help="per-token entropy along the responses, per domain")
    d.add_argument("dump", metavar="ROLLOUTS.jsonl", help="rollout dump")
    d.add_argument("--step", type=int, default=None, help="which step (default: the last one in the dump)")
    d.add_argument("--output", default=None, metavar="PNG", help="default: <dump>.dynamics.png")


def _check_output_folder(path) -> None:
    """--output in a folder that does not exist is an error before any work (nothing is created)."""
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"output folder does not exist: {folder} (create it, or choose another --output)")


def run(args) -> int:
    from heal.analysis import logs, plots

    _check_output_folder(args.output)
    if args.plot == "curves":
        metrics = logs.load_metrics(args.log)
        out = args.output or os.path.splitext(args.log)[0] + ".entropy.png"
        plots.plot_entropy_curves(metrics, out, keys=args.keys, title=args.title, smooth=args.smooth)
    elif args.plot == "heatmap":
        if args.max_per_step < 1:
            raise ValueError(f"--max-per-step must be >= 1, got {args.max_per_step}")
        recs = logs.load_rollout_dump(args.dump)
        out = args.output or os.path.splitext(args.dump)[0] + ".heatmap.png"
        plots.plot_distance_heatmaps_by_step(recs, out, data_source=args.data_source, steps=args.steps,
                                             max_per_step=args.max_per_step, metric=args.metric, first=args.first)
    else:
        recs = logs.load_rollout_dump(args.dump)
        step = args.step if args.step is not None else max(r["step"] for r in recs)
        recs = [r for r in recs if r["step"] == step]
        if not recs:
            raise ValueError(f"--step {step}: no records with that step in {args.dump}")
        out = args.output or os.path.splitext(args.dump)[0] + ".dynamics.png"
        plots.plot_entropy_dynamics([r["entropy"] for r in recs], [str(r["data_source"]) for r in recs], out,
                                    title=f"Entropy dynamics, step {step}"
                                    + plots.entropy_temperature_note([r.get("entropy_temperature") for r in recs]))
    print(f"heal plot: wrote {out}")
    return 0
