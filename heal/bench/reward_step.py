"""Benchmark: the trainer's whole EDA reward step for a full batch (``heal bench reward``).

What a HEAL trainer does once per step after the old-log-prob pass, timed end to end on the CPU
(in verl the reward runs in the driver process, which usually has no GPU):

  padded entropies ``[B, T]`` + response mask + data sources + uids already in memory
  -> :func:`heal.reward.eda_step` (pack, one fused grouped-max similarity op, rules, metrics)
  -> shaped token scores: ``weight * r_EDA`` added at each row's last valid token.

Beside it, the reference implementation's cost on the same batch: its per-pair Python loop
(``F.interpolate`` + two softmaxes + ``F.kl_div`` + ``.item()``) is timed on a random sample of pairs
of the batch and extrapolated to the ``B * (B - 1)`` ordered pairs a step needs (running all of
them would take minutes).

Default batch: 1024 trajectories (128 prompts x 8 rollouts), lengths uniform in [64, 3072],
a quarter of the prompts general-domain. Results: ``benchmarks/results/reward_step-cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    parser.add_argument("--batch", type=int, default=1024, help="trajectories per step (default 1024)")
    parser.add_argument("--rollouts", type=int, default=8, help="trajectories per prompt (default 8)")
    parser.add_argument("--min-len", type=int, default=64, help="shortest response length (default 64)")
    parser.add_argument("--max-len", type=int, default=3072, help="longest response length = padded width (default 3072)")
    parser.add_argument(
        "--general-fraction", type=float, default=0.25, help="fraction of prompts that are general-domain (default 0.25)"
    )
    parser.add_argument("--metric", default="kl", choices=("kl", "hti", "pl"), help="similarity (default kl)")
    parser.add_argument("--exclude-same-prompt", action="store_true", help="skip same-prompt pairs (default off)")
    parser.add_argument("--iters", type=int, default=7, help="timed runs of the step; the median is reported (default 7)")
    parser.add_argument(
        "--ref-pairs", type=int, default=300, help="random pairs on which the reference loop (always kl, scored first, float32) is timed (default 300)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic batch (default 0)")
    harness.add_output_dir_argument(parser, dest="out_dir")
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no files")


def make_batch(batch: int, rollouts: int, min_len: int, max_len: int, general_fraction: float, seed: int):
    """A synthetic step: padded entropies, mask, data sources, uids and accuracy token scores."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    # entropy-like values: mostly low, with high-entropy "forking" spikes, a per-trajectory scale
    base = torch.rand(batch, max_len, generator=g) ** 4 * 3.0
    scale = 0.5 + torch.rand(batch, 1, generator=g)
    entropy = (base * scale).to(torch.float32)
    mask = torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)
    entropy[~mask] = 0.0
    num_prompts = (batch + rollouts - 1) // rollouts
    prompt = torch.arange(batch) // rollouts
    general_prompt = torch.randperm(num_prompts, generator=g)[: round(general_fraction * num_prompts)]
    is_general = torch.isin(prompt, general_prompt)
    data_sources = ["commonsense_qa" if flag else "math" for flag in is_general.tolist()]
    uids = [f"prompt-{int(p)}" for p in prompt]
    acc = (torch.rand(batch, generator=g) < 0.4).to(torch.float32)
    token_scores = torch.zeros(batch, max_len)
    last = lens - 1
    token_scores[torch.arange(batch), last] = acc
    return entropy, mask, data_sources, uids, token_scores, lens


def run(args) -> int:
    import os
    import time

    import torch
    from tqdm import tqdm

    from heal.bench import harness
    from heal.bench.eda import reference_pair_kl
    from heal.dynamics import pack_padded
    from heal.reward import EDAConfig, add_to_last_token, eda_step
    from heal_kernels import grouped_max_similarity
    from heal_kernels._backend import resolve_backend

    device = torch.device("cpu")
    load_before = os.getloadavg()[0]
    if args.batch < 2 or args.rollouts < 1 or not (1 <= args.min_len <= args.max_len):
        raise ValueError("need --batch >= 2, --rollouts >= 1 and 1 <= --min-len <= --max-len")
    entropy, mask, sources, uids, token_scores, lens = make_batch(
        args.batch, args.rollouts, args.min_len, args.max_len, args.general_fraction, args.seed
    )
    cfg = EDAConfig(
        general_sources=("commonsense_qa",), metric=args.metric, exclude_same_prompt=args.exclude_same_prompt
    )
    backend = resolve_backend(device)

    out = {}

    def step():
        result, metrics = eda_step(entropy, mask, sources, uids, cfg)
        out["scores"] = add_to_last_token(token_scores, cfg.weight * result.reward, mask)
        out["metrics"] = metrics
        out["result"] = result

    print(f"reward step: B={args.batch}, T={args.max_len}, lengths U[{args.min_len}, {args.max_len}], "
          f"{torch.get_num_threads()} threads, backend {backend}")
    cpu0 = time.process_time()
    t_step = harness.time_fn(step, device, warmup=1, iters=args.iters, max_seconds=120)
    # CPU seconds (all threads) per step: with other processes on the cores the wall time grows,
    # this does not; cpu_s / threads is what the step takes on an otherwise idle machine
    step_cpu_s = (time.process_time() - cpu0) / (t_step["runs"] + 1)
    # breakdown: packing, and the fused op alone
    values, cu = pack_padded(entropy, mask)
    t_pack = harness.time_fn(lambda: pack_padded(entropy, mask), device, warmup=1, iters=args.iters)
    is_general = out["result"].is_general
    t_op = harness.time_fn(
        lambda: grouped_max_similarity(values, cu, is_general.to(torch.int32), 2, metric=args.metric),
        device,
        warmup=1,
        iters=args.iters,
        max_seconds=120,
    )

    # the reference loop on a random sample of ordered pairs (i != j) of the same batch
    g = torch.Generator().manual_seed(args.seed + 1)
    seqs = [values[int(cu[i]) : int(cu[i + 1])] for i in range(args.batch)]
    rows = torch.randint(0, args.batch, (args.ref_pairs,), generator=g)
    cols = (rows + torch.randint(1, args.batch, (args.ref_pairs,), generator=g)) % args.batch
    reference_pair_kl(seqs[0], seqs[1])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i, j in tqdm(list(zip(rows.tolist(), cols.tolist())), desc="reference loop (sample)", leave=False):
        reference_pair_kl(seqs[i], seqs[j])
    ref_per_pair_s = (time.perf_counter() - t0) / args.ref_pairs
    ref_cpu_per_pair_s = (time.process_time() - c0) / args.ref_pairs
    pairs = args.batch * (args.batch - 1)
    ref_step_s = ref_per_pair_s * pairs
    ref_cpu_step_s = ref_cpu_per_pair_s * pairs

    load_after = os.getloadavg()[0]
    threads = torch.get_num_threads()
    step_s = t_step["median_ms"] / 1e3
    op_s = t_op["median_ms"] / 1e3
    nbytes = entropy.numel() * entropy.element_size() + mask.numel() * mask.element_size()
    bandwidth = harness.copy_bandwidth_gbps(device, nbytes=1 << 28)
    metrics = out["metrics"]
    rows_md = [
        {"what": "heal reward step (eda_step + shaped scores + metrics)", "median_s": step_s,
         "per_pair_us": step_s / pairs * 1e6, "vs_reference": ref_step_s / step_s},
        {"what": f"  of which: grouped_max_similarity op ({backend})", "median_s": op_s,
         "per_pair_us": op_s / pairs * 1e6, "vs_reference": ref_step_s / op_s},
        {"what": "  of which: pack_padded", "median_s": t_pack["median_ms"] / 1e3},
        {"what": f"heal reward step, CPU time of all threads / {threads} threads (idle-machine estimate, perfect scaling)",
         "median_s": step_cpu_s / threads, "per_pair_us": step_cpu_s / threads / pairs * 1e6,
         "vs_reference": ref_cpu_step_s / (step_cpu_s / threads)},
        {"what": f"reference per-pair loop (timed on {args.ref_pairs} pairs, extrapolated)", "median_s": ref_step_s,
         "per_pair_us": ref_per_pair_s * 1e6, "vs_reference": 1.0},
        {"what": "reference per-pair loop, CPU time of all threads (idle-machine estimate)", "median_s": ref_cpu_step_s,
         "per_pair_us": ref_cpu_per_pair_s * 1e6, "vs_reference": 1.0},
    ]
    table = harness.markdown_table(rows_md, ["what", "median_s", "per_pair_us", "vs_reference"])
    env = harness.environment(device)
    md = "\n".join(
        [
            "# EDA reward step (trainer's view), CPU",
            "",
            f"Batch: {args.batch} trajectories ({args.batch // args.rollouts} prompts x {args.rollouts}), padded width "
            f"{args.max_len}, lengths uniform in [{args.min_len}, {args.max_len}] (mean {float(lens.float().mean()):.0f}), "
            f"{int(is_general.sum())} general; metric {args.metric}, exclude_same_prompt={args.exclude_same_prompt}; "
            f"{pairs} ordered pairs.",
            f"Machine: {env['device']}, {env['cpu_threads']} threads, torch {env['torch']}; median of {t_step['runs']} runs; "
            f"1-min load average {load_before:.1f} before / {load_after:.1f} after (other processes share the cores).",
            "",
            table,
            "",
            f"Target: <= 2 s per step on this 2-core machine -> measured {step_s:.3f} s wall "
            f"({'met' if step_s <= 2.0 else 'NOT met'}), {step_cpu_s / threads:.3f} s from CPU time / threads "
            f"({'met' if step_cpu_s / threads <= 2.0 else 'NOT met'} on an idle machine; {step_cpu_s:.3f} CPU-s in all, "
            f"an upper bound for the wall time of this compute-bound step on an idle machine). "
            f"vs_reference: wall rows against the reference's wall time, CPU-time rows against its CPU time. The step reads {nbytes / 1e6:.1f} MB of padded entropies + mask "
            f"(memory floor {nbytes / (bandwidth * 1e9) * 1e3:.1f} ms at the measured {bandwidth:.1f} GB/s copy bandwidth); "
            f"the rest is the O(B^2 * min(m, n)) similarity work.",
            f"EDA rate: target {metrics['eda/rate_target']:.3f}, general {metrics['eda/rate_general']:.3f}.",
        ]
    )
    print(md)
    if not args.no_write:
        payload = {
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("out_dir", "no_write")},
            "backend": backend,
            "pairs": pairs,
            "mean_length": float(lens.float().mean()),
            "num_general": int(is_general.sum()),
            "step": t_step,
            "step_cpu_time_s": step_cpu_s,
            "step_idle_estimate_s": step_cpu_s / threads,
            "op": t_op,
            "pack_padded": t_pack,
            "reference": {
                "pairs_timed": args.ref_pairs,
                "per_pair_s": ref_per_pair_s,
                "extrapolated_step_s": ref_step_s,
                "cpu_per_pair_s": ref_cpu_per_pair_s,
                "cpu_extrapolated_step_s": ref_cpu_step_s,
            },
            "speedup_vs_reference": ref_step_s / step_s,
            "speedup_vs_reference_cpu_time": ref_cpu_step_s / (step_cpu_s / threads),
            "target_s": 2.0,
            "target_met": step_s <= 2.0,
            "load_average_1min": [load_before, load_after],
            "input_bytes": nbytes,
            "copy_bandwidth_gbps": bandwidth,
            "metrics": {k: v for k, v in metrics.items()},
        }
        figure = None
        try:
            figure, ax = harness.agg_subplots(figsize=(7, 3.4))
            labels = [
                "reference loop, wall\n(extrapolated)",
                "reference loop, CPU time",
                "heal op, wall",
                "heal reward step, wall",
                f"heal reward step,\nCPU time / {threads}",
            ]
            secs = [ref_step_s, ref_cpu_step_s, op_s, step_s, step_cpu_s / threads]
            ax.barh(labels, secs, color=["#999999", "#bbbbbb", "#4c72b0", "#dd8452", "#f0b27a"])
            ax.set_xscale("log")
            ax.axvline(2.0, color="k", ls="--", lw=1)
            ax.set_xlabel("seconds per training step (log), dashed = 2 s target")
            ax.set_title(f"EDA reward step, B={args.batch}, CPU {threads} threads, load avg {load_after:.1f}")
            for y, s in enumerate(secs):
                ax.text(s, y, f" {s:.3g} s", va="center")
        except ImportError:
            figure = None
        paths = harness.write_results("reward_step", device, payload, md, args.out_dir, figure)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
