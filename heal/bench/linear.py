"""Benchmark: entropy + label log-probs straight from hidden states and a linear head
(``heal bench linear``).

Side by side in one process, on the same ``hidden[N, D]``, ``weight[V, D]`` and labels, at
temperature ``T``, forward and forward + backward (gradients of both outputs, random upstream
weights, w.r.t. hidden and weight):

* ``heal`` -- :func:`heal_kernels.linear_entropy_and_logprobs` (one ``[chunk_tokens x chunk_vocab]``
  logits block at a time);
* ``unfused`` -- ``lm_head`` then :func:`heal_kernels.entropy_and_logprobs` on the full
  ``[N, V]`` logits (what a trainer does without a fused head);
* ``verl torch`` -- verl's ``FusedLinearForPPO`` torch backend (chunks of 512 tokens with full
  float32 logits), when verl is importable;
* ``verl triton`` -- verl's Triton ``linear_cross_entropy`` (CUDA only, hidden size a multiple of 128);
* ``liger`` -- Liger-Kernel's fused linear cross-entropy with entropy (the function verl's ``liger``
  backend calls), when installed and on CUDA;
* ``matmuls only`` -- the floor of heal's schedule: the same blocked matmuls with nothing between
  them (forward: ``z = h @ W_b.T`` per block; forward + backward: that, the recompute and the two
  gradient matmuls).

Recorded per variant: median time, peak extra memory while one call runs (CUDA: the allocator's
peak; CPU: the resident-memory high-water mark of the timed call above the resident memory before
it), the bytes autograd keeps between
forward and backward beyond the inputs (saved-tensor hooks), errors against the float64 reference on
the first rows, and the machine's 1-minute load average around the run (the development machine is
shared). Results: ``benchmarks/results/linear-<device>.{json,md,png}``.

Defaults: CUDA ``[16384 x 4096] x [151936 x 4096]`` and ``[4096 x 896] x [151936 x 896]`` bfloat16;
CPU ``[1024 x 896] x [32768 x 896]`` and ``[4096 x 896] x [151936 x 896]`` (Qwen2.5-0.5B's head)
float32, T = 0.7.
"""

from __future__ import annotations

import argparse
import os

DESCRIPTION = __doc__

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (default auto: cuda when available)")
    parser.add_argument("--shape", action="append", default=None, metavar="NxDxV",
                        help="tokens x hidden size x vocabulary, e.g. 4096x896x151936; repeat for several "
                             "(default: see the description)")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                        help="hidden / weight dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--temperature", type=float, default=0.7, help="softmax temperature (default 0.7)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed runs per variant, median reported (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: heal, unfused, verl torch, verl triton, liger, matmuls only")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="heal's chunk_tokens (default: the op's)")
    parser.add_argument("--chunk-vocab", type=int, default=None, help="heal's chunk_vocab (default: the op's)")
    harness.add_output_dir_argument(parser)
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no files")


def _parse_shape(text: str):
    try:
        n, d, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape must look like NxDxV (e.g. 4096x896x151936), got {text!r}") from None
    if min(n, d, v) < 1:
        raise SystemExit(f"--shape entries must be >= 1, got {text!r}")
    return n, d, v


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------------------------
# the variants: name -> fn(h, w, labels) -> (entropy, logprobs); None when unavailable (+ reason)
# ---------------------------------------------------------------------------------------------


def _variants(device, temperature, hidden_size, chunks):
    import torch

    import heal_kernels

    out, skipped = {}, {}
    ct, cv = chunks
    out["heal"] = lambda h, w, lab: heal_kernels.linear_entropy_and_logprobs(
        h, w, lab, temperature, chunk_tokens=ct, chunk_vocab=cv)
    out["unfused"] = lambda h, w, lab: heal_kernels.entropy_and_logprobs(h @ w.T, lab, temperature)
    try:
        from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction

        def verl_torch(h, w, lab):
            lp, ent = FusedLinearForPPOFunction.apply(h, w, lab, temperature, 512)
            return ent, lp

        out["verl torch"] = verl_torch
    except Exception as exc:
        skipped["verl torch"] = f"verl not importable ({type(exc).__name__})"
    if device.type != "cuda":
        skipped["verl triton"] = "CUDA only"
    elif hidden_size % 128:
        skipped["verl triton"] = "hidden size not a multiple of 128"
    else:
        try:
            from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy

            def verl_triton(h, w, lab):
                lp, ent = LinearCrossEntropy.apply(h, w, lab, float(temperature), "none", None)
                return ent, lp

            out["verl triton"] = verl_triton
        except Exception as exc:
            skipped["verl triton"] = f"not importable ({type(exc).__name__})"
    try:
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as Liger

        if device.type != "cuda":
            skipped["liger"] = "CUDA only"
        else:
            def liger(h, w, lab):
                nll, ent = Liger.apply(h, w, lab, temperature, -100, 1, True)
                return ent, -nll

            out["liger"] = liger
    except Exception:
        skipped["liger"] = "liger_kernel not installed"
    return out, skipped


def _matmul_floor(h, w, ct, cv, backward):
    """The blocked matmuls of heal's schedule with nothing between them."""
    import torch

    n, v = h.shape[0], w.shape[0]
    buf = torch.empty(min(ct, n) * min(cv, v), dtype=h.dtype, device=h.device)
    d_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if backward else None
    d_w = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if backward else None
    passes = 2 if backward else 1
    for v0 in range(0, v, cv):
        wb = w[v0 : v0 + cv]
        for t0 in range(0, n, ct):
            hc = h[t0 : t0 + ct]
            for _ in range(passes):  # forward; the backward's recompute
                z = torch.mm(hc, wb.T, out=buf[: hc.shape[0] * wb.shape[0]].view(hc.shape[0], wb.shape[0]))
            if backward:
                if z.dtype == torch.float32:
                    d_h[t0 : t0 + ct].addmm_(z, wb)
                    d_w[v0 : v0 + cv].addmm_(z.T, hc)
                else:
                    d_h[t0 : t0 + ct] += torch.mm(z, wb)
                    d_w[v0 : v0 + cv] += torch.mm(z.T, hc)
    return d_h, d_w


def _saved_extra_bytes(fn, inputs):
    import torch

    ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def _hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _cpu_peak_rss_bytes(fn):
    """Peak resident memory above the resident memory before ``fn`` runs (Linux: the RSS high-water
    mark, reset through ``/proc/self/clear_refs``), or None where that is not available. Counts every
    byte the process touches (torch tensors, BLAS and C++ scratch); large tensors are mmapped by the
    C allocator and returned on free, so what the allocator caches does not hide them."""
    import gc

    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_bytes()
        if _hwm_bytes() > base + (1 << 20):  # the reset did not take
            return None
    except OSError:
        return None
    fn()
    return max(0, _hwm_bytes() - base)


def _cpu_peak_bytes(fn):
    """Peak extra bytes allocated through torch while ``fn`` runs on the CPU, from the profiler's
    allocation events: each event's own (self) allocations counted at its start and its own frees
    at its end (an autograd Function frees its temporaries when it returns), replayed in time order."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        marks = []
        for e in prof.events():
            usage = getattr(e, "self_cpu_memory_usage", 0)
            if usage:
                marks.append((e.time_range.start if usage > 0 else e.time_range.end, usage))
        live = peak = 0
        for _, usage in sorted(marks, key=lambda m: (m[0], m[1] < 0)):
            live += usage
            peak = max(peak, live)
        return int(peak)
    except Exception:
        return None


def _timed_with_memory(fn, device, iters, profile_cpu_memory=True):
    """Median ms over ``iters`` runs and the peak extra bytes of the first timed run."""
    import statistics
    import time

    import torch

    from heal.bench import harness

    times, peak = [], None
    for i in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            if i == 0:
                peak = int(torch.cuda.max_memory_allocated(device) - base)
        elif i == 0 and profile_cpu_memory:
            t0 = time.perf_counter()
            peak = _cpu_peak_rss_bytes(fn)  # measured on the first timed run
            times.append((time.perf_counter() - t0) * 1e3)
            if peak is None:  # no /proc: the profiler's (upper-bound) replay on a further run
                peak = _cpu_peak_bytes(fn)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def _errors(fn, h, w, labels, temperature, rows=32):
    import torch

    from heal_kernels import reference

    with torch.no_grad():
        ent, lp = fn(h[:rows], w, labels[:rows])
    ref_e, ref_lp = reference.linear_entropy_and_logprobs(h[:rows], w, labels[:rows], temperature)
    return float((ent.double() - ref_e).abs().max()), float((lp.double() - ref_lp).abs().max())


def _run_shape(device, dtype, shape, temperature, iters, wanted, chunks, progress):
    import torch

    from heal_kernels.ops.linear import default_chunks

    n, d, v = shape
    gpu = device.type == "cuda"
    dflt = default_chunks(device)
    ct, cv = chunks[0] or dflt[0], chunks[1] or dflt[1]
    torch.manual_seed(0)
    h = (torch.randn(n, d, device=device)).to(dtype)
    w = (torch.randn(v, d, device=device) * (1.0 / d**0.5) * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    g_e = torch.randn(n, device=device)
    g_lp = torch.randn(n, device=device)
    variants, skipped = _variants(device, temperature, d, (ct, cv))
    rows = []
    order = ["matmuls only"] + list(variants)
    if wanted:
        order = [x for x in order if x in wanted]
    for name in progress(order, desc=f"linear bench {n}x{d}x{v}", unit="variant"):
        row = {"variant": name, "load_before": _load()}
        try:
            if name == "matmuls only":
                fwd = lambda: _matmul_floor(h, w, ct, cv, backward=False)  # noqa: E731
                fwdbwd = lambda: _matmul_floor(h, w, ct, cv, backward=True)  # noqa: E731
            else:
                fn = variants[name]
                row["err_entropy"], row["err_logprob"] = _errors(fn, h, w, labels, temperature)

                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn(h, w, labels)

                hg = h.detach().clone().requires_grad_(True)
                wg = w.detach().clone().requires_grad_(True)
                saved = []

                def fwdbwd(fn=fn, hg=hg, wg=wg):
                    # what autograd keeps between forward and backward, counted in the timed run itself
                    nbytes, (ent, lp) = _saved_extra_bytes(lambda: fn(hg, wg, labels), [hg, wg, labels])
                    saved.append(nbytes)
                    return torch.autograd.grad((ent.float() * g_e + lp.float() * g_lp).sum(), (hg, wg))
            if gpu:
                for _ in range(2):
                    fwd()
                    fwdbwd()
            row["fwd_ms"], peak = _timed_with_memory(fwd, device, iters)
            row["fwd_peak_mb"] = None if peak is None else peak / 2**20
            row["fwdbwd_ms"], peak = _timed_with_memory(fwdbwd, device, iters)
            row["fwdbwd_peak_mb"] = None if peak is None else peak / 2**20
            if name != "matmuls only":
                row["saved_mb"] = saved[0] / 2**20
        except Exception as exc:
            if gpu and isinstance(exc, torch.cuda.OutOfMemoryError):
                row["note"] = "out of memory"
            else:
                row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        row["load_after"] = _load()
        if gpu:
            torch.cuda.empty_cache()
        rows.append(row)
    for name, why in skipped.items():
        if not wanted or name in wanted:
            rows.append({"variant": name, "note": f"skipped: {why}"})
    elem = torch.empty(0, dtype=dtype).element_size()
    gemm_flops = 2.0 * n * d * v
    return {
        "shape": {"tokens": n, "hidden": d, "vocab": v},
        "chunk_tokens": ct,
        "chunk_vocab": cv,
        "dtype": str(dtype).replace("torch.", ""),
        "logits_mb": n * v * elem / 2**20,
        "block_mb": min(ct, n) * min(cv, v) * elem / 2**20,
        "inputs_mb": (n * d + v * d) * elem / 2**20,
        "gemm_gflop": gemm_flops / 1e9,
        "results": rows,
    }


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from heal.bench import harness

    device = harness.resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.shape:
        shapes = [_parse_shape(s) for s in args.shape]
    elif gpu:
        shapes = [(16384, 4096, 151936), (4096, 896, 151936)]
    else:
        shapes = [(1024, 896, 32768), (4096, 896, 151936)]
    dtype = getattr(torch, _DTYPES[args.dtype or ("bfloat16" if gpu else "float32")])
    iters = args.iters or (10 if gpu else 1)
    wanted = None
    if args.variants:
        wanted = [x.strip() for x in args.variants.split(",") if x.strip()]
    env = harness.environment(device)
    runs = []
    payload = {"temperature": float(args.temperature), "iters": iters, "runs": runs,
               "heal_backend": "triton" if gpu else "cpu (C++ block kernels when they build, else chunked torch)"}
    for s in shapes:  # results are written after every shape: a long run keeps what it finished
        runs.append(_run_shape(device, dtype, s, float(args.temperature), iters, wanted,
                               (args.chunk_tokens, args.chunk_vocab), tqdm))
        md = _markdown(env, payload, gpu)
        if not args.no_write:
            paths = harness.write_results("linear", device, payload, md, args.output_dir, _figure(payload))
    print(md)
    if not args.no_write:
        print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


def _markdown(env, payload, gpu) -> str:
    from heal.bench.harness import markdown_table

    lines = [
        "# Entropy + log-probs from hidden states (fused linear head)",
        "",
        f"Device: {env['device']} ({env.get('cpu_threads')} CPU threads); torch {env['torch']}, "
        f"triton {env.get('triton')}, verl {env.get('verl')}; {env['time_utc']}; T = {payload['temperature']}; "
        f"median of {payload['iters']} run(s).",
        "",
        "Columns: times in ms; `peak_mb` = peak extra memory during one call (outputs and gradients "
        "included" + ("; the CUDA allocator's peak" if gpu else "; the process's resident-memory high-water "
        "mark above its resident memory before the call (Linux `VmHWM`, reset through `/proc/self/clear_refs`), "
        "so BLAS and C++ scratch count too")
        + "); `saved_mb` = what autograd keeps between forward and backward beyond the inputs; "
        "`err_*` = max |x - ref| against the float64 reference on the first 32 rows; `load_*` = the "
        "machine's 1-minute load average before / after the variant ran"
        + ("" if gpu else " (a shared 2-core machine: times above load 2 are inflated)") + ".",
    ]
    cols = ["variant", "fwd_ms", "fwdbwd_ms", "fwd_peak_mb", "fwdbwd_peak_mb", "saved_mb", "err_entropy",
            "err_logprob", "load_before", "load_after", "note"]
    for run in payload["runs"]:
        s = run["shape"]
        lines += [
            "",
            f"## hidden [{s['tokens']} x {s['hidden']}], weight [{s['vocab']} x {s['hidden']}], {run['dtype']}",
            "",
            f"Full logits: {run['logits_mb']:.0f} MiB; heal's block [{min(run['chunk_tokens'], s['tokens'])} x "
            f"{min(run['chunk_vocab'], s['vocab'])}]: "
            f"{run['block_mb']:.0f} MiB; inputs {run['inputs_mb']:.0f} MiB; one GEMM {run['gemm_gflop']:.0f} GFLOP "
            "(forward: 1 GEMM; forward + backward: 3 unfused, 4 for heal, which recomputes the logits).",
            "",
            markdown_table(run["results"], cols),
        ]
        res = {r["variant"]: r for r in run["results"]}
        heal = res.get("heal", {})
        notes = []
        for other in ("unfused", "verl torch", "verl triton", "liger", "matmuls only"):
            o = res.get(other, {})
            for key in ("fwd_ms", "fwdbwd_ms"):
                if o.get(key) and heal.get(key):
                    notes.append(f"- {other} / heal ({key[:-3]}): {o[key] / heal[key]:.2f}x time")
            if o.get("fwdbwd_peak_mb") and heal.get("fwdbwd_peak_mb"):
                notes.append(f"- {other} / heal (forward + backward peak memory): "
                             f"{o['fwdbwd_peak_mb'] / heal['fwdbwd_peak_mb']:.1f}x")
        if notes:
            lines += ["", "Ratios (baseline / heal):", ""] + notes
    return "\n".join(lines) + "\n"


def _figure(payload):
    from heal.bench.harness import agg_subplots

    runs = payload["runs"]
    try:
        fig, axes = agg_subplots(len(runs), 2, figsize=(10, 3.3 * len(runs)), squeeze=False)
    except Exception:
        return None
    for ax_row, run in zip(axes, runs):
        res = [r for r in run["results"] if r.get("fwdbwd_ms")]
        names = [r["variant"] for r in res]
        x = range(len(names))
        w = 0.38
        ax = ax_row[0]
        ax.bar([i - w / 2 for i in x], [r["fwd_ms"] / 1e3 for r in res], w, label="forward")
        ax.bar([i + w / 2 for i in x], [r["fwdbwd_ms"] / 1e3 for r in res], w, label="forward + backward")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylabel("time (s)")
        s = run["shape"]
        ax.set_title(f"[{s['tokens']}x{s['hidden']}] x [{s['vocab']}x{s['hidden']}] {run['dtype']}: time", fontsize=9)
        ax.legend(fontsize=7)
        ax = ax_row[1]
        ax.bar([i - w / 2 for i in x], [r.get("fwd_peak_mb") or 0 for r in res], w, label="forward")
        ax.bar([i + w / 2 for i in x], [r.get("fwdbwd_peak_mb") or 0 for r in res], w, label="forward + backward")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylabel("peak extra memory (MiB)")
        ax.set_title("peak memory during one call", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
