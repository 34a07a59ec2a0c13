"""The Triton pair kernel's run-length form (heal_kernels.triton.pairwise), through the interpreter.

* segment boundaries: the kernel's float32 boundary rule (estimate + one exact check) against brute
  force over the float32 index rule, for many (m, n) up to 65,536 (an emulation of the GPU's fused
  multiply-adds, and the kernel's own ``_boundary`` run by the interpreter);
* accuracy: float64 agreement to 1e-6 relative at 40,000 and 65,536 tokens (float64 prefixes, float64
  folding of the float32 partial sums);
* ``rows=(begin, end)``: every row bit-identical to the full call;
* both forms (run-length P = L and P = S', direct) and their three loops against the reference.
"""

import math
import os

import pytest
import torch

from heal_kernels import reference as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU tensors through the interpreter")

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    from heal_kernels.triton import pairwise as tri

    @triton.jit
    def _boundaries_kernel(sf_ptr, out_ptr, m, n, N: tl.constexpr):
        """``b_s + 2^23`` for the ``N`` positions ``s`` at ``sf_ptr``: the pair kernel's own helper,
        with its per-pair ``r``, ``scale`` and ``-scale 2^23`` computed as the kernel computes them."""
        offs = tl.arange(0, N)
        sf = tl.load(sf_ptr + offs)
        ms_f = m.to(tl.float32)
        nl_f = n.to(tl.float32)
        rr = nl_f * tl.math.div_rn(1.0, ms_f)
        sg = tl.math.div_rn(ms_f, nl_f)
        tl.store(out_ptr + offs, tri._boundary(sf, rr, sg, sg * -tri.MAGIC))

    @triton.jit
    def _keys_kernel(x_ptr, out_ptr, N: tl.constexpr):
        """The grouped kernel's int32 keys of ``N`` floats."""
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, tri._key(tl.load(x_ptr + offs)))


def pack(lengths, dist="uniform", seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    if dist == "uniform":
        values = torch.rand(total, generator=g) * 4
    else:
        values = torch.empty(total).exponential_(generator=g) * 2
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return values, cu


# ---------------------------------------------------------------------------------------------
# segment boundaries
# ---------------------------------------------------------------------------------------------


def brute_boundaries(m: int, n: int) -> torch.Tensor:
    """``b_s`` for ``s = 0..m - 1``: the first long position whose float32-rule source is ``s``."""
    src = ref.nearest_indices(m, n)
    return torch.searchsorted(src, torch.arange(m, dtype=torch.int64))


def _f32(x):
    return x.to(torch.float32)


def rule_boundaries(m: int, n: int, s: torch.Tensor) -> torch.Tensor:
    """The kernel's rule (``_boundary``) for positions ``s``: both multiply-adds emulated exactly
    (float64 products of float32 values are exact here, then one rounding), as the GPU's FFMA and the
    interpreter's path compute them."""
    m32, n32 = torch.tensor(float(m), dtype=torch.float32), torch.tensor(float(n), dtype=torch.float32)
    r = _f32(n32 * (torch.tensor(1.0, dtype=torch.float32) / m32))  # fl(n fl(1 / m))
    sig = m32 / n32  # correctly rounded
    nms = sig * -8388608.0
    sf = s.to(torch.float32)
    tm = _f32(sf.double() * r.double() + 8388608.0)
    pr = _f32(tm.double() * sig.double() + nms.double())
    return (tm + (pr < sf).to(torch.float32)).to(torch.int64) - 8388608


def exact_integer_boundaries(m: int, n: int, s: torch.Tensor) -> torch.Tensor:
    """``ceil(s n / m)``: the boundaries of the exact integer rule ``floor(t m / n)`` (not torch's)."""
    return (s * n + m - 1) // m


def boundary_cases():
    g = torch.Generator().manual_seed(7)
    cases = {(m, n) for n in range(2, 130) for m in range(1, n)}  # every small pair
    for n in (4095, 4096, 4099, 31000, 40000, 65535, 65536):
        cases |= {(1, n), (2, n), (n - 1, n), (n // 2, n), ((2 * n) // 3, n), (n // 3 + 1, n)}
    for _ in range(200):
        n = int(torch.randint(2, 65537, (1,), generator=g))
        cases.add((int(torch.randint(1, n, (1,), generator=g)), n))
    return sorted(cases)


def test_boundaries_follow_the_float32_rule_exactly():
    """The estimate-and-check rule gives exactly torch's float32 boundaries, rounding included, for
    every pair up to n = 129 and ~250 pairs up to 65,536 (m = 1, m = n - 1, ratios around 1.5); the
    exact integer rule differs on some of them (the check can fail)."""
    integer_differs = 0
    for m, n in boundary_cases():
        s = torch.arange(m, dtype=torch.int64)
        expected = brute_boundaries(m, n)
        got = rule_boundaries(m, n, s)
        assert torch.equal(got, expected), (m, n, int((got != expected).nonzero()[0, 0]))
        integer_differs += int(not torch.equal(exact_integer_boundaries(m, n, s), expected))
    assert integer_differs > 0


@pytest.mark.parametrize("m, n", [(1, 7), (3, 5), (2, 3), (1333, 4099), (2047, 4001), (3001, 4096), (40000, 65536),
                                  (65535, 65536), (1, 65536), (43690, 65536)])
def test_kernel_boundary_helper_matches_brute_force(m, n):
    """The kernel's ``_boundary`` itself (interpreter) on every position of the pair."""
    size = triton.next_power_of_2(m)
    sf = torch.zeros(size, dtype=torch.float32)
    sf[:m] = torch.arange(m, dtype=torch.float32)
    out = torch.empty(size, dtype=torch.float32)
    _boundaries_kernel[(1,)](sf, out, m, n, N=size)
    got = out[:m].to(torch.int64) - 8388608
    assert torch.equal(got, brute_boundaries(m, n))


# ---------------------------------------------------------------------------------------------
# accuracy at long lengths
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def big_tiles(monkeypatch):
    """Interpreter tiles wide enough for 65,536-token pairs in seconds (the arithmetic is the CUDA
    kernel's: only the block sizes differ)."""
    monkeypatch.setattr(tri, "TILES_INTERPRETED", dict(ROWS=2, SPLIT=1, BLOCK_J=2, BLOCK_T=256, KD=4, KR=4,
                                                       num_warps=1))
    monkeypatch.setattr(tri, "PACK_INTERPRETED", dict(BLOCK=4096, num_warps=1))


def rel_err(out, expected):
    off = ~torch.eye(expected.shape[0], dtype=torch.bool)
    return float(((out.double() - expected).abs() / expected.abs())[off].max())


@pytest.mark.parametrize("lengths, dist", [
    ([40000, 40000, 31000, 4095, 17, 2], "uniform"),  # float32 accumulation was 1e-5 off here
    ([65536, 65535, 32768, 40000, 13107, 1], "exponential"),  # m = n - 1, n = 2 m (direct); n = 5 m (run-length:
    # 5 x 13107 = 65535), m = 1
])
def test_long_sequences_agree_with_float64(lengths, dist, big_tiles):
    values, cu = pack(lengths, dist)
    for short_first in (False, True):
        expected = ref.pairwise_similarity(values, cu, kl_direction="short_first" if short_first else "scored_first")
        out = tri.pairwise_kl(values, cu, short_first)
        assert rel_err(out, expected) <= 1e-6, rel_err(out, expected)
        assert bool((out.diagonal() == 0).all())  # a sequence against itself: exactly 0


def test_identical_long_sequences_give_exactly_zero(big_tiles):
    values, cu = pack([40000, 40000, 26000])
    values[40000:80000] = values[:40000]
    out = tri.pairwise_kl(values, cu, False)
    assert out[0, 1].item() == 0.0 and out[1, 0].item() == 0.0
    assert out[0, 2].item() < -1e-4


def test_prefix_sums_are_float64():
    """The packing kernel's prefixes: float64 sums of the float32 e and x, n + 1 entries per sequence
    from starts + b, PE[n] = Z."""
    lengths = [3, 0, 1, 20, 7]
    values, cu = pack(lengths)
    from heal_kernels.triton import _launch
    from heal_kernels.ops import pairwise as pw

    kernel, grid, args, kwargs, p = tri.pack_launch_spec(values, cu)
    _launch.launch(kernel, grid, args, kwargs)
    st = pw.seq_stats(values, cu)
    for b, n in enumerate(lengths):
        s0, p0 = int(cu[b]), int(p["starts"][b]) + b
        e = st.e[s0:s0 + n].double()
        x = values[s0:s0 + n].double()
        zero = torch.zeros(1, dtype=torch.float64)
        torch.testing.assert_close(p["pe"][p0:p0 + n + 1], torch.cat([zero, e.cumsum(0)]), rtol=1e-15, atol=0)
        torch.testing.assert_close(p["px"][p0:p0 + n + 1], torch.cat([zero, x.cumsum(0)]), rtol=1e-15, atol=0)
        if n:
            assert p["z"][b].item() == p["pe"][p0 + n].item()
            torch.testing.assert_close(p["ex"][b], (e * x).sum(), rtol=1e-15, atol=0)
            assert p["im"][b].item() == (torch.tensor(1.0) / torch.tensor(float(n))).item()


# ---------------------------------------------------------------------------------------------
# forms, loops, rows
# ---------------------------------------------------------------------------------------------


# absolute slack for near-zero similarities: float32 terms round at about 2^-24 of |x| Z (KL itself is
# computed in float64 from them); the other backends' tests allow 1e-6
TINY = 1e-6

# interpreter tiles: 2 x 4 pairs, 8 lanes (7 segments a run-length trip), partial sums of 2 trips:
# lengths from 1 to 160 give every form several unrolled groups, single trips and masked trips (run-length
# from n >= 5 m: 160 against 32 runs two groups of two trips)
FORMS = [1, 2, 3, 5, 8, 9, 12, 13, 18, 27, 32, 40, 41, 60, 61, 90, 160, 0, 40]


def test_forms_match_reference():
    values, cu = pack(FORMS, "exponential", seed=3)
    lens = torch.tensor(FORMS)
    L = torch.maximum(lens[:, None], lens[None, :])
    S = torch.minimum(lens[:, None], lens[None, :])
    ok = S > 0
    rl = ok & (S < L) & (L * tri.RL_DEN >= S * tri.RL_NUM)
    assert bool(rl.any()) and bool((ok & ~rl & (S < L)).any()) and bool((ok & (S == L)).any())
    assert int(torch.where(rl, S, 0).max()) - 1 >= 2 * 2 * 7  # a run-length pair with two groups of two trips
    for short_first in (False, True):
        expected = ref.pairwise_similarity(values, cu, kl_direction="short_first" if short_first else "scored_first")
        out = tri.pairwise_kl(values, cu, short_first)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=TINY, equal_nan=True)


def test_pairs_where_the_float32_rule_is_not_the_integer_rule():
    """Lengths whose float32 index rule differs from floor(t m / n) at some position (26 of 44, 14 of
    46, 2 of 82, ...): a boundary one position off moves a whole element between segments, far more
    than the tolerance."""
    lengths = [26, 44, 14, 46, 2, 82, 6, 74, 54, 76]
    for m, n in ((26, 44), (14, 46), (2, 82), (6, 74), (54, 76)):
        assert not torch.equal(ref.nearest_indices(m, n), torch.arange(n) * m // n)
    values, cu = pack(lengths, seed=11)
    for short_first in (False, True):
        expected = ref.pairwise_similarity(values, cu, kl_direction="short_first" if short_first else "scored_first")
        torch.testing.assert_close(tri.pairwise_kl(values, cu, short_first).double(), expected, rtol=1e-6, atol=TINY)


@pytest.mark.parametrize("short_first", [False, True])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_rows_are_bit_identical_to_the_full_call(short_first, exclude_self):
    lengths = [5, 0, 9, 3, 12, 7, 40, 61, 13, 27, 26, 1, 90, 8]
    values, cu = pack(lengths, seed=5)
    bsz = len(lengths)
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 3, (bsz,), generator=g)
    pids = torch.randint(0, 4, (bsz,), generator=g)
    for p in (None, pids):
        full = tri.grouped_max_kl(values, cu, short_first, groups, 3, exclude_self, p)
        assert full.shape == (bsz, 3)
        for begin, end in [(0, 1), (3, 9), (7, bsz), (2, 2)]:
            sub = tri.grouped_max_kl(values, cu, short_first, groups, 3, exclude_self, p, rows=(begin, end))
            assert sub.shape == (end - begin, 3)
            assert torch.equal(sub, full[begin:end]), (begin, end)
        expected = ref.grouped_max_similarity(values, cu, groups, 3, exclude_self=exclude_self, prompt_ids=p,
                                              kl_direction="short_first" if short_first else "scored_first")
        torch.testing.assert_close(full.double(), expected, rtol=1e-6, atol=TINY)


def test_keys_order_as_floats_and_nan_is_the_largest():
    """The grouped output is an atomic max over int32 keys: every two floats order as their keys
    (``-inf`` lowest, ``-0.0`` below ``0.0``), a NaN of either sign gets the largest key, and
    ``keys_to_float`` gives back every non-NaN float's bits (and a NaN for the NaN key); the buffer's
    initial key is ``-inf``'s."""
    special = [float("-inf"), -3.5e38, -2.0, -1e-40, -0.0, 0.0, 1e-40, 1e-30, 2.0, 3.5e38, float("inf")]
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(special), torch.randn(64 - len(special) - 2, generator=g) * 10])
    x = torch.cat([x, torch.tensor([float("nan")]), -torch.tensor([float("nan")])]).to(torch.float32)
    keys = torch.empty(64, dtype=torch.int32)
    _keys_kernel[(1,)](x, keys, N=64)
    finite = ~x.isnan()
    xf, kf = x[finite].double(), keys[finite].long()
    lt = xf[:, None] < xf[None, :]
    assert bool((kf[:, None] < kf[None, :])[lt].all())
    assert bool((keys[~finite] == tri.NAN_KEY).all()) and int(keys[finite].max()) < tri.NAN_KEY
    back = tri.keys_to_float(keys)
    assert torch.equal(back[finite].view(torch.int32), x[finite].view(torch.int32))
    assert bool(back[~finite].isnan().all())
    init = torch.full((1,), tri.NEG_INF_KEY.value, dtype=torch.int32)
    assert tri.keys_to_float(init).item() == float("-inf") and int(init) == int(keys[0])


def test_rows_argument_is_checked():
    values, cu = pack([3, 4, 5])
    groups = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="rows"):
        tri.grouped_max_kl(values, cu, False, groups, 1, True, None, rows=(2, 5))
    with pytest.raises(ValueError, match="rows"):
        tri.launch_spec(tri.pack_launch_spec(values, cu)[4], False, True, rows=(0, 1))


def test_loop_structure_is_read_from_the_sass():
    """The static model reads six loops (three per form) from the compiled kernel; the reading
    refuses other shapes (a record then fails the compile gate)."""
    from heal_kernels.triton import aot

    lines = []
    addr = 0

    def emit(op, pred=""):
        nonlocal addr
        lines.append(f"        /*{addr:04x}*/      {pred} {op} ;")
        addr += 0x10

    def loop(ops, masked=False):
        start = addr
        for op in ops:
            emit(op)
        if masked:
            emit("LDG.E.64 R4, desc[UR4][R2.64]", "@P1")
        emit(f"BRA 0x{start:x}", "@P0")

    tile = addr
    emit("IMAD R0, R1, R2, R3")
    for form in aot.PAIRWISE_FORMS:
        body = ["FFMA R1, R2, R3, R4", "LDG.E.64 R4, desc[UR4][R2.64]"]
        if form != "direct":
            body.append("SHFL.IDX PT, R5, R6, R7, 0x1f")
        loop(body * 4)
        loop(body)
        loop(body, masked=True)
    emit("IADD3 R0, R0, 0x1, RZ")
    emit(f"BRA 0x{tile:x}", "@P2")
    emit("EXIT")
    got = aot.pairwise_loops(aot.parse_sass("\n".join(lines)))
    assert set(aot.PAIRWISE_LOOPS) <= set(got) and got["tile_code"] == 3
    assert got["rl_main"]["mix"]["shfl"] == 4 and got["direct_tail"]["instructions"] == 4
    # a form without its masked loop is not this kernel
    bad = [ln for ln in lines if "@P1" not in ln]
    assert set(aot.PAIRWISE_LOOPS) - set(aot.pairwise_loops(aot.parse_sass("\n".join(bad))))


def test_empty_and_single_token_pairs():
    values, cu = pack([0, 1, 1, 2, 0, 3])
    out = tri.pairwise_kl(values, cu, False)
    expected = ref.pairwise_similarity(values, cu)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=TINY, equal_nan=True)
    assert not math.isnan(out[1, 2].item())
