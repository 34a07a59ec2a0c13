"""No entropy graph when the entropy is needed as a value only (``entropy_coeff == 0``).

Runs verl's real ``FSDPEngineWithLMHead.forward_step`` (``prepare_model_inputs`` ->
``prepare_model_outputs`` -> verl's ``ppo_loss``) on CPU with a tiny LM head, and measures the bytes
that autograd keeps for the backward pass (every tensor saved for backward that is still alive once
``forward_step`` has returned the loss), before and after heal's two pieces
(:mod:`heal.integrations.verl.entropy_graph`).
"""

import functools
import gc
import types
import weakref

import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from heal.integrations.verl import entropy_graph  # noqa: E402
from heal.integrations.verl.losses import HealPolicyLossConfig  # noqa: E402

VOCAB, HIDDEN = 3000, 16
PROMPTS, RESPONSES = [3, 5, 4], [40, 25, 33]
N_TOKENS = sum(PROMPTS) + sum(RESPONSES)


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g))
        self.head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False, **kwargs):
        return types.SimpleNamespace(logits=self.emb[input_ids] @ self.head.T)


@pytest.fixture
def engine(monkeypatch):
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    from verl.workers.config import FSDPEngineConfig

    monkeypatch.setattr(fsdp_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(fsdp_impl, "get_device_name", lambda: "cpu")
    eng = fsdp_impl.FSDPEngineWithLMHead.__new__(fsdp_impl.FSDPEngineWithLMHead)
    eng.engine_config = FSDPEngineConfig(use_torch_compile=False)
    eng.module = _TinyLM()
    eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size = False, 1
    eng.pad_to_length, eng._autocast_dtype = False, torch.float32
    eng.compute_entropy_from_logits = verl_F.entropy_from_logits  # what FSDPEngine.__init__ binds
    eng.get_data_parallel_group = lambda: None
    return eng


def _micro_batch(calculate_entropy=True, seed=1):
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    ids = [torch.randint(0, VOCAB, (p + r,), generator=g) for p, r in zip(PROMPTS, RESPONSES)]
    mb = TensorDict(
        {
            "input_ids": nested(ids),
            "position_ids": nested([torch.arange(len(x)) for x in ids]),
            "prompts": nested([x[:p] for x, p in zip(ids, PROMPTS)]),
            "responses": nested([x[p:] for x, p in zip(ids, PROMPTS)]),
            "response_mask": nested([torch.ones(r, dtype=torch.long) for r in RESPONSES]),
            "old_log_probs": nested([-torch.rand(r, generator=g) * 8 for r in RESPONSES]),
            "advantages": nested([torch.randn(1, generator=g).expand(r).clone() for r in RESPONSES]),
        },
        batch_size=len(ids),
    )
    for key, value in {"temperature": 0.7, "calculate_entropy": calculate_entropy, "use_remove_padding": True,
                       "dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}.items():
        tu.assign_non_tensor_data(mb, key, value)
    return mb


def _actor_config(mode, entropy_coeff=0.0):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=2, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=3,
                       entropy_coeff=entropy_coeff, use_kl_loss=False, policy_loss=HealPolicyLossConfig(loss_mode=mode))


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _retained_bytes(run):
    """Run ``run()`` (returns the loss) recording every tensor autograd saves for backward; return the
    loss and the bytes of the distinct storages still held by the graph once ``run`` has returned."""
    saved = []

    def pack(t):
        # hold a detached alias: holding the tensor itself would tie a saved *output* (softmax's, say)
        # to its own grad_fn in a reference cycle that outlives the graph and would count as retained
        holder = _Saved(t.detach())
        saved.append(weakref.ref(holder))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        loss = run()
    gc.collect()
    storages = {}
    for ref in saved:
        holder = ref()
        if holder is None:
            continue
        t = holder.t.values() if holder.t.is_nested else holder.t
        try:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        except RuntimeError:  # tensor subclasses without a plain storage
            continue
    return loss, sum(storages.values())


def _previous_hand_over(ppo_loss):
    """heal's hand-over before this change: entropy published (detached) to heal's losses, and verl's
    ``ppo_loss`` called with the entropy in the model output (its ``0 * entropy_loss`` term kept)."""
    from verl.workers.utils.padding import no_padding_2_padding

    from heal.integrations.verl.losses import entropy_context

    def loss(config, model_output, data, dp_group=None):
        with entropy_context(no_padding_2_padding(model_output["entropy"], data).detach()):
            return ppo_loss(config, model_output, data, dp_group=dp_group)

    loss.__name__, loss.__module__ = "ppo_loss", "verl.workers.utils.losses"
    return loss


def _step(engine, mode, *, heal_on, calculate_entropy=True, entropy_coeff=0.0):
    """One verl forward_step + backward; heal's pieces on or off. Returns (loss, retained bytes, grads, metrics)."""
    from verl.workers.utils import losses as verl_losses

    wrapped = verl_losses.ppo_loss
    assert getattr(wrapped, "__heal_wrapped__", False)
    loss_fn = wrapped if heal_on else _previous_hand_over(wrapped.__wrapped_ppo_loss__)
    if heal_on:
        entropy_graph.install_no_grad_entropy()
    else:
        entropy_graph.uninstall_no_grad_entropy()
    try:
        engine.module.zero_grad(set_to_none=True)
        lf = functools.partial(loss_fn, config=_actor_config(mode, entropy_coeff))
        out = {}

        def run():
            loss, output = engine.forward_step(_micro_batch(calculate_entropy), loss_function=lf, forward_only=False)
            out.update(output)
            return loss

        loss, retained = _retained_bytes(run)
        loss.backward()
        grads = [p.grad.clone() for p in engine.module.parameters()]
        return float(loss), retained, grads, out["metrics"]
    finally:
        entropy_graph.install_no_grad_entropy()


@pytest.mark.parametrize("mode", ["high_entropy_tokens", "entropy_advantage", "vanilla"])
def test_no_entropy_graph_is_kept_with_coefficient_zero(engine, mode):
    logits_bytes = N_TOKENS * VOCAB * 4
    loss_before, before, grads_before, m_before = _step(engine, mode, heal_on=False)
    loss_after, after, grads_after, m_after = _step(engine, mode, heal_on=True)
    _, floor, _, _ = _step(engine, "vanilla", heal_on=True, calculate_entropy=False)
    # verl's own path keeps the entropy graph: at least one more float32 [N, V] (the softmax)
    assert before - floor >= logits_bytes
    # heal's path keeps nothing for the entropy: the same bytes as a step that computes no entropy
    assert after == floor
    assert loss_after == pytest.approx(loss_before, rel=1e-6, abs=1e-9)
    for a, b in zip(grads_after, grads_before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # verl's metric is still there, with verl's value
    ent_before, ent_after = m_before["actor/entropy_loss"], m_after["actor/entropy_loss"]
    assert [float(v) for v in ent_after.values] == pytest.approx([float(v) for v in ent_before.values], rel=1e-6)
    assert ent_after.aggregation == ent_before.aggregation


def test_loss_wrapper_alone_frees_the_graph(engine):
    """Without the engine-side no_grad (other engines), the detached hand-over still leaves no graph."""
    from verl.workers.utils import losses as verl_losses

    entropy_graph.uninstall_no_grad_entropy()
    try:
        lf = functools.partial(verl_losses.ppo_loss, config=_actor_config("high_entropy_tokens"))
        _, retained = _retained_bytes(
            lambda: engine.forward_step(_micro_batch(), loss_function=lf, forward_only=False)[0])
        lf0 = functools.partial(verl_losses.ppo_loss, config=_actor_config("vanilla"))
        _, floor = _retained_bytes(
            lambda: engine.forward_step(_micro_batch(False), loss_function=lf0, forward_only=False)[0])
    finally:
        entropy_graph.install_no_grad_entropy()
    assert retained == floor


def test_nonzero_coefficient_keeps_verls_entropy_bonus(engine):
    """entropy_coeff != 0: the bonus needs its gradient; heal changes nothing."""
    loss_v, before, grads_v, _ = _step(engine, "vanilla", heal_on=False, entropy_coeff=0.01)
    loss_h, after, grads_h, _ = _step(engine, "vanilla", heal_on=True, entropy_coeff=0.01)
    assert after == before
    assert loss_h == pytest.approx(loss_v, rel=1e-6)
    for a, b in zip(grads_h, grads_v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    _, _, grads_0, _ = _step(engine, "vanilla", heal_on=True, entropy_coeff=0.0)
    assert not all(torch.allclose(a, b) for a, b in zip(grads_h, grads_0))  # the bonus moved the gradient


def test_loss_config_of_recognises_verls_ppo_loss_only():
    from verl.workers.utils import losses as verl_losses

    cfg = _actor_config("vanilla")
    assert entropy_graph.loss_config_of(functools.partial(verl_losses.ppo_loss, config=cfg)) is cfg
    assert entropy_graph.loss_config_of(functools.partial(lambda config, **k: 0, config=cfg)) is None
    assert entropy_graph.loss_config_of(None) is None
