"""Static performance model of heal's Triton kernels: predictions from the compiled code, no GPU.

Every launched variant (:func:`heal_kernels.triton.aot.variants`) is compiled for each architecture
(sm_80, sm_90, sm_100 when the installed Triton accepts it) and read from its cubin: registers,
spills, theoretical occupancy and the hot loop's SASS instructions per element. From them:

* entropy kernels: the predicted fraction of the device's HBM copy bandwidth, the smaller of the
  issue limit (instructions per element against the SMs' issue rate) and the memory-parallelism
  limit (bytes in flight per SM against bandwidth x latency);
* the pairwise kernel: the predicted time of the EDA benchmark batch (``heal bench eda``: B = 1024,
  lengths uniform in [64, 3072]), counting the real tile work of that batch (every program's tiles,
  their unmasked and masked trips), the per-tile overhead, load imbalance (programs placed on SM
  slots in launch order) and the L2 traffic.

Writes ``benchmarks/results/static-sm_<arch>.{json,md}`` (one record per variant and arch; the JSON
has ``predicted_eda_ms`` per device). These are predictions: ``heal bench entropy`` / ``heal bench
eda`` on a GPU measure, and ``--measured`` puts a measured result file next to the prediction.

    heal bench static [--arch 80 90 100] [--jobs 2] [--measured benchmarks/results/eda-<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

DESCRIPTION = __doc__

# devices by the architecture whose code they run
DEVICES = {
    80: {"A100 SXM 80GB": dict(sms=108, clock_ghz=1.41, hbm_tbs=2.04, l2_tbs=4.0)},
    90: {
        "H100 SXM": dict(sms=132, clock_ghz=1.98, hbm_tbs=3.35, l2_tbs=5.5),
        "H200": dict(sms=132, clock_ghz=1.98, hbm_tbs=4.8, l2_tbs=5.5),
    },
    100: {"B200": dict(sms=148, clock_ghz=1.96, hbm_tbs=8.0, l2_tbs=9.0)},
}
COPY_FRACTION = 0.9  # a device-to-device copy reaches ~90% of the HBM peak
STREAM_ISSUE_EFFICIENCY = 0.9  # streaming kernels issue 90% of cycles when enough warps are resident
PAIR_ISSUE_EFFICIENCY = 0.75  # gather-heavy pairwise loop at >= 4 warps per scheduler
HBM_LATENCY_NS = 800.0  # loaded HBM latency
LAUNCH_US = 5.0  # the kernel's launch
PREP_US_PER_OP = 4.0  # one eager PyTorch CUDA op of the op's preparation: host dispatch + launch

ASSUMPTIONS = [
    "Predictions, not measurements: derived from the SASS of the compiled kernels (Triton {triton}, no GPU).",
    "Issue capacity: SMs x 4 schedulers x 1 warp-instruction per cycle at the boost clock; every SASS "
    "instruction of the hot loop costs one issue slot (MUFU, F2I and memory instructions included).",
    f"Copy bandwidth = {COPY_FRACTION:.0%} of the HBM peak; a kernel's fraction of copy bandwidth is "
    "min(1, issue limit, memory-parallelism limit) relative to that copy.",
    f"Streaming (entropy) kernels issue at {STREAM_ISSUE_EFFICIENCY:.0%} efficiency; memory parallelism "
    f"needs copy bandwidth x {HBM_LATENCY_NS:.0f} ns in flight per device, supplied by the resident warps' "
    "loads of one loop trip.",
    f"Pairwise kernel: {PAIR_ISSUE_EFFICIENCY:.0%} issue efficiency at >= 4 resident warps per scheduler, "
    "proportionally less below; programs are placed on SM slots (blocks per SM from registers) in launch "
    "order and the time is the last slot's finish (load imbalance included).",
    "Pairwise L2 traffic: each column tile re-reads its columns' and its rows' (x, e) pairs (8 bytes per "
    "position) from L2 once per tile; reuse inside a tile's loop trip is served by L1. Time is the larger "
    "of issue and L2 time (they overlap); L2 read bandwidth as listed per device.",
    f"Plus {LAUNCH_US:.0f} us for the kernel's launch. The op around it also runs the packing kernel "
    "(per-sequence statistics and the (x, e) pairs; its bytes at its predicted fraction of copy bandwidth) and "
    "small eager PyTorch ops (lengths, starts, buffers, sort, the final max over column splits; counted on the "
    "CPU): each launch is costed at {prep_us:.0f} us of host dispatch, shown apart as the op's time (the kernel "
    "cannot start before them unless earlier GPU work hides them).",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100],
                        help="SM architectures (default 80 90 100; those the installed Triton rejects are skipped)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile processes (default 2)")
    parser.add_argument("--only", default=None, help="only variants whose name contains this")
    parser.add_argument("--measured", nargs="*", default=[],
                        help="result JSON files of a GPU run (heal bench entropy / eda) to print next to the predictions")
    parser.add_argument("--output-dir", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only, write no files")


def stream_prediction(rec: dict, dev: dict) -> dict:
    """Predicted fraction of copy bandwidth for an entropy variant on one device."""
    ipe = rec.get("instructions_per_element")
    bpe = rec["bytes_per_element"]
    if not ipe or not bpe:
        return {}
    copy_bps = COPY_FRACTION * dev["hbm_tbs"] * 1e12
    issue_eps = dev["sms"] * 4 * dev["clock_ghz"] * 1e9 * 32 * STREAM_ISSUE_EFFICIENCY / ipe
    issue_frac = issue_eps * bpe / copy_bps
    # bytes loaded per trip per thread: elements per thread x element size (the reads only)
    read_bytes = rec["elements_per_thread_per_iteration"] * (bpe / 2 if rec["family"].endswith("_bwd") else bpe)
    in_flight = dev["sms"] * rec["warps_per_sm"] * 32 * read_bytes
    needed = copy_bps * HBM_LATENCY_NS * 1e-9
    mlp_frac = in_flight / needed
    frac = min(1.0, issue_frac, mlp_frac)
    return dict(fraction_of_copy=round(frac, 3), issue_limit=round(issue_frac, 3), parallelism_limit=round(mlp_frac, 3),
                bound="memory" if frac >= 1.0 else ("issue" if issue_frac <= mlp_frac else "parallelism"))


def eda_prediction(rec: dict, lengths, dev: dict) -> dict:
    """Predicted time of the pairwise kernel on the EDA batch (see the module docstring)."""
    import torch

    kw = rec["kwargs"]
    rows, bj, bt, warps = kw["ROWS"], kw["BLOCK_J"], kw["BLOCK_T"], kw["num_warps"]
    split = kw.get("SPLIT", 1)
    hot = rec["hot_loop_instructions"]
    tail = rec.get("tail_loop_instructions", hot)
    tile_over = rec.get("outer_loop_overhead_instructions", 0)
    lens = torch.as_tensor(lengths, dtype=torch.int64)
    b = lens.numel()
    asc = torch.sort(lens).values
    desc = asc.flip(0)
    nprog = math.ceil(b / rows)
    ntile = math.ceil(b / bj)
    pad_r = nprog * rows - b
    pad_j = ntile * bj - b
    r_len = torch.cat([desc, torch.zeros(pad_r, dtype=torch.int64)]).view(nprog, rows)
    c_len = torch.cat([asc, torch.zeros(pad_j, dtype=torch.int64)]).view(ntile, bj)
    # nl per pair [prog, tile, rows, cols]; empty pairs drop out of n_min / n_max
    rl = r_len[:, None, :, None]
    cl = c_len[None, :, None, :]
    ok = (rl > 0) & (cl > 0)
    nl = torch.where(ok, torch.maximum(rl, cl), torch.zeros((), dtype=torch.int64))
    n_max = nl.amax(dim=(2, 3))
    big = torch.iinfo(torch.int64).max
    n_min = torch.where(ok, nl, torch.full((), big)).amin(dim=(2, 3))
    n_min = torch.where(n_min == big, n_max, n_min)
    n_full = (n_min // bt) * bt
    main_trips = n_full // bt
    tail_trips = torch.div(n_max - n_full + bt - 1, bt, rounding_mode="floor")
    tile_work = (main_trips * hot + tail_trips * tail + tile_over).double() * warps  # warp-instructions [prog, tile]
    # program (group g, split s) takes tiles s, s + SPLIT, ...; launch order: g-major as the grid runs x first
    tile_split = torch.arange(ntile) % split
    per_prog = torch.stack([tile_work[:, tile_split == s_].sum(dim=1) for s_ in range(split)], dim=0).t().reshape(-1)
    warps_sm = rec["warps_per_sm"]
    blocks_sm = max(1, warps_sm // warps)
    eff = PAIR_ISSUE_EFFICIENCY * min(1.0, (warps_sm / 4) / 4)
    slot_rate = 4 * dev["clock_ghz"] * 1e9 * eff / blocks_sm  # warp-instructions per second per block slot
    slots = dev["sms"] * blocks_sm
    finish = torch.zeros(slots, dtype=torch.float64)
    for w in per_prog.tolist():  # launch order = program order (longest rows first)
        k = int(torch.argmin(finish))
        finish[k] += w / slot_rate
    issue_s = float(finish.max())
    ideal_s = float(per_prog.sum()) / (slot_rate * slots)
    # L2: per tile, its columns' and rows' positions, 8 bytes each
    tile_bytes = 8.0 * (c_len.sum(dim=1)[None, :] + r_len.sum(dim=1)[:, None])
    l2_s = float(tile_bytes.sum()) / (dev["l2_tbs"] * 1e12)
    total_s = max(issue_s, l2_s) + LAUNCH_US * 1e-6
    positions = float((nl.sum()).item())
    return dict(
        predicted_ms=total_s * 1e3,
        issue_ms=issue_s * 1e3,
        issue_ms_balanced=ideal_s * 1e3,
        l2_ms=l2_s * 1e3,
        l2_gb=float(tile_bytes.sum()) / 1e9,
        pair_positions=positions,
        issue_efficiency=eff,
        bound="L2" if l2_s > issue_s else "issue",
    )


def eda_preparation_ops() -> int:
    """Eager launches of the grouped op's Triton path besides its pair kernel on the EDA batch: the
    small PyTorch ops (lengths, even starts, buffers, sort, the max over column splits), counted by
    a dispatch mode on CPU tensors (views and metadata-only ops are free), plus the packing kernel."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from heal_kernels.triton import aot
    from heal_kernels.triton import pairwise as tri

    free = {"view", "_unsafe_view", "slice", "select", "detach", "alias", "expand", "t", "transpose",
            "_local_scalar_dense", "empty", "unsqueeze", "squeeze", "as_strided", "reshape"}
    names = []

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    values, cu, groups, _ = aot.eda_batch()
    cu64 = cu.to(torch.int64)
    with _Count():
        specs, out = tri.launches(values, cu64, False, False, groups, 2, True, None)
        out.amax(dim=0)
    return sum(1 for n in names if n.rstrip("_") not in free) + len(specs) - 1  # the pair kernel is the prediction


def _fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _markdown(arch: int, doc: dict) -> str:
    devs = list(DEVICES[arch])
    lines = [
        f"# Static performance model: sm_{arch} (predictions)",
        "",
        f"Triton {doc['triton']}, torch {doc['torch']}; compiled on {doc['host']} without a GPU. "
        f"Generated by `heal bench static` in {doc['seconds']:.0f} s. **Every figure below is a prediction** "
        "from the compiled SASS, not a measurement.",
        "",
        "## Assumptions",
        "",
    ]
    lines += [f"- {a}" for a in doc["assumptions"]]
    lines += ["", "## Devices", "", "| device | SMs | clock GHz | HBM TB/s | L2 TB/s |", "|---|---|---|---|---|"]
    for name in devs:
        d = DEVICES[arch][name]
        lines.append(f"| {name} | {d['sms']} | {d['clock_ghz']} | {d['hbm_tbs']} | {d['l2_tbs']} |")
    if doc.get("predicted_eda_ms"):
        lines += ["", f"## EDA batch (B={doc['eda']['batch']}, lengths U[{doc['eda']['min_len']}, {doc['eda']['max_len']}])",
                  "", f"Variant `{doc['eda']['variant']}` (the reward's default path).", "",
                  f"Predicted ms is the pair kernel; op ms adds the packing kernel's streaming time and the op's "
                  f"{doc['eda'].get('preparation_ops', 0)} eager launches (the packing kernel and small PyTorch ops) "
                  f"at {PREP_US_PER_OP:.0f} us each.", "",
                  "| device | predicted ms | op ms | issue ms | issue ms (perfect balance) | L2 ms | L2 GB | bound | measured ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, p in doc["eda"]["per_device"].items():
            meas = doc.get("measured", {}).get("eda_ms")
            lines.append(f"| {name} | {p['predicted_ms']:.3f} | {_fmt(p.get('op_ms'), 3)} | {p['issue_ms']:.3f} | {p['issue_ms_balanced']:.3f} | "
                         f"{p['l2_ms']:.3f} | {p['l2_gb']:.2f} | {p['bound']} | {_fmt(meas, 3)} |")
    head = "| variant | regs | spill B | warps/SM | instr/elem | " + " | ".join(f"{d} % of copy" for d in devs) + " |"
    lines += ["", "## Variants", "", head, "|" + "---|" * (5 + len(devs))]
    for r in doc["variants"]:
        if r.get("error"):
            lines.append(f"| {r['name']} | compile error: {r['error']} |" + " |" * (4 + len(devs)))
            continue
        fr = []
        for name in devs:
            p = r.get("predicted_fraction_of_copy", {}).get(name)
            fr.append(f"{100 * p:.0f}" if p is not None else "-")
        lines.append(f"| {r['name']} | {r['regs']} | {r['spill_bytes']} | {r['warps_per_sm']} | "
                     f"{_fmt(r.get('instructions_per_element'))} | " + " | ".join(fr) + " |")
    meas = doc.get("measured")
    if meas:
        lines += ["", f"## Measured on {meas.get('device')} (same commit)", "",
                  f"- EDA grouped op, full batch: {_fmt(meas.get('eda_ms'), 3)} ms measured vs the predictions above",
                  f"- entropy forward {meas.get('entropy_shape')} {meas.get('entropy_dtype')}: "
                  f"{_fmt(meas.get('entropy_fwd_pct_copy'), 0)}% of the measured copy bandwidth "
                  f"(forward + backward {_fmt(meas.get('entropy_fwdbwd_pct_copy'), 0)}%)"]
    lines += ["", "Instructions per element: SASS instructions of the hot loop (the unmasked main loop, from its "
              "label to its backward branch) divided by the elements (pairwise: aligned pair positions) one thread "
              "handles per trip.", ""]
    return "\n".join(lines)


def build(archs, jobs=1, only=None, progress=True) -> dict:
    """Compile and model; ``{arch: document}``."""
    import torch
    import triton

    from heal_kernels.triton import aot

    t0 = time.time()
    recs = aot.compile_all(archs, jobs=jobs, only=only, progress=progress)
    by_name = {v.name: v for v in aot.variants_cached()}
    _, _, _, lens = aot.eda_batch()
    prep = None  # the op's eager launches: the same for every arch, counted once
    docs = {}
    for arch in sorted({int(r["arch"][3:]) for r in recs}):
        devs = DEVICES.get(arch, {})
        out = []
        eda = None
        for r in recs:
            if r["arch"] != f"sm_{arch}":
                continue
            v = by_name[r["name"]]
            r = dict(r)
            r["bytes_per_element"] = v.bytes_per_element
            r.pop("hot_loop_mix", None)
            if v.family != "pairwise" and not r.get("error"):  # streaming kernels: entropy, linear, packing
                preds = {name: stream_prediction(r, d) for name, d in devs.items()}
                r["predicted"] = preds
                r["predicted_fraction_of_copy"] = {n: p.get("fraction_of_copy") for n, p in preds.items()}
            if v.family == "pairwise":
                r["predicted_fraction_of_copy"] = {n: None for n in devs}  # not a streaming kernel: see predicted_eda_ms
            if (v.family == "pairwise" and not r.get("error") and v.name.startswith("pairwise_grouped_fp32_scored_first_exself_J")
                    and "hot_loop_instructions" in r):
                prep = eda_preparation_ops() if prep is None else prep
                per_device = {name: eda_prediction(r, lens, d) for name, d in devs.items()}
                pack = next((x for x in out if x["name"].startswith("pairwise_pack")), None)
                for name, p in per_device.items():
                    # the packing kernel streams the batch once (its bytes at its predicted fraction of copy)
                    frac = ((pack or {}).get("predicted_fraction_of_copy") or {}).get(name) or 1.0
                    bpe = (pack or {}).get("bytes_per_element", 16.0)
                    p["pack_ms"] = sum(lens.tolist()) * bpe / (COPY_FRACTION * devs[name]["hbm_tbs"] * 1e12 * frac) * 1e3
                    p["op_ms"] = p["predicted_ms"] + p["pack_ms"] + prep * PREP_US_PER_OP * 1e-3
                eda = dict(variant=v.name, batch=aot.EDA_BATCH, min_len=aot.EDA_MIN_LEN, max_len=aot.EDA_MAX_LEN,
                           preparation_ops=prep, per_device=per_device)
            out.append(r)
        docs[arch] = dict(
            arch=f"sm_{arch}",
            triton=triton.__version__,
            torch=torch.__version__,
            host=platform.processor() or platform.machine(),
            seconds=time.time() - t0,
            assumptions=[a.format(triton=triton.__version__, prep_us=PREP_US_PER_OP) for a in ASSUMPTIONS],
            devices=devs,
            variants=out,
            eda=eda,
            predicted_eda_ms={n: p["predicted_ms"] for n, p in (eda or {}).get("per_device", {}).items()},
        )
    return docs


def _load_measured(paths) -> dict:
    """Measured figures of a GPU run: the EDA grouped op's full-batch time (``heal bench eda``) and
    heal's forward / forward+backward as a percentage of the measured copy bandwidth (``heal bench
    entropy``)."""
    got = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        env = doc.get("environment", {})
        if env.get("device_type") != "cuda":
            continue
        got["device"] = env.get("device")
        for r in doc.get("rows", []):  # heal bench eda
            if str(r.get("method", "")).startswith("heal") and "grouped" in str(r.get("method", "")):
                got["eda_ms"] = r.get("full_batch_ms")
        for r in doc.get("results", []):  # heal bench entropy
            if r.get("variant") == "heal":
                got["entropy_fwd_pct_copy"] = r.get("fwd_pct_copy")
                got["entropy_fwdbwd_pct_copy"] = r.get("fwdbwd_pct_copy")
                got["entropy_shape"] = doc.get("shape")
                got["entropy_dtype"] = doc.get("dtype")
    return got


def run(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("heal bench static compiles the kernels: unset TRITON_INTERPRET")
    docs = build(args.arch, jobs=args.jobs, only=args.only)
    measured = _load_measured(args.measured) if args.measured else {}
    out_dir = Path(args.output_dir or "benchmarks/results")
    bad = 0
    for arch, doc in docs.items():
        if measured:
            doc["measured"] = measured
        md = _markdown(arch, doc)
        print(md)
        bad += sum(1 for r in doc["variants"] if r.get("error") or r.get("failures"))
        if not args.no_write:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"static-sm_{arch}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
            (out_dir / f"static-sm_{arch}.md").write_text(md)
            print(f"wrote {out_dir / f'static-sm_{arch}.json'} and .md")
    return 1 if bad else 0
