"""heal_kernels.pairwise_similarity / grouped_max_similarity vs the float64 reference loop.

Backends: ``torch`` (float64 tiles), ``cpu`` (the C++ extension, built once per machine and cached
by torch), ``triton`` (the Triton interpreter on CPU; tiny shapes). The reference
(:mod:`heal_kernels.reference`) literally runs ``F.interpolate`` + ``softmax`` + ``F.kl_div`` per pair.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import heal_kernels
from heal_kernels import reference as ref
from heal_kernels.ops import pairwise as pw

BACKENDS = ["torch", "cpu", "triton"]
DIRECTIONS = ["scored_first", "short_first"]
RTOL, ATOL = 1e-5, 1e-6


def pack(lengths, dist="uniform", device="cpu", gen=None):
    lengths = list(lengths)
    total = sum(lengths)
    if dist == "uniform":
        values = torch.rand(total, generator=gen) * 4
    else:
        values = torch.empty(total).exponential_(generator=gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.tensor(lengths).cumsum(0)
    return values.to(device), cu.to(device)


def close(out, expected):
    torch.testing.assert_close(out.double().cpu(), expected.double(), rtol=RTOL, atol=ATOL, equal_nan=True)


def needs(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ext")


# lengths: 1, equal, one dividing the other, coprime, an empty sequence
SMALL = [1, 3, 7, 7, 14, 5, 0, 40, 13, 64, 2, 21, 1]
TINY = [1, 3, 6, 6, 12, 0, 5, 17]  # interpreter-sized


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_direction", DIRECTIONS)
@pytest.mark.parametrize("dist", ["uniform", "exponential"])
def test_pairwise_kl_matches_reference(backend, kl_direction, dist, request):
    needs(backend, request)
    values, cu = pack(TINY if backend == "triton" else SMALL, dist)
    expected = ref.pairwise_similarity(values, cu, metric="kl", kl_direction=kl_direction)
    out = pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend=backend)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    close(out, expected)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))  # pairs with the empty sequence


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_long_sequences_match_interpolate(backend, request):
    """Lengths in the thousands, where float32 and exact index rules differ (few pairs)."""
    needs(backend, request)
    lengths = [4099, 4000, 1, 1333, 2048, 4096, 3001]
    values, cu = pack(lengths)
    for kl_direction in DIRECTIONS:
        expected = ref.pairwise_similarity(values, cu, kl_direction=kl_direction)
        close(pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend=backend), expected)


def test_reference_uses_float32_index_rule():
    """The spec stretches with float32's rule even for float64 values (DESIGN.md 3.2)."""
    for m, n in [(1333, 4099), (2047, 4001), (3001, 4096)]:
        seq = torch.arange(m, dtype=torch.float64)
        assert torch.equal(ref.stretch(seq, n).to(torch.int64), ref.nearest_indices(m, n))


@pytest.mark.parametrize("metric", ["hti", "pl"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_hti_pl_match_reference(metric, backend, request):
    needs(backend, request)
    values, cu = pack([1, 2, 5, 5, 10, 0, 23, 40, 7])
    # ties: repeated values exercise the lower-index tie rule of HTI; a constant sequence gives r=0
    values[cu[3] : cu[4]] = 2.0
    values[cu[6] : cu[6] + 10] = torch.round(values[cu[6] : cu[6] + 10])
    expected = ref.pairwise_similarity(values, cu, metric=metric)
    close(pw.pairwise_similarity(values, cu, metric=metric, backend=backend), expected)
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])
    exp_g = ref.grouped_max_similarity(values, cu, groups, 2, metric=metric)
    close(pw.grouped_max_similarity(values, cu, groups, 2, metric=metric, backend=backend), exp_g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matches_reference(backend, request):
    needs(backend, request)
    lengths = TINY if backend == "triton" else SMALL
    values, cu = pack(lengths)
    bsz = len(lengths)
    groups = torch.randint(0, 3, (bsz,))
    groups[groups == 2] = 0  # group 2 is empty: its column stays -inf
    pids = torch.randint(0, 3, (bsz,))
    for exclude_self in (True, False):
        for prompt_ids in (None, pids):
            for kl_direction in DIRECTIONS:
                expected = ref.grouped_max_similarity(
                    values, cu, groups, 3, exclude_self=exclude_self, prompt_ids=prompt_ids, kl_direction=kl_direction
                )
                out = pw.grouped_max_similarity(
                    values,
                    cu,
                    groups,
                    3,
                    exclude_self=exclude_self,
                    prompt_ids=prompt_ids,
                    kl_direction=kl_direction,
                    backend=backend,
                )
                assert out.dtype == torch.float32 and out.shape == (bsz, 3)
                assert torch.equal(torch.isinf(out), torch.isinf(expected))
                assert bool(torch.isinf(out[:, 2]).all())
                close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_batches(backend, request):
    needs(backend, request)
    # B = 1: no other column
    values, cu = pack([5])
    out = pw.grouped_max_similarity(values, cu, torch.tensor([0]), 2, backend=backend)
    assert torch.equal(out, torch.full((1, 2), -math.inf))
    out = pw.grouped_max_similarity(values, cu, torch.tensor([0]), 1, exclude_self=False, backend=backend)
    assert out.item() == pytest.approx(0.0, abs=1e-6)  # KL of a sequence with itself
    assert pw.pairwise_similarity(values, cu, backend=backend).item() == pytest.approx(0.0, abs=1e-6)
    # every sequence empty
    values, cu = pack([0, 0, 0])
    out = pw.grouped_max_similarity(values, cu, torch.tensor([0, 1, 0]), 2, backend=backend)
    assert torch.equal(out, torch.full((3, 2), -math.inf))
    assert bool(torch.isnan(pw.pairwise_similarity(values, cu, backend=backend)).all())
    # B = 0
    values, cu = pack([])
    assert pw.pairwise_similarity(values, cu, backend=backend).shape == (0, 0)
    assert pw.grouped_max_similarity(values, cu, torch.zeros(0, dtype=torch.int64), 2, backend=backend).shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_sequences_have_zero_kl(backend, request):
    needs(backend, request)
    values, cu = pack([9, 9, 4])
    values[9:18] = values[0:9]
    out = pw.pairwise_similarity(values, cu, backend=backend)
    assert out[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert out[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, 2].item() < -1e-4


def test_backends_agree(request):
    """C++, torch and Triton (interpreter) agree on one random batch, run to run identical."""
    request.getfixturevalue("cpu_ext")
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 48, (10,), generator=g).tolist()
    values, cu = pack(lengths, gen=g)
    groups = torch.randint(0, 2, (10,), generator=g)
    results = {}
    for backend in BACKENDS:
        first = pw.grouped_max_similarity(values, cu, groups, 2, backend=backend)
        again = pw.grouped_max_similarity(values, cu, groups, 2, backend=backend)
        assert torch.equal(first, again), backend  # deterministic
        results[backend] = first
        full = pw.pairwise_similarity(values, cu, backend=backend)
        assert torch.equal(full, pw.pairwise_similarity(values, cu, backend=backend)), backend
        results[backend + "_full"] = full
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(results[backend], results["torch"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(results[backend + "_full"], results["torch_full"], rtol=RTOL, atol=ATOL)
    # the grouped op is the row-wise max of the full matrix's eligible entries
    full = results["cpu_full"].clone()
    full.fill_diagonal_(-math.inf)
    for grp in (0, 1):
        cols = full[:, groups == grp]
        exp = cols.max(dim=1).values if cols.shape[1] else torch.full((10,), -math.inf)
        assert torch.equal(results["cpu"][:, grp], exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_groups(backend, request):
    """One group per trajectory."""
    needs(backend, request)
    values, cu = pack([3, 5, 1, 8, 2, 6])
    groups = torch.tensor([0, 1, 2, 3, 4, 6])
    expected = ref.grouped_max_similarity(values, cu, groups, 7, exclude_self=False)
    close(pw.grouped_max_similarity(values, cu, groups, 7, exclude_self=False, backend=backend), expected)


def test_cpu_larger_batch_matches_torch(request):
    """A batch big enough for several OpenMP chunks and AVX2 blocks (plus ragged tails)."""
    request.getfixturevalue("cpu_ext")
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 700, (40,), generator=g).tolist()
    values, cu = pack(lengths, dist="exponential", gen=g)
    groups = (torch.rand(40, generator=g) < 0.25).long()
    pids = torch.arange(40) // 4
    for kl_direction in DIRECTIONS:
        a = pw.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, kl_direction=kl_direction, backend="cpu")
        b = pw.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, kl_direction=kl_direction, backend="torch")
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_public_api_and_default_backend():
    values, cu = pack([3, 8, 5])
    expected = ref.pairwise_similarity(values, cu)
    close(heal_kernels.pairwise_similarity(values, cu), expected)
    # int64 offsets and float64 / bfloat16 values are accepted
    close(heal_kernels.pairwise_similarity(values.double(), cu.long()), expected)
    assert heal_kernels.pairwise_similarity(values.bfloat16(), cu).dtype == torch.float32
    groups = torch.tensor([0, 1, 1], dtype=torch.int32)
    exp_g = ref.grouped_max_similarity(values, cu, groups, 2)
    close(heal_kernels.grouped_max_similarity(values, cu, groups, 2), exp_g)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v, c: (v.reshape(2, -1), c), "values"),
        (lambda v, c: (v.long(), c), "values"),
        (lambda v, c: (v, c.float()), "cu_seqlens"),
        (lambda v, c: (v, c.to(torch.int16)), "cu_seqlens"),
        (lambda v, c: (v, c.reshape(1, -1)), "cu_seqlens"),
        (lambda v, c: (v, c + 1), "start at 0"),
        (lambda v, c: (v, torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
        (lambda v, c: (v, torch.tensor([0, 4, 6, 9], dtype=torch.int32)), "end at len"),
        (lambda v, c: (v, torch.tensor([0, 4, 6, 11], dtype=torch.int32)), "end at len"),
        (lambda v, c: (v, torch.zeros(0, dtype=torch.int32)), "cu_seqlens"),
    ],
)
def test_bad_packed_input(make, match):
    values, cu = pack([4, 2, 4])
    v, c = make(values, cu)
    with pytest.raises(ValueError, match=match):
        pw.pairwise_similarity(v, c, backend="torch")
    with pytest.raises(ValueError, match=match):
        pw.grouped_max_similarity(v, c, torch.zeros(3, dtype=torch.int64), 1, backend="torch")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_entropy_names_trajectory(bad):
    values, cu = pack([4, 2, 4])
    values[7] = bad
    with pytest.raises(ValueError, match="trajectory 2"):
        pw.pairwise_similarity(values, cu)
    with pytest.raises(ValueError, match="trajectory 2"):
        pw.grouped_max_similarity(values, cu, torch.zeros(3, dtype=torch.int64), 1)


def test_bad_arguments():
    values, cu = pack([4, 2, 4])
    groups = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="metric"):
        pw.pairwise_similarity(values, cu, metric="cosine")
    with pytest.raises(ValueError, match="kl_direction"):
        pw.grouped_max_similarity(values, cu, groups, 2, kl_direction="long_first")
    with pytest.raises(ValueError, match="groups"):
        pw.grouped_max_similarity(values, cu, torch.tensor([0, 2, 0]), 2)
    with pytest.raises(ValueError, match="groups"):
        pw.grouped_max_similarity(values, cu, torch.tensor([0, -1, 0]), 2)
    with pytest.raises(ValueError, match="groups"):
        pw.grouped_max_similarity(values, cu, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="groups"):
        pw.grouped_max_similarity(values, cu, torch.tensor([0.0, 1.0, 0.0]), 2)
    with pytest.raises(TypeError, match="groups"):
        pw.grouped_max_similarity(values, cu, [0, 1, 0], 2)
    with pytest.raises(ValueError, match="num_groups"):
        pw.grouped_max_similarity(values, cu, groups, 0)
    with pytest.raises(ValueError, match="prompt_ids"):
        pw.grouped_max_similarity(values, cu, groups, 2, prompt_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prompt_ids"):
        pw.grouped_max_similarity(values, cu, groups, 2, prompt_ids=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="backend"):
        pw.pairwise_similarity(values, cu, backend="cuda-magic")
    with pytest.raises(TypeError, match="values"):
        pw.pairwise_similarity([1.0, 2.0], cu)


def test_device_mismatch_is_rejected():
    """Device checks run before any work (a meta tensor stands in for a second device)."""
    values, cu = pack([4, 2, 4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        pw.pairwise_similarity(values, cu.to("meta"))
    with pytest.raises(ValueError, match="groups"):
        pw.grouped_max_similarity(values, cu, torch.tensor([0, 1, 0], device="meta"), 2)
    with pytest.raises(ValueError, match="prompt_ids"):
        pw.grouped_max_similarity(values, cu, torch.tensor([0, 1, 0]), 2, prompt_ids=torch.tensor([0, 1, 2], device="meta"))


def test_extension_loader_falls_back_with_warning(monkeypatch):
    from heal_kernels import cpu

    with pytest.warns(UserWarning, match="not found"):
        assert cpu.load_extension("heal_test_missing", ["does_not_exist.cpp"]) is None
    monkeypatch.setenv("HEAL_KERNELS_NO_BUILD", "1")
    assert cpu.load_extension("heal_test_disabled", ["pairwise.cpp"]) is None
    # with no extension, the cpu backend still answers (torch path)
    monkeypatch.setattr(pw, "_cpu_ext", lambda: None)
    values, cu = pack([3, 5])
    close(pw.pairwise_similarity(values, cu, backend="cpu"), ref.pairwise_similarity(values, cu))


def test_csrc_is_found():
    from heal_kernels.cpu import csrc_dir

    assert (csrc_dir() / "pairwise.cpp").is_file()


@pytest.mark.cuda
def test_cuda_triton_matches_cpu_at_scale():
    """On a GPU: the compiled Triton kernel (real block sizes) against the torch path on the CPU."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, 3100, (96,), generator=g).tolist()
    values, cu = pack(lengths, dist="exponential", gen=g)
    groups = (torch.rand(96, generator=g) < 0.25).long()
    pids = torch.arange(96) // 8
    for kl_direction in DIRECTIONS:
        exp_full = pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend="torch")
        full = pw.pairwise_similarity(values.cuda(), cu.cuda(), kl_direction=kl_direction)
        torch.testing.assert_close(full.cpu(), exp_full, rtol=RTOL, atol=1e-5, equal_nan=True)
        exp = pw.grouped_max_similarity(values, cu, groups, 2, prompt_ids=pids, kl_direction=kl_direction, backend="torch")
        out = pw.grouped_max_similarity(
            values.cuda(), cu.cuda(), groups.cuda(), 2, prompt_ids=pids.cuda(), kl_direction=kl_direction
        )
        torch.testing.assert_close(out.cpu(), exp, rtol=RTOL, atol=1e-5)
        again = pw.grouped_max_similarity(
            values.cuda(), cu.cuda(), groups.cuda(), 2, prompt_ids=pids.cuda(), kl_direction=kl_direction
        )
        assert torch.equal(out, again)


def test_triton_clamped_index_rule_and_check_false(monkeypatch):
    """The Triton kernel's path for batches of 2^22+ values (it keeps min(src, m - 1)) gives the same
    numbers, and check=False changes nothing on the CPU (CPU inputs are always checked)."""
    import os

    from heal_kernels.triton import pairwise as tri

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors through the interpreter")
    lengths = [1, 3, 6, 6, 12, 0, 5, 17, 9]
    values, cu = pack(lengths)
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0])
    expected = ref.grouped_max_similarity(values, cu, groups, 2)
    monkeypatch.setattr(tri, "CLAMP_FREE_TOTAL", 0)
    out = pw.grouped_max_similarity(values, cu, groups, 2, backend="triton", check=False)
    close(out, expected)
    close(pw.pairwise_similarity(values, cu, backend="triton"), ref.pairwise_similarity(values, cu))
    with pytest.raises(ValueError, match="groups must lie"):
        pw.grouped_max_similarity(values, cu, groups + 5, 2, backend="torch", check=False)


def test_triton_packing_kernel_matches_seq_stats():
    """The Triton path's packing kernel (interpreter): every sequence starts at an even position (the
    pair kernel reads the long side 16 bytes at a time and tells Triton so), each position holds its
    (x, e) float32 pair with x in the low half, the gaps are zeros, and mx / e / zsum are the CPU
    paths' ``seq_stats`` (zsum to float32 rounding)."""
    import os

    from heal_kernels.triton import _launch
    from heal_kernels.triton import pairwise as tri

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors through the interpreter")
    lengths = [3, 0, 1, 4, 7, 2, 0, 20, 5]  # 20 > the interpreter's block of 8: several trips
    values, cu = pack(lengths)
    cu64 = cu.to(torch.int64)
    st = pw.seq_stats(values, cu64)
    kernel, grid, args, kwargs, p = tri.pack_launch_spec(values, cu64)
    _launch.launch(kernel, grid, args, kwargs)
    starts = p["starts"].to(torch.int64)
    assert (starts % tri.ALIGN == 0).all()  # every sequence on a 128-byte line
    assert p["lens"].tolist() == lengths
    assert torch.equal(p["mx"], st.mx.to(torch.float32))
    torch.testing.assert_close(p["zsum"], st.zsum.to(torch.float32), rtol=2e-7, atol=0)
    pairs = p["xe"].view(torch.float32).view(-1, 2)  # little-endian: x, then e
    used = torch.zeros(pairs.shape[0], dtype=torch.bool)
    for b, n in enumerate(lengths):
        s0, s1 = int(st.starts[b]), int(starts[b])
        assert torch.equal(pairs[s1 : s1 + n, 0], st.x[s0 : s0 + n])
        assert torch.equal(pairs[s1 : s1 + n, 1], st.e[s0 : s0 + n])
        used[s1 : s1 + n] = True
        if b + 1 < len(lengths):
            assert s1 + n <= int(starts[b + 1]) < s1 + n + tri.ALIGN  # the next line boundary
    assert (pairs[~used] == 0).all()
