"""heal.dynamics: packed ragged batches, converters and validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heal.dynamics import lengths, pack_nested, pack_padded, pack_sequences, unpack, validate_packed


def _seqs(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) * 3 for n in lens]


def test_pack_sequences_layout():
    seqs = _seqs([3, 0, 5, 1])
    values, cu = pack_sequences(seqs)
    assert values.dtype == torch.float32 and cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 3, 8, 9]
    assert torch.equal(values, torch.cat(seqs))
    assert lengths(cu).tolist() == [3, 0, 5, 1]
    for a, b in zip(unpack(values, cu), seqs):
        assert torch.equal(a, b)


def test_pack_sequences_accepts_lists_and_ints():
    values, cu = pack_sequences([[1, 2], [], [0.5]])
    assert values.tolist() == [1.0, 2.0, 0.5] and cu.tolist() == [0, 2, 2, 3]
    values, cu = pack_sequences([])
    assert values.numel() == 0 and cu.tolist() == [0]


def test_pack_padded_prefix_and_non_prefix_masks():
    vals = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    vals[0, 3] = math.nan  # padding may hold garbage
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    values, cu = pack_padded(vals, mask)
    assert values.dtype == torch.float32
    assert values.tolist() == [0.0, 1.0, 2.0, 5.0, 7.0]
    assert cu.tolist() == [0, 3, 5, 5]
    # bool and float masks give the same
    for m in (mask.bool(), mask.float()):
        v2, cu2 = pack_padded(vals, m)
        assert torch.equal(v2, values) and torch.equal(cu2, cu)


def test_pack_padded_empty_batch():
    values, cu = pack_padded(torch.zeros(0, 7), torch.zeros(0, 7, dtype=torch.bool))
    assert values.numel() == 0 and cu.tolist() == [0]


def test_pack_padded_bad_input():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask must have the shape"):
        pack_padded(v, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask must be bool or 0/1, got 2 at \[0, 0\]"):
        pack_padded(v, torch.full((2, 3), 2))
    half = torch.ones(2, 3)
    half[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"mask must be bool or 0/1, got 0.5 at \[1, 2\]"):
        pack_padded(v, half)
    with pytest.raises(ValueError, match="mask must be bool or 0/1, got -1"):
        pack_padded(v, -torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="values must be 2-D"):
        pack_padded(torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="values must be a floating"):
        pack_padded(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3))


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_pack_nested(layout):
    seqs = _seqs([4, 1, 7])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # strided nested tensors warn that they are a prototype
        nt = torch.nested.nested_tensor(seqs, layout=layout)
    values, cu = pack_nested(nt)
    ref_values, ref_cu = pack_sequences(seqs)
    assert torch.equal(values, ref_values) and torch.equal(cu, ref_cu)


def test_pack_nested_jagged_view_with_holes():
    base = torch.arange(12.0).reshape(3, 4)
    nt = torch.nested.narrow(base, dim=1, start=0, length=torch.tensor([2, 4, 1]), layout=torch.jagged)
    values, cu = pack_nested(nt)
    assert values.tolist() == [0.0, 1.0, 4.0, 5.0, 6.0, 7.0, 8.0] and cu.tolist() == [0, 2, 6, 7]


def test_pack_nested_rejects_dense():
    with pytest.raises(TypeError, match="nested"):
        pack_nested(torch.zeros(2, 3))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=0, max_size=8), st.integers(0, 2**31 - 1))
def test_round_trip_padded_sequences(lens, seed):
    seqs = _seqs(lens, seed)
    width = max(lens, default=0) + 2
    padded = torch.full((len(lens), width), -7.0)
    mask = torch.zeros(len(lens), width, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for i, s in enumerate(seqs):
        pos = torch.randperm(width, generator=g)[: s.numel()].sort().values  # any mask pattern
        padded[i, pos] = s
        mask[i, pos] = True
    v1, cu1 = pack_padded(padded, mask)
    v2, cu2 = pack_sequences(seqs)
    assert torch.equal(v1, v2) and torch.equal(cu1, cu2)
    assert validate_packed(v1, cu1) == len(lens)
    back = unpack(v1, cu1)
    assert len(back) == len(seqs)
    for a, b in zip(back, seqs):
        assert torch.equal(a, b)


def test_validate_packed_errors_name_the_argument():
    v = torch.rand(5)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert validate_packed(v, cu) == 2
    cases = [
        (v, torch.tensor([1, 2, 5], dtype=torch.int32), "cu_seqlens must start at 0"),
        (v, torch.tensor([0, 3, 2, 5], dtype=torch.int32), "cu_seqlens must be non-decreasing"),
        (v, torch.tensor([0, 2, 4], dtype=torch.int32), r"cu_seqlens must end at len\(values\)=5"),
        (v, torch.tensor([0, 2, 5], dtype=torch.int64), "cu_seqlens must be int32"),
        (v.double(), cu, "values must be float32"),
        (v.reshape(5, 1), cu, "values must be 1-D"),
        (v, torch.tensor([[0, 5]], dtype=torch.int32), "cu_seqlens must be 1-D"),
    ]
    for values, cu_bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            validate_packed(values, cu_bad)
    with pytest.raises(TypeError, match="values"):
        validate_packed([0.0, 1.0], cu)
    with pytest.raises(TypeError, match="cu_seqlens"):
        validate_packed(v, [0, 5])


def test_validate_packed_device_mismatch():
    v = torch.rand(3, device="meta")
    with pytest.raises(ValueError, match="cu_seqlens is on cpu but values on meta"):
        validate_packed(v, torch.tensor([0, 3], dtype=torch.int32))


def test_validate_packed_names_nan_trajectory():
    v = torch.rand(9)
    cu = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32)
    v[5] = math.nan
    with pytest.raises(ValueError, match="trajectory 2 has a NaN entropy at token 2"):
        validate_packed(v, cu)
    v[5] = 1.0
    v[8] = math.inf
    with pytest.raises(ValueError, match="trajectory 3 has an infinite entropy at token 1"):
        validate_packed(v, cu)
    validate_packed(v, cu, check_finite=False)  # the check can be skipped
    # huge but finite entropies are valid (their sum overflows float32)
    assert validate_packed(torch.full((10,), 3e38), torch.tensor([0, 4, 10], dtype=torch.int32)) == 2
