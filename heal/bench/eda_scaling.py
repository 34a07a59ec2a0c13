"""How the EDA's cost grows with the batch (``heal bench eda --scaling B1,B2,...``).

For each batch size (lengths uniform in ``[--min-len, --max-len]``, the same generator as ``heal bench
eda``), the full EDA (:func:`heal_kernels.grouped_max_similarity`, two groups, ``B * (B - 1)`` ordered
pairs) is timed

* on the CPU, in this process ("driver"), with 1, 2 and all allowed threads (``num_threads=``;
  the CPUs of this process's affinity mask), and sharded over ``--workers`` worker processes
  ("workers": each computes its share of the pairs with ``all // workers`` threads, the way
  ``heal.eda_placement: workers`` does in verl; the time includes sending the packed batch to every
  worker and the partial maxima back, and their max). The workers' result is checked to equal the driver's bit for bit.
* on CUDA, with the Triton kernel.

Reported: seconds per call (median of ``--iters``, at least one), nanoseconds per ordered pair, and
elements per second (sum over pairs of ``min(m, n)``, the work of the run-length form). Results:
``eda_scaling-<device>.{json,md,png}``. Batches whose single-thread run would take long are still
run: pick ``--scaling`` to suit the machine.
"""

from __future__ import annotations

import math
import os
import time
from typing import Dict, List


def _parse_batches(text: str) -> List[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--scaling takes comma-separated batch sizes, e.g. 1024,4096, got {text!r}") from None
    if not out or any(b < 2 for b in out):
        raise SystemExit(f"--scaling: every batch size must be >= 2, got {text!r}")
    return out


def _payload(values, cu, groups):
    return {"values": values, "cu_seqlens": cu, "groups": groups, "num_groups": 2, "prompt_ids": None, "kwargs": {}}


def _worker_call(args):
    payload, rank, world, threads = args
    from heal.integrations.verl.eda_workers import grouped_max_shard

    payload = dict(payload, kwargs={"num_threads": threads})
    return grouped_max_shard(payload, rank, world)


def run_scaling(args) -> int:
    import concurrent.futures as cf
    import multiprocessing as mp

    import torch

    from heal.bench import harness
    from heal.bench.eda import make_batch
    from heal_kernels import grouped_max_similarity
    from heal_kernels._backend import available_cpus
    from heal_kernels.cpu import load_pairwise

    device = harness.resolve_device(args.device)
    batches = _parse_batches(args.scaling)
    cpus = available_cpus()
    rows: List[Dict[str, object]] = []
    print(f"EDA scaling on {harness.device_name(device)}: B in {batches}, lengths U[{args.min_len}, {args.max_len}], "
          f"{cpus} CPUs allowed")
    if device.type == "cpu" and load_pairwise() is None:
        print("the C++ extension is unavailable: nothing to measure on the CPU")
        return 1
    pool = None
    world = max(1, int(args.workers))
    if device.type == "cpu" and world > 1:
        pool = cf.ProcessPoolExecutor(max_workers=world, mp_context=mp.get_context("spawn"))
    try:
        for bsz in batches:
            values, cu, groups, lens = make_batch(bsz, args.min_len, args.max_len, args.general_fraction, args.seed, device)
            pairs = bsz * (bsz - 1)
            l64 = lens.to(torch.float64)
            min_elems = float(torch.minimum(l64[:, None], l64[None, :]).sum() - l64.sum())

            def add(placement, threads, seconds, note=""):
                row = {"batch": bsz, "placement": placement, "threads": threads, "seconds": seconds,
                       "ns_per_pair": seconds * 1e9 / pairs, "gelem_per_s": min_elems / seconds / 1e9, "note": note}
                rows.append(row)
                print(f"  B={bsz:<6} {placement:<8} threads={threads!s:<5} {seconds:9.3f} s  {row['ns_per_pair']:8.1f} ns/pair")

            def timed(fn):
                best = []
                for _ in range(max(1, args.iters)):
                    t0 = time.perf_counter()
                    out = fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    best.append(time.perf_counter() - t0)
                best.sort()
                return best[len(best) // 2], out

            if device.type == "cuda":
                grouped_max_similarity(values, cu, groups, 2)  # compile
                secs, _ = timed(lambda: grouped_max_similarity(values, cu, groups, 2))
                add("driver", "gpu", secs, "Triton")
                continue
            ref = None
            for threads in sorted({1, min(2, cpus), cpus}):
                secs, out = timed(lambda t=threads: grouped_max_similarity(values, cu, groups, 2, num_threads=t))
                ref = out if ref is None else ref
                add("driver", threads, secs)
            if pool is not None:
                per = max(1, cpus // world)
                payload = _payload(values, cu, groups)
                k = min(bsz, 16)  # warm-up: every worker loads the extension once
                warm = _payload(values[: int(cu[k])], cu[: k + 1], groups[:k])
                list(pool.map(_worker_call, [(warm, r, world, per) for r in range(world)]))

                from heal.integrations.verl.eda_workers import combine_shares

                def sharded():
                    outs = list(pool.map(_worker_call, [(payload, r, world, per) for r in range(world)]))
                    return combine_shares(outs, bsz, 2)

                secs, out = timed(sharded)
                same = torch.equal(out, ref)
                add("workers", f"{world}x{per}", secs, "bit-identical to driver" if same else "DIFFERS from driver")
                if not same:
                    raise RuntimeError(f"B={bsz}: the workers' result differs from the driver's")
    finally:
        if pool is not None:
            pool.shutdown()

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cols = ["batch", "placement", "threads", "seconds", "ns_per_pair", "gelem_per_s", "note"]
    md = [
        f"# EDA cost against batch size on {harness.device_name(device)}",
        "",
        f"Full EDA (both per-row maxima, B(B-1) ordered pairs), lengths U[{args.min_len}, {args.max_len}]; "
        f"median of {max(1, args.iters)} run(s); {cpus} CPUs allowed; load average at the end {load}. "
        "gelem/s counts sum over pairs of min(m, n). workers = processes each computing a share of the pairs "
        "(WxT: W workers of T threads), batch sent to each and partial maxima returned and combined, included in the time.",
        "",
        harness.markdown_table(rows, cols),
    ]
    markdown = "\n".join(md)
    print(markdown)
    if not args.no_write:
        fig = None
        try:
            fig, ax = harness.agg_subplots(figsize=(6.4, 3.6))
            series: Dict[str, List] = {}
            for r in rows:
                series.setdefault(f"{r['placement']}, {r['threads']} threads", []).append((r["batch"], r["seconds"]))
            for name, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B (trajectories)")
            ax.set_ylabel("seconds per EDA call")
            ax.set_title(f"EDA cost vs batch, {harness.device_name(device)}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
        except Exception as exc:  # plotting is optional
            print(f"(no figure: {exc})")
        paths = harness.write_results("eda_scaling", device, {"rows": rows, "load_average_at_end": load,
                                                              "cpus_allowed": cpus, "min_len": args.min_len,
                                                              "max_len": args.max_len}, markdown, args.out_dir, fig)
        print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0 if all(math.isfinite(r["seconds"]) for r in rows) else 1
