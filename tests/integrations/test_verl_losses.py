"""heal's policy-loss modes through verl's real registry and verl's real ``ppo_loss``."""

import math

import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from heal.integrations.verl import losses as heal_losses  # noqa: E402
from heal.integrations.verl.losses import HealPolicyLossConfig  # noqa: E402


def _actor_config(loss_mode="vanilla", **policy):
    from verl.workers.config import ActorConfig

    return ActorConfig(
        strategy="fsdp",
        rollout_n=2,
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        policy_loss=HealPolicyLossConfig(loss_mode=loss_mode, **policy),
    )


def _batch(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    new = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[1] = -adv[1].abs()  # some negative advantages for the dual clip
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    return old, new, adv, mask, ent


def _literal_token_loss(old, new, adv, lo=0.2, hi=0.28, c=3.0):
    """Dual-clip PPO per token, one scalar at a time (float64)."""
    out = torch.zeros_like(old)
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            r = math.exp(max(-20.0, min(20.0, float(new[i, t] - old[i, t]))))
            a = float(adv[i, t])
            loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if a < 0:
                loss = min(loss, -a * c)
            out[i, t] = loss
    return out


def test_losses_are_in_verls_registry():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

    assert get_policy_loss_fn("high_entropy_tokens") is heal_losses.compute_policy_loss_high_entropy_tokens
    assert get_policy_loss_fn("entropy_advantage") is heal_losses.compute_policy_loss_entropy_advantage
    assert "vanilla" in POLICY_LOSS_REGISTRY and "kl_cov" in POLICY_LOSS_REGISTRY  # verl's own still there


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_high_entropy_tokens_matches_literal(rho):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, ent = _batch(seed=int(rho * 10))
    cfg = _actor_config("high_entropy_tokens", high_entropy_ratio=rho)
    loss, metrics = get_policy_loss_fn("high_entropy_tokens")(
        old, new, adv, mask, loss_agg_mode="token-mean", config=cfg, rollout_is_weights=None, entropy=ent
    )
    # literal: sort the valid entropies, keep the ceil(rho * N) largest, mean of their token losses
    valid = [(float(ent[i, t]), i, t) for i in range(ent.shape[0]) for t in range(ent.shape[1]) if mask[i, t]]
    k = math.ceil(rho * len(valid) - 1e-9)
    chosen = sorted(valid, reverse=True)[:k]
    tok = _literal_token_loss(old, new, adv)
    expected = sum(float(tok[i, t]) for _, i, t in chosen) / k
    assert float(loss) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics["actor/high_entropy_frac"] == pytest.approx(k / len(valid))
    assert metrics["actor/high_entropy_threshold"] == pytest.approx(chosen[-1][0])


def test_high_entropy_tokens_rho1_equals_vanilla_and_padding_is_ignored():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, ent = _batch(seed=3)
    ent = ent.masked_fill(~mask, 1e9)  # padding must never be selected
    cfg = _actor_config("high_entropy_tokens", high_entropy_ratio=1.0)
    ours, _ = get_policy_loss_fn("high_entropy_tokens")(old, new, adv, mask, "token-mean", cfg, None, entropy=ent)
    vanilla, _ = get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", cfg, None)
    assert float(ours) == pytest.approx(float(vanilla), rel=1e-9)
    cfg = _actor_config("high_entropy_tokens", high_entropy_ratio=0.2)
    _, m = get_policy_loss_fn("high_entropy_tokens")(old, new, adv, mask, "token-mean", cfg, None, entropy=ent)
    assert m["actor/high_entropy_threshold"] < 10  # chosen among valid tokens only


def test_high_entropy_tokens_gradient_only_on_selected_tokens():
    old, new, adv, mask, ent = _batch(seed=4)
    new = new.clone().requires_grad_(True)
    cfg = _actor_config("high_entropy_tokens", high_entropy_ratio=0.25)
    loss, _ = heal_losses.compute_policy_loss_high_entropy_tokens(old, new, adv, mask, "token-mean", cfg, None, entropy=ent)
    loss.backward()
    sel, _ = heal_losses.top_entropy_mask(ent, mask, 0.25)
    assert bool((new.grad[~sel] == 0).all())
    assert bool((new.grad[sel] != 0).any())


def test_high_entropy_tokens_global_token_normaliser():
    """With verl's global token count the normaliser is that count times the selected fraction."""
    old, new, adv, mask, ent = _batch(seed=5)
    cfg = _actor_config("high_entropy_tokens", high_entropy_ratio=0.5)
    local, _ = heal_losses.compute_policy_loss_high_entropy_tokens(old, new, adv, mask, "token-mean", cfg, None, entropy=ent)
    n_valid = int(mask.sum())
    cfg.global_batch_info.update({"dp_size": 1, "batch_num_tokens": 4 * n_valid, "global_batch_size": 16})
    scaled, _ = heal_losses.compute_policy_loss_high_entropy_tokens(old, new, adv, mask, "token-mean", cfg, None, entropy=ent)
    assert float(scaled) == pytest.approx(float(local) / 4, rel=1e-9)


@pytest.mark.parametrize("alpha,kappa", [(0.4, 2.0), (1.5, 1.0), (0.0, 3.0)])
def test_entropy_advantage_matches_literal(alpha, kappa):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, ent = _batch(seed=7)
    cfg = _actor_config("entropy_advantage", entropy_adv_alpha=alpha, entropy_adv_kappa=kappa)
    loss, metrics = get_policy_loss_fn("entropy_advantage")(old, new, adv, mask, "token-mean", cfg, None, entropy=ent)
    shaped = torch.zeros_like(adv)
    for i in range(adv.shape[0]):
        for t in range(adv.shape[1]):
            a = float(adv[i, t])
            shaped[i, t] = a + min(alpha * float(ent[i, t]), abs(a) / kappa)
    tok = _literal_token_loss(old, new, shaped)
    expected = float(tok[mask].sum()) / int(mask.sum())
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    nz = mask & (adv != 0)
    assert bool((torch.sign(shaped[nz]) * torch.sign(adv[nz]) >= 0).all())  # never flips (kappa >= 1)
    if kappa > 1:
        assert torch.equal(torch.sign(shaped[nz]), torch.sign(adv[nz]))
    if alpha == 0:
        vanilla, _ = get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", cfg, None)
        assert float(loss) == pytest.approx(float(vanilla), rel=1e-9)


def test_entropy_is_detached_in_entropy_advantage():
    old, new, adv, mask, ent = _batch(seed=8)
    ent = ent.clone().requires_grad_(True)
    cfg = _actor_config("entropy_advantage")
    loss, _ = heal_losses.compute_policy_loss_entropy_advantage(old, new.requires_grad_(True), adv, mask, "token-mean", cfg, None, entropy=ent)
    loss.backward()
    assert ent.grad is None


def test_missing_entropy_names_the_switch():
    old, new, adv, mask, _ = _batch()
    cfg = _actor_config("high_entropy_tokens")
    with pytest.raises(RuntimeError, match="calculate_entropy"):
        heal_losses.compute_policy_loss_high_entropy_tokens(old, new, adv, mask, "token-mean", cfg, None)
    with pytest.raises(RuntimeError, match="calculate_entropy"):
        heal_losses.compute_policy_loss_entropy_advantage(old, new, adv, mask, "token-mean", cfg, None)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"high_entropy_ratio": 0.0}, "high_entropy_ratio"),
        ({"high_entropy_ratio": 1.5}, "high_entropy_ratio"),
        ({"entropy_adv_alpha": -1.0}, "entropy_adv_alpha"),
        ({"entropy_adv_kappa": 0.5}, "entropy_adv_kappa"),
    ],
)
def test_policy_loss_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        HealPolicyLossConfig(**kwargs)


def test_policy_loss_config_through_hydra_target():
    """verl builds ActorConfig with hydra instantiate: the heal subclass and its keys pass through."""
    from omegaconf import OmegaConf

    from verl.utils.config import omega_conf_to_dataclass

    node = OmegaConf.create(
        {
            "_target_": "verl.workers.config.ActorConfig",
            "strategy": "fsdp",
            "rollout_n": 2,
            "ppo_mini_batch_size": 4,
            "ppo_micro_batch_size_per_gpu": 2,
            "policy_loss": {
                "_target_": "heal.integrations.verl.losses.HealPolicyLossConfig",
                "loss_mode": "high_entropy_tokens",
                "high_entropy_ratio": 0.3,
            },
        }
    )
    cfg = omega_conf_to_dataclass(node)
    assert isinstance(cfg.policy_loss, HealPolicyLossConfig)
    assert cfg.policy_loss.high_entropy_ratio == 0.3 and cfg.policy_loss.entropy_adv_kappa == 2.0
    node.policy_loss.high_entropy_ratio = 2.0
    with pytest.raises(Exception, match="high_entropy_ratio"):
        omega_conf_to_dataclass(node)


def _ppo_loss_inputs(seed=0):
    """A micro-batch the way verl's engine hands it to ``ppo_loss``: nested (no-padding) tensors."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = [3, 5, 2, 4], [6, 4, 7, 5]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    seq_lens = [p + r for p, r in zip(prompt_lens, resp_lens)]
    log_probs = [-torch.rand(n, generator=g) * 2 for n in seq_lens]
    entropy = [torch.rand(n, generator=g) * 3 for n in seq_lens]
    old = [lp[p - 1 : p - 1 + r] + 0.1 * torch.randn(r, generator=g) for lp, p, r in zip(log_probs, prompt_lens, resp_lens)]
    adv = [torch.full((r,), float(torch.randn(1, generator=g))) for r in resp_lens]
    data = TensorDict(
        {
            "prompts": nested([torch.ones(p, dtype=torch.long) for p in prompt_lens]),
            "responses": nested([torch.ones(r, dtype=torch.long) for r in resp_lens]),
            "response_mask": nested([torch.ones(r, dtype=torch.long) for r in resp_lens]),
            "old_log_probs": nested(old),
            "advantages": nested(adv),
        },
        batch_size=len(seq_lens),
    )
    tu.assign_non_tensor_data(data, "dp_size", 1)
    tu.assign_non_tensor_data(data, "batch_num_tokens", None)
    tu.assign_non_tensor_data(data, "global_batch_size", None)
    model_output = {"log_probs": nested(log_probs), "entropy": nested(entropy)}
    # padded response-aligned views (log-prob of response token t sits at sequence position p - 1 + t)
    R = max(resp_lens)
    pad = lambda xs: torch.stack([torch.nn.functional.pad(x, (0, R - x.numel())) for x in xs])  # noqa: E731
    lp_resp = pad([lp[p - 1 : p - 1 + r] for lp, p, r in zip(log_probs, prompt_lens, resp_lens)])
    ent_resp = pad([e[p - 1 : p - 1 + r] for e, p, r in zip(entropy, prompt_lens, resp_lens)])
    mask = pad([torch.ones(r) for r in resp_lens]).bool()
    return data, model_output, pad(old), lp_resp, pad(adv), mask, ent_resp


@pytest.mark.parametrize("mode", ["high_entropy_tokens", "entropy_advantage"])
def test_verl_ppo_loss_hands_entropy_to_heal_losses(mode):
    """verl's own ppo_loss (as the engine worker calls it) reaches heal's loss with the update
    pass's entropy, aligned with log_prob: same number as calling the loss directly."""
    from verl.workers.utils import losses as verl_losses

    assert getattr(verl_losses.ppo_loss, "__heal_wrapped__", False), "plugin did not wrap verl's ppo_loss"
    cfg = _actor_config(mode)
    data, model_output, old, lp, adv, mask, ent = _ppo_loss_inputs()
    total, metrics = verl_losses.ppo_loss(cfg, model_output, data)
    fn = {"high_entropy_tokens": heal_losses.compute_policy_loss_high_entropy_tokens,
          "entropy_advantage": heal_losses.compute_policy_loss_entropy_advantage}[mode]
    cfg2 = _actor_config(mode)
    direct, _ = fn(old, lp, adv, mask, "token-mean", cfg2, None, entropy=ent)
    # entropy_coeff = 0 and no KL loss: verl's total is the policy loss
    assert float(total) == pytest.approx(float(direct), rel=1e-6)
    assert "actor/pg_loss" in metrics
    assert heal_losses.current_entropy() is None  # published only during the call


def test_verl_ppo_loss_without_entropy_fails_clearly():
    from verl.workers.utils import losses as verl_losses

    cfg = _actor_config("high_entropy_tokens")
    data, model_output, *_ = _ppo_loss_inputs()
    model_output.pop("entropy")
    with pytest.raises(RuntimeError, match="calculate_entropy"):
        verl_losses.ppo_loss(cfg, model_output, data)
