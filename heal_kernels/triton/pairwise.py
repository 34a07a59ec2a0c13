"""Triton kernels for the all-pairs ``-KL`` entropy-dynamics similarity (CUDA; interpreter on CPU).

For a pair, with ``L`` the longer sequence (length ``n``), ``S'`` the shorter one (length ``m``)
stretched by ``src(t) = min(floor(f32(t) * (f32(m) / f32(n))), m - 1)`` and ``e = exp(x - M_seq)``
precomputed once per element:

* ``P = L``:  ``KL = sum_t e_L (L - S') / Z_L + (M_S - M_L) + log(Z_S' / Z_L)``
* ``P = S'``: ``KL = sum_t e_S' (S' - L) / Z_S' + (M_L - M_S) + log(Z_L / Z_S')``

A pair is computed once for both of its directions (P = L and P = S' share the boundaries, the
loads and ``Z_S'``). Two forms of the sums, chosen per pair (never per tile: a pair's result does not
depend on the pairs it shares a tile with):

* **run-length** (``m < n``, ``n >= 5 m``, ``n < 2^20``), ``O(m)`` per pair. ``src`` is
  non-decreasing, so ``seg(s) = {t : src(t) = s} = [b_s, b_{s+1})``. With the long side's float64
  prefix sums ``PE`` (of ``e``) and ``PX`` (of ``x``), stored together as 16-byte ``(PE, PX)``
  records, ``c_s = b_{s+1} - b_s``,
  ``dPE_s = PE[b_{s+1}] - PE[b_s]`` and ``dPX_s`` likewise: ``Z_S' = sum_s c_s e_S[s]``,
  ``sum_t e_L (L - S') = EX_L - sum_s x_S[s] dPE_s`` (``EX = sum e x`` per sequence) and
  ``sum_t e_S' (L - S') = sum_s e_S[s] (dPX_s - c_s x_S[s])``. Boundaries follow the float32 rule
  exactly, rounding included: ``b_s`` = the smallest ``t`` with ``fl32(f32(t) * scale) >= s``, from
  the estimate ``t~ = round(s * fl32(n fl32(1 / m)))`` (one FMA into ``2^23``: the float's bits hold
  the integer) and one exact check ``fma(t~ + 2^23, scale, -2^23 scale) < s -> t~ + 1`` (proof in
  :func:`_boundary`). Lane ``k`` of a ``BLOCK_T``-lane trip computes ``b_{s0+k}`` and gathers the
  record there: one 16-byte gather per short position; the segment's other end comes from lane
  ``k + 1`` by warp shuffles (``tl.gather`` along the lane axis), so a trip covers ``BLOCK_T - 1``
  segments.
* **direct** (``m == n``: identical sequences give exactly 0; ``n < 5 m``; long sides from
  ``2^20``): the aligned positions of both sides, the short side gathered at ``src(t)``. On sm_90 it
  costs 12.9 SASS instructions per aligned position against 29.7 per short position, both
  directions: the run-length form issues fewer instructions from ``n >= 2.3 m``, but each of its
  gathers touches its own 128-byte line where the direct form reads whole lines, and ``heal bench
  static`` predicts the EDA batch fastest under its pessimistic figure with the switch at
  ``n >= 5 m`` (0.77 ms on an H100, against 0.89 ms at ``n >= 2.3 m``; the nominal figure rises from
  0.63 to 0.67 ms).

Precision. The prefixes are float64 (``|error| <= n 2^-53 Z``); a segment's sum is their float64
difference. P = L accumulates ``x_S dPE`` in float64; the other sums take float32 terms (the
segment sum rounded once) summed in float32 over ``KD`` / ``KR`` trips, then folded into float64
(the fold points are fixed trip numbers, so tile composition never changes a result); lanes are
summed in float64 and the per-pair formula runs in float64 (``log`` from the exponent plus a
float32 ``logf`` of the mantissa, about 5e-8). At 40,000-65,536 tokens the result agrees with a
float64 evaluation to about 1.4e-7 relative (tests: 1e-6); the remaining error is the float32
terms' rounding, about ``2^-24 max|x|`` absolute (what limits nearly equal sequences).

Layout. Rows are length-sorted; program ``p`` scores ``ROWS`` length-adjacent rows, longest first;
it walks the columns in length order in tiles of ``BLOCK_J`` columns; a tile holds ``ROWS x
BLOCK_J`` pairs on its first axis and ``BLOCK_T`` lanes on consecutive positions on its second
(every 2-D load is one 8-byte load per lane: ``max_contiguous(., 1)`` keeps Triton from
vectorising, which would put two positions per thread and cost a shared-memory layout conversion
for every shuffle; the 16-byte record is one inline-PTX load, :func:`_load_record`). Consecutive
pairs form blocks of ``WARP_ROWS x WARP_COLS`` (one warp's on CUDA), so that a warp's loads of the
same row or column touch the same lines, and every sequence starts on a 128-byte line
(:data:`ALIGN`), so that a direct trip reads its long side from whole lines. When every sequence is
scored (``SYM``), a program runs only the column tiles at or below its rows in length order: each
unordered pair once, both directions written (the pair of a sequence with itself: once). Per tile,
each form present runs three loops: groups of ``KD`` / ``KR`` unmasked trips (unrolled), single
unmasked trips, masked trips. The indices and lengths of the
tile's pairs are loaded again after the loops (volatile loads: not merged) so that only three sums
per pair hold registers across them. The grouped variant writes one ``atomic_max`` per pair and
direction into an int32 ``[R, G]`` buffer of order-preserving keys (:func:`_key`; NaN the largest,
so NaN-sticky; -inf's key to start), decoded by :func:`keys_to_float`: a max is order-free, so the
result is deterministic; no ``[B, B]`` buffer. ``rows=(begin, end)`` scores only rows
``begin..end-1`` against every column (each pair's direction from the row, computed by the same
code): each row's values are bit-identical to the full call.

FP contraction is on (``enable_fp_fusion=True`` at launch): the accumulations are FMAs; the
boundary's two multiply-adds are explicit ``fma`` (the interpreter, whose ``fma`` rounds twice,
evaluates them exactly in float64 instead: the same results); the direct form's ``t * scale`` (no
addend) is a plain rounded multiply. Ratios of lengths are divided with correct rounding
(``div_rn``; the compile gate accepts no float division here but ``div.rn``, no ``rcp``, and checks
that every stretched index is a plain ``mul.f32`` / ``FMUL`` of the ``div.rn`` scale, then a
truncation).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from heal_kernels.triton._launch import launch

FP_FUSION = True  # passed at every launch
# int32 offsets: the (x, e) pairs take at most total + 15 B + 64 positions, the (PE, PX) records one more per
# sequence, and a record's first float64 (2 x its index) must stay below 2^31
MAX_TOTAL = 2**30 - 2**17
ALIGN = 16  # every sequence's (x, e) pairs start at a multiple of 16 positions: 128 bytes, one L1 line
ALIGNED = tl.constexpr(ALIGN)  # the same, for the kernels' alignment hints
MAGIC = tl.constexpr(8388608.0)  # 2^23: a float in [2^23, 2^24) holds an integer in its low mantissa bits
MAGIC_BITS = tl.constexpr(0x4B000000)  # the bits of 2^23
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")  # as triton.jit decides
RL_MAX_LEN = 2**20  # run-length form for long sides below this (the boundary check's proven range)
RL_NUM, RL_DEN = 5, 1  # run-length form where n >= 5 m: the static model's best pessimistic figure (heal bench static)
# the grouped output's keys (see _key): -inf's (0xFF800000 with the magnitude bits flipped), and NaN's
NEG_INF_KEY = tl.constexpr(-2139095041)
NAN_KEY = 0x7FFFFFFF


@triton.jit
def _unpack(v):
    """``(x, e)`` of int64 words holding two float32 (``x`` in the low half): bit casts, no arithmetic."""
    x = v.to(tl.int32).to(tl.float32, bitcast=True)
    e = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return x, e


@triton.jit
def _direct_step(s_ptrs, l_ptrs, zs, acc_l, acc_s, MASKED: tl.constexpr, valid):
    """One ``[P, T]`` block of aligned positions: gathers ``(x, e)`` of both sides (one 8-byte load
    each) and accumulates ``Z_S'``, ``sum e_L (L - S')`` (P = L) and ``sum e_S' (L - S')`` (P = S')."""
    if MASKED:
        vs = tl.load(s_ptrs, mask=valid, other=0)
        vl = tl.load(l_ptrs, mask=valid, other=0)
    else:
        vs = tl.load(s_ptrs)
        vl = tl.load(l_ptrs)
    xs, es = _unpack(vs)
    xl, el = _unpack(vl)
    d = xl - xs
    zs += es
    acc_l += el * d  # FMA
    acc_s += es * d  # FMA
    return zs, acc_l, acc_s


@triton.jit
def _fma(a, b, c):
    """``fl32(a * b + c)``, one rounding: the FFMA on a GPU; under the interpreter (whose ``fma`` is a
    rounded product plus a rounded sum) an exact float64 evaluation, so that both round alike. Exact
    in float64 when ``a * b + c`` needs at most 53 bits, as in :func:`_boundary`."""
    if INTERPRETED:
        return (a.to(tl.float64) * b.to(tl.float64) + c).to(tl.float32)  # c: float32 or a constant
    else:
        return tl.math.fma(a, b, c)


@triton.jit
def _boundary(sf, r, sig, nms):
    """``b_s + 2^23`` as a float32 (exact: an integer below ``2^24``): ``b_s`` is the smallest ``t``
    with ``fl32(f32(t) * sig) >= s``, i.e. the first long position whose stretched source is ``s``.

    ``sf = f32(s)``, ``sig = fl32(m / n)`` (correctly rounded), ``r = fl32(n * fl32(1 / m))`` (two
    roundings), ``nms = -sig 2^23`` (exact). With ``q = s n / m`` and ``u = 2^-24``: the estimate
    ``t~ = round(s * r)`` (one FMA into ``2^23``) has ``|t~ - q| <= 1/2 + 3 u q``; ``fl(t sig) >= s``
    holds for ``t >= q (1 + 2u)`` and fails for ``t < q (1 - 2u)`` (rounding is monotone), so
    ``b_s - t~`` lies in ``(-1/2 - 5uq, 3/2 + 5uq)``, i.e. is 0 or 1 while ``q < 2^20``. One exact
    check picks it: ``fl32(t~ sig) = fma(t~ + 2^23, sig, -2^23 sig)`` (the float ``tm`` holds
    ``t~ + 2^23``; ``tm sig - 2^23 sig = t~ sig`` exactly, at most 45 bits, rounded once)."""
    tm = _fma(sf, r, MAGIC)  # round(s * r) + 2^23
    pr = _fma(tm, sig, nms)  # fl32(t~ * sig): the index rule's product
    return tm + (pr < sf).to(tl.float32)


@triton.jit
def _load_record(ptr):
    """The float64 pair at ``ptr`` (16-byte aligned): one 16-byte load per lane on a GPU (inline PTX:
    a ``[P, T, 2]`` load splits into a layout of its own, and Triton then computes the addresses twice);
    two loads under the interpreter."""
    if INTERPRETED:
        return tl.load(ptr), tl.load(ptr + 1)
    else:
        return tl.inline_asm_elementwise("ld.global.v2.f64 {$0, $1}, [$2];", "=d,=d,l", [ptr],
                                         dtype=(tl.float64, tl.float64), is_pure=True, pack=1)


@triton.jit
def _rl_step(sf, soff, r, sig, nms, pbase, sbase, nxt, acc_l, acc_s, z, MASKED: tl.constexpr, svalid, n_m):
    """One trip of the run-length loop over ``[P, T]`` lanes: lane ``k`` takes boundary ``s0 + k``
    (``sf`` its float, ``soff`` its short position) and segment ``s0 + k`` (lane ``T - 1`` only lends
    its boundary: its neighbour is itself, so its ``c`` and ``dF`` are 0). Gathers the ``(PE, PX)``
    record at the boundary (one 16-byte load) and accumulates both directions: ``x_S dPE`` (P = L,
    float64) into ``acc_l``, ``e_S (dPX - c x_S)`` (P = S') into ``acc_s``, and ``c e_S`` into ``z``."""
    tcm = _boundary(sf[None, :], r[:, None], sig[:, None], nms[:, None])
    if MASKED:
        tcm = tl.minimum(tcm, n_m[:, None])  # b_m = n: every lane's record exists (no mask: see _rl_sums)
    # the record of the boundary b: the float's bits are b + MAGIC_BITS, a bias the base takes off; a 64-bit
    # offset (twice the bits does not fit 31 bits)
    fe, fx = _load_record(pbase[:, None] + tcm.to(tl.int32, bitcast=True).to(tl.int64) * 2)
    if MASKED:
        v = tl.load(sbase[:, None] + soff[None, :], mask=svalid, other=0)
    else:
        v = tl.load(sbase[:, None] + soff[None, :])
    fe2 = tl.gather(fe, nxt, axis=1)  # the next lane's prefixes: warp shuffles
    fx2 = tl.gather(fx, nxt, axis=1)
    t2 = tl.gather(tcm, nxt, axis=1)
    c = t2 - tcm  # the segment's length (exact)
    x, e = _unpack(v)
    acc_l += x.to(tl.float64) * (fe2 - fe)  # float64 FMA: the segment's sum is not rounded
    acc_s += e * ((fx2 - fx).to(tl.float32) - c * x)  # the segment's sum rounded once; FMA, then FMA
    z += c * e
    return acc_l, acc_s, z


@triton.jit
def _rl_sums(m_r, nr_max, nl, inv_m, l_pos, s_pos, pp_ptr, xe_ptr, offs_t, nxt, P: tl.constexpr,
             BLOCK_T: tl.constexpr, KR: tl.constexpr):
    """The run-length sums of the pairs with ``m_r > 0`` (their short length; 0 elsewhere), both
    directions at once (float64, per pair): ``sum_s x_S dPE_s`` (P = L), ``sum_s e_S (dPX_s - c_s x_S)``
    (P = S') and ``Z_S' = sum_s c_s e_S``. ``l_pos``: the long side's first ``(PE, PX)`` record in
    ``pp``; ``s_pos``: the short side's first position in ``xe``. Other pairs run with ``b_s = s`` on
    the first entries of the arrays and are dropped by the caller."""
    STEP: tl.constexpr = BLOCK_T - 1  # segments per trip
    sel = m_r > 0
    nr_min = tl.min(tl.where(sel, m_r, nr_max), axis=0)
    ms_f = tl.maximum(m_r, 1).to(tl.float32)
    nl_f = tl.where(sel, nl, 1).to(tl.float32)
    rr = nl_f * tl.where(sel, inv_m, 1.0)  # the estimate's ratio: fl(n fl(1 / m))
    sg = tl.math.div_rn(ms_f, nl_f)  # the index rule's scale, correctly rounded
    nms = sg * -MAGIC  # exact
    # the boundary's float bits are b + MAGIC_BITS: the bias is taken off the base once
    pbase = pp_ptr + 2 * (tl.where(sel, l_pos, 0) - MAGIC_BITS).to(tl.int64)
    sbase = xe_ptr + tl.where(sel, s_pos, 0)
    tf0 = offs_t.to(tl.float32)
    # -0.0, not 0.0: constants of their own (CSE would share the direct loop's, and their layout).
    # P = L accumulates its terms in float64 (never folded); P = S' and Z in float32, folded
    acc_l = tl.full([P, BLOCK_T], -0.0, tl.float64)
    acc_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
    z_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
    acc_o = tl.full([P, BLOCK_T], -0.0, tl.float64)
    z_o = tl.full([P, BLOCK_T], -0.0, tl.float64)
    # unmasked trips: every boundary below m for every pair (b <= n - 1): groups of KR (unrolled), then
    # single trips; the trip's first position is carried as scalars (loop-carried tensors could take
    # another loop's layout). Partial sums are folded at trips KR - 1, 2 KR - 1, ... in all three loops
    # (a pair's sums do not depend on its tile).
    full = (nr_min - 1) // STEP
    groups = full // KR
    s0 = 0
    s0f = 0.0
    for _ in range(0, groups):
        sg0 = tf0 + s0f  # the group's first boundaries; each trip's are STEP more (integers: exact)
        for _k in tl.static_range(KR):
            acc_l, acc_i, z_i = _rl_step(sg0 + _k * STEP, tl.max_contiguous(offs_t + s0, 1), rr, sg, nms, pbase,
                                         sbase, nxt, acc_l, acc_i, z_i, False, None, None)
            s0 += STEP
        s0f += KR * STEP
        acc_o += acc_i.to(tl.float64)
        acc_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
        z_o += z_i.to(tl.float64)
        z_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
    for tt in range(groups * KR, full):
        acc_l, acc_i, z_i = _rl_step(tf0 + s0f, tl.max_contiguous(offs_t + s0, 1), rr, sg, nms, pbase, sbase,
                                     nxt, acc_l, acc_i, z_i, False, None, None)
        s0 += STEP
        s0f += STEP
        if tt % KR == KR - 1:
            acc_o += acc_i.to(tl.float64)
            acc_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
            z_o += z_i.to(tl.float64)
            z_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
    # the ragged end: the short side's loads masked; the boundaries clamped to b_m = n, so every lane reads
    # a record of its long side (k > m: record n, whose differences with its neighbour's are 0, times the
    # masked x_S = e_S = 0)
    n_m = nl_f + MAGIC
    for tt in range(full, tl.cdiv(nr_max, STEP)):
        k = tt * STEP + offs_t
        svalid = k[None, :] < m_r[:, None]
        acc_l, acc_i, z_i = _rl_step(k.to(tl.float32), tl.max_contiguous(k, 1), rr, sg, nms, pbase, sbase, nxt,
                                     acc_l, acc_i, z_i, True, svalid, n_m)
        if tt % KR == KR - 1:
            acc_o += acc_i.to(tl.float64)
            acc_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
            z_o += z_i.to(tl.float64)
            z_i = tl.full([P, BLOCK_T], -0.0, tl.float32)
    acc_o += acc_i.to(tl.float64)
    z_o += z_i.to(tl.float64)
    return tl.sum(acc_l, axis=1), tl.sum(acc_o, axis=1), tl.sum(z_o, axis=1)


@triton.jit
def _direct_sums(dr, nl_d, nd_max, ms, start_l, start_s, xe_ptr, offs_t, P: tl.constexpr, BLOCK_T: tl.constexpr,
                 KD: tl.constexpr, CLAMP_SRC: tl.constexpr):
    """The direct sums of the pairs ``dr`` (``nl_d``: their long length, 0 elsewhere), both directions
    at once (float64, per pair): ``sum_t e_L (L - S')`` (P = L), ``sum_t e_S' (L - S')`` (P = S') and
    ``Z_S' = sum_t e_S(src(t))``. Other pairs read the first positions of ``xe`` (scale 1,
    ``src = t``) and are dropped by the caller."""
    nd_min = tl.min(tl.where(dr, nl_d, nd_max), axis=0)
    ms_c = tl.maximum(tl.where(dr, ms, 0), 1)
    scale = tl.math.div_rn(ms_c.to(tl.float32), tl.maximum(nl_d, 1).to(tl.float32))  # correctly rounded
    # every sequence starts at a multiple of ALIGN positions (see pack_launch_spec)
    base_l = xe_ptr + tl.multiple_of(tl.where(dr, start_l, 0), ALIGNED)
    base_s = xe_ptr + tl.where(dr, start_s, 0)
    full = nd_min // BLOCK_T  # unmasked trips every direct pair has
    groups = full // KD
    zs_i = tl.zeros([P, BLOCK_T], tl.float32)
    al_i = tl.zeros([P, BLOCK_T], tl.float32)
    as_i = tl.zeros([P, BLOCK_T], tl.float32)
    zs_o = tl.zeros([P, BLOCK_T], tl.float64)
    al_o = tl.zeros([P, BLOCK_T], tl.float64)
    as_o = tl.zeros([P, BLOCK_T], tl.float64)
    # groups of KD unmasked trips (unrolled), single unmasked trips, masked trips; partial sums folded at
    # trips KD - 1, 2 KD - 1, ... in all three loops. The trip's first position is carried as scalars
    # (t exact in float32 below 2^24); one 8-byte load per lane (max_contiguous 1: the run-length loops
    # need the lanes on consecutive positions, and one layout for the kernel saves shared-memory
    # conversions)
    tf0 = offs_t.to(tl.float32)
    t0 = 0
    t0f = 0.0
    for _ in range(0, groups):
        tg0 = tf0 + t0f  # the group's first positions; each trip's are BLOCK_T more (integers: exact)
        for _k in tl.static_range(KD):
            src = ((tg0 + _k * BLOCK_T)[None, :] * scale[:, None]).to(tl.int32)  # trunc = floor (>= 0)
            if CLAMP_SRC:  # the rule's min(., m - 1): a no-op while every length is below 2^22 (CLAMP_FREE_TOTAL)
                src = tl.minimum(src, ms_c[:, None] - 1)
            l_off = tl.max_contiguous(offs_t + t0, 1)
            zs_i, al_i, as_i = _direct_step(base_s[:, None] + src, base_l[:, None] + l_off[None, :], zs_i, al_i, as_i,
                                            False, None)
            t0 += BLOCK_T
        t0f += KD * BLOCK_T
        zs_o += zs_i.to(tl.float64)
        al_o += al_i.to(tl.float64)
        as_o += as_i.to(tl.float64)
        zs_i = tl.zeros([P, BLOCK_T], tl.float32)
        al_i = tl.zeros([P, BLOCK_T], tl.float32)
        as_i = tl.zeros([P, BLOCK_T], tl.float32)
    for tt in range(groups * KD, full):
        src = ((tf0 + t0f)[None, :] * scale[:, None]).to(tl.int32)
        if CLAMP_SRC:
            src = tl.minimum(src, ms_c[:, None] - 1)
        l_off = tl.max_contiguous(offs_t + t0, 1)
        zs_i, al_i, as_i = _direct_step(base_s[:, None] + src, base_l[:, None] + l_off[None, :], zs_i, al_i, as_i, False,
                                        None)
        t0 += BLOCK_T
        t0f += BLOCK_T
        if tt % KD == KD - 1:
            zs_o += zs_i.to(tl.float64)
            al_o += al_i.to(tl.float64)
            as_o += as_i.to(tl.float64)
            zs_i = tl.zeros([P, BLOCK_T], tl.float32)
            al_i = tl.zeros([P, BLOCK_T], tl.float32)
            as_i = tl.zeros([P, BLOCK_T], tl.float32)
    for t0 in range(full * BLOCK_T, nd_max, BLOCK_T):  # the ragged end, masked
        t = t0 + offs_t
        valid = t[None, :] < nl_d[:, None]
        src = tl.minimum((t.to(tl.float32)[None, :] * scale[:, None]).to(tl.int32), ms_c[:, None] - 1)
        zs_i, al_i, as_i = _direct_step(base_s[:, None] + src, base_l[:, None] + tl.max_contiguous(t, 1)[None, :], zs_i,
                                        al_i, as_i, True, valid)
        if (t0 // BLOCK_T) % KD == KD - 1:
            zs_o += zs_i.to(tl.float64)
            al_o += al_i.to(tl.float64)
            as_o += as_i.to(tl.float64)
            zs_i = tl.zeros([P, BLOCK_T], tl.float32)
            al_i = tl.zeros([P, BLOCK_T], tl.float32)
            as_i = tl.zeros([P, BLOCK_T], tl.float32)
    zs_o += zs_i.to(tl.float64)
    al_o += al_i.to(tl.float64)
    as_o += as_i.to(tl.float64)
    return tl.sum(al_o, axis=1), tl.sum(as_o, axis=1), tl.sum(zs_o, axis=1)


@triton.jit
def _log64(q):
    """``log(q)`` of a positive normal float64 to about ``5e-8`` absolute, without libdevice's float64
    log: ``q = 2^k f`` (``f`` in ``[0.75, 1.5)``) from the bits, ``k ln 2`` in float64, ``log f`` in
    float32 (libdevice's ``logf``, 1 ulp) plus the first-order term of ``f``'s rounding to float32,
    ``d / f ~ d (2 - f)`` (``|d| <= 2^-25 f``; ``1 / f`` to 25%: ``1e-8``)."""
    qb = q.to(tl.int64, bitcast=True)
    k = ((qb >> 52) & 0x7FF) - 1023
    f = ((qb & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)  # [1, 2)
    big = f > 1.5
    f = tl.where(big, f * 0.5, f)
    k = tl.where(big, k + 1, k)
    f32 = f.to(tl.float32)
    f32d = f32.to(tl.float64)
    return k.to(tl.float64) * 0.6931471805599453 + tl.log(f32).to(tl.float64) + (f - f32d) * (2.0 - f)


@triton.jit
def _recip64(q):
    """``1 / q`` for a positive float64 in float32's range: a correctly rounded float32 seed, then one
    Newton step in float64 (relative error about ``2^-46``)."""
    r = tl.math.div_rn(1.0, q.to(tl.float32)).to(tl.float64)
    return r + r * (1.0 - q * r)


@triton.jit
def _pair(rorder_ptr, order_ptr, lens_ptr, rpos, rmask, jpos, jmask, VOLATILE: tl.constexpr):
    """A tile's pairs: row ``i``, column ``j``, their lengths, ``ok`` (both non-empty), ``l_is_row``
    (the row is L: the longer side, the row on ties), the long and short lengths."""
    i = tl.load(rorder_ptr + tl.where(rmask, rpos, 0), volatile=VOLATILE)
    j = tl.load(order_ptr + jpos, mask=jmask, other=0, volatile=VOLATILE)
    m_i = tl.where(rmask, tl.load(lens_ptr + i, volatile=VOLATILE), 0)
    m_j = tl.where(jmask, tl.load(lens_ptr + j, volatile=VOLATILE), 0)
    ok = (m_i > 0) & (m_j > 0)
    l_is_row = m_i >= m_j
    return i, j, m_i, m_j, ok, l_is_row, tl.where(l_is_row, m_i, m_j), tl.where(l_is_row, m_j, m_i)


@triton.jit
def _neg_kl(p_is_row, i, j, l_is_row, ms, nl, a_l, a_s, zs, mx_ptr, z_ptr, iz_ptr):
    """``-KL`` of one direction of each pair (float32; the per-pair formula in float64), the side
    ``P`` weighting it given by ``p_is_row``. With ``q = Z_S' / Z_L``:
    P = L:  ``KL = a / Z_L + (M_S - M_L) + log q``;
    P = S': ``KL = -a / Z_S' - ((M_S - M_L) + log q)``, ``1 / Z_S' = (1 / Z_L) (1 / q)``.
    On equal lengths P is taken as L (``a = -a_s`` when P is the pair's S: the exact negation of the
    sum computed from P's side), so each direction is bit for bit what a kernel scoring that row alone
    computes."""
    p_is_l = p_is_row == l_is_row
    tie = ms == nl
    case_long = p_is_l | tie
    a = tl.where(p_is_l, a_l, tl.where(tie, -a_s, a_s))
    l_row = tl.where(tie, p_is_row, l_is_row)  # whether the side taken as L is the row
    l_idx = tl.where(l_row, i, j)
    s_idx = tl.where(l_row, j, i)
    z_l = tl.load(z_ptr + l_idx)
    iz_l = tl.load(iz_ptr + l_idx)
    z_s = tl.where(tie, tl.load(z_ptr + s_idx), zs)  # not stretched: Z_S itself
    q = z_s * iz_l
    lq = tl.where(z_s == z_l, 0.0, _log64(q))  # equal sums: log 1 = 0 exactly (identical sequences give 0)
    shift = (tl.load(mx_ptr + s_idx) - tl.load(mx_ptr + l_idx)).to(tl.float64) + lq
    kl = tl.where(case_long, a * iz_l + shift, -(a * iz_l) * _recip64(q) - shift)
    return (-kl).to(tl.float32)


@triton.jit
def _key(sim):
    """Order-preserving int32 key of a float32 (``atomic_max`` on keys is a float max): the bits for
    a non-negative float, the bits with the magnitude flipped for a negative one; NaN (any sign) the
    largest key (NaN-sticky; it decodes as a NaN)."""
    b = sim.to(tl.int32, bitcast=True)
    k = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return tl.where(sim != sim, 0x7FFFFFFF, k)


@triton.jit
def _kl_pairs_kernel(
    xe_ptr,  # int64 [total + 15 B + 64]: (x, e) float32 pairs, x in the low half, sequences 128-byte aligned
    pp_ptr,  # float64 [total + 16 B + 64, 2]: per sequence b, record starts[b] + b + k = (PE, PX)[k] (k = 0..n),
    # PE[k] = sum_{t<k} e, PX[k] = sum_{t<k} x
    starts_ptr,  # int32 [B]
    lens_ptr,  # int32 [B]
    mx_ptr,  # float32 [B], max of each sequence
    z_ptr,  # float64 [B], sum e of each sequence (= its last PE)
    iz_ptr,  # float64 [B], 1 / z (1 for empty sequences)
    ex_ptr,  # float64 [B], sum e x of each sequence
    im_ptr,  # float32 [B], 1 / n, correctly rounded (1 for empty sequences)
    order_ptr,  # int32 [B], sequences sorted by length (ascending): the columns
    rorder_ptr,  # int32 [R], the scored rows sorted by length (ascending; = order when SYM)
    groups_ptr,  # int32 [B]
    pid_ptr,  # int64 [B] (unused unless HAS_PID)
    out_ptr,  # float32 [B, B] (FULL) or int32 [R, G] keys (see _key), the key of -inf to start
    B,
    R,
    ROW0,  # first scored row (rows = ROW0 .. ROW0 + R - 1; the output's row index is i - ROW0)
    G,
    SHORT_FIRST: tl.constexpr,
    FULL: tl.constexpr,
    SYM: tl.constexpr,  # every sequence is scored: each unordered pair once, both directions written
    EXCLUDE_SELF: tl.constexpr,
    HAS_PID: tl.constexpr,
    CLAMP_SRC: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WARP_ROWS: tl.constexpr,  # the pairs of a block of 32 // BLOCK_T (one warp on CUDA): WARP_ROWS rows x
    WARP_COLS: tl.constexpr,  # WARP_COLS columns, so that their loads share lines
    KD: tl.constexpr,  # direct loop: trips per float32 partial sum
    KR: tl.constexpr,  # run-length loop: trips per float32 partial sum
    RL_NUM: tl.constexpr,
    RL_DEN: tl.constexpr,
    RL_MAX: tl.constexpr,
    SECTIONS: tl.constexpr = 3,  # which loops are compiled (1 direct, 2 run-length): both, but for the
    # static model's builds that measure each section's share of the per-tile code
):
    P: tl.constexpr = ROWS * BLOCK_J
    pair = tl.arange(0, P)
    # row and column slot of each pair: consecutive pairs (one warp's on CUDA) form blocks of WARP_ROWS
    # rows x WARP_COLS columns; the blocks run along the columns, then the rows
    WB: tl.constexpr = WARP_ROWS * WARP_COLS
    blk = pair // WB
    r_of = (blk // (BLOCK_J // WARP_COLS)) * WARP_ROWS + (pair % WB) // WARP_COLS
    j_of = (blk % (BLOCK_J // WARP_COLS)) * WARP_COLS + pair % WARP_COLS
    # rows: length order descending, ROWS per program, longest programs first; program axis 1 takes
    # every SPLIT-th column tile. SYM: only the columns at or below the row in length order (the pair
    # (row, column) when the column comes first, both directions; the pair with itself, the row's)
    group = tl.program_id(0)
    split = tl.program_id(1)
    rpos = R - 1 - (group * ROWS + r_of)
    rmask = rpos >= 0
    offs_t = tl.arange(0, BLOCK_T)
    nxt = tl.broadcast_to(tl.minimum(offs_t + 1, BLOCK_T - 1)[None, :], [P, BLOCK_T])
    if SYM:
        j_end = R - group * ROWS  # past the program's highest row position
    else:
        j_end = B
    for j0 in range(split * BLOCK_J, j_end, SPLIT * BLOCK_J):
        jpos = j0 + j_of
        jmask = jpos < B
        if SYM:
            vis = jpos <= rpos
        else:
            vis = jmask
        # the pair's indices and lengths are loaded before the loops and again after them (volatile:
        # not merged), so that nothing per pair but the three sums holds registers across the loops
        i, j, m_i, m_j, ok, l_is_row, nl, ms = _pair(rorder_ptr, order_ptr, lens_ptr, rpos, rmask, jpos, jmask, False)
        ok = ok & vis
        start_i = tl.load(starts_ptr + i)
        start_j = tl.load(starts_ptr + j)
        start_l = tl.where(l_is_row, start_i, start_j)
        start_s = tl.where(l_is_row, start_j, start_i)
        l_idx = tl.where(l_is_row, i, j)
        s_idx = tl.where(l_is_row, j, i)
        # the form of each pair (see the module docstring); its sums, float64, both directions:
        # a_l = sum_t e_L (L - S'), a_s = sum_t e_S' (L - S'), zs = Z_S'
        rl = ok & (ms < nl) & (nl * RL_DEN >= ms * RL_NUM) & (nl < RL_MAX)
        dr = ok & (rl == 0)
        a_l = tl.zeros([P], tl.float64)
        a_s = tl.zeros([P], tl.float64)
        zs = tl.zeros([P], tl.float64)
        nl_d = tl.where(dr, nl, 0)
        nd_max = tl.max(nl_d, axis=0)
        if (SECTIONS & 1) and nd_max > 0:
            acc_l, acc_s, z = _direct_sums(dr, nl_d, nd_max, ms, start_l, start_s, xe_ptr, offs_t, P, BLOCK_T, KD,
                                           CLAMP_SRC)
            a_l = tl.where(dr, acc_l, a_l)
            a_s = tl.where(dr, acc_s, a_s)
            zs = tl.where(dr, z, zs)
        # run-length: a_l = EX_L - sum x_S dPE, a_s = sum e_S (dPX - c x_S)
        m_r = tl.where(rl, ms, 0)
        nr_max = tl.max(m_r, axis=0)
        if (SECTIONS & 2) and nr_max > 0:
            acc_l, acc_s, z = _rl_sums(m_r, nr_max, nl, tl.load(im_ptr + s_idx), start_l + l_idx, start_s, pp_ptr,
                                       xe_ptr, offs_t, nxt, P, BLOCK_T, KR)
            a_l = tl.where(rl, tl.load(ex_ptr + l_idx) - acc_l, a_l)
            a_s = tl.where(rl, acc_s, a_s)
            zs = tl.where(rl, z, zs)

        # ---- per pair, once per tile (float64), from reloaded indices: the row's direction and (SYM)
        # the column's
        i, j, m_i, m_j, ok, l_is_row, nl, ms = _pair(rorder_ptr, order_ptr, lens_ptr, rpos, rmask, jpos, jmask, True)
        if SHORT_FIRST:  # P = the shorter side (the row on ties)
            p_row = m_i <= m_j
            p_col = m_j <= m_i
        else:  # P = the scored side
            p_row = m_i >= 0  # all true
            p_col = p_row
        sim_r = _neg_kl(p_row, i, j, l_is_row, ms, nl, a_l, a_s, zs, mx_ptr, z_ptr, iz_ptr)
        live = vis & rmask
        both = live & (jpos < rpos)  # SYM: the column's direction too (not for the pair with itself)
        if SYM:
            sim_c = _neg_kl(p_col == 0, i, j, l_is_row, ms, nl, a_l, a_s, zs, mx_ptr, z_ptr, iz_ptr)
        if FULL:
            tl.store(out_ptr + i.to(tl.int64) * B + j, tl.where(ok, sim_r, float("nan")), mask=live)
            if SYM:
                tl.store(out_ptr + j.to(tl.int64) * B + i, tl.where(ok, sim_c, float("nan")), mask=both)
        else:
            elig = ok & live
            if EXCLUDE_SELF:
                elig = elig & (j != i)
            if HAS_PID:
                elig = elig & (tl.load(pid_ptr + j) != tl.load(pid_ptr + i))
            # one atomic max per pair and direction on the scored sequence's key of the neighbour's group
            # (order-free, so deterministic): the row's, and (SYM) the column's
            tl.atomic_max(out_ptr + ((i - ROW0) * G + tl.load(groups_ptr + j)), _key(sim_r), mask=elig,
                          sem="relaxed")
            if SYM:
                both = elig & both
                tl.atomic_max(out_ptr + (j * G + tl.load(groups_ptr + i)), _key(sim_c), mask=both, sem="relaxed")


# CUDA: 16 warps, 8 lanes per pair on consecutive positions, so a warp holds 4 pairs: 2 rows x 2 columns
# (WARP_ROWS x WARP_COLS), whose loads of the same row (direct form) or column (run-length form) are the
# same lines; 64 pairs per 8 x 8 tile (the per-pair code of a tile runs once per warp for 4 pairs); one
# program per SM: ``maxnreg`` = the 128 registers of 512 threads. KD / KR trips per float32 partial sum
# (the unrolled main loops; at KR = 8 Triton 3.9's sm_90 code spills 40 bytes, and KR = 4 costs the batch
# nothing the static model sees). SPLIT = 8 column splits: finer programs, better balance (static model).
TILES = dict(ROWS=8, SPLIT=8, BLOCK_J=8, BLOCK_T=8, WARP_ROWS=2, WARP_COLS=2, KD=8, KR=4, num_warps=16, maxnreg=128)
TILES_SM100 = dict(TILES)
# small: quick, still every path (several fold groups, masked and unmasked trips)
TILES_INTERPRETED = dict(ROWS=2, SPLIT=2, BLOCK_J=4, BLOCK_T=8, WARP_ROWS=2, WARP_COLS=2, KD=2, KR=2, num_warps=1)
# min(floor(t * f32(m / n)), m - 1) needs no min while n < 2^22: t <= n - 1 and f32(m / n) <= (m / n)(1 + 2^-24)
# keep the rounded product below m - m / n + m 2^-23 < m. The total length bounds every length (no sync).
CLAMP_FREE_TOTAL = 2**22


def tiles_for_arch(arch: int) -> dict:
    """The CUDA tile configuration for ``sm_<arch>`` (one for sm_80 and sm_90, one for sm_100; the
    AOT list groups architectures by it)."""
    return TILES_SM100 if arch >= 100 else TILES


def _blocks(device: torch.device, arch=None):
    """Tile sizes and warps for ``device`` (the interpreter on CPU tensors; ``arch`` or the CUDA
    device's compute capability picks the CUDA configuration)."""
    if device.type == "cuda":
        if arch is None:
            major, minor = torch.cuda.get_device_capability(device)
            arch = 10 * major + minor
        cfg = dict(tiles_for_arch(arch))
    else:
        cfg = dict(TILES_INTERPRETED)
    return cfg


@triton.jit
def _pack_kernel(
    values_ptr,  # float32 [total], the packed batch
    cu_ptr,  # int64 [B + 1]
    starts_ptr,  # int32 [B], each sequence's (aligned) start in xe
    xe_ptr,  # float32 view of the int64 [size] (x, e) pairs, zeros
    pp_ptr,  # float64 [psize, 2] out: (PE, PX) records, the prefix sums of e and x, sequence b's from
    # record starts[b] + b (n + 1 records)
    mx_ptr,  # float32 [B] out: max of each sequence (0 when empty; NaN when it holds a NaN or infinity)
    zsum_ptr,  # float32 [B] out: sum of e over each sequence
    z_ptr,  # float64 [B] out: sum of e over each sequence (its last PE)
    iz_ptr,  # float64 [B] out: 1 / z (1 for an empty sequence)
    ex_ptr,  # float64 [B] out: sum of e x over each sequence
    im_ptr,  # float32 [B] out: 1 / n, correctly rounded (1 for an empty sequence)
    BLOCK: tl.constexpr,
):
    """One program per sequence: ``mx = max x``, ``e = f32(exp(f64(x) - mx))`` (as the CPU paths'
    ``seq_stats``; ``mx`` is stored as NaN for a sequence holding a NaN or infinity, which makes its
    pairs NaN), the ``(x, e)`` pairs written at the sequence's (aligned) start, the float64 prefix
    sums of ``e`` and ``x`` (``PE[0] = 0``, ``PE[n] = Z``; a block scan plus a carry: a fixed order per
    sequence, so identical sequences get identical sums), ``Z`` and ``EX = sum e x`` in float64."""
    b = tl.program_id(0)
    src0 = tl.load(cu_ptr + b)
    n = (tl.load(cu_ptr + b + 1) - src0).to(tl.int32)
    st = tl.load(starts_ptr + b)
    dst = xe_ptr + 2 * st.to(tl.int64)
    pbase = (st + b).to(tl.int64)
    src = values_ptr + src0
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for k0 in range(0, n, BLOCK):
        k = k0 + offs
        m = tl.maximum(m, tl.load(src + k, mask=k < n, other=float("-inf")))
    mx = tl.max(m, axis=0)
    mx = tl.where(n > 0, mx, 0.0)
    rec = pp_ptr + 2 * pbase  # the sequence's first (PE, PX) record
    tl.store(rec, 0.0)
    tl.store(rec + 1, 0.0)
    rec += 2
    ce = tl.zeros([BLOCK], tl.float64)  # running prefix at each lane; the carry is its last lane
    cx = tl.zeros([BLOCK], tl.float64)
    ex = tl.zeros([BLOCK], tl.float64)
    last = offs == BLOCK - 1
    for k0 in range(0, n, BLOCK):
        k = k0 + offs
        inb = k < n
        x = tl.load(src + k, mask=inb, other=0.0)
        e = tl.where(inb, tl.exp(x.to(tl.float64) - mx.to(tl.float64)).to(tl.float32), 0.0)
        tl.store(dst + 2 * k, x, mask=inb)
        tl.store(dst + 2 * k + 1, e, mask=inb)
        e64 = e.to(tl.float64)
        x64 = x.to(tl.float64)
        ce = tl.cumsum(e64, axis=0) + tl.sum(tl.where(last, ce, 0.0), axis=0)
        cx = tl.cumsum(x64, axis=0) + tl.sum(tl.where(last, cx, 0.0), axis=0)
        tl.store(rec + 2 * k, ce, mask=inb)
        tl.store(rec + 2 * k + 1, cx, mask=inb)
        ex += e64 * x64  # exact products (24 + 24 bits)
    z = tl.sum(tl.where(last, ce, 0.0), axis=0)  # = PE[n]: masked lanes add 0
    # a sequence holding a NaN or an infinity: its float64 sum of x (PX[n]) is not finite (a sum of
    # finite float32 values cannot overflow float64), and a NaN max poisons every pair of it (the pair
    # kernel's shift M_S - M_L): NaN, as on the CPU backends, whatever the GPU's max.f32 made of the
    # values above (no per-element flag: it cost registers, and a spill under Triton 3.9)
    sx = tl.sum(tl.where(last, cx, 0.0), axis=0)
    tl.store(mx_ptr + b, tl.where((sx == sx) & (tl.abs(sx) < float("inf")), mx, float("nan")))
    tl.store(zsum_ptr + b, z.to(tl.float32))
    tl.store(z_ptr + b, z)
    tl.store(iz_ptr + b, 1.0 / tl.where(n > 0, z, 1.0))
    tl.store(ex_ptr + b, tl.sum(ex, axis=0))
    tl.store(im_ptr + b, tl.math.div_rn(1.0, tl.maximum(n, 1).to(tl.float32)))


PACK = dict(BLOCK=512, num_warps=4)  # CUDA: lengths of hundreds to thousands of tokens
PACK_INTERPRETED = dict(BLOCK=8, num_warps=1)  # small: several trips per sequence in the tests


def pack_launch_spec(values, cu, interpreted=None):
    """``(kernel, grid, args, kwargs, packed)`` of the packing launch (shared with :mod:`.aot`).

    ``values`` float32 ``[total]``, ``cu`` int64 ``[B + 1]`` (validated). ``packed`` holds the pair
    kernel's per-sequence inputs, filled by the launch: ``xe`` (each position's ``(x, e)`` float32
    pair as one int64, ``x`` in the low half, every sequence starting at a multiple of :data:`ALIGN`
    positions with zeros up to the next one, so that a trip of the pair kernel's direct loop reads
    the long side from whole 128-byte lines), ``pp`` (float64 ``[psize, 2]``: the ``(PE, PX)``
    prefix-sum records, sequence ``b``'s ``n + 1`` from record ``starts[b] + b``; ``pe`` / ``px`` are
    its two columns, as views), ``starts``, ``lens`` (int32), ``mx``, ``zsum`` (float32), ``z``,
    ``ex`` (float64). No host synchronisation."""
    bsz = cu.numel() - 1
    total = values.numel()
    size = total + (ALIGN - 1) * bsz + 64  # aligned starts pad each sequence by at most 15; zeros after the end
    psize = size + bsz  # one more record per sequence (PE[n], PX[n])
    if psize >= MAX_TOTAL:
        raise ValueError(f"the packed batch has {total} values; the Triton kernel takes fewer than "
                         f"{MAX_TOTAL - ALIGN * bsz - 64} for {bsz} sequences")
    dev = values.device
    if interpreted is None:
        interpreted = dev.type != "cuda"
    lens = (cu[1:] - cu[:-1]).to(torch.int32)
    span = (lens + (ALIGN - 1)) & -ALIGN  # each sequence's length rounded up to a multiple of ALIGN
    starts = torch.cumsum(span, 0, dtype=torch.int32) - span
    xe = torch.zeros(size, dtype=torch.int64, device=dev)
    pp = torch.zeros((psize, 2), dtype=torch.float64, device=dev)
    mx = torch.empty(bsz, dtype=torch.float32, device=dev)
    zsum = torch.empty(bsz, dtype=torch.float32, device=dev)
    z = torch.empty(bsz, dtype=torch.float64, device=dev)
    iz = torch.empty(bsz, dtype=torch.float64, device=dev)
    ex = torch.empty(bsz, dtype=torch.float64, device=dev)
    im = torch.empty(bsz, dtype=torch.float32, device=dev)
    cfg = PACK_INTERPRETED if interpreted else PACK
    args = (values, cu, starts, xe.view(torch.float32), pp, mx, zsum, z, iz, ex, im)
    kwargs = dict(BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION)
    return _pack_kernel, (bsz,), args, kwargs, dict(xe=xe, pp=pp, pe=pp[:, 0], px=pp[:, 1], starts=starts,
                                                  lens=lens, mx=mx, zsum=zsum, z=z, iz=iz, ex=ex, im=im, total=total,
                                                  cu=cu)


def launch_spec(packed, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None, device=None,
                arch=None, rows=None):
    """``(kernel, grid, args, kwargs, out)`` of the pair kernel's launch on ``packed`` (from
    :func:`pack_launch_spec`; shared with :mod:`.aot`); ``device`` and ``arch`` override what picks
    the tile sizes (the AOT list passes ``cuda`` and an SM version); ``rows`` (grouped only):
    ``None`` or ``(begin, end)``, the scored rows."""
    lens = packed["lens"]
    bsz = lens.numel()
    dev = lens.device
    order = torch.argsort(lens, stable=True).to(torch.int32)
    if rows is None:
        row0, nrows, rorder = 0, bsz, order
    else:
        if full:
            raise ValueError("rows applies to the grouped op only")
        row0, row1 = int(rows[0]), int(rows[1])
        if not 0 <= row0 <= row1 <= bsz:
            raise ValueError(f"rows must satisfy 0 <= begin <= end <= B={bsz}, got {rows}")
        nrows = row1 - row0
        rorder = (row0 + torch.argsort(lens[row0:row1], stable=True)).to(torch.int32)
    cfg = _blocks(device or dev, arch)
    split = cfg["SPLIT"]  # column splits: finer programs, less load imbalance (disjoint columns)
    if full:
        out = torch.empty((bsz, bsz), dtype=torch.float32, device=dev)
        groups32 = lens  # any int32 [B]: never read (FULL)
    else:
        out = torch.full((nrows, num_groups), NEG_INF_KEY.value, dtype=torch.int32, device=dev)
        groups32 = groups.to(torch.int32)
    pid_t = pids if pids is not None else packed["cu"]  # any int64 tensor: never read without HAS_PID
    args = (packed["xe"], packed["pp"], packed["starts"], lens, packed["mx"], packed["z"], packed["iz"],
            packed["ex"], packed["im"], order, rorder, groups32, pid_t, out, bsz, nrows, row0, num_groups)
    kwargs = dict(
        SHORT_FIRST=bool(short_first),
        FULL=bool(full),
        SYM=rows is None,
        EXCLUDE_SELF=bool(exclude_self),
        HAS_PID=pids is not None,
        CLAMP_SRC=packed["total"] >= CLAMP_FREE_TOTAL,
        ROWS=cfg["ROWS"],
        SPLIT=split,
        BLOCK_J=cfg["BLOCK_J"],
        BLOCK_T=cfg["BLOCK_T"],
        WARP_ROWS=cfg.get("WARP_ROWS", 1),
        WARP_COLS=cfg.get("WARP_COLS", 1),
        KD=cfg["KD"],
        KR=cfg["KR"],
        RL_NUM=RL_NUM,
        RL_DEN=RL_DEN,
        RL_MAX=RL_MAX_LEN,
        num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}),
        num_stages=1,
        enable_fp_fusion=FP_FUSION,
    )
    return _kl_pairs_kernel, (triton.cdiv(nrows, cfg["ROWS"]), split), args, kwargs, out


def keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Float32 values of the grouped kernel's int32 keys (see ``_key``): the inverse map; the NaN key
    decodes to a NaN."""
    bits = torch.where(keys < 0, keys ^ NAN_KEY, keys)
    return bits.view(torch.float32)


def launches(values, cu, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None, rows=None):
    """The op's two launches ``[(kernel, grid, args, kwargs)]`` (packing, then the pairs) and the
    pair kernel's output buffer."""
    pk, pgrid, pargs, pkw, packed = pack_launch_spec(values, cu)
    kernel, grid, args, kwargs, out = launch_spec(packed, short_first, full, groups, num_groups, exclude_self, pids,
                                                  rows=rows)
    return [(pk, pgrid, pargs, pkw), (kernel, grid, args, kwargs)], out


def _launch(values, cu, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None, rows=None):
    specs, out = launches(values, cu, short_first, full, groups, num_groups, exclude_self, pids, rows)
    for spec in specs:
        if spec[1][0] > 0:  # rows=(b, b): no program
            launch(*spec)
    return out if full else keys_to_float(out)


def pairwise_kl(values, cu, short_first: bool) -> torch.Tensor:
    """Float32 ``[B, B]`` of ``-KL`` (row scored), NaN where a side is empty. ``values`` float32
    ``[total]``, ``cu`` int64 ``[B + 1]`` (validated)."""
    return _launch(values, cu, short_first, True)


def grouped_max_kl(values, cu, short_first: bool, groups, num_groups: int, exclude_self: bool, pids,
                   rows=None) -> torch.Tensor:
    """Float32 ``[B, num_groups]`` (``[end - begin, num_groups]`` with ``rows=(begin, end)``): per
    scored row the max of ``-KL`` over each group's eligible columns (every sequence is a column).
    A row's values are bit-identical whatever ``rows`` is."""
    return _launch(values, cu, short_first, False, groups, num_groups, exclude_self, pids, rows)


def positions_per_iteration(kwargs) -> int:
    """Aligned pair positions one trip of the direct loop covers (for the static model)."""
    return int(kwargs["ROWS"]) * int(kwargs["BLOCK_J"]) * int(kwargs["BLOCK_T"])


def segments_per_iteration(kwargs) -> int:
    """Short positions (segments) one trip of the run-length loop covers (for the static model)."""
    return int(kwargs["ROWS"]) * int(kwargs["BLOCK_J"]) * (int(kwargs["BLOCK_T"]) - 1)

