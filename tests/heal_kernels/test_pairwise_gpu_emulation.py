"""The Triton pair kernel's arithmetic as a CUDA GPU runs it, emulated in NumPy, against float64.

The interpreter runs the kernel's lanes in the kernel's order, but not its rounding: it evaluates
``a * b + c`` as two roundings where the GPU (``enable_fp_fusion``) issues one FMA, and it runs the
interpreter tiles, not the CUDA ones. This file recomputes, for the CUDA tile configuration
(``tri.TILES``: ``BLOCK_T`` lanes, ``KD`` / ``KR`` trips per float32 partial sum), every pair's sums
the way the compiled kernel does:

* the packing kernel's float32 ``e = f32(exp(f64(x) - max))``, float64 prefixes ``PE`` / ``PX``, ``EX``;
* the form the kernel picks per pair (run-length for ``n >= RL_NUM / RL_DEN m``, direct otherwise);
* direct: per lane float32 ``Z_S'`` (adds) and ``sum w (L - S')`` (one FMA per position), folded into
  float64 every ``KD`` trips;
* run-length: boundaries by the float32 index rule, lane ``k``'s segment ``[b_k, b_{k+1})`` (the last
  lane of a trip only lends its boundary), ``P = L``: ``x_S dPE`` in float64 FMAs, ``P = S'``: the
  segment's ``dPX`` rounded once to float32, ``fma(-c, x, .)`` then ``fma(e, ., acc)`` in float32;
  ``c e`` by FMA in float32; partials folded into float64 every ``KR`` trips;
* the per-pair formula in float64.

A float32 FMA is emulated exactly enough: the product of two float32 is exact in float64, the sum is
rounded to float64 and then to float32 (a double rounding that differs from the GPU's single one in
the last bit of rare terms, far below what is tested). Asserted: 1e-6 relative of float64 up to
65,536 tokens, and the EDA decision (general max > target max) equal to the C++ backend's on every
row whose float64 margin exceeds 1e-6.
"""

import numpy as np
import pytest
import torch

from heal_kernels import reference as ref
from heal_kernels.triton import pairwise as tri

CFG = tri.TILES  # the CUDA configuration (sm_80 / sm_90)


def f32(a):
    return np.asarray(a, dtype=np.float32)


def fma32(a, b, c):
    """float32 ``a * b + c`` with one rounding (emulated: exact product, float64 sum, to float32)."""
    return f32(np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64))


class Seq:
    """One sequence as the packing kernel leaves it."""

    def __init__(self, x):
        self.x = f32(x)
        self.n = self.x.size
        self.mx = np.float32(self.x.max())
        self.e = f32(np.exp(self.x.astype(np.float64) - np.float64(self.mx)))
        self.pe = np.concatenate([[0.0], np.cumsum(self.e.astype(np.float64))])
        self.px = np.concatenate([[0.0], np.cumsum(self.x.astype(np.float64))])
        self.z = self.pe[-1]
        self.ex = float(np.sum(self.e.astype(np.float64) * self.x.astype(np.float64)))


def lanes_fold(terms_a, terms_b, acc_fn, k_per_fold):
    """Per lane float32 accumulation over trips (``terms_*`` ``[trips, lanes]``, float32), folded into
    float64 every ``k_per_fold`` trips; returns the float64 sum over lanes of the folded sums."""
    trips, lanes = terms_a.shape
    k_per_fold = max(1, min(k_per_fold, trips))  # past the last trip: the final fold
    groups = -(-trips // k_per_fold)
    pad = groups * k_per_fold - trips
    ta = np.concatenate([terms_a, np.zeros((pad, lanes), np.float32)]).reshape(groups, k_per_fold, lanes)
    tb = np.concatenate([terms_b, np.zeros((pad, lanes), np.float32)]).reshape(groups, k_per_fold, lanes)
    acc = np.zeros((groups, lanes), np.float32)
    for k in range(k_per_fold):  # sequential inside a fold group, as the unrolled trips
        acc = acc_fn(ta[:, k], tb[:, k], acc)
    return float(np.sum(acc.astype(np.float64)))  # the float64 folds and the lane sum (order-free here)


def boundaries(m, n):
    """b_0 .. b_m by the float32 index rule: b_k = the first long position whose source is k."""
    scale = np.float32(np.float32(m) / np.float32(n))
    src = np.minimum(np.floor(f32(np.arange(n, dtype=np.float32) * scale)).astype(np.int64), m - 1)
    return np.searchsorted(src, np.arange(m + 1))


def direct_sums(s, l, case_long):
    """(a, Z_S') of the direct form: a = sum_t w (L - S'), w = e_L (P = L) or e_S' (P = S')."""
    m, n, T = s.n, l.n, CFG["BLOCK_T"]
    scale = np.float32(np.float32(m) / np.float32(n))
    t = np.arange(n)
    src = np.minimum(f32(t.astype(np.float32) * scale).astype(np.int64), m - 1)
    trips = -(-n // T)
    pad = trips * T - n

    def grid(v):
        return np.concatenate([f32(v), np.zeros(pad, np.float32)]).reshape(trips, T)

    es, d = s.e[src], f32(l.x - s.x[src])  # the subtraction rounds once
    w = l.e if case_long else es
    a = lanes_fold(grid(w), grid(d), fma32, CFG["KD"])
    zs = lanes_fold(grid(es), grid(np.ones(n, np.float32)), lambda u, one, acc: f32(acc + u), CFG["KD"])
    return a, zs


def runlength_sums(s, l, case_long):
    """(a, Z_S') of the run-length form, lanes and trips as the kernel's loops."""
    m, T = s.n, CFG["BLOCK_T"]
    step = T - 1
    b = boundaries(m, l.n)  # b_m = n
    trips = -(-(m + 1) // step)
    k = np.arange(trips)[:, None] * step + np.arange(T)[None, :]  # lane k's boundary / segment
    valid = k <= m
    kb = np.minimum(k, m)
    f = np.where(valid, (l.pe if case_long else l.px)[b[kb]], 0.0)
    tcm = b[kb].astype(np.float32)  # clamped at n beyond m, as the kernel's min
    nxt = np.minimum(np.arange(T) + 1, T - 1)  # the next lane (the last lane: itself)
    c = f32(tcm[:, nxt] - tcm)  # the segment's count (exact)
    df = f[:, nxt] - f  # float64
    seg = k < m
    x = np.where(seg, s.x[np.minimum(k, m - 1)], np.float32(0))
    e = np.where(seg, s.e[np.minimum(k, m - 1)], np.float32(0))
    zs = lanes_fold(c, e, fma32, CFG["KR"])
    if case_long:  # P = L: float64 FMAs, never folded
        acc = np.zeros(T)
        for tt in range(trips):
            acc = x[tt].astype(np.float64) * df[tt] + acc
        return l.ex - float(np.sum(acc)), zs
    y = fma32(-c, x, f32(df))  # the segment's dPX rounded once, then fma(-c, x, .)
    return lanes_fold(e, y, fma32, CFG["KR"]), zs


def pair_similarity(si, sj, short_first):
    """The kernel's ``-KL`` for row ``si`` scored against column ``sj`` (float64 result, like the
    float64 per-pair formula the kernel runs before its float32 store)."""
    p_is_row = si.n <= sj.n if short_first else True
    case_long = (si.n if p_is_row else sj.n) >= (sj.n if p_is_row else si.n)
    l_is_row = case_long == p_is_row
    lo, sh = (si, sj) if l_is_row else (sj, si)
    nl, ms = lo.n, sh.n
    rl = ms < nl and nl * tri.RL_DEN >= ms * tri.RL_NUM and nl < tri.RL_MAX_LEN
    a, zs = (runlength_sums if rl else direct_sums)(sh, lo, case_long)
    if ms == nl:
        zs = sh.z
    q = zs / lo.z
    lq = 0.0 if zs == lo.z else float(np.log(q))
    shift = float(np.float64(sh.mx) - np.float64(lo.mx)) + lq
    kl = a / lo.z + shift if case_long else -(a / lo.z) / q - shift
    return -kl


def pack(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    vals = [torch.rand(n, generator=g) ** 4 * 3 * (0.5 + torch.rand(1, generator=g)) for n in lengths]
    return vals


@pytest.mark.parametrize("lengths", [
    [65536, 40000, 31000, 4095, 17, 2],
    [65536, 65535, 32768, 40000, 13107, 1],  # m = n - 1, n = 2 m (direct); n = 5 m (run-length: 5 x 13107 =
    # 65535), m = 1
])
def test_cuda_arithmetic_agrees_with_float64_at_long_lengths(lengths):
    xs = pack(lengths, 7)
    seqs = [Seq(x.numpy()) for x in xs]
    worst = 0.0
    for short_first in (False, True):
        direction = "short_first" if short_first else "scored_first"
        for i in range(len(xs)):
            for j in range(len(xs)):
                if i == j:
                    continue
                exp = ref.kl_similarity(xs[i], xs[j], direction)
                got = pair_similarity(seqs[i], seqs[j], short_first)
                worst = max(worst, abs(got - exp) / abs(exp))
    assert worst <= 1e-6, worst


def test_emulation_is_the_kernels_form_choice_and_catches_float32_accumulation(monkeypatch):
    """The emulation can fail: with every pair forced to the direct form and one float32 partial sum
    over the whole sequence (no folding), the 40,000-token pair is off by more than 1e-6, as the kernel
    once was."""
    xs = pack([40000, 31000], 3)
    seqs = [Seq(x.numpy()) for x in xs]
    exp = ref.kl_similarity(xs[0], xs[1], "scored_first")
    assert abs(pair_similarity(seqs[0], seqs[1], False) - exp) <= 1e-6 * abs(exp)
    monkeypatch.setitem(CFG, "KD", 10**9)  # no fold: one float32 partial per lane
    monkeypatch.setitem(CFG, "BLOCK_T", 1)  # and one lane
    assert abs(pair_similarity(seqs[0], seqs[1], False) - exp) > 1e-6 * abs(exp)


def test_gpu_and_cpu_eda_decisions_agree_where_the_margin_is_real(cpu_ext):
    """On an EDA batch (lengths U[64, 3072]) the emulated CUDA similarities and the C++ backend's
    give the same reward decision (max over general neighbours > max over target neighbours) on every
    row whose float64 margin exceeds 1e-6."""
    from heal_kernels.ops import pairwise as pw

    g = torch.Generator().manual_seed(11)
    bsz = 14
    lengths = torch.randint(64, 3073, (bsz,), generator=g).tolist()
    xs = pack(lengths, 5)
    general = [k % 3 == 0 for k in range(bsz)]
    seqs = [Seq(x.numpy()) for x in xs]
    values = torch.cat(xs)
    cu = torch.tensor([0] + lengths).cumsum(0)
    cpu = pw.pairwise_similarity(values, cu, backend="cpu").double()
    checked = 0
    for i in range(bsz):
        if general[i]:
            continue
        gpu_row = {j: pair_similarity(seqs[i], seqs[j], False) for j in range(bsz) if j != i}
        f64_row = {j: ref.kl_similarity(xs[i], xs[j]) for j in gpu_row}
        for row, name in ((gpu_row, "gpu"), ({j: cpu[i, j].item() for j in gpu_row}, "cpu")):
            for j in row:
                assert abs(row[j] - f64_row[j]) <= 1e-6 * abs(f64_row[j]) + 1e-9, (name, i, j)
        best = {}
        for name, row in (("gpu", gpu_row), ("cpu", {j: cpu[i, j].item() for j in gpu_row}), ("f64", f64_row)):
            mg = max(v for j, v in row.items() if general[j])
            mt = max(v for j, v in row.items() if not general[j])
            best[name] = (mg > mt, mg - mt)
        if abs(best["f64"][1]) > 1e-6:
            checked += 1
            assert best["gpu"][0] == best["cpu"][0] == best["f64"][0], (i, best)
    assert checked >= 5
