"""Benchmark: runs per second of the code sandbox (``heal bench sandbox``).

What the code checker pays per test case, for two programs:

* ``trivial``: ``print(1)`` (interpreter start-up and sandbox set-up only);
* ``test case``: a typical stdin/stdout check: read 1000 integers, sort them, print two numbers,
  compared with the expected output (:func:`heal.scoring.code.outputs_match`).

Paths, side by side in one process:

* ``process-only``: today's path before kernel isolation: a fresh ``python -I -S`` with the audit
  hook, in a private network namespace (``unshare -rn``), no pool;
* ``kernel``: bubblewrap (user/mount/pid/net/IPC/UTS namespaces, read-only standard library,
  seccomp filter, per-run uid) + the audit hook, no pool;
* ``kernel + pool``: the same, with ``--pool`` sandboxes started ahead of their jobs (the default
  of :func:`heal.scoring.sandbox.run_python`).

Each cell runs ``--runs`` programs from ``W`` threads at once (``--workers``); runs/s is the wall
rate, latency the median per run. Last, the code checker's own path from one caller:
:func:`heal.scoring.code.run_tests` on rows of 8 test cases of the ``test case`` program, its
tests one after another (``parallel_tests=1``) and 4 at once (the default), default isolation. The machine's 1-minute load average is recorded: other
processes share the cores. Results: ``benchmarks/results/sandbox-cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__

TRIVIAL = "print(1)\n"
TEST_CASE = """import sys
def main():
    data = sys.stdin.read().split()
    n = int(data[0])
    a = sorted(map(int, data[1:1 + n]))
    print(sum(a), max(a[i + 1] - a[i] for i in range(n - 1)))
main()
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    parser.add_argument("--runs", type=int, default=40, help="programs per cell (default 40)")
    parser.add_argument("--workers", default="1,2,4", help="concurrent callers (threads), comma-separated (default 1,2,4)")
    parser.add_argument("--pool", type=int, default=4, help="sandboxes started ahead for the 'kernel + pool' path (default 4)")
    parser.add_argument("--checker-rows", type=int, default=5,
                        help="rows of 8 tests for the run_tests measurement (default 5; 0 skips it)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="wall-clock limit per program (default 5)")
    harness.add_output_dir_argument(parser, dest="out_dir")
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no files")


def _test_case(seed: int = 0):
    import random

    rng = random.Random(seed)
    a = [rng.randint(-10**6, 10**6) for _ in range(1000)]
    stdin = f"{len(a)}\n" + " ".join(map(str, a)) + "\n"
    s = sorted(a)
    expected = f"{sum(s)} {max(s[i + 1] - s[i] for i in range(len(s) - 1))}\n"
    return stdin, expected


def run(args) -> int:
    import os
    import statistics
    import time
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm import tqdm

    from heal.bench import harness
    from heal.scoring import sandbox
    from heal.scoring.code import outputs_match

    try:
        workers = sorted({int(w) for w in str(args.workers).split(",") if w.strip()})
    except ValueError:
        raise ValueError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
    if not workers or min(workers) < 1:
        raise ValueError(f"--workers must be integers >= 1, got {args.workers!r}")
    if args.runs < 1 or args.pool < 1 or args.checker_rows < 0 or not args.timeout_s > 0:
        raise ValueError("need --runs >= 1, --pool >= 1, --checker-rows >= 0 and --timeout-s > 0")

    status = sandbox.isolation_status()
    paths = [("process-only", "audit-hook-only", 0)]
    if status["kernel_isolation"]:
        paths += [("kernel", "bubblewrap", 0), (f"kernel + pool {args.pool}", "bubblewrap", args.pool)]
    else:
        print(f"kernel isolation unavailable here ({status['missing']}): measuring the process-only path alone")
    stdin_tc, expected_tc = _test_case()
    programs = [("trivial", TRIVIAL, "", "1\n"), ("test case", TEST_CASE, stdin_tc, expected_tc)]

    def one(isolation, pool, code, stdin, expected):
        t0 = time.perf_counter()
        r = sandbox._run(code, stdin, isolation=isolation, timeout_s=args.timeout_s, memory_mb=512,
                         max_output_bytes=1 << 20, mode="stdin", fn_name=None, isolate_network=True, disk_mb=64,
                         max_processes=64, pool_size=pool)
        return time.perf_counter() - t0, r.ok and outputs_match(r.stdout, expected)

    load_before = os.getloadavg()[0]
    rows = []
    cells = [(p, w, prog) for prog in programs for p in paths for w in workers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="heal sandbox: running untrusted code with the audit hook only")
        for (label, isolation, pool), w, (prog_name, code, stdin, expected) in tqdm(cells, desc="sandbox cells"):
            for _ in range(max(w, pool)):  # warm-up: fill the pool, start the threads
                one(isolation, pool, code, stdin, expected)
            if pool:
                time.sleep(0.5)  # let the pool refill before timing
            t0 = time.perf_counter()
            with ThreadPoolExecutor(w) as ex:
                results = list(ex.map(lambda _: one(isolation, pool, code, stdin, expected), range(args.runs)))
            wall = time.perf_counter() - t0
            lat = sorted(t for t, _ in results)
            rows.append({
                "program": prog_name, "path": label, "workers": w, "runs_per_s": args.runs / wall,
                "median_ms": statistics.median(lat) * 1e3, "p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3,
                "failed": sum(not ok for _, ok in results), "load_1min": os.getloadavg()[0],
            })
    # the checker's path: rows of 8 tests, one caller
    from heal.scoring.code import CodeCheckConfig, run_tests

    inputs, outputs = [], []
    for seed in range(8):
        i, o = _test_case(seed)
        inputs.append(i)
        outputs.append(o)
    gt = {"inputs": inputs, "outputs": outputs}
    rows_checker = []
    n_rows = args.checker_rows
    if status["kernel_isolation"] and n_rows > 0:
        for parallel in (1, 4):
            cfg = CodeCheckConfig(timeout_s=args.timeout_s, parallel_tests=parallel)
            run_tests(TEST_CASE, gt, cfg)  # warm-up
            t0 = time.perf_counter()
            ok = [all(run_tests(TEST_CASE, gt, cfg)) for _ in range(n_rows)]
            wall = time.perf_counter() - t0
            rows_checker.append({"path": f"run_tests, parallel_tests={parallel}", "rows": n_rows, "tests_per_s": 8 * n_rows / wall,
                                 "row_ms": wall / n_rows * 1e3, "failed_rows": ok.count(False),
                                 "load_1min": os.getloadavg()[0]})
    sandbox.pool._pool.close()
    load_after = os.getloadavg()[0]

    def cell(prog, path, w):
        for r in rows:
            if r["program"] == prog and r["path"] == path and r["workers"] == w:
                return r
        return None

    summary = []
    for prog_name, *_ in programs:
        for w in workers:
            base = cell(prog_name, "process-only", w)
            for label, _, _ in paths[1:]:
                k = cell(prog_name, label, w)
                summary.append({"program": prog_name, "workers": w, "path": label,
                                "overhead_x": base["runs_per_s"] / k["runs_per_s"],
                                "latency_x": k["median_ms"] / base["median_ms"]})
    best_kernel = max((r["runs_per_s"] for r in rows if r["program"] == "trivial" and r["path"] != "process-only"),
                      default=None)
    best_kernel_1 = max((r["runs_per_s"] for r in rows if r["program"] == "trivial" and r["path"] != "process-only"
                         and r["workers"] == min(workers)), default=None)
    device = torch.device("cpu")
    env = harness.environment(device)
    ncpu = os.cpu_count()
    lines = [
        "# Code sandbox throughput, CPU",
        "",
        f"Machine: {env['device']}, {ncpu} logical CPUs, Python {env['python']}; "
        f"bubblewrap: {status['bubblewrap']['version'] or 'absent'}; caller uid {os.geteuid()} "
        f"({'per-run unprivileged uid, no user namespace' if os.geteuid() == 0 else 'uid 65534 in a user namespace'}). "
        f"{args.runs} runs per cell; 1-min load average {load_before:.1f} before / {load_after:.1f} after "
        f"(the machine is shared: other processes load the cores, so absolute rates are pessimistic and noisy).",
        "",
        harness.markdown_table(rows, ["program", "path", "workers", "runs_per_s", "median_ms", "p90_ms", "failed",
                                      "load_1min"]),
        "",
    ]
    if summary:
        lines += [
            "Isolation overhead: process-only runs/s / kernel runs/s at the same number of workers (target <= 1.5x); "
            "latency_x: median latency ratio.",
            "",
            harness.markdown_table(summary, ["program", "workers", "path", "overhead_x", "latency_x"]),
            "",
            f"Target >= 30 trivial runs/s on this machine: best kernel-isolated rate {best_kernel:.1f} runs/s "
            f"({'met' if best_kernel >= 30 else 'NOT met'}); with {min(workers)} caller: {best_kernel_1:.1f} runs/s.",
        ]
    if rows_checker:
        lines += [
            "",
            "The code checker from one caller (kernel isolation, default pool): rows of 8 test cases of the "
            "`test case` program.",
            "",
            harness.markdown_table(rows_checker, ["path", "rows", "tests_per_s", "row_ms", "failed_rows", "load_1min"]),
        ]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        payload = {
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("out_dir", "no_write")},
            "isolation_status": {k: status[k] for k in ("active", "kernel_isolation", "bubblewrap", "read_only_binds")},
            "rows": rows,
            "overhead": summary,
            "checker": rows_checker,
            "best_kernel_trivial_runs_per_s": best_kernel,
            "load_average_1min": [load_before, load_after],
            "logical_cpus": ncpu,
            "caller_uid": os.geteuid(),
        }
        figure = None
        try:
            figure, axes = harness.agg_subplots(1, len(programs), figsize=(10, 3.6), sharey=True)
            for ax, (prog_name, *_) in zip(axes, programs):
                for label, _, _ in paths:
                    pts = [(r["workers"], r["runs_per_s"]) for r in rows if r["program"] == prog_name and r["path"] == label]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.axhline(30, color="k", ls="--", lw=1)
                ax.set_xticks(workers)
                ax.set_xlabel("concurrent callers")
                ax.set_title(f"{prog_name}")
            axes[0].set_ylabel("runs / s (dashed: 30)")
            axes[0].legend(fontsize=8)
            figure.suptitle(f"heal code sandbox, {ncpu} CPUs, load avg {load_before:.1f} -> {load_after:.1f}")
        except ImportError:
            figure = None
        paths_written = harness.write_results("sandbox", device, payload, md, args.out_dir, figure)
        print("wrote " + ", ".join(str(p) for p in paths_written.values()))
    return 0
