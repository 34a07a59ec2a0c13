"""The EDA inside a Ray actor started with default options, against the same call in a plain process.

verl's trainer process (where ``heal.eda_placement: driver`` computes the EDA) is such an actor, and
Ray starts its actors with ``OMP_NUM_THREADS=1``: torch runs one thread there. heal's kernel takes its
thread count from the process's affinity mask instead (:func:`heal_kernels.available_cpus`). Timed,
on the same batch (lengths U[64, 3072], a quarter general):

* ``plain process``: ``heal.reward.eda_reward`` with its default threads;
* ``Ray actor, default threads``: the same call inside a default ``@ray.remote`` actor;
* ``Ray actor, torch's thread count``: the same with ``num_threads=torch.get_num_threads()`` (what the
  kernel used when it followed torch's global setting).

    python benchmarks/eda_ray_actor.py [--batch 4096] [--iters 3] [--output-dir benchmarks/results]

Needs ``ray`` (it comes with verl). Writes ``eda_ray_actor-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def measure(batch: int, iters: int, which: str):
    """Median seconds of ``eda_reward`` on the benchmark batch, and the thread counts seen."""
    import torch

    from heal.bench.eda import make_batch
    from heal.reward import eda_reward
    from heal_kernels._backend import available_cpus

    values, cu, groups, _ = make_batch(batch, 64, 3072, 0.25, 0, "cpu")
    threads = torch.get_num_threads() if which == "torch" else None
    eda_reward(values[: int(cu[16])], cu[:17], groups[:16].bool(), num_threads=threads)  # load the extension
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        eda_reward(values, cu, groups.bool(), num_threads=threads)
        times.append(time.perf_counter() - t0)
    return {
        "seconds": statistics.median(times),
        "kernel_threads": threads if threads is not None else available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "affinity": len(os.sched_getaffinity(0)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096, help="trajectories (default 4096)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per setting, median reported (default 3)")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="results folder (default: benchmarks/results, the committed tables)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import ray
    import torch

    from heal.bench import harness

    rows = [{"setting": "plain process", **measure(args.batch, args.iters, "default")}]
    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        class Actor:  # default options, like verl's TaskRunner
            def measure(self, *a):
                return measure(*a)

        actor = Actor.remote()
        for which, name in (("default", "Ray actor, default threads"), ("torch", "Ray actor, torch's thread count")):
            rows.append({"setting": name, **ray.get(actor.measure.remote(args.batch, args.iters, which))})
    finally:
        ray.shutdown()
    base = rows[0]["seconds"]
    for r in rows:
        r["vs_plain"] = r["seconds"] / base
    load = os.getloadavg()
    cols = ["setting", "seconds", "vs_plain", "kernel_threads", "torch_threads", "omp_num_threads", "affinity"]
    md = "\n".join([
        f"# heal.eda_reward inside a default Ray actor, B={args.batch}",
        "",
        f"Lengths U[64, 3072], a quarter general; median of {args.iters} calls; {harness.device_name(torch.device('cpu'))}; "
        f"load average at the end {load}.",
        "",
        harness.markdown_table(rows, cols),
    ])
    print(md)
    if not args.no_write:
        paths = harness.write_results("eda_ray_actor", torch.device("cpu"), {"batch": args.batch, "rows": rows,
                                                                           "load_average_at_end": load},
                                      md, args.output_dir)
        print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
