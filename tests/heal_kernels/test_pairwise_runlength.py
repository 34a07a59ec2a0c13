"""The run-length form of the C++ pairwise KL kernel (``csrc/pairwise.cpp``) against brute force and
the float64 reference.

* segment boundaries: the kernel's own code (vector and scalar), through its ``boundaries`` test entry,
  against the float32 index rule applied to every position;
* ``grouped`` / ``pairwise`` against :mod:`heal_kernels.reference` at 1e-6 relative, up to 65,536
  tokens, both KL directions, prompt ids, ``exclude_self``, empty and length-1 sequences;
* row ranges and thread counts: bit-identical rows;
* identical sequences: exactly 0.
"""

import math

import pytest
import torch

from heal_kernels import reference as ref
from heal_kernels.ops import pairwise as pw

DIRECTIONS = ["scored_first", "short_first"]
RTOL, ATOL = 1e-6, 1e-9
LONG = [65536, 40000, 31000, 4095, 17, 2]


def pack(lengths, gen, dist="uniform"):
    lengths = list(lengths)
    total = sum(lengths)
    if dist == "uniform":
        values = torch.rand(total, generator=gen) * 4
    else:  # entropy-like: mostly low, a few spikes
        values = torch.rand(total, generator=gen) ** 4 * 3
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        cu[1:] = torch.tensor(lengths).cumsum(0)
    return values, cu


def close(out, expected):
    torch.testing.assert_close(out.double(), expected.double(), rtol=RTOL, atol=ATOL, equal_nan=True)


def brute_boundaries(m: int, n: int) -> torch.Tensor:
    """b_k = the first t with src(t) >= k (b_m = n), src by the float32 rule at every position."""
    scale = torch.tensor(m, dtype=torch.float32) / torch.tensor(n, dtype=torch.float32)
    src = torch.clamp(torch.floor(torch.arange(n, dtype=torch.float32) * scale).to(torch.int64), max=m - 1)
    assert torch.equal(src, ref.nearest_indices(m, n))
    return torch.searchsorted(src, torch.arange(m + 1))


def kernel_boundaries(ext, m: int, n: int, scalar: bool):
    out = torch.full((m + 1,), -1, dtype=torch.int32)
    flagged = ext.boundaries(m, n, out.data_ptr(), scalar)
    return out.to(torch.int64), flagged


def boundary_cases():
    g = torch.Generator().manual_seed(20240607)
    cases = [(1, 2), (1, 3), (2, 3), (1, 65536), (2, 65536), (65535, 65536), (32768, 65536), (4095, 4096),
             (4097, 65536), (3, 65535), (1333, 4099), (2047, 4001), (3001, 4096), (21845, 65536), (43690, 65535)]
    for n in torch.randint(2, 65537, (120,), generator=g).tolist():
        cases.append((int(torch.randint(1, n, (1,), generator=g)), n))
    for n in torch.randint(2, 65537, (30,), generator=g).tolist():
        cases.append((n - 1, n))  # m = n - 1
        cases.append((max(1, n - int(torch.randint(2, 50, (1,), generator=g))), n))  # m near n
    for n in torch.randint(64, 3073, (60,), generator=g).tolist():  # the benchmark's lengths
        cases.append((int(torch.randint(1, n, (1,), generator=g)), n))
    return cases


def test_boundaries_match_float32_rule(cpu_ext):
    """Every boundary of the kernel (vector path and scalar rule) equals brute force over all t; the
    cases include ones where float32 rounding moves a boundary off the exact-integer position (and the
    kernel's rare exact-product test runs)."""
    flagged = 0
    differs_from_integer = 0
    for m, n in boundary_cases():
        expected = brute_boundaries(m, n)
        assert int(expected[0]) == 0 and int(expected[m]) == n
        for scalar in (False, True):
            got, f = kernel_boundaries(cpu_ext, m, n, scalar)
            bad = torch.nonzero(got != expected).flatten()
            assert bad.numel() == 0, (m, n, scalar, bad[:5].tolist(), got[bad[:5]].tolist(), expected[bad[:5]].tolist())
            if not scalar:
                flagged += f
        k = torch.arange(m + 1, dtype=torch.int64)
        integer_rule = torch.minimum((k * n + m - 1) // m, torch.tensor(n))  # ceil(k n / m): floor(t m / n)
        differs_from_integer += int((integer_rule != expected).any())
    if cpu_ext.simd():
        assert flagged > 0  # the exact float32 test ran
    assert differs_from_integer > 0  # the float32 rule matters here


def test_boundaries_rejects_out_of_range(cpu_ext):
    out = torch.zeros(8, dtype=torch.int32)
    for m, n in ((0, 5), (5, 5), (6, 5), (1, 1 << 22)):
        with pytest.raises(ValueError):
            cpu_ext.boundaries(m, n, out.data_ptr(), False)


def _groups_pids(bsz, gen):
    groups = torch.randint(0, 3, (bsz,), generator=gen)
    groups[groups == 2] = 0  # group 2 stays empty: -inf column
    pids = torch.randint(0, 3, (bsz,), generator=gen)
    return groups, pids


@pytest.mark.parametrize("kl_direction", DIRECTIONS)
@pytest.mark.parametrize("lengths", [LONG, LONG[::-1] + [0, 1, 1]], ids=["long", "long_rev_empty_ones"])
def test_long_sequences_match_reference(cpu_ext, lengths, kl_direction):
    """Lengths up to 65,536 (float64 prefix sums at 1e-6 relative), float32 index rule included."""
    g = torch.Generator().manual_seed(len(lengths) + (kl_direction == "short_first"))
    values, cu = pack(lengths, g, dist="entropy")
    expected = ref.pairwise_similarity(values, cu, kl_direction=kl_direction)
    out = pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend="cpu")
    assert out.dtype == torch.float32
    close(out, expected)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    groups, pids = _groups_pids(len(lengths), g)
    for exclude_self in (True, False):
        for prompt_ids in (None, pids):
            exp_g = ref.grouped_max_similarity(values, cu, groups, 3, exclude_self=exclude_self, prompt_ids=prompt_ids,
                                               kl_direction=kl_direction)
            got = pw.grouped_max_similarity(values, cu, groups, 3, exclude_self=exclude_self, prompt_ids=prompt_ids,
                                            kl_direction=kl_direction, backend="cpu")
            assert torch.equal(torch.isinf(got), torch.isinf(exp_g))
            close(got, exp_g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_match_reference(cpu_ext, seed):
    """Random ragged batches (equal lengths, divisors, empties, ones) in both directions, with prompt ids."""
    g = torch.Generator().manual_seed(100 + seed)
    bsz = 14
    lengths = torch.randint(0, 400, (bsz,), generator=g)
    lengths[:3] = torch.tensor([0, 1, 1])[torch.randperm(3, generator=g)]
    lengths[3] = lengths[4]  # one pair of equal lengths (direct form)
    lengths[5] = 2 * lengths[6] + 2
    lengths = lengths.tolist()
    values, cu = pack(lengths, g, dist="uniform" if seed % 2 else "entropy")
    groups, pids = _groups_pids(bsz, g)
    for kl_direction in DIRECTIONS:
        expected = ref.pairwise_similarity(values, cu, kl_direction=kl_direction)
        full = pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend="cpu")
        close(full, expected)
        for exclude_self in (True, False):
            for prompt_ids in (None, pids):
                exp_g = ref.grouped_max_similarity(values, cu, groups, 3, exclude_self=exclude_self,
                                                   prompt_ids=prompt_ids, kl_direction=kl_direction)
                got = pw.grouped_max_similarity(values, cu, groups, 3, exclude_self=exclude_self,
                                                prompt_ids=prompt_ids, kl_direction=kl_direction, backend="cpu")
                close(got, exp_g)
                # the grouped op is the row max of the matrix's eligible entries, bit for bit
                ok = ~torch.isnan(full)
                if exclude_self:
                    ok &= ~torch.eye(bsz, dtype=torch.bool)
                if prompt_ids is not None:
                    ok &= prompt_ids.unsqueeze(1) != prompt_ids.unsqueeze(0)
                masked = torch.where(ok, full, torch.full_like(full, -math.inf))
                for grp in range(3):
                    cols = masked[:, groups == grp]
                    exp_col = cols.max(dim=1).values if cols.shape[1] else torch.full((bsz,), -math.inf)
                    exp_col = torch.where(torch.tensor(lengths) == 0, torch.full_like(exp_col, -math.inf), exp_col)
                    assert torch.equal(got[:, grp], exp_col)


def test_direct_form_beyond_run_length_range(cpu_ext):
    """A sequence of 2^22 + 3 tokens (past the boundary rule's proven range) takes the direct form."""
    g = torch.Generator().manual_seed(7)
    lengths = [(1 << 22) + 3, 3001, 1]
    values, cu = pack(lengths, g, dist="entropy")
    seqs = ref.split_ragged(values, cu)
    out = pw.pairwise_similarity(values, cu, backend="cpu")
    for i in range(3):
        for j in range(3):
            if i != j and max(lengths[i], lengths[j]) > 4000:
                exp = ref.kl_similarity(seqs[i], seqs[j])
                assert out[i, j].item() == pytest.approx(exp, rel=RTOL, abs=ATOL), (i, j)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 tensor's bit patterns (bit-identical, NaN and -0.0 included)."""
    return t.contiguous().view(torch.int32)


def _stats(values, cu):
    st = pw.seq_stats(values.to(torch.float32).contiguous(), cu.to(torch.int64).contiguous())
    return st


@pytest.mark.parametrize("short_first", [False, True])
def test_rows_and_threads_are_bit_identical(cpu_ext, short_first):
    """Every row range, with 1, 2 or 3 threads, gives exactly the full call's rows."""
    g = torch.Generator().manual_seed(11)
    bsz = 45
    lengths = torch.randint(1, 900, (bsz,), generator=g)
    lengths[7] = 0
    lengths[9] = lengths[10]
    values, cu = pack(lengths.tolist(), g, dist="entropy")
    st = _stats(values, cu)
    groups = (torch.rand(bsz, generator=g) < 0.3).to(torch.int64)
    pids = torch.arange(bsz, dtype=torch.int64) // 4
    for exclude_self, p in ((True, None), (False, pids), (True, pids)):
        args = (groups, 2, exclude_self, p)
        full = pw._run_cpu_ext(cpu_ext, st, short_first, args, 1)
        assert full.shape == (bsz, 2)
        for threads in (1, 2, 3):
            assert torch.equal(bits(pw._run_cpu_ext(cpu_ext, st, short_first, args, threads)), bits(full))
            for begin, end in ((0, 1), (0, bsz), (3, 17), (16, 17), (20, bsz), (bsz - 1, bsz), (5, 5)):
                part = pw._run_cpu_ext(cpu_ext, st, short_first, args, threads, (begin, end))
                assert part.shape == (end - begin, 2)
                assert torch.equal(bits(part), bits(full[begin:end])), (threads, begin, end)
    # the matrix, too, whatever the thread count
    mat = pw._run_cpu_ext(cpu_ext, st, short_first, False, 1)
    for threads in (2, 3):
        assert torch.equal(bits(pw._run_cpu_ext(cpu_ext, st, short_first, False, threads)), bits(mat))


def test_identical_sequences_give_exactly_zero(cpu_ext):
    g = torch.Generator().manual_seed(5)
    base = [1, 2, 9, 257, 5000, 65536]
    lengths = [n for n in base for _ in range(2)]  # each length twice, the copies identical
    values, cu = pack(lengths, g, dist="entropy")
    for k in range(0, len(lengths), 2):
        values[cu[k + 1] : cu[k + 2]] = values[cu[k] : cu[k + 1]]
    for kl_direction in DIRECTIONS:
        out = pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend="cpu")
        for k in range(0, len(lengths), 2):
            for i, j in ((k, k + 1), (k + 1, k), (k, k), (k + 1, k + 1)):
                assert out[i, j].item() == 0.0, (lengths[k], i, j, out[i, j].item())
        assert (out[0, 2:] < 0).all()  # different sequences are not
        # self-similarity through the grouped op: one group per pair of copies, self included
        groups = torch.arange(len(lengths)) // 2
        got = pw.grouped_max_similarity(values, cu, groups, len(base), exclude_self=False,
                                        kl_direction=kl_direction, backend="cpu")
        for k in range(len(lengths)):
            assert got[k, k // 2].item() == 0.0


@pytest.mark.parametrize("short_first", [False, True])
def test_columns_of_one_length_share_boundaries_bit_for_bit(cpu_ext, short_first):
    """Columns of equal length are computed as a group (shared segment boundaries, up to 4 at a time):
    every pair's value equals that of the same pair in a batch of just those two sequences, bit for bit,
    and the float64 reference at 1e-6."""
    g = torch.Generator().manual_seed(23)
    # runs of 1 .. 9 sequences per length (groups of 4, 4 and 1 for 9), lengths interleaved
    lengths = [n for k, n in enumerate((3, 40, 41, 129, 700, 1031, 2, 1500, 64)) for _ in range(k + 1)]
    perm = torch.randperm(len(lengths), generator=g).tolist()
    lengths = [lengths[p] for p in perm]
    values, cu = pack(lengths, g, dist="entropy")
    mat = pw._run_cpu_ext(cpu_ext, _stats(values, cu), short_first, False, 2)
    seqs = [values[cu[i]:cu[i + 1]] for i in range(len(lengths))]
    pairs = [(i, j) for i in range(len(lengths)) for j in range(len(lengths)) if lengths[i] < lengths[j]]
    for i, j in pairs[:: max(1, len(pairs) // 150)]:
        two = torch.cat([seqs[i], seqs[j]])
        cu2 = torch.tensor([0, lengths[i], lengths[i] + lengths[j]])
        alone = pw._run_cpu_ext(cpu_ext, _stats(two, cu2), short_first, False, 1)
        assert bits(alone[0, 1]) == bits(mat[i, j]) and bits(alone[1, 0]) == bits(mat[j, i]), (i, j)
        direction = DIRECTIONS[short_first]
        for a, b in ((i, j), (j, i)):
            exp = ref.kl_similarity(seqs[a], seqs[b], direction)
            assert mat[a, b].item() == pytest.approx(exp, rel=RTOL, abs=ATOL), (a, b)
    # the grouped op over the same batch: each row's max of its matrix entries (self excluded)
    groups = torch.tensor([k % 3 for k in range(len(lengths))])
    got = pw._run_cpu_ext(cpu_ext, _stats(values, cu), short_first, (groups, 3, True, None), 2)
    m = mat.clone()
    m.fill_diagonal_(float("-inf"))
    for k in range(3):
        col = torch.where(groups == k)[0]
        assert torch.equal(bits(got[:, k]), bits(m[:, col].max(dim=1).values))
