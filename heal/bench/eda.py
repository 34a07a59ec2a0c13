"""Benchmark: all-pairs entropy-dynamics similarity + the EDA reductions (``heal bench eda``).

The batch: ``--batch`` trajectories (default 1024) with lengths uniform in ``[--min-len,
--max-len]`` (default [64, 3072]), a quarter of them general-domain. "Full EDA" is both per-row
maxima (best target neighbour, best general neighbour, self excluded) for every trajectory:
``heal_kernels.grouped_max_similarity(..., num_groups=2)``, ``B * (B - 1)`` ordered pairs.

Methods, all in one process on the same batch:

* heal's grouped op on each backend available: ``cpu`` (the C++ extension), ``torch`` (pure torch),
  ``triton`` (CUDA only);
* the reference-style loop (``F.interpolate`` + two softmaxes + ``F.kl_div`` + ``.item()`` per pair,
  float32 as the reference implementation ran it) timed on ``--ref-pairs`` random pairs and
  extrapolated to all pairs;
* the best vectorised PyTorch baseline we could write: columns sorted by length, one row at a time
  against cache-sized blocks of columns, a padded gather of both aligned sequences and
  ``log_softmax`` over the aligned length; on the CPU it runs ``--baseline-rows`` random rows
  against every column and is extrapolated (heal's torch backend too), with torch's default thread
  count and single-threaded, the faster reported.

Reported per method: median wall time (measured, or extrapolated where marked), time per pair,
speed-up per pair over the reference loop, aligned elements per second (sum over pairs of
``max(m, n)``: the element work every exact method does at least once), peak extra memory; plus
the max difference of heal's result to the baseline / reference on the rows they share.
Results: ``benchmarks/results/eda-<device>.{json,md,png}``.

``--scaling B1,B2,...`` runs the scaling table instead (:mod:`heal.bench.eda_scaling`): the EDA's
cost against the batch size, with 1, 2 and all threads and sharded over worker processes.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    parser.add_argument("--batch", type=int, default=1024, help="trajectories (default 1024)")
    parser.add_argument("--min-len", type=int, default=64, help="shortest trajectory (default 64)")
    parser.add_argument("--max-len", type=int, default=3072, help="longest trajectory (default 3072)")
    parser.add_argument("--general-fraction", type=float, default=0.25, help="fraction of general trajectories (default 0.25)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available; default auto)")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per method, median reported (default 5)")
    parser.add_argument("--ref-pairs", type=int, default=300, help="random pairs the reference loop is timed on (default 300)")
    parser.add_argument(
        "--baseline-rows",
        type=int,
        default=None,
        help="rows the vectorised baseline and heal's torch backend run on the CPU, extrapolated to B (default 32 on CPU, all on CUDA)",
    )
    parser.add_argument("--skip-torch", action="store_true", help="skip heal's pure-torch backend")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    harness.add_output_dir_argument(parser, dest="out_dir")
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no files")
    parser.add_argument(
        "--scaling",
        default=None,
        metavar="B1,B2,...",
        help="instead of the comparison: the scaling table over these batch sizes (e.g. 1024,2048,4096,8192,16384): "
        "1, 2 and all threads, driver vs --workers processes on the CPU; the Triton kernel on CUDA "
        "(results eda_scaling-<device>.*)",
    )
    parser.add_argument("--workers", type=int, default=2, help="--scaling on the CPU: worker processes sharing the work (default 2)")


def make_batch(batch: int, min_len: int, max_len: int, general_fraction: float, seed: int, device):
    """The benchmark batch ``(values, cu_seqlens, groups, lengths)``: :func:`heal_kernels.triton.shapes.make_batch`
    (the AOT variant list specialises the kernels on the same batch)."""
    from heal_kernels.triton.shapes import make_batch as _make_batch

    return _make_batch(batch, min_len, max_len, general_fraction, seed, device)


def reference_pair_kl(a, b) -> float:
    """One pair as the reference implementation computes it: float32, scored first."""
    import torch
    import torch.nn.functional as F

    n = max(a.numel(), b.numel())
    if a.numel() < n:
        a = F.interpolate(a.view(1, 1, -1), size=n, mode="nearest").view(-1)
    if b.numel() < n:
        b = F.interpolate(b.view(1, 1, -1), size=n, mode="nearest").view(-1)
    p = torch.softmax(a, dim=0)
    log_q = torch.log_softmax(b, dim=0)
    return -F.kl_div(log_q, p, reduction="sum").item()


def baseline_grouped(values, cu, groups, num_groups, rows, *, block_elems=None):
    """Vectorised PyTorch baseline: ``[len(rows), num_groups]`` max of ``-KL(P_i || P_j)`` (self excluded).

    Columns sorted by length; for a block of rows x columns the aligned index of both sides is
    gathered from a padded ``[B, max_len]`` matrix (nearest rule in float32, exactly as
    ``F.interpolate``), ``log_softmax`` runs over the aligned length (padding masked to ``-inf``).
    Memory per block: ``block_elems`` aligned elements.
    """
    import torch

    dev = values.device
    if block_elems is None:  # cache-sized on the CPU; big blocks (few launches) on a GPU
        block_elems = 1 << 24 if dev.type == "cuda" else 1 << 18
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    bsz = lens.numel()
    max_len = int(lens.max())
    padded = torch.zeros(bsz, max_len, dtype=torch.float32, device=dev)
    pos = torch.arange(max_len, device=dev)
    mask = pos.unsqueeze(0) < lens.unsqueeze(1)
    padded[mask] = values.to(torch.float32)
    order = torch.argsort(lens)
    slen = lens[order]
    out = torch.full((rows.numel(), num_groups), -float("inf"), dtype=torch.float32, device=dev)
    for r, i in enumerate(rows.tolist()):
        mi = int(lens[i])
        c0 = 0
        while c0 < bsz:
            width = max(mi, int(slen[min(bsz - 1, c0)]))
            cb = max(1, block_elems // width)
            c1 = min(bsz, c0 + cb)
            width = max(mi, int(slen[c1 - 1]))
            cols = order[c0:c1]
            mj = lens[cols]
            n = torch.clamp(mj, min=mi)  # aligned length per pair
            t = torch.arange(width, device=dev).unsqueeze(0)
            valid = t < n.unsqueeze(1)

            def src(m):
                scale = m.to(torch.float32) / n.to(torch.float32)
                s = torch.floor(t.to(torch.float32) * scale.unsqueeze(1)).to(torch.int64)
                return torch.minimum(s, (m - 1).unsqueeze(1)).clamp(min=0)

            a = padded[i][src(torch.full_like(mj, mi))]
            b = torch.gather(padded[cols], 1, src(mj))
            neg = torch.tensor(-float("inf"), device=dev)
            la = torch.log_softmax(torch.where(valid, a, neg), dim=1)
            lb = torch.log_softmax(torch.where(valid, b, neg), dim=1)
            kl = torch.where(valid, la.exp() * (la - lb), torch.zeros((), device=dev)).sum(1)
            sim = torch.where(cols == i, neg, -kl)
            part = torch.full((num_groups,), -float("inf"), device=dev).scatter_reduce(0, groups[cols], sim, reduce="amax")
            out[r] = torch.maximum(out[r], part)
            c0 = c1
    return out


def run(args) -> int:
    if args.scaling:
        from heal.bench.eda_scaling import run_scaling

        return run_scaling(args)
    import math
    import os
    import random
    import time

    import torch

    from heal.bench import harness
    from heal_kernels.ops import pairwise as pw

    device = harness.resolve_device(args.device)
    values, cu, groups, lens = make_batch(args.batch, args.min_len, args.max_len, args.general_fraction, args.seed, device)
    bsz = args.batch
    pairs = bsz * (bsz - 1)
    lens64 = lens.to(torch.float64)
    aligned = float(torch.maximum(lens64.unsqueeze(0), lens64.unsqueeze(1)).sum() - lens64.sum())  # sum of max(m, n), i != j
    print(f"EDA benchmark on {harness.device_name(device)}: B={bsz}, lengths U[{args.min_len}, {args.max_len}], "
          f"{int(groups.sum())} general, {pairs} ordered pairs, {aligned / 1e9:.2f} G aligned elements")
    rows_out = []
    results = {}

    def record(name, ms, npairs, extrapolated, mem=None, note=""):
        per_pair_ns = ms * 1e6 / npairs
        full_ms = per_pair_ns * pairs / 1e6
        row = {
            "method": name,
            "measured_pairs": npairs,
            "time_ms": ms,
            "per_pair_ns": per_pair_ns,
            "full_batch_ms": full_ms,
            "extrapolated": extrapolated,
            "aligned_gelem_per_s": aligned / (full_ms * 1e-3) / 1e9,
            "peak_mem_mb": None if mem is None else mem / 2**20,
            "note": note,
        }
        rows_out.append(row)
        print(f"  {name:<34} {full_ms / 1e3:9.3f} s full batch{' (extrapolated)' if extrapolated else ''}, {per_pair_ns:10.1f} ns/pair")
        return row

    # heal's grouped op, each backend available on this device
    backends = ["triton"] if device.type == "cuda" else ["cpu"]
    if device.type == "cpu" and not args.skip_torch:
        backends.append("torch")
    for be in backends:
        if be == "cpu":
            from heal_kernels.cpu import load_pairwise

            t0 = time.perf_counter()
            ext = load_pairwise()
            build_s = time.perf_counter() - t0
            if ext is None:
                print("  (C++ extension unavailable; the cpu backend would run the torch path: skipped)")
                continue
        if be == "torch" and device.type == "cpu":
            # the pure-torch path on a sample of rows (it is the slow fallback)
            nrows = args.baseline_rows or 32
            sub = torch.randperm(bsz, generator=torch.Generator().manual_seed(args.seed + 1))[:nrows]
            # rows x all columns: same pairs as the grouped op does for those rows
            fn = lambda: _torch_rows(pw, values, cu, groups, sub)  # noqa: E731
            ms, threads = _best_threads(harness, fn, device)
            record("heal torch backend", ms, nrows * (bsz - 1), True, harness.peak_memory_bytes(fn, device), f"{nrows} rows, {threads} threads")
            results["torch_rows"] = (sub, fn())
            continue
        fn = lambda be=be: pw.grouped_max_similarity(values, cu, groups, 2, backend=be)  # noqa: E731
        t = harness.time_fn(fn, device, warmup=1, iters=args.iters)
        mem = harness.peak_memory_bytes(fn, device)
        note = f"{torch.get_num_threads()} threads" if be == "cpu" else ""
        if be == "cpu":
            # CPU seconds of one run (all threads): wall / CPU tells how contended the machine was
            c0 = time.process_time()
            fn()
            cpu_s = time.process_time() - c0
            note += f", {cpu_s:.2f} CPU-s per run, first-use build/load {build_s:.1f} s"
            results["cpu_seconds_per_run"] = cpu_s
        record(f"heal {be} backend (grouped op)", t["median_ms"], pairs, False, mem, note)
        results[be] = fn()

    heal_key = "triton" if device.type == "cuda" else ("cpu" if "cpu" in results else None)
    heal_out = results.get(heal_key) if heal_key else None

    # vectorised PyTorch baseline
    nrows = args.baseline_rows or (bsz if device.type == "cuda" else 32)
    sub = torch.randperm(bsz, generator=torch.Generator().manual_seed(args.seed + 2))[:nrows].to(device)
    fn = lambda: baseline_grouped(values, cu, groups, 2, sub)  # noqa: E731
    if device.type == "cuda":
        ms, threads = harness.time_fn(fn, device, warmup=1, iters=3)["median_ms"], None
    else:
        ms, threads = _best_threads(harness, fn, device)
    mem = harness.peak_memory_bytes(fn, device)
    note = f"{nrows} rows" + (f", {threads} threads" if threads else "")
    base_row = record("vectorised PyTorch baseline", ms, nrows * (bsz - 1), nrows < bsz, mem, note)
    base_out = fn()
    diffs = {}
    if heal_out is not None:
        diffs["heal_vs_baseline_max_abs"] = float((heal_out[sub] - base_out).abs().max())
    if "torch_rows" in results and heal_out is not None:
        rsub, rout = results["torch_rows"]
        diffs["heal_cpu_vs_torch_backend_max_abs"] = float((heal_out[rsub] - rout).abs().max())

    # reference-style per-pair loop on random pairs (CPU tensors, as the reference ran on the driver)
    rng = random.Random(args.seed)
    seqs = [values[int(cu[k]) : int(cu[k + 1])].cpu() for k in range(bsz)]
    sample = []
    while len(sample) < args.ref_pairs:
        i, j = rng.randrange(bsz), rng.randrange(bsz)
        if i != j:
            sample.append((i, j))
    t0 = time.perf_counter()
    ref_vals = [reference_pair_kl(seqs[i], seqs[j]) for i, j in sample]
    ref_ms = (time.perf_counter() - t0) * 1e3
    ref_row = record("reference per-pair loop", ref_ms, len(sample), True, None, f"{len(sample)} random pairs, CPU")
    # heal's values on the same pairs (full matrix entries through the pairwise op on just those rows)
    check_rows = sorted({i for i, _ in sample[:40]} | {j for _, j in sample[:40]})
    idx = torch.tensor(check_rows)
    sub_vals = torch.cat([seqs[k] for k in check_rows])
    sub_cu = torch.zeros(len(check_rows) + 1, dtype=torch.int64)
    sub_cu[1:] = torch.tensor([seqs[k].numel() for k in check_rows]).cumsum(0)
    sub_full = pw.pairwise_similarity(sub_vals, sub_cu)
    pos = {k: n for n, k in enumerate(check_rows)}
    diffs["heal_vs_reference_loop_max_abs"] = max(abs(float(sub_full[pos[i], pos[j]]) - v) for (i, j), v in zip(sample[:40], ref_vals[:40]))
    del idx

    for row in rows_out:
        row["speedup_per_pair_vs_reference"] = ref_row["per_pair_ns"] / row["per_pair_ns"]
        row["speedup_vs_baseline"] = base_row["per_pair_ns"] / row["per_pair_ns"]

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    payload = {
        "shape": {
            "batch": bsz,
            "min_len": args.min_len,
            "max_len": args.max_len,
            "general": int(groups.sum()),
            "ordered_pairs": pairs,
            "aligned_elements": aligned,
            "total_tokens": int(cu[-1]),
        },
        "rows": rows_out,
        "checks": diffs,
        "heal_cpu_cpu_seconds_per_run": results.get("cpu_seconds_per_run"),
        "load_average_at_end": load,
        "copy_bandwidth_gbps": harness.copy_bandwidth_gbps(device, 1 << 28),
    }
    cols = [
        "method",
        "full_batch_ms",
        "extrapolated",
        "per_pair_ns",
        "speedup_per_pair_vs_reference",
        "speedup_vs_baseline",
        "aligned_gelem_per_s",
        "peak_mem_mb",
        "note",
    ]
    md = [
        f"# EDA all-pairs similarity on {harness.device_name(device)}",
        "",
        f"B={bsz} trajectories, lengths U[{args.min_len}, {args.max_len}] ({int(cu[-1])} tokens), {int(groups.sum())} general; "
        f"full EDA = both per-row maxima over {pairs} ordered pairs ({aligned / 1e9:.2f} G aligned elements). "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {load}.",
        "",
        harness.markdown_table(rows_out, cols),
        "",
        "Extrapolated rows were timed on a sample (see note) and scaled per pair to the full batch.",
        f"Checks (max abs difference of -KL): {diffs}",
        f"Device copy bandwidth: {payload['copy_bandwidth_gbps']:.1f} GB/s.",
    ]
    markdown = "\n".join(md)
    print(markdown)
    if not args.no_write:
        fig = None
        try:
            fig, ax = harness.agg_subplots(figsize=(7, 3.2))
            names = [r["method"] + (" *" if r["extrapolated"] else "") for r in rows_out]
            ax.barh(names, [r["full_batch_ms"] / 1e3 for r in rows_out], color="tab:blue")
            ax.set_xscale("log")
            ax.set_xlabel("seconds for the full batch (log; * = extrapolated from a sample)")
            ax.set_title(f"EDA, B={bsz}, {harness.device_name(device)}", fontsize=9)
            for k, r in enumerate(rows_out):
                ax.text(r["full_batch_ms"] / 1e3, k, f" {r['full_batch_ms'] / 1e3:.3g} s", va="center", fontsize=8)
            fig.tight_layout()
        except Exception as exc:  # plotting is optional
            print(f"(no figure: {exc})")
        paths = harness.write_results("eda", device, payload, markdown, args.out_dir, fig)
        print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


def _best_threads(harness, fn, device):
    """CPU: time ``fn`` once with torch's default thread count and once single-threaded; the best.

    Many small torch ops with intra-op threads stall badly on a busy machine (each op waits for
    every thread); the baselines get whichever setting is faster.
    """
    import torch

    default = torch.get_num_threads()
    best = None
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        try:
            ms = harness.time_fn(fn, device, warmup=0, iters=1)["median_ms"]
        finally:
            torch.set_num_threads(default)
        if best is None or ms < best[0]:
            best = (ms, threads)
    return best


def _torch_rows(pw, values, cu, groups, rows):
    """heal's torch path (grouped max, self excluded) for ``rows`` x all columns."""
    vals, cu64 = pw._validate_packed(values, cu)
    st = pw.seq_stats(vals, cu64)
    out = pw._grouped_torch(st, cu64, "kl", False, groups, 2, True, None, rows=rows)
    return out[rows]
