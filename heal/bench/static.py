"""Static performance model of heal's Triton kernels: predictions from the compiled code, no GPU.

Every launched variant (:func:`heal_kernels.triton.aot.variants`) is compiled for each architecture
(sm_80, sm_90, sm_100 when the installed Triton accepts it) and read from its cubin: registers,
spills, theoretical occupancy and the hot loop's SASS instructions per element. From them:

* entropy kernels: the predicted fraction of the device's HBM copy bandwidth, the smaller of the
  issue limit (instructions per element against the SMs' issue rate) and the memory-parallelism
  limit (bytes in flight per SM against bandwidth x latency);
* the pairwise kernel: the predicted time of the EDA benchmark batch (``heal bench eda``: B = 1024,
  lengths uniform in [64, 3072]), counting the real tile work of that batch (every program's tiles,
  each pair's form -- run-length or direct -- as the kernel picks it, each form's unrolled, single and
  masked trips), the per-tile code (each form's share from builds with only that form compiled),
  load imbalance (programs placed on SM slots in launch order) and the L2 traffic; next to it a
  pessimistic figure (sustained clock, per-pipe issue rates, L1 wavefronts of the gathers).

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
    80: {"A100 SXM 80GB": dict(sms=108, clock_ghz=1.41, sustained_ghz=1.275, hbm_tbs=2.04, l2_tbs=4.0)},
    90: {
        "H100 SXM": dict(sms=132, clock_ghz=1.98, sustained_ghz=1.755, hbm_tbs=3.35, l2_tbs=5.5),
        "H200": dict(sms=132, clock_ghz=1.98, sustained_ghz=1.755, hbm_tbs=4.8, l2_tbs=5.5),
    },
    100: {"B200": dict(sms=148, clock_ghz=1.96, sustained_ghz=1.74, hbm_tbs=8.0, l2_tbs=9.0)},
}
# the pessimistic pair-kernel figure: cycles one warp-instruction of each pipe class
# (heal_kernels.triton.aot.pipe_class) holds its pipe on one of the SM's 4 schedulers, = 32 lanes / (per-SM
# results per clock / 4): CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table (cc 8.0 / 9.0:
# fp32 64 / 128, fp64 32 / 64, 32-bit integer add / compare / logic 64, conversions and MUFU 16, warp shuffle 32
# results per clock per SM); loads / stores: 32 LD/ST units per SM (A100 / H100 whitepapers). sm_100 as sm_90.
PIPE_CYCLES = {
    80: dict(fp32=2, fp64=4, alu=2, xu=8, lsu=4, shfl=4, control=2),
    90: dict(fp32=1, fp64=2, alu=2, xu=8, lsu=4, shfl=4, control=2),
    100: dict(fp32=1, fp64=2, alu=2, xu=8, lsu=4, shfl=4, control=2),
}
L1_LINE = 128  # bytes: one L1 data-stage wavefront per distinct 128-byte line a warp-instruction touches
RECORD_BYTES = 8  # the pair kernel's loads: an (x, e) float32 pair or a float64 prefix, 8 bytes per lane
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
    "Pairwise L2 traffic: each column tile re-reads, from L2, every array its pairs read: the (x, e) pairs and "
    "the float64 prefix sums (8 bytes per position each) of its rows and columns; reuse inside a tile is "
    "served by L1. Time is the larger of issue and L2 time (they overlap); L2 read bandwidth as listed per device.",
    "Pair kernel (run-length and direct forms): each tile's pairs are classified as the kernel does (run-length "
    "where n >= 1.5 m, P = L or P = S'; direct otherwise); per tile the work is the base code plus, for each "
    "form present, its code and its main-loop groups and masked trips, as read from the SASS (the per-form "
    "code from builds with only that form compiled).",
    "Pessimistic pair-kernel figure: the sustained clock (listed per device: ~0.89 x boost, e.g. H100 SXM 1.755 "
    "vs 1.98 GHz); each loop body costs max(instructions / issue efficiency, per pipe: its instructions x "
    "cycles per warp-instruction) on a scheduler (fp32 1 or 2, fp64 2 or 4, integer 2, conversions / MUFU 8, "
    "shuffles 4, loads 4 cycles: sm_90 or sm_80); and the SM's L1 handles one wavefront (one 128-byte line of "
    "one warp-instruction) or one shuffle per cycle: each trip's loads touch, per 32 lanes, the lines their "
    "positions span (a gather at stride r spans r times more). The time is the larger of the two, per "
    "program, placed on SM slots like the nominal one.",
    f"Plus {LAUNCH_US:.0f} us for the kernel's launch. The op around it also runs the packing kernel "
    "(per-sequence statistics and the (x, e) pairs; its bytes at its predicted fraction of copy bandwidth) and "
    "small eager PyTorch ops (lengths, starts, buffers, sort, the final max over column splits; counted on the "
    "CPU): each launch is costed at {prep_us:.0f} us of host dispatch, shown apart as the op's time (the kernel "
    "cannot start before them unless earlier GPU work hides them).",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.bench import harness

    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100],
                        help="SM architectures (default 80 90 100; those the installed Triton rejects are skipped)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile processes (default 2)")
    parser.add_argument("--only", default=None, help="only variants whose name contains this")
    parser.add_argument("--measured", nargs="*", default=[],
                        help="result JSON files of a GPU run (heal bench entropy / eda) to print next to the predictions")
    harness.add_output_dir_argument(parser)
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


def _lines(lanes: int, stride, record: int = RECORD_BYTES):
    """Expected 128-byte lines one warp-instruction touches: ``lanes`` lanes reading ``record`` bytes at
    positions ``stride`` apart (a tensor of strides; at most one line per lane)."""
    import torch

    span = ((lanes - 1) * stride + 1) * record  # bytes from the first lane's record to the last's
    return torch.clamp(1.0 + span / L1_LINE, max=float(lanes))  # a span at a random offset: 1 + span / 128


def _body_cycles(body: dict, arch: int) -> float:
    """Scheduler cycles one warp spends on a loop body, pessimistic: max(issue at the pair kernel's
    efficiency, the busiest pipe)."""
    pipes = PIPE_CYCLES.get(arch, PIPE_CYCLES[90])
    pipe = max((n * pipes.get(c, 1) for c, n in body.get("mix", {}).items()), default=0)
    return max(body["instructions"] / PAIR_ISSUE_EFFICIENCY, float(pipe))


def pair_tiles(lengths, kw: dict, short_first: bool = False):
    """The pair kernel's tiles on a batch: for every (program, column tile) the pairs' lengths and
    forms as the kernel classifies them (``heal_kernels.triton.pairwise``), each form's trips.
    Returns a dict of tensors shaped ``[programs, tiles, ...]``."""
    import torch

    from heal_kernels.triton import pairwise as tri

    rows, bj, bt = kw["ROWS"], kw["BLOCK_J"], kw["BLOCK_T"]
    kd, kr = kw.get("KD", 1), kw.get("KR", 1)
    step = bt - 1
    lens = torch.as_tensor(lengths, dtype=torch.int64)
    b = lens.numel()
    asc = torch.sort(lens).values
    desc = asc.flip(0)
    nprog, ntile = math.ceil(b / rows), math.ceil(b / bj)
    r_len = torch.cat([desc, torch.zeros(nprog * rows - b, dtype=torch.int64)]).view(nprog, rows)
    c_len = torch.cat([asc, torch.zeros(ntile * bj - b, dtype=torch.int64)]).view(ntile, bj)
    R = r_len[:, None, :, None].expand(nprog, ntile, rows, bj)
    C = c_len[None, :, None, :].expand(nprog, ntile, rows, bj)
    ok = (R > 0) & (C > 0)
    if short_first:
        p_is_row = R <= C
    else:
        p_is_row = torch.ones_like(ok)
    case_long = torch.where(p_is_row, R, C) >= torch.where(p_is_row, C, R)
    L = torch.maximum(R, C)
    S = torch.minimum(R, C)
    rl = ok & (S < L) & (L * tri.RL_DEN >= S * tri.RL_NUM) & (L < tri.RL_MAX_LEN)
    forms = dict(direct=(ok & ~rl, L, bt, kd, 0), rl_long=(rl & case_long, S, step, kr, 1),
                 rl_short=(rl & ~case_long, S, step, kr, 1))
    out = dict(R=R, C=C, L=L, S=S, ok=ok, rl=rl, case_long=case_long, r_len=r_len, c_len=c_len)
    big = torch.iinfo(torch.int64).max
    for name, (mask, ln, per_trip, k, off) in forms.items():
        m = mask.flatten(2)
        x = ln.flatten(2)
        run = m.any(-1)
        mx = torch.where(m, x, 0).amax(-1)
        mn = torch.where(m, x, big).amin(-1)
        mn = torch.where(run, mn, torch.zeros_like(mn))
        full = torch.clamp((mn - off) // per_trip, min=0)  # unmasked trips
        groups = full // k
        trips = (mx + per_trip - 1) // per_trip
        out[name] = dict(mask=mask, run=run, groups=groups, single=full - groups * k,
                         tail=torch.clamp(trips - full, min=0), trips=trips)
    return out


def pair_kernel_prediction(rec: dict, lengths, dev: dict, arch: int = 90, short_first: bool = False) -> dict:
    """Nominal and pessimistic time of the pair kernel (run-length and direct forms) on the batch:
    see :data:`ASSUMPTIONS`. ``rec`` is an :func:`heal_kernels.triton.aot.analyse` record with
    ``loops`` and ``section_code`` (the tile code of builds with no form / one form compiled)."""
    import torch

    kw = rec["kwargs"]
    rows, bj, bt, warps, split = kw["ROWS"], kw["BLOCK_J"], kw["BLOCK_T"], kw["num_warps"], kw.get("SPLIT", 1)
    kd, kr = kw["KD"], kw["KR"]
    loops = rec["loops"]
    code = rec["section_code"]
    base = float(code[0])
    sec = {"direct": code[1] - code[0], "rl_long": code[2] - code[0], "rl_short": code[4] - code[0]}
    t = pair_tiles(lengths, kw, short_first)
    nprog, ntile = t["r_len"].shape[0], t["c_len"].shape[0]
    P = rows * bj
    lanes_per_pair = bt  # lanes of one warp-instruction's pair (a warp holds 32 / bt pairs per instruction)
    # nominal: warp-instructions per (program, tile); pessimistic: scheduler cycles per warp and L1 cycles
    work = torch.full((nprog, ntile), base, dtype=torch.float64)
    pess = torch.full((nprog, ntile), base / PAIR_ISSUE_EFFICIENCY, dtype=torch.float64)
    l1 = torch.zeros((nprog, ntile), dtype=torch.float64)
    L = t["L"].double()
    S = t["S"].double().clamp(min=1)
    ratio = torch.where(t["ok"], L / S, torch.ones_like(L)).flatten(2)
    for name in ("direct", "rl_long", "rl_short"):
        f = t[name]
        main, single, tail = loops[f"{name}_main"], loops[f"{name}_single"], loops[f"{name}_tail"]
        run = f["run"].double()
        k = kd if name == "direct" else kr
        # single trips: LLVM may have unrolled their loop (``factor`` trips per unrolled iteration, the
        # rest one by one); the unrolled body is costed as factor single bodies of its own size
        fac = single.get("factor", 1)
        s_unr = torch.div(f["single"], fac, rounding_mode="floor") if fac > 1 else torch.zeros_like(f["single"])
        s_one = f["single"] - s_unr * fac
        unr = single.get("unrolled", 0)
        work += (run * sec[name] + f["groups"] * main["instructions"] + s_unr * unr + s_one * single["instructions"]
                 + f["tail"] * tail["instructions"])
        pess += (run * sec[name] / PAIR_ISSUE_EFFICIENCY + f["groups"] * _body_cycles(main, arch)
                 + (s_unr * fac + s_one) * _body_cycles(single, arch) + f["tail"] * _body_cycles(tail, arch))
        # L1: per trip, every pair of the tile runs the loop (the others on r = 1 at the arrays' start)
        r = torch.where(f["mask"].flatten(2), ratio, torch.ones_like(ratio))
        if name == "direct":
            per_pair = _lines(lanes_per_pair, torch.ones_like(r)) + _lines(lanes_per_pair, 1.0 / r)
        else:
            per_pair = _lines(lanes_per_pair, r) + _lines(lanes_per_pair, torch.ones_like(r))
        shfl = main["mix"].get("shfl", 0) / k * warps  # shuffle warp-instructions per trip
        trips = f["groups"] * k + f["single"] + f["tail"]
        l1 += trips * (per_pair.sum(-1) + shfl)
    work_w = work * warps  # warp-instructions
    # L2 bytes per tile: every array a sequence's pairs read (xe: direct or short side; PE / PX: long side)
    mask_any = lambda m, dim: m.any(dim)  # noqa: E731
    R_long = t["R"] >= t["C"]
    xe_use = t["direct"]["mask"] | (t["rl"] & ~R_long.expand_as(t["rl"]))
    pe_use = t["rl_long"]["mask"]
    px_use = t["rl_short"]["mask"]
    # rows (dim 2) read xe when short or direct, a prefix when long; columns (dim 3) the other way round
    row_arrays = (mask_any(xe_use, 3).double() + mask_any(pe_use & R_long, 3).double()
                  + mask_any(px_use & R_long, 3).double())
    col_xe = t["direct"]["mask"] | (t["rl"] & R_long)
    col_arrays = (mask_any(col_xe, 2).double() + mask_any(pe_use & ~R_long, 2).double()
                  + mask_any(px_use & ~R_long, 2).double())
    tile_bytes = RECORD_BYTES * ((t["r_len"][:, None, :].double() * row_arrays).sum(-1)
                                 + (t["c_len"][None, :, :].double() * col_arrays).sum(-1))
    warps_sm = rec["warps_per_sm"]
    blocks_sm = max(1, warps_sm // warps)
    eff = PAIR_ISSUE_EFFICIENCY * min(1.0, (warps_sm / 4) / 4)
    tile_split = torch.arange(ntile) % split

    def place(per_prog_seconds):
        slots = dev["sms"] * blocks_sm
        finish = torch.zeros(slots, dtype=torch.float64)
        for w in per_prog_seconds.tolist():  # launch order = program order (longest rows first)
            kk = int(torch.argmin(finish))
            finish[kk] += w
        return float(finish.max()), float(per_prog_seconds.sum()) / slots

    def per_prog(x):
        return torch.stack([x[:, tile_split == s_].sum(dim=1) for s_ in range(split)], dim=0).t().reshape(-1)

    # nominal: warp-instructions at 4 per cycle per SM x efficiency, shared by the SM's blocks
    slot_rate = 4 * dev["clock_ghz"] * 1e9 * eff / blocks_sm
    issue_s, ideal_s = place(per_prog(work_w) / slot_rate)
    l2_s = float(tile_bytes.sum()) / (dev["l2_tbs"] * 1e12)
    total_s = max(issue_s, l2_s) + LAUNCH_US * 1e-6
    # pessimistic: per program, max(scheduler cycles (its warps spread over 4 schedulers), L1 cycles), at the
    # sustained clock, shared by the SM's blocks
    clock = dev.get("sustained_ghz", dev["clock_ghz"]) * 1e9
    sched = per_prog(pess * (warps / 4))
    l1c = per_prog(l1)
    pess_s, pess_ideal = place(torch.maximum(sched, l1c) * blocks_sm / clock)
    sched_s, _ = place(sched * blocks_sm / clock)
    l1_s, _ = place(l1c * blocks_sm / clock)
    pess_total = max(pess_s, l2_s) + LAUNCH_US * 1e-6
    segs = {n: float((t[n]["mask"].double() * (t["L"] if n == "direct" else t["S"]).double()).sum()) for n in
            ("direct", "rl_long", "rl_short")}
    return dict(
        predicted_ms=total_s * 1e3, issue_ms=issue_s * 1e3, issue_ms_balanced=ideal_s * 1e3, l2_ms=l2_s * 1e3,
        l2_gb=float(tile_bytes.sum()) / 1e9, issue_efficiency=eff, bound="L2" if l2_s > issue_s else "issue",
        pessimistic_ms=pess_total * 1e3, pessimistic_sched_ms=sched_s * 1e3, pessimistic_l1_ms=l1_s * 1e3,
        pessimistic_balanced_ms=pess_ideal * 1e3,
        pessimistic_bound=max((("L2", l2_s), ("L1", l1_s), ("issue/pipes", sched_s)), key=lambda kv: kv[1])[0],
        pair_positions=segs["direct"], short_positions=segs["rl_long"] + segs["rl_short"],
        tiles_with=dict(direct=int(t["direct"]["run"].sum()), rl_long=int(t["rl_long"]["run"].sum()),
                        rl_short=int(t["rl_short"]["run"].sum()), total=nprog * ntile),
    )


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
    lines += ["", "## Devices", "", "| device | SMs | clock GHz (boost) | sustained GHz (pessimistic) | HBM TB/s | L2 TB/s |",
              "|---|---|---|---|---|---|"]
    for name in devs:
        d = DEVICES[arch][name]
        lines.append(f"| {name} | {d['sms']} | {d['clock_ghz']} | {d.get('sustained_ghz', '-')} | {d['hbm_tbs']} | "
                     f"{d['l2_tbs']} |")
    if doc.get("predicted_eda_ms"):
        lines += ["", f"## EDA batch (B={doc['eda']['batch']}, lengths U[{doc['eda']['min_len']}, {doc['eda']['max_len']}])",
                  "", f"Variant `{doc['eda']['variant']}` (the reward's default path).", "",
                  f"Predicted ms is the pair kernel; op ms adds the packing kernel's streaming time and the op's "
                  f"{doc['eda'].get('preparation_ops', 0)} eager launches (the packing kernel and small PyTorch ops) "
                  f"at {PREP_US_PER_OP:.0f} us each.", "",
                  "Pessimistic ms: the pair kernel at the sustained clock with pipe rates and L1 wavefronts (see "
                  "Assumptions); its scheduler / L1 parts are each placed on the SMs alone.", "",
                  "| device | predicted ms | op ms | issue ms | issue ms (perfect balance) | L2 ms | L2 GB | bound | "
                  "pessimistic ms | pess. scheduler ms | pess. L1 ms | pess. bound | measured ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, p in doc["eda"]["per_device"].items():
            meas = doc.get("measured", {}).get("eda_ms")
            lines.append(f"| {name} | {p['predicted_ms']:.3f} | {_fmt(p.get('op_ms'), 3)} | {p['issue_ms']:.3f} | {p['issue_ms_balanced']:.3f} | "
                         f"{p['l2_ms']:.3f} | {p['l2_gb']:.2f} | {p['bound']} | {_fmt(p.get('pessimistic_ms'), 3)} | "
                         f"{_fmt(p.get('pessimistic_sched_ms'), 3)} | {_fmt(p.get('pessimistic_l1_ms'), 3)} | "
                         f"{p.get('pessimistic_bound', '-')} | {_fmt(meas, 3)} |")
        rec = next((r for r in doc["variants"] if r["name"] == doc["eda"]["variant"]), {})
        if rec.get("loops"):
            kw = rec["kwargs"]
            lines += ["", "Pair kernel loops (SASS instructions of each loop body; a main body covers "
                      f"{kw['KD']} direct / {kw['KR']} run-length trips): per element = per aligned position (direct) "
                      "or per short position (run-length).", "",
                      "| form | per element | main | single | masked | per-tile code (form) |", "|---|---|---|---|---|---|"]
            per_el = dict(direct=rec.get("instructions_per_position_direct"),
                          rl_long=rec.get("instructions_per_segment_rl_long"),
                          rl_short=rec.get("instructions_per_segment_rl_short"))
            code = rec.get("section_code") or {}
            for form, bit in (("direct", 1), ("rl_long", 2), ("rl_short", 4)):
                sl = rec["loops"][f"{form}_single"]
                single = str(sl["instructions"]) + (f" ({sl['unrolled']} x{sl['factor']} unrolled)" if sl.get("factor") else "")
                sec = (code.get(bit, 0) - code.get(0, 0)) if code else None
                lines.append(f"| {form} | {_fmt(per_el[form])} | {rec['loops'][f'{form}_main']['instructions']} | "
                             f"{single} | {rec['loops'][f'{form}_tail']['instructions']} | {_fmt(sec)} |")
            lines.append(f"| tile (every form) | - | - | - | - | {_fmt(code.get(0))} base |")
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
              "label to its backward branch) divided by the elements one thread handles per trip (pair kernel: the "
              "run-length loop for P = L, per short position).", ""]
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
                if "loops" in r:
                    # each form's share of the per-tile code: builds with no form / one form compiled
                    secs = aot.pairwise_section_variants(v)
                    r["section_code"] = {}
                    for k_, sv in secs.items():
                        srec = aot.analyse(sv, arch)
                        r["section_code"][k_] = srec.get("tile_code_instructions")
                    if any(x is None for x in r["section_code"].values()):
                        r.pop("section_code")
                if "section_code" in r:
                    per_device = {name: pair_kernel_prediction(r, lens, d, arch) for name, d in devs.items()}
                else:
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
    from heal.bench.harness import DEFAULT_RESULTS_DIR

    out_dir = Path(args.output_dir or DEFAULT_RESULTS_DIR)
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
