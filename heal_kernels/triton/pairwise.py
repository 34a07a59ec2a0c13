"""Triton kernels for the all-pairs ``-KL`` entropy-dynamics similarity (CUDA; interpreter on CPU).

For a pair, with ``L`` the longer sequence (length ``n``), ``S'`` the shorter one (length ``m``)
stretched by ``src(t) = min(floor(f32(t) * (f32(m) / f32(n))), m - 1)`` and ``e = exp(x - M_seq)``
precomputed once per element:

* ``P = L``:  ``KL = sum_t e_L (L - S') / Z_L + (M_S - M_L) + log(Z_S' / Z_L)``
* ``P = S'``: ``KL = sum_t e_S' (S' - L) / Z_S' + (M_L - M_S) + log(Z_L / Z_S')``

``Z_L`` (a whole sequence's ``sum e``) is precomputed per sequence; ``Z_S' = sum_t e_S(src(t))`` is
accumulated (it equals ``Z_S`` when ``m = n``, which is used: identical sequences give exactly 0).
No ``exp`` or ``log`` in the pair loop; float32 accumulation with tree reductions, so results are
deterministic (no atomics).

Layout. Rows are length-sorted; program ``p`` scores ``ROWS`` length-adjacent rows, longest first
(the long programs start first: less load imbalance at the end). It walks the columns in length
order in tiles of ``BLOCK_J`` columns; one tile holds the ``ROWS x BLOCK_J`` pairs on its first axis
and ``BLOCK_T`` aligned positions on its second, so a column block is read once from L2 for
``ROWS`` rows (the other rows' reads hit L1): ``ROWS`` times less L2 traffic than a program per
row. Positions every pair of the tile has run unmasked; only the last, ragged positions are
masked. ``x`` and ``e`` are interleaved so one 8-byte load serves both, every sequence starts at an
even position (the packing kernel pads), so the long side -- read at consecutive positions -- comes two
positions per 16-byte load; each pair has 64-bit base pointers (a gather of the stretched side is a
shift-add, no index add); the main loop carries the long side's pointers and ``t`` as float32, so
its integer work is the trip count. One accumulator takes ``e_P (L - S')`` (a select picks
``e_P``; one reduction per pair), and the stretch scale ``m / n`` is divided with correct rounding
(``div_rn``): Triton's default ``div.full.f32`` is off by up to 2 ulp, which moves nearest-neighbour
indices. Offsets are int32 (the launcher checks the total length). ``maxnreg=128`` keeps two
8-warp programs per SM on every architecture.

FP contraction is on (``enable_fp_fusion=True`` at launch): the accumulations ``acc + w * d`` are
FMAs; ``t * scale`` (no addend) is a plain rounded multiply, as in torch's index rule.

The grouped variant keeps a running max per (row, group) in registers and writes
``[ROWS, num_groups]`` once per program: no ``[B, B]`` buffer, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heal_kernels.triton._launch import launch

FP_FUSION = True  # passed at every launch
MAX_TOTAL = 2**31 - 2**16  # int32 offsets (positions + padding) stay below 2^31


@triton.jit
def _pair_step(s_ptrs, l_ptrs, w_long, zs, acc, MASKED: tl.constexpr, valid):
    """One ``[P, T]`` block of aligned positions: gathers ``(x, e)`` of both sides (one 8-byte load
    each) and accumulates ``Z_S'`` and ``sum e_P (L - S')`` (``e_P`` = ``e_L`` where ``w_long``, else
    ``e_S'``)."""
    if MASKED:
        vs = tl.load(s_ptrs, mask=valid, other=0)
        vl = tl.load(l_ptrs, mask=valid, other=0)
    else:
        vs = tl.load(s_ptrs)
        vl = tl.load(l_ptrs)
    # low 32 bits: x, high 32 bits: e (bit casts of the two halves; no arithmetic)
    xs = vs.to(tl.int32).to(tl.float32, bitcast=True)
    es = (vs >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    xl = vl.to(tl.int32).to(tl.float32, bitcast=True)
    el = (vl >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    zs += es
    acc += tl.where(w_long, el, es) * (xl - xs)  # select + FMA
    return zs, acc


@triton.jit
def _kl_rows_kernel(
    xe_ptr,  # int64 [total + pad]: (x, e) float32 pairs, x in the low half
    starts_ptr,  # int32 [B]
    lens_ptr,  # int32 [B]
    mx_ptr,  # float32 [B], max of each sequence
    zsum_ptr,  # float32 [B], sum exp(x - max) of each sequence
    order_ptr,  # int32 [B], sequences sorted by length (ascending)
    groups_ptr,  # int32 [B]
    pid_ptr,  # int64 [B] (unused unless HAS_PID)
    out_ptr,  # float32 [B, B] (FULL) or [SPLIT, B, G]
    B,
    G,
    SHORT_FIRST: tl.constexpr,
    FULL: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    HAS_PID: tl.constexpr,
    CLAMP_SRC: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    P: tl.constexpr = ROWS * BLOCK_J
    pair = tl.arange(0, P)
    r_of = pair // BLOCK_J  # row slot of each pair
    j_of = pair % BLOCK_J  # column slot of each pair
    # rows: length order descending, ROWS per program, longest programs first; program axis 1
    # takes every SPLIT-th column tile (grouped: each split writes its own partial maxima, combined by one amax)
    group = tl.program_id(0)
    split = tl.program_id(1)
    rpos = B - 1 - (group * ROWS + r_of)
    rmask = rpos >= 0
    i = tl.load(order_ptr + tl.where(rmask, rpos, 0))
    m_i = tl.where(rmask, tl.load(lens_ptr + i), 0)
    start_i = tl.load(starts_ptr + i)
    offs_t = tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    running = tl.full([ROWS, BLOCK_G], float("-inf"), tl.float32)
    for j0 in range(split * BLOCK_J, B, SPLIT * BLOCK_J):
        jmask = (j0 + j_of) < B
        j = tl.load(order_ptr + j0 + j_of, mask=jmask, other=0)
        m_j = tl.where(jmask, tl.load(lens_ptr + j), 0)
        start_j = tl.load(starts_ptr + j)
        ok = (m_i > 0) & (m_j > 0)
        # P = the side whose softmax weights the KL; L = the longer side (P on ties)
        if SHORT_FIRST:
            p_is_row = m_i <= m_j
        else:
            p_is_row = m_j >= 0  # all true
        m_p = tl.where(p_is_row, m_i, m_j)
        m_q = tl.where(p_is_row, m_j, m_i)
        case_long = m_p >= m_q
        l_is_row = case_long == p_is_row
        nl = tl.where(ok, tl.where(l_is_row, m_i, m_j), 0)
        ms = tl.where(l_is_row, m_j, m_i)
        # pairs with an empty side read the first positions of xe and are dropped: their nl is 0, so
        # scale = 1 and src = t < n_full, in bounds (the empty side is the stretched one: ms = 0)
        start_l = tl.where(ok, tl.where(l_is_row, start_i, start_j), 0)
        start_s = tl.where(ok, tl.where(l_is_row, start_j, start_i), 0)
        # per-pair 64-bit bases (a gather is then one shift-add, no index add); every sequence starts
        # at an even position (see pack_launch_spec), so L's (x, e) pairs are read two at a time (16 bytes)
        base_l = xe_ptr + tl.multiple_of(start_l, 2)
        base_s = xe_ptr + start_s
        ms_c = tl.maximum(ms, 1)
        scale = tl.math.div_rn(ms_c.to(tl.float32), tl.maximum(nl, 1).to(tl.float32))  # correctly rounded
        n_max = tl.max(nl, axis=0)
        n_min = tl.min(tl.where(ok, nl, n_max), axis=0)
        n_full = (n_min // BLOCK_T) * BLOCK_T  # positions every live pair of the tile has
        zs = tl.zeros([P, BLOCK_T], tl.float32)
        acc = tl.zeros([P, BLOCK_T], tl.float32)
        w_long = case_long[:, None]
        # the main loop carries L's pointers and t as float32 (exact below 2^24): the trip count is
        # its only integer work
        l_ptrs = base_l[:, None] + offs_t[None, :]
        tf = offs_t.to(tl.float32)
        for _ in range(0, n_full, BLOCK_T):
            src = (tf[None, :] * scale[:, None]).to(tl.int32)  # trunc = floor (>= 0)
            if CLAMP_SRC:  # the rule's min(., m - 1): a no-op while every length is below 2^22 (CLAMP_FREE_TOTAL)
                src = tl.minimum(src, ms_c[:, None] - 1)
            zs, acc = _pair_step(base_s[:, None] + src, l_ptrs, w_long, zs, acc, False, None)
            l_ptrs += BLOCK_T
            tf += BLOCK_T
        for t0 in range(n_full, n_max, BLOCK_T):  # the ragged end: at most a few blocks
            t = t0 + offs_t
            valid = t[None, :] < nl[:, None]
            src = tl.minimum((t.to(tl.float32)[None, :] * scale[:, None]).to(tl.int32), ms_c[:, None] - 1)
            zs, acc = _pair_step(base_s[:, None] + src, base_l[:, None] + t[None, :], w_long, zs, acc, True, valid)
        # the rest is per pair, once per tile: per-sequence values are (re)loaded here (L1 hits) so
        # that they hold no registers during the loops
        mx_i = tl.load(mx_ptr + i)
        z_i = tl.load(zsum_ptr + i)
        mx_j = tl.load(mx_ptr + j)
        z_j = tl.load(zsum_ptr + j)
        # P = L: KL = sum e_L (L - S') / Z_L + (M_S - M_L) + log Z_S' - log Z_L
        # P = S': KL = -sum e_S' (L - S') / Z_S' + (M_L - M_S) + log Z_L - log Z_S'
        a = tl.where(case_long, 1.0, -1.0) * tl.sum(acc, axis=1)
        z_s = tl.where(ms == nl, tl.where(l_is_row, z_j, z_i), tl.sum(zs, axis=1))  # not stretched: Z_S itself
        z_l = tl.where(l_is_row, z_i, z_j)
        z_s = tl.where(ok, z_s, 1.0)
        z_l = tl.where(ok, z_l, 1.0)
        z_p = tl.where(case_long, z_l, z_s)
        mx_l = tl.where(l_is_row, mx_i, mx_j)
        mx_s = tl.where(l_is_row, mx_j, mx_i)
        shift = (mx_s - mx_l) + (tl.log(z_s) - tl.log(z_l))  # equal sums cancel exactly: identical sequences give 0
        # correctly rounded division (the compile gate rejects div.full.f32 in this kernel)
        kl = tl.math.div_rn(a, z_p) + tl.where(case_long, shift, -shift)
        sim = -kl
        if FULL:
            sim = tl.where(ok, sim, float("nan"))
            tl.store(out_ptr + i.to(tl.int64) * B + j, sim, mask=jmask & rmask)
        else:
            elig = ok & jmask
            if EXCLUDE_SELF:
                elig = elig & (j != i)
            if HAS_PID:
                elig = elig & (tl.load(pid_ptr + j) != tl.load(pid_ptr + i))
            g = tl.load(groups_ptr + j)
            vals = tl.where(elig, sim, float("-inf"))
            hit = g[:, None] == offs_g[None, :]
            vals = tl.reshape(tl.where(hit, vals[:, None], float("-inf")), [ROWS, BLOCK_J, BLOCK_G])
            running = tl.maximum(running, tl.max(vals, axis=1))
    if not FULL:
        rpos_r = B - 1 - (group * ROWS + tl.arange(0, ROWS))
        i_r = tl.load(order_ptr + tl.where(rpos_r >= 0, rpos_r, 0))
        ptrs = out_ptr + (split * B + i_r[:, None]).to(tl.int64) * G + offs_g[None, :]
        tl.store(ptrs, running, mask=(rpos_r[:, None] >= 0) & (offs_g[None, :] < G))


# CUDA, every architecture: 8 warps, 2 programs per SM. ``maxnreg`` holds ptxas to the 128 registers
# of two 256-thread programs per SM: without it ptxas for sm_100 aims at 3 and spills
TILES = dict(ROWS=4, SPLIT=4, BLOCK_J=8, BLOCK_T=32, num_warps=8, maxnreg=128)
TILES_INTERPRETED = dict(ROWS=2, SPLIT=2, BLOCK_J=4, BLOCK_T=8, num_warps=1)  # small: quick, still every path
# min(floor(t * f32(m / n)), m - 1) needs no min while n < 2^22: t <= n - 1 and f32(m / n) <= (m / n)(1 + 2^-24)
# keep the rounded product below m - m / n + m 2^-23 < m. The total length bounds every length (no sync).
CLAMP_FREE_TOTAL = 2**22


def tiles_for_arch(arch: int) -> dict:
    """The CUDA tile configuration for ``sm_<arch>`` (today one for sm_80, sm_90 and sm_100; the AOT
    list groups architectures by it)."""
    return TILES


def _blocks(device: torch.device, num_groups: int = 1, arch=None):
    """Tile sizes and warps for ``device`` (the interpreter on CPU tensors; ``arch`` or the CUDA
    device's compute capability picks the CUDA configuration), plus ``BLOCK_G``."""
    if device.type == "cuda":
        if arch is None:
            major, minor = torch.cuda.get_device_capability(device)
            arch = 10 * major + minor
        cfg = dict(tiles_for_arch(arch))
    else:
        cfg = dict(TILES_INTERPRETED)
    cfg["BLOCK_G"] = triton.next_power_of_2(max(1, num_groups))
    return cfg


@triton.jit
def _pack_kernel(
    values_ptr,  # float32 [total], the packed batch
    cu_ptr,  # int64 [B + 1]
    starts_ptr,  # int32 [B], each sequence's (even) start in xe
    xe_ptr,  # float32 view of the int64 [size] (x, e) pairs, zeros
    mx_ptr,  # float32 [B] out: max of each sequence (0 when empty)
    zsum_ptr,  # float32 [B] out: sum of e over each sequence
    BLOCK: tl.constexpr,
):
    """One program per sequence: ``mx = max x``, ``e = f32(exp(f64(x) - mx))`` (as the CPU paths'
    ``seq_stats``), the ``(x, e)`` pairs written at the sequence's even start, ``zsum`` the float64
    sum of the float32 ``e`` (a fixed tree per sequence: identical sequences get identical sums)."""
    b = tl.program_id(0)
    src0 = tl.load(cu_ptr + b)
    n = (tl.load(cu_ptr + b + 1) - src0).to(tl.int32)
    dst = xe_ptr + 2 * tl.load(starts_ptr + b).to(tl.int64)
    src = values_ptr + src0
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for k0 in range(0, n, BLOCK):
        k = k0 + offs
        m = tl.maximum(m, tl.load(src + k, mask=k < n, other=float("-inf")))
    mx = tl.max(m, axis=0)
    mx = tl.where(n > 0, mx, 0.0)
    z = tl.zeros([BLOCK], tl.float64)
    for k0 in range(0, n, BLOCK):
        k = k0 + offs
        inb = k < n
        x = tl.load(src + k, mask=inb, other=0.0)
        e = tl.where(inb, tl.exp(x.to(tl.float64) - mx.to(tl.float64)).to(tl.float32), 0.0)
        tl.store(dst + 2 * k, x, mask=inb)
        tl.store(dst + 2 * k + 1, e, mask=inb)
        z += e.to(tl.float64)
    tl.store(mx_ptr + b, mx)
    tl.store(zsum_ptr + b, tl.sum(z, axis=0).to(tl.float32))


PACK = dict(BLOCK=1024, num_warps=4)  # CUDA: lengths of hundreds to thousands of tokens
PACK_INTERPRETED = dict(BLOCK=8, num_warps=1)  # small: several trips per sequence in the tests


def pack_launch_spec(values, cu, interpreted=None):
    """``(kernel, grid, args, kwargs, packed)`` of the packing launch (shared with :mod:`.aot`).

    ``values`` float32 ``[total]``, ``cu`` int64 ``[B + 1]`` (validated). ``packed`` holds the pair
    kernel's per-sequence inputs, filled by the launch: ``xe`` (each position's ``(x, e)`` float32
    pair as one int64, ``x`` in the low half, every sequence starting at an even position with a zero
    pad after odd-length ones, so the pair kernel's unmasked reads of the long side are 16-byte
    aligned pairs of positions), ``starts``, ``lens`` (int32), ``mx``, ``zsum`` (float32). No host
    synchronisation."""
    bsz = cu.numel() - 1
    total = values.numel()
    size = total + bsz + 64  # even starts add at most one pad per sequence; zeros after the end
    if size >= MAX_TOTAL:
        raise ValueError(f"the packed batch has {total} values; the Triton kernel takes fewer than "
                         f"{MAX_TOTAL - bsz - 64} for {bsz} sequences")
    dev = values.device
    if interpreted is None:
        interpreted = dev.type != "cuda"
    lens = (cu[1:] - cu[:-1]).to(torch.int32)
    span = lens + (lens & 1)  # each sequence's length rounded up to even
    starts = torch.cumsum(span, 0, dtype=torch.int32) - span
    xe = torch.zeros(size, dtype=torch.int64, device=dev)
    mx = torch.empty(bsz, dtype=torch.float32, device=dev)
    zsum = torch.empty(bsz, dtype=torch.float32, device=dev)
    cfg = PACK_INTERPRETED if interpreted else PACK
    args = (values, cu, starts, xe.view(torch.float32), mx, zsum)
    kwargs = dict(BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION)
    return _pack_kernel, (bsz,), args, kwargs, dict(xe=xe, starts=starts, lens=lens, mx=mx, zsum=zsum, total=total,
                                                  cu=cu)


def launch_spec(packed, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None, device=None,
                arch=None):
    """``(kernel, grid, args, kwargs, out)`` of the pair kernel's launch on ``packed`` (from
    :func:`pack_launch_spec`; shared with :mod:`.aot`); ``device`` and ``arch`` override what picks
    the tile sizes (the AOT list passes ``cuda`` and an SM version)."""
    lens = packed["lens"]
    bsz = lens.numel()
    dev = lens.device
    order = torch.argsort(lens, stable=True).to(torch.int32)
    cfg = _blocks(device or dev, num_groups, arch)
    split = cfg["SPLIT"]  # column splits: finer programs, less load imbalance (full: disjoint columns)
    if full:
        out = torch.empty((bsz, bsz), dtype=torch.float32, device=dev)
        groups32 = lens  # any int32 [B]: never read (FULL)
    else:
        out = torch.empty((split, bsz, num_groups), dtype=torch.float32, device=dev)
        groups32 = groups.to(torch.int32)
    pid_t = pids if pids is not None else packed["cu"]  # any int64 tensor: never read without HAS_PID
    args = (packed["xe"], packed["starts"], lens, packed["mx"], packed["zsum"], order, groups32, pid_t, out, bsz,
            num_groups)
    kwargs = dict(
        SHORT_FIRST=bool(short_first),
        FULL=bool(full),
        EXCLUDE_SELF=bool(exclude_self),
        HAS_PID=pids is not None,
        CLAMP_SRC=packed["total"] >= CLAMP_FREE_TOTAL,
        ROWS=cfg["ROWS"],
        SPLIT=split,
        BLOCK_J=cfg["BLOCK_J"],
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_G=cfg["BLOCK_G"],
        num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
        num_stages=1,
        enable_fp_fusion=FP_FUSION,
    )
    return _kl_rows_kernel, (triton.cdiv(bsz, cfg["ROWS"]), split), args, kwargs, out


def launches(values, cu, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None):
    """The op's two launches ``[(kernel, grid, args, kwargs)]`` (packing, then the pairs) and the
    pair kernel's output buffer."""
    pk, pgrid, pargs, pkw, packed = pack_launch_spec(values, cu)
    kernel, grid, args, kwargs, out = launch_spec(packed, short_first, full, groups, num_groups, exclude_self, pids)
    return [(pk, pgrid, pargs, pkw), (kernel, grid, args, kwargs)], out


def _launch(values, cu, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None):
    specs, out = launches(values, cu, short_first, full, groups, num_groups, exclude_self, pids)
    for spec in specs:
        launch(*spec)
    return out if full else out.amax(dim=0)  # combine the column splits' maxima (order-free: deterministic)


def pairwise_kl(values, cu, short_first: bool) -> torch.Tensor:
    """Float32 ``[B, B]`` of ``-KL`` (row scored), NaN where a side is empty. ``values`` float32
    ``[total]``, ``cu`` int64 ``[B + 1]`` (validated)."""
    return _launch(values, cu, short_first, True)


def grouped_max_kl(values, cu, short_first: bool, groups, num_groups: int, exclude_self: bool, pids) -> torch.Tensor:
    """Float32 ``[B, num_groups]``: per-row max of ``-KL`` over each group's eligible columns."""
    return _launch(values, cu, short_first, False, groups, num_groups, exclude_self, pids)


def positions_per_iteration(kwargs) -> int:
    """Aligned pair positions one trip of the hot loop covers (for the static model)."""
    return int(kwargs["ROWS"]) * int(kwargs["BLOCK_J"]) * int(kwargs["BLOCK_T"])
