"""The fused-linear drop-in against verl 0.9's real torch-backend FusedLinearForPPO (CPU)."""

import sys
import types

import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402

from heal.integrations.verl import fused_entropy, fused_linear  # noqa: E402


@pytest.fixture
def verl_objects():
    import verl.utils.experimental.torch_functional as verl_tf
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    originals = (verl_tf.FusedLinearForPPO, verl_lce.linear_cross_entropy)
    assert originals[0] is not fused_linear.FusedLinearForPPO, "a previous test left the drop-in on"
    yield originals
    fused_linear.restore_verl_fused_linear()
    assert (verl_tf.FusedLinearForPPO, verl_lce.linear_cross_entropy) == originals


def _inputs(shape, d, v, dtype):
    h = torch.randn(*shape, d).to(dtype).requires_grad_()
    w = (torch.randn(v, d) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, shape)
    return h, w, labels


@pytest.mark.parametrize("shape", [(37,), (2, 19)], ids=["2d", "3d"])
@pytest.mark.parametrize("vocab", [300, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_verls_torch_backend(verl_objects, shape, vocab, temperature):
    verl_cls = verl_objects[0]
    h, w, labels = _inputs(shape, 16, vocab, torch.float32)
    g_lp, g_e = torch.randn(shape), torch.randn(shape)

    lp_v, e_v = verl_cls(chunk_size=8)(h, w, labels, temperature)
    (lp_v * g_lp + e_v * g_e).sum().backward()
    dh_v, dw_v = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    lp, e = fused_linear.FusedLinearForPPO(chunk_size=8)(h, w, labels, temperature)
    (lp * g_lp + e * g_e).sum().backward()

    assert lp.shape == lp_v.shape == shape and e.shape == e_v.shape == shape
    assert lp.dtype == lp_v.dtype == torch.float32 and e.dtype == e_v.dtype
    torch.testing.assert_close(lp, lp_v, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(e, e_v, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(h.grad, dh_v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, dw_v, rtol=1e-4, atol=1e-5)


def test_gradient_through_one_output_and_bf16(verl_objects):
    verl_cls = verl_objects[0]
    for dtype in (torch.float32, torch.bfloat16):
        h, w, labels = _inputs((24,), 16, 257, dtype)
        lp_v, e_v = verl_cls()(h, w, labels, 0.8)
        lp_v.sum().backward()  # log-probs only: entropy's gradient is None
        dh_v, dw_v = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        lp, e = fused_linear.FusedLinearForPPO()(h, w, labels, 0.8)
        lp.sum().backward()
        assert e.dtype == e_v.dtype == dtype and lp.dtype == torch.float32
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(lp, lp_v, **tol)
        torch.testing.assert_close(e.float(), e_v.float(), **tol)
        torch.testing.assert_close(h.grad.float(), dh_v.float(), **tol)
        torch.testing.assert_close(w.grad.float(), dw_v.float(), **tol)


def test_linear_cross_entropy_conventions(verl_objects):
    verl_cls = verl_objects[0]
    h, w, labels = _inputs((2, 11), 16, 333, torch.float32)
    lp_v, e_v = verl_cls()(h, w, labels, 0.7)
    lp, e = fused_linear.linear_cross_entropy(h, w, labels, 0.7, "none")
    assert lp.shape == e.shape == (22,) and lp.dtype == e.dtype == torch.float32
    torch.testing.assert_close(lp, lp_v.reshape(-1), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(e, e_v.reshape(-1), rtol=1e-5, atol=2e-5)
    assert bool((lp <= 0).all())  # log-probabilities, never positive (verl's Triton kernel's old bug)
    s, _ = fused_linear.linear_cross_entropy(h, w, labels, 0.7, "sum")
    m, _ = fused_linear.linear_cross_entropy(h, w, labels, 0.7, "mean")
    torch.testing.assert_close(s, lp_v.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m, lp_v.mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear.linear_cross_entropy(h, w, labels, 0.7, "max")
    with pytest.raises(ValueError, match="labels must lie in"):
        fused_linear.linear_cross_entropy(h, w, labels + 333, 0.7)


def test_switch_patches_both_backends_and_megatron_bindings(verl_objects, monkeypatch):
    import verl.utils.experimental.torch_functional as verl_tf
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    # a Megatron forward module that bound verl's function at import (megatron is not installed here)
    fake = types.ModuleType("verl.models.mcore.model_forward_fused")
    fake.linear_cross_entropy = verl_objects[1]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    fused_entropy.use_fused_entropy()  # heal's switch turns on both drop-ins
    try:
        assert fused_linear.fused_linear_enabled()
        assert verl_tf.FusedLinearForPPO is fused_linear.FusedLinearForPPO
        assert verl_lce.linear_cross_entropy is fused_linear.linear_cross_entropy
        assert fake.linear_cross_entropy is fused_linear.linear_cross_entropy
        # what verl's transformers forwards do at run time
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        h, w, labels = _inputs((1, 9), 16, 100, torch.float32)
        lp, e = FusedLinearForPPO(impl_backend="torch")(h, w, labels, temperature=0.7)
        assert lp.shape == e.shape == (1, 9)
    finally:
        fused_entropy.restore_verl_entropy()
    assert not fused_linear.fused_linear_enabled()
    assert fake.linear_cross_entropy is verl_objects[1]
    assert verl_tf.FusedLinearForPPO is verl_objects[0]


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        fused_linear.FusedLinearForPPO(impl_backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_verls_patched_model_forward_runs_heal(verl_objects, backend):
    """verl's own fused-kernel forward (``patch_forward_with_backends``) on a tiny Qwen2: with heal's
    switch on, both backends (the Triton one cannot run on a CPU without heal) give the log-probs and
    entropies of the model's own logits, and gradients reach the model."""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    cfg = transformers.Qwen2Config(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    ids = torch.randint(0, 301, (1, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    from heal_kernels import reference

    ref_e, ref_lp = reference.entropy_and_logprobs(logits, rolled, 0.7)

    cls = type(model)
    original_forward = cls.forward
    fused_entropy.use_fused_entropy()
    try:
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
        out = model(input_ids=ids, temperature=0.7, return_dict=True)
        lp, e = out.log_probs, out.entropy
        torch.testing.assert_close(lp.double().reshape(ref_lp.shape), ref_lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(e.double().reshape(ref_e.shape), ref_e, rtol=1e-4, atol=1e-4)
        (lp.sum() + e.sum()).backward()
        assert model.lm_head.weight.grad is not None and bool(model.lm_head.weight.grad.abs().sum() > 0)
    finally:
        cls.forward = original_forward
        fused_entropy.restore_verl_entropy()


def test_autocast_and_mixed_dtypes_follow_the_matmul(verl_objects):
    """Under autocast the logits are computed in autocast's dtype and the entropy comes back in
    hidden's dtype, as verl's torch backend does; a weight of another dtype makes hidden follow it."""
    verl_cls = verl_objects[0]
    h, w, labels = _inputs((16,), 16, 200, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_v, e_v = verl_cls()(h, w, labels, 0.9)
        lp, e = fused_linear.FusedLinearForPPO()(h, w, labels, 0.9)
    assert e.dtype == e_v.dtype == torch.float32 and lp.dtype == lp_v.dtype == torch.float32
    torch.testing.assert_close(lp, lp_v, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(e, e_v, rtol=2e-2, atol=2e-2)
    lp2, _ = fused_linear.linear_cross_entropy(h, w.to(torch.bfloat16), labels, 0.9)  # hidden follows the weight
    assert lp2.dtype == torch.float32 and lp2.shape == (16,)
