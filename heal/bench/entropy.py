"""Benchmark: token entropy + label log-probs from logits (``heal bench entropy``).

Side by side in one process, on the same ``logits[N, V]`` and labels, at temperature ``T``:

* ``heal`` -- :func:`heal_kernels.entropy_and_logprobs` (Triton on CUDA, chunked torch on CPU);
* ``torch`` -- plain PyTorch: ``log_softmax(z.float() / T)`` + gather + ``-(p * logp).sum(-1)``;
* ``torch.compile`` -- the same maths under ``torch.compile`` (skipped, with the reason recorded,
  when compilation fails);
* ``verl`` -- ``verl.utils.torch_functional.entropy_from_logits`` + ``logprobs_from_logits`` on
  ``z / T`` (what verl's actor does), and ``verl chunked`` with ``entropy_from_logits_with_chunking``
  (forward only, as verl uses it), when verl is importable.

Each variant is timed for the forward (entropy + log-probs) and the forward + backward (gradients
of both outputs w.r.t. the logits). Also recorded: peak extra memory, the bytes-moved floor
(``N * V * elem`` read in the forward; read + read + write for forward + backward) and the achieved
rate against it, one ``torch.log_softmax`` on the same tensor (the CPU target: heal's forward in at
most 2x its time), max error of entropy / log-probs against the float64 reference on the first rows,
and on CUDA the device-to-device copy bandwidth measured in the same run, with every variant as a
percentage of it. Results: ``benchmarks/results/entropy-<device>.{json,md,png}``.

Defaults: CUDA ``[16384, 151936]`` bfloat16, T = 0.7; CPU ``[4096, 32000]`` float32, T = 0.7.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (default auto: cuda when available)")
    parser.add_argument("--rows", type=int, default=None,
                        help="tokens N (default 16384 on CUDA, 4096 on CPU)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary V (default 151936 on CUDA, 32000 on CPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                        help="logits dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--temperature", type=float, default=0.7, help="softmax temperature (default 0.7)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed runs per variant, median reported (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    harness.add_output_dir_argument(parser)
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no files")


# ---------------------------------------------------------------------------------------------
# the variants
# ---------------------------------------------------------------------------------------------


def _torch_math(z, labels, temperature):
    import torch

    logp = torch.log_softmax(z.float() / temperature, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return ent, lp


def _variants(temperature, compile_ok: bool):
    """name -> (forward(z, labels) -> (entropy, logprobs or None), supports_backward)."""
    from heal_kernels import entropy_and_logprobs

    out = {
        "heal": (lambda z, lab: entropy_and_logprobs(z, lab, temperature), True),
        "torch": (lambda z, lab: _torch_math(z, lab, temperature), True),
    }
    if compile_ok:
        import torch

        compiled = torch.compile(_torch_math)
        out["torch.compile"] = (lambda z, lab: compiled(z, lab, temperature), True)
    try:
        from verl.utils import torch_functional as verl_F

        def verl_fwd(z, lab):
            zt = z / temperature  # verl's actor divides the logits by the temperature first
            return verl_F.entropy_from_logits(zt), verl_F.logprobs_from_logits(zt, lab)

        def verl_chunked(z, lab):
            zt = z / temperature
            return verl_F.entropy_from_logits_with_chunking(zt), verl_F.logprobs_from_logits(zt, lab)

        out["verl"] = (verl_fwd, True)
        out["verl chunked"] = (verl_chunked, False)
    except Exception:  # verl not installed
        pass
    return out


def _errors(fwd, z, labels, temperature, rows: int = 32):
    """Max |error| of entropy / log-probs vs the float64 reference on the first rows."""
    import torch

    from heal_kernels import reference

    zs, ls = z[:rows].detach(), labels[:rows]
    with torch.no_grad():
        ent, lp = fwd(zs, ls)
    ref_ent, ref_lp = reference.entropy_and_logprobs(zs.double(), ls, temperature)
    e1 = float((ent.double() - ref_ent).abs().max())
    e2 = float((lp.double() - ref_lp).abs().max()) if lp is not None else None
    return e1, e2


def run(args) -> int:
    import time

    import torch
    from tqdm import tqdm

    from heal.bench import harness

    device = harness.resolve_device(args.device)
    gpu = device.type == "cuda"
    rows = args.rows or (16384 if gpu else 4096)
    vocab = args.vocab or (151936 if gpu else 32000)
    dtype = getattr(torch, _DTYPES[args.dtype or ("bfloat16" if gpu else "float32")])
    iters = args.iters or (20 if gpu else 3)
    temperature = float(args.temperature)
    max_seconds = 60.0 if gpu else 3.0

    torch.manual_seed(0)
    z = (torch.randn(rows, vocab, device=device) * 2.0).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device)
    g_h = torch.randn(rows, device=device)
    g_l = torch.randn(rows, device=device)
    elem = z.element_size()
    fwd_bytes = rows * vocab * elem
    fwdbwd_bytes = 3 * rows * vocab * elem  # forward read + backward read + gradient write

    env = harness.environment(device)
    copy_gbps = harness.copy_bandwidth_gbps(device) if gpu else None

    # baselines that are not variants: one log_softmax on the same tensor, one copy of it
    base = {}
    base["log_softmax"] = harness.time_fn(lambda: torch.log_softmax(z, dim=-1), device, warmup=1, iters=iters,
                                          max_seconds=max_seconds)["median_ms"]
    base["clone"] = harness.time_fn(lambda: z.clone(), device, warmup=1, iters=iters,
                                    max_seconds=max_seconds)["median_ms"]

    compile_note = None
    compile_ok = not args.no_compile
    if compile_ok:
        try:
            t0 = time.perf_counter()
            fn = torch.compile(_torch_math)
            zz = z[:8].detach().clone().requires_grad_(True)
            e, lp = fn(zz, labels[:8], temperature)
            torch.autograd.grad((e.sum() + lp.sum()), zz)
            compile_note = f"compiled (small-shape warm-up {time.perf_counter() - t0:.1f} s)"
        except Exception as exc:  # compilation unavailable on this machine
            compile_ok = False
            compile_note = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    elif args.no_compile:
        compile_note = "skipped (--no-compile)"

    variants = _variants(temperature, compile_ok)

    def warmup(name):
        # CUDA: always (allocator, autotuning, caches); CPU: only torch.compile needs a first call
        # at the full shape (its compilation), the others' single runs already take seconds
        return 2 if gpu else (1 if name == "torch.compile" else 0)

    results = []
    for name, (fwd, has_bwd) in tqdm(list(variants.items()), desc="entropy bench", unit="variant"):
        row = {"variant": name}
        try:
            row["err_entropy"], row["err_logprob"] = _errors(fwd, z, labels, temperature)

            def forward():
                with torch.no_grad():
                    return fwd(z, labels)

            t = harness.time_fn(forward, device, warmup=warmup(name), iters=iters, max_seconds=max_seconds)
            row["fwd_ms"] = t["median_ms"]
            # (CPU) the profiler replays a whole call: skipped for baselines slower than 5 s a call
            slow = not gpu and row["fwd_ms"] > 5000
            row["fwd_peak_mb"] = None if slow else _mb(harness.peak_memory_bytes(forward, device))
            if has_bwd:
                zg = z.detach().clone().requires_grad_(True)

                def fwd_bwd():
                    ent, lp = fwd(zg, labels)
                    return torch.autograd.grad((ent * g_h + lp * g_l).sum(), zg)

                t = harness.time_fn(fwd_bwd, device, warmup=warmup(name), iters=iters, max_seconds=max_seconds)
                row["fwdbwd_ms"] = t["median_ms"]
                slow = not gpu and row["fwdbwd_ms"] > 5000
                row["fwdbwd_peak_mb"] = None if slow else _mb(harness.peak_memory_bytes(fwd_bwd, device))
                del zg
        except torch.cuda.OutOfMemoryError as exc:  # noqa: F841 - the big baselines may not fit
            row["note"] = "out of memory"
        except Exception as exc:
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if gpu:
            torch.cuda.empty_cache()
        _rates(row, fwd_bytes, fwdbwd_bytes, copy_gbps, base["log_softmax"])
        results.append(row)

    heal = results[0]
    speedups = {}
    for r in results[1:]:
        for key in ("fwd_ms", "fwdbwd_ms"):
            if r.get(key) and heal.get(key):
                speedups[f"{r['variant']} / heal ({key[:-3]})"] = r[key] / heal[key]

    payload = {
        "shape": [rows, vocab],
        "dtype": str(dtype).replace("torch.", ""),
        "temperature": temperature,
        "iters": iters,
        "bytes_floor": {"forward": fwd_bytes, "forward_backward": fwdbwd_bytes},
        "copy_bandwidth_gbps": copy_gbps,
        "log_softmax_ms": base["log_softmax"],
        "clone_ms": base["clone"],
        "heal_fwd_over_log_softmax": (heal.get("fwd_ms") or float("nan")) / base["log_softmax"],
        "torch_compile": compile_note,
        "heal_backend": "triton" if gpu else "cpu (C++ when it builds, else chunked torch)",
        "results": results,
        "speedup_vs_heal": speedups,
    }
    md = _markdown(env, payload, gpu)
    print(md)
    if not args.no_write:
        paths = harness.write_results("entropy", device, payload, md, args.output_dir, _figure(payload))
        print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


def _mb(nbytes):
    return None if nbytes is None else nbytes / 2**20


def _rates(row, fwd_bytes, fwdbwd_bytes, copy_gbps, log_softmax_ms):
    if row.get("fwd_ms"):
        row["fwd_gbps"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
        row["fwd_over_log_softmax"] = row["fwd_ms"] / log_softmax_ms
        if copy_gbps:
            row["fwd_pct_copy"] = 100.0 * row["fwd_gbps"] / copy_gbps
    if row.get("fwdbwd_ms"):
        row["fwdbwd_gbps"] = fwdbwd_bytes / (row["fwdbwd_ms"] * 1e-3) / 1e9
        if copy_gbps:
            row["fwdbwd_pct_copy"] = 100.0 * row["fwdbwd_gbps"] / copy_gbps


def _markdown(env, payload, gpu) -> str:
    from heal.bench.harness import markdown_table

    n, v = payload["shape"]
    cols = ["variant", "fwd_ms", "fwd_gbps"] + (["fwd_pct_copy"] if gpu else ["fwd_over_log_softmax"])
    cols += ["fwdbwd_ms", "fwdbwd_gbps"] + (["fwdbwd_pct_copy"] if gpu else [])
    cols += ["fwd_peak_mb", "fwdbwd_peak_mb", "err_entropy", "err_logprob", "note"]
    lines = [
        f"# Token entropy + log-probs, logits [{n}, {v}] {payload['dtype']}, T = {payload['temperature']}",
        "",
        f"Device: {env['device']} ({env.get('cpu_threads')} CPU threads); torch {env['torch']}, "
        f"triton {env.get('triton')}, verl {env.get('verl')}; {env['time_utc']}.",
        "",
        f"Bytes floor: forward {payload['bytes_floor']['forward'] / 1e9:.3f} GB read; forward + backward "
        f"{payload['bytes_floor']['forward_backward'] / 1e9:.3f} GB (read, read, write the gradient).",
    ]
    if payload["copy_bandwidth_gbps"]:
        lines.append(f"Device-to-device copy bandwidth in this run: {payload['copy_bandwidth_gbps']:.0f} GB/s "
                     "(read + write); `pct_copy` columns are each variant's rate against it.")
    lines += [
        f"One `torch.log_softmax` on the same tensor: {payload['log_softmax_ms']:.2f} ms; one clone: "
        f"{payload['clone_ms']:.2f} ms. heal forward / log_softmax = {payload['heal_fwd_over_log_softmax']:.2f}.",
        f"torch.compile: {payload['torch_compile']}.",
        "",
        "Times are medians (ms). Peak memory: extra MiB allocated through torch while one call runs "
        "(outputs and the gradient included; empty on CPU for baselines slower than 5 s a call"
        + ("" if gpu else "; heal's C++ kernels also use a 4*V-byte scratch row per thread, not seen by torch")
        + "). Errors: max |x - ref| against the float64 reference on the first 32 rows.",
        "",
        markdown_table(payload["results"], cols),
        "",
        "Speed-ups of heal (time of the baseline / time of heal):",
        "",
    ]
    lines += [f"- {k}: {val:.2f}x" for k, val in payload["speedup_vs_heal"].items()]
    return "\n".join(lines) + "\n"


def _figure(payload):
    from heal.bench.harness import agg_subplots

    try:
        fig, ax = agg_subplots(figsize=(7, 3.6))
    except Exception:
        return None
    res = [r for r in payload["results"] if r.get("fwd_ms")]
    names = [r["variant"] for r in res]
    x = range(len(names))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["fwd_ms"] for r in res], w, label="forward")
    ax.bar([i + w / 2 for i in x], [r.get("fwdbwd_ms") or 0 for r in res], w, label="forward + backward")
    ax.axhline(payload["log_softmax_ms"], color="gray", ls="--", lw=1, label="one log_softmax")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    n, v = payload["shape"]
    ax.set_title(f"entropy + log-probs, [{n}, {v}] {payload['dtype']}, T={payload['temperature']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
