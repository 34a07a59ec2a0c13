"""One contract for NaN / infinite entropies on every backend (C++, torch, Triton under the interpreter).

* ``check=True``: ``ValueError`` naming the trajectory and position;
* ``check=False``: a sequence holding a NaN or an infinity makes every similarity it takes part in NaN
  (scored row and neighbour); every other pair is unchanged. In the grouped op such a NaN is an
  eligible value and propagates, exactly like ``torch.amax`` over the matrix's eligible entries; ``-inf``
  only ever means "no eligible neighbour".
"""

import math

import pytest
import torch

from heal_kernels.ops import pairwise as pw

BACKENDS = ["cpu", "torch", "triton"]
BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def batch(bad_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 0, 13, 9, 3, 17, 6]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    values = torch.rand(int(cu[-1]), generator=g) * 3
    bad = [1, 6]  # sequence 1: one bad value; sequence 6: its first value
    values[cu[1] + 4] = BAD[bad_kind]
    values[cu[6]] = BAD[bad_kind]
    return values, cu, lengths, bad


def expected_grouped(mat, lengths, groups, num_groups, pids, exclude_self):
    """``torch.amax`` of the eligible matrix entries (NaN propagates), ``-inf`` for none."""
    bsz = len(lengths)
    out = torch.full((bsz, num_groups), -math.inf)
    for i in range(bsz):
        for g in range(num_groups):
            cols = [j for j in range(bsz) if groups[j] == g and lengths[i] and lengths[j]
                    and not (exclude_self and i == j) and not (pids is not None and pids[i] == pids[j])]
            if cols:
                out[i, g] = torch.amax(mat[i, cols])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_kind", list(BAD))
def test_check_names_the_trajectory(backend, bad_kind):
    values, cu, _, _ = batch(bad_kind)
    with pytest.raises(ValueError, match=r"trajectory 1, position 4"):
        pw.pairwise_similarity(values, cu, backend=backend)
    groups = torch.zeros(len(cu) - 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"trajectory 1, position 4"):
        pw.grouped_max_similarity(values, cu, groups, 1, backend=backend)


@pytest.mark.parametrize("kl_direction", ["scored_first", "short_first"])
@pytest.mark.parametrize("bad_kind", list(BAD))
def test_unchecked_output_is_the_same_on_every_backend(bad_kind, kl_direction):
    values, cu, lengths, bad = batch(bad_kind)
    bsz = len(lengths)
    clean = values.clone()
    for b in bad:  # the same batch with the bad sequences made finite: every other pair must not move
        clean[cu[b]:cu[b + 1]] = 1.0
    groups = torch.tensor([0, 1, 0, 1, 0, 2, 1, 0])
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mats = {}
    for backend in BACKENDS:
        mat = pw.pairwise_similarity(values, cu, kl_direction=kl_direction, backend=backend, check=False)
        ref = pw.pairwise_similarity(clean, cu, kl_direction=kl_direction, backend=backend)
        for i in range(bsz):
            for j in range(bsz):
                empty = lengths[i] == 0 or lengths[j] == 0
                if empty or i in bad or j in bad:
                    assert math.isnan(mat[i, j].item()), (backend, i, j)
                else:
                    assert mat[i, j].item() == pytest.approx(ref[i, j].item(), rel=1e-6, abs=1e-7), (backend, i, j)
        mats[backend] = mat
        for exclude_self, p in ((True, None), (False, pids), (True, pids)):
            got = pw.grouped_max_similarity(values, cu, groups, 3, exclude_self=exclude_self, prompt_ids=p,
                                            kl_direction=kl_direction, backend=backend, check=False)
            exp = expected_grouped(mat, lengths, groups.tolist(), 3, p, exclude_self)
            assert torch.equal(torch.isnan(got), torch.isnan(exp)), (backend, exclude_self, got, exp)
            assert torch.equal(torch.isneginf(got), torch.isneginf(exp)), (backend, exclude_self)
            fin = torch.isfinite(exp)
            torch.testing.assert_close(got[fin], exp[fin], rtol=1e-6, atol=1e-7)
            assert torch.isnan(got[bad[0]]).any()  # the bad row has eligible neighbours: NaN, not -inf
    # the NaN pattern is the same on every backend
    for backend in BACKENDS[1:]:
        assert torch.equal(torch.isnan(mats[backend]), torch.isnan(mats["cpu"])), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_shares_combine_nan(backend):
    """Partial maxima of shares combine with ``torch.maximum`` (which propagates NaN) to the full result."""
    values, cu, lengths, bad = batch("nan")
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    full = pw.grouped_max_similarity(values, cu, groups, 2, backend=backend, check=False)
    parts = [pw.grouped_max_similarity(values, cu, groups, 2, backend=backend, check=False, share=(k, 3))
             for k in range(3)]
    comb = torch.maximum(torch.maximum(parts[0], parts[1]), parts[2])
    assert torch.equal(torch.isnan(comb), torch.isnan(full))
    fin = torch.isfinite(full)
    assert torch.equal(comb[fin], full[fin])
    assert torch.isnan(full).all(dim=1).sum() >= 2  # the two bad rows


def test_triton_handles_gpu_max_semantics(monkeypatch):
    """On a GPU ``tl.maximum`` is ``max.f32``, which returns the other operand when one is NaN; the
    interpreter's is NumPy's ``maximum``, which propagates it. With the interpreter made to drop NaN
    the way the GPU does (its ``tl.max`` reduction already does: ``nanmax``), the grouped op still
    gives NaN, not a finite max and not ``-inf``: the kernel handles NaN explicitly."""
    import numpy as np
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_maxnumf",
                        lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax), raising=True)
    values, cu, lengths, bad = batch("nan")
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    mat = pw.pairwise_similarity(values, cu, backend="cpu", check=False)
    exp = expected_grouped(mat, lengths, groups.tolist(), 2, None, True)
    got = pw.grouped_max_similarity(values, cu, groups, 2, backend="triton", check=False)
    assert torch.isnan(exp).any() and torch.isfinite(exp).any()
    assert torch.equal(torch.isnan(got), torch.isnan(exp)), (got, exp)
    fin = torch.isfinite(exp)
    torch.testing.assert_close(got[fin], exp[fin], rtol=1e-6, atol=1e-7)
