"""The entropy custom ops under torch.compile, torch.library.opcheck, and property tests."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heal_kernels import reference
from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "cpu")


def _loss(logits, labels):
    ent, lp = entropy_and_logprobs(logits, labels, 0.7)
    return (ent * 0.3 - lp).sum(), ent, lp


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend):
    """fullgraph=True: the ops trace (fake impls) and their autograd is captured; same numbers as eager."""
    torch._dynamo.reset()
    z = torch.randn(2, 3, 97, requires_grad=True)
    labels = torch.randint(0, 97, (2, 3))
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    loss_c, ent_c, lp_c = compiled(z, labels)
    (g_c,) = torch.autograd.grad(loss_c, z)
    loss_e, ent_e, lp_e = _loss(z, labels)
    (g_e,) = torch.autograd.grad(loss_e, z)
    assert torch.allclose(ent_c, ent_e, atol=1e-6) and torch.allclose(lp_c, lp_e, atol=1e-6)
    assert torch.allclose(g_c, g_e, atol=1e-6)
    ent_t = torch.compile(lambda x: token_entropy(x, 1.3), fullgraph=True, backend=backend)(z.detach())
    assert torch.allclose(ent_t, token_entropy(z.detach(), 1.3), atol=1e-6)


@pytest.mark.parametrize("with_labels", [True, False])
def test_opcheck(with_labels):
    z = torch.randn(5, 33, requires_grad=True)
    labels = torch.randint(0, 33, (5,)) if with_labels else None
    torch.library.opcheck(torch.ops.heal.entropy_fwd.default, (z, labels, 0.7, "cpu"))
    ent, _, stats = torch.ops.heal.entropy_fwd(z.detach(), labels, 0.7, "cpu")
    g = torch.randn(5)
    torch.library.opcheck(
        torch.ops.heal.entropy_bwd.default,
        (z.detach(), labels, ent, stats, g, g if with_labels else None, 0.7, "cpu"),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(0, 5),
    vocab=st.integers(1, 300),
    temperature=st.floats(0.05, 5.0),
    scale=st.floats(0.0, 60.0),
    offset=st.floats(-2e3, 2e3),
    masked=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_inputs_match_reference(rows, vocab, temperature, scale, offset, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen) * scale + offset
    mask = torch.rand(rows, vocab, generator=gen) < masked
    mask[:, 0] = False  # keep one finite entry per row
    z[mask] = -math.inf
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    zg = z.clone().requires_grad_(True)
    ent, lp = entropy_and_logprobs(zg, labels, temperature)
    zr = z.double().requires_grad_(True)
    ref_ent, ref_lp = reference.entropy_and_logprobs(zr, labels, temperature)
    tol = lambda r: torch.clamp(1e-5 * r.abs(), min=1e-4)  # noqa: E731
    assert (ent.double() - ref_ent).abs().le(tol(ref_ent)).all()
    fin = torch.isfinite(ref_lp)
    assert torch.equal(lp[~fin].double(), ref_lp[~fin])
    assert (lp.double()[fin] - ref_lp[fin]).abs().le(tol(ref_lp[fin])).all()
    if rows:
        g_h = torch.randn(rows, generator=gen)
        g_l = torch.randn(rows, generator=gen)
        (g,) = torch.autograd.grad((ent * g_h + lp * g_l).sum(), zg)
        (gr,) = torch.autograd.grad((ref_ent * g_h.double() + ref_lp * g_l.double()).sum(), zr)
        assert torch.isfinite(g).all()
        scale_g = max(gr.abs().max().item(), 1.0)
        assert (g.double() - gr).abs().max().item() <= 1e-4 * scale_g
