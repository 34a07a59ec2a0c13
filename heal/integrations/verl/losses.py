"""Entropy-regularisation baselines as verl policy-loss modes (``actor.policy_loss.loss_mode``).

Registered in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` by heal's verl plugin:

``high_entropy_tokens`` -- "Beyond the 80/20 rule" (Wang et al. 2025, seed 003; HEAL paper eq. 14):
    the clipped PPO/GRPO surrogate on the top-``rho`` highest-entropy valid tokens only,
    normalised by their count ``N_HE``::

        M_t = [H_t >= H_(k)],  k = ceil(rho * N_valid)   (H_(k): the k-th largest valid entropy)
        L   = -(1 / N_HE) * sum_t M_t * min(r_t A_t, clip(r_t) A_t)

    Where the top-``rho`` set is taken is ``policy_loss.high_entropy_scope``: ``batch`` (the paper's
    rule) uses the mask the ``heal_sync`` driver computed over the whole batch and shipped through
    the TransferQueue (``heal.high_entropy_scope: batch``, the default there); ``micro_batch`` (the
    default of the loss on its own, e.g. under verl's plain trainer; the 80/20 authors' code) takes it
    over the tokens of one loss call. Ties at the threshold are all kept.
    With ``loss_agg_mode=token-mean`` and verl's global token count (``batch_num_tokens``) the
    normaliser is the batch's ``N_HE`` shipped with the mask (``batch``), or that global count times
    this call's selected fraction (``micro_batch``). Other aggregation modes apply
    verl's ``agg_loss`` to the masked loss. ``rho`` = ``policy_loss.high_entropy_ratio``
    (default 0.2).

``entropy_advantage`` -- "Reasoning with Exploration: An Entropy Perspective" (Cheng et al. 2025,
    seed 004): the clipped surrogate with the advantage shaped per token::

        A'_t = A_t + min(alpha * H_t.detach(), |A_t| / kappa)

    ``alpha`` = ``policy_loss.entropy_adv_alpha`` (default 0.4), ``kappa`` =
    ``policy_loss.entropy_adv_kappa`` (default 2.0); these are the values of Cheng et al.'s
    experiments (seed 004's summary does not list them). ``kappa >= 1`` keeps the sign of ``A``.

Both have verl's policy-loss signature ``(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights) -> (loss, metrics)`` plus an optional keyword
``entropy`` (``[B, T]``, the current policy's token entropy). verl's ``ppo_loss`` does not pass
entropy to policy losses; heal's plugin wraps ``verl.workers.utils.losses.ppo_loss`` (transparently:
it only publishes ``model_output["entropy"]``, padded like ``log_prob``, for the duration of the
call, and only when one of these two modes is selected), and the loss reads it from there; with
``entropy_coeff == 0`` the entropy reaches the loss detached and verl's ``0 * entropy_loss`` term is
skipped, so no entropy graph is kept (:mod:`heal.integrations.verl.entropy_graph`). verl
computes that entropy in the update pass only when asked: set
``actor_rollout_ref.actor.calculate_entropy=true`` (the recipes do). Without it these losses raise
a ``RuntimeError`` that says so.

Their parameters live in :class:`HealPolicyLossConfig`, a subclass of verl's ``PolicyLossConfig``
selected with ``actor_rollout_ref.actor.policy_loss._target_=heal.integrations.verl.losses.HealPolicyLossConfig``
(verl builds the actor config with hydra's ``instantiate``, so the subclass and its extra keys
pass through). With verl's plain ``PolicyLossConfig`` the defaults above apply.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = [
    "HIGH_ENTROPY_TOKENS",
    "ENTROPY_ADVANTAGE",
    "ENTROPY_LOSS_MODES",
    "HealPolicyLossConfig",
    "compute_policy_loss_high_entropy_tokens",
    "compute_policy_loss_entropy_advantage",
    "top_entropy_mask",
    "entropy_shaped_advantages",
    "register_policy_losses",
    "wrap_ppo_loss",
    "current_entropy",
    "entropy_context",
    "high_entropy_mask_context",
    "entropy_is_value_only",
    "HIGH_ENTROPY_SCOPES",
    "HIGH_ENTROPY_MASK_KEY",
    "HIGH_ENTROPY_TOTAL_KEY",
]

HIGH_ENTROPY_TOKENS = "high_entropy_tokens"
ENTROPY_ADVANTAGE = "entropy_advantage"
ENTROPY_LOSS_MODES = (HIGH_ENTROPY_TOKENS, ENTROPY_ADVANTAGE)

DEFAULT_HIGH_ENTROPY_RATIO = 0.2
DEFAULT_ENTROPY_ADV_ALPHA = 0.4
DEFAULT_ENTROPY_ADV_KAPPA = 2.0

HIGH_ENTROPY_SCOPES = ("batch", "micro_batch")
HIGH_ENTROPY_MASK_KEY = "heal_high_entropy_mask"  # TransferQueue field: per response token, 1.0 = selected
HIGH_ENTROPY_TOTAL_KEY = "heal_high_entropy_total"  # TransferQueue field: per row, the batch's selected-token count

_ENTROPY: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("heal_policy_entropy", default=None)
_HE_MASK: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("heal_high_entropy_mask", default=None)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def _check_ratio(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_high_entropy_scope(value, key: str) -> str:
    if value not in HIGH_ENTROPY_SCOPES:
        raise ValueError(f"{key} must be one of {list(HIGH_ENTROPY_SCOPES)}, got {value!r}")
    return value


def _check_alpha(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_kappa(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise ValueError(f"{key} must be a finite number >= 1 (kappa >= 1 keeps the sign of the advantage), got {value!r}")
    return float(value)


def _policy_loss_config_base():
    try:
        from verl.workers.config import PolicyLossConfig
    except Exception:  # pragma: no cover - verl missing: the class is unusable anyway
        return object
    return PolicyLossConfig


@dataclass
class HealPolicyLossConfig(_policy_loss_config_base()):
    """verl's ``PolicyLossConfig`` plus the parameters of heal's entropy losses (validated here).

    Attributes:
        high_entropy_ratio: ``rho`` of ``high_entropy_tokens`` (fraction of tokens updated), in (0, 1].
        entropy_adv_alpha: ``alpha`` of ``entropy_advantage`` (>= 0).
        entropy_adv_kappa: ``kappa`` of ``entropy_advantage`` (>= 1).
        high_entropy_scope: where ``high_entropy_tokens`` takes its top-``rho``: ``micro_batch`` (each
            loss call, the 80/20 authors' code; the default of the loss on its own) or ``batch`` (the
            paper's rule: one threshold over the whole batch, computed by the ``heal_sync`` driver and
            shipped as a per-token mask; ``heal_sync`` sets this from ``heal.high_entropy_scope``).
    """

    high_entropy_ratio: float = DEFAULT_HIGH_ENTROPY_RATIO
    entropy_adv_alpha: float = DEFAULT_ENTROPY_ADV_ALPHA
    entropy_adv_kappa: float = DEFAULT_ENTROPY_ADV_KAPPA
    high_entropy_scope: str = "micro_batch"

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        _check_ratio(self.high_entropy_ratio, "actor.policy_loss.high_entropy_ratio")
        _check_alpha(self.entropy_adv_alpha, "actor.policy_loss.entropy_adv_alpha")
        _check_kappa(self.entropy_adv_kappa, "actor.policy_loss.entropy_adv_kappa")
        check_high_entropy_scope(self.high_entropy_scope, "actor.policy_loss.high_entropy_scope")


def _policy_param(config, key: str, default):
    """``config.policy_loss.<key>`` (ActorConfig or DictConfig), or ``default`` when absent."""
    if config is None:
        return default
    pl = config.get("policy_loss", None) if hasattr(config, "get") else getattr(config, "policy_loss", None)
    if pl is None:
        return default
    value = pl.get(key, None) if hasattr(pl, "get") else getattr(pl, key, None)
    return default if value is None else value


def _clip_params(config):
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required: it holds the clip ratios")
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    clip = get("clip_ratio", 0.2)
    low = get("clip_ratio_low", None)
    high = get("clip_ratio_high", None)
    c = get("clip_ratio_c", 3.0)
    low = clip if low is None else low
    high = clip if high is None else high
    if not c > 1.0:
        raise ValueError(f"actor.clip_ratio_c must be > 1 (dual-clip PPO), got {c!r}")
    return float(low), float(high), float(c)


def _global_batch_info(config) -> dict:
    info = getattr(config, "global_batch_info", None) if config is not None else None
    if info is None and config is not None and hasattr(config, "get"):
        info = config.get("global_batch_info", None)
    return dict(info) if info else {}


# ---------------------------------------------------------------------------------------------
# maths
# ---------------------------------------------------------------------------------------------


def _clipped_surrogate(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_c):
    """Per-token dual-clip PPO loss (the surrogate of verl's ``vanilla`` mode) and its metrics."""
    from verl.utils.torch_functional import masked_mean

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    upper = torch.maximum(unclipped, clipped)
    lower_cap = -advantages * clip_c
    losses = torch.where(advantages < 0, torch.minimum(upper, lower_cap), upper)
    metrics = {
        "actor/pg_clipfrac": masked_mean(torch.gt(clipped, unclipped).float(), response_mask).detach().item(),
        "actor/ppo_kl": masked_mean(-log_ratio, response_mask).detach().item(),
        "actor/pg_clipfrac_lower": masked_mean(
            torch.gt(upper, lower_cap) * (advantages < 0).float(), response_mask
        ).detach().item(),
    }
    return losses, metrics


def top_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, ratio: float):
    """Boolean mask of the top-``ratio`` highest-entropy valid tokens, and the threshold used.

    ``k = ceil(ratio * N_valid)`` tokens (at least 1 when any token is valid); every valid token
    whose entropy is ``>=`` the k-th largest valid entropy is selected (ties are all kept).
    Returns ``(mask, threshold)``; with no valid token the mask is all False and the threshold NaN.
    """
    ratio = _check_ratio(ratio, "ratio")
    valid = response_mask.bool()
    if entropy.shape != valid.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)} but response_mask has {tuple(valid.shape)}")
    ent = entropy.detach().float()
    vals = ent[valid]
    n = vals.numel()
    if n == 0:
        return torch.zeros_like(valid), float("nan")
    k = max(1, min(n, math.ceil(ratio * n - 1e-9)))
    threshold = torch.topk(vals, k, sorted=True).values[-1]
    return valid & (ent >= threshold), float(threshold)


def entropy_shaped_advantages(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float):
    """``A + min(alpha * H.detach(), |A| / kappa)`` (Cheng et al. 2025), elementwise."""
    alpha = _check_alpha(alpha, "alpha")
    kappa = _check_kappa(kappa, "kappa")
    if entropy.shape != advantages.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)} but advantages has {tuple(advantages.shape)}")
    bonus = torch.minimum(alpha * entropy.detach().to(advantages.dtype), advantages.abs() / kappa)
    return advantages + bonus, bonus


def _require_entropy(entropy, mode: str, shape) -> torch.Tensor:
    if entropy is None:
        entropy = _ENTROPY.get()
    if entropy is None:
        raise RuntimeError(
            f"policy loss {mode!r} needs the current policy's per-token entropy, but none was provided: set "
            "actor_rollout_ref.actor.calculate_entropy=true (verl then computes it in the update pass) and keep "
            "heal's verl plugin enabled (VERL_USE_EXTERNAL_PLUGINS must not be 'none'; it publishes the entropy "
            "to the loss), or pass entropy= explicitly"
        )
    if tuple(entropy.shape) != tuple(shape):
        raise ValueError(f"entropy has shape {tuple(entropy.shape)} but log_prob has {tuple(shape)}")
    return entropy


# ---------------------------------------------------------------------------------------------
# the two policy losses
# ---------------------------------------------------------------------------------------------


def compute_policy_loss_high_entropy_tokens(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    high_entropy_mask: Optional[torch.Tensor] = None,
    high_entropy_total: Optional[float] = None,
):
    """80/20 policy loss: the clipped surrogate on the top-``rho`` entropy tokens (module docstring).

    ``high_entropy_mask`` (``[B, T]`` bool, default: the mask the driver shipped for this micro-batch,
    if any) is the batch-level selection of ``heal.high_entropy_scope: batch``; ``high_entropy_total``
    the batch's selected-token count (the token-mean normaliser). Without a mask the top-``rho`` is
    taken over this call's tokens (``micro_batch``); ``actor.policy_loss.high_entropy_scope=batch``
    without a shipped mask is an error.
    """
    from verl.trainer.ppo.core_algos import agg_loss

    if high_entropy_mask is None:
        shipped = _HE_MASK.get()
        if shipped is not None:
            high_entropy_mask, high_entropy_total = shipped
    scope = check_high_entropy_scope(
        _policy_param(config, "high_entropy_scope", "micro_batch"), "actor.policy_loss.high_entropy_scope"
    )
    valid = response_mask.bool()
    clip_low, clip_high, clip_c = _clip_params(config)
    if high_entropy_mask is None:
        if scope == "batch":
            raise RuntimeError(
                "actor.policy_loss.high_entropy_scope=batch but no batch-level high-entropy mask reached the loss: "
                "the mask is computed by the heal_sync trainer (trainer.v1.trainer_mode=heal_sync, "
                "heal.high_entropy_scope=batch) and shipped through the TransferQueue; with another trainer set "
                "high_entropy_scope=micro_batch"
            )
        entropy = _require_entropy(entropy, HIGH_ENTROPY_TOKENS, log_prob.shape)
        rho = _check_ratio(
            _policy_param(config, "high_entropy_ratio", DEFAULT_HIGH_ENTROPY_RATIO), "actor.policy_loss.high_entropy_ratio"
        )
        he_mask, threshold = top_entropy_mask(entropy, valid, rho)
        high_entropy_total = None
    else:
        if tuple(high_entropy_mask.shape) != tuple(log_prob.shape):
            raise ValueError(
                f"high_entropy_mask has shape {tuple(high_entropy_mask.shape)} but log_prob has {tuple(log_prob.shape)}"
            )
        he_mask = high_entropy_mask.bool() & valid
        threshold = float("nan")  # chosen by the driver over the whole batch (logged there)
    losses, metrics = _clipped_surrogate(old_log_prob, log_prob, advantages, valid, clip_low, clip_high, clip_c)
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights

    n_valid = int(valid.sum())
    n_sel = int(he_mask.sum())
    info = _global_batch_info(config)
    if loss_agg_mode == "token-mean":
        global_tokens = info.get("batch_num_tokens", None)
        if global_tokens is None:
            info["batch_num_tokens"] = he_mask.sum().clamp(min=1)
        elif high_entropy_total is not None:  # batch scope: the batch's N_HE
            info["batch_num_tokens"] = max(float(high_entropy_total), 1.0)
        else:
            frac = n_sel / n_valid if n_valid else 0.0
            info["batch_num_tokens"] = max(float(global_tokens) * frac, 1.0)
    if loss_agg_mode == "token-mean" and n_sel == 0:
        pg_loss = (losses * 0.0).sum()  # keeps the graph; nothing to learn from
    else:
        pg_loss = agg_loss(loss_mat=losses, loss_mask=he_mask, loss_agg_mode=loss_agg_mode, **info)
    metrics["actor/high_entropy_frac"] = (n_sel / n_valid) if n_valid else 0.0
    if high_entropy_mask is None:
        metrics["actor/high_entropy_threshold"] = threshold
    return pg_loss, metrics


def compute_policy_loss_entropy_advantage(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
):
    """Entropy-shaped advantage ``A + min(alpha*H.detach(), |A|/kappa)`` in the clipped surrogate."""
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.torch_functional import masked_mean

    entropy = _require_entropy(entropy, ENTROPY_ADVANTAGE, log_prob.shape)
    alpha = _check_alpha(
        _policy_param(config, "entropy_adv_alpha", DEFAULT_ENTROPY_ADV_ALPHA), "actor.policy_loss.entropy_adv_alpha"
    )
    kappa = _check_kappa(
        _policy_param(config, "entropy_adv_kappa", DEFAULT_ENTROPY_ADV_KAPPA), "actor.policy_loss.entropy_adv_kappa"
    )
    clip_low, clip_high, clip_c = _clip_params(config)
    valid = response_mask.bool()
    shaped, bonus = entropy_shaped_advantages(advantages, entropy, alpha, kappa)
    losses, metrics = _clipped_surrogate(old_log_prob, log_prob, shaped, valid, clip_low, clip_high, clip_c)
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    pg_loss = agg_loss(loss_mat=losses, loss_mask=valid, loss_agg_mode=loss_agg_mode, **_global_batch_info(config))
    metrics["actor/entropy_adv_bonus"] = masked_mean(bonus, valid).detach().item() if bool(valid.any()) else 0.0
    return pg_loss, metrics


# ---------------------------------------------------------------------------------------------
# registration and the entropy hand-over
# ---------------------------------------------------------------------------------------------


def register_policy_losses(core_algos=None) -> None:
    """Register both modes in verl's ``POLICY_LOSS_REGISTRY`` (idempotent)."""
    if core_algos is None:
        from verl.trainer.ppo import core_algos
    core_algos.register_policy_loss(HIGH_ENTROPY_TOKENS)(compute_policy_loss_high_entropy_tokens)
    core_algos.register_policy_loss(ENTROPY_ADVANTAGE)(compute_policy_loss_entropy_advantage)


def current_entropy() -> Optional[torch.Tensor]:
    """The entropy published for the policy-loss call in progress (``None`` outside one)."""
    return _ENTROPY.get()


@contextlib.contextmanager
def entropy_context(entropy: Optional[torch.Tensor]):
    """Publish ``entropy`` ([B, T], padded like ``log_prob``) to heal's policy losses within the block."""
    token = _ENTROPY.set(entropy)
    try:
        yield
    finally:
        _ENTROPY.reset(token)


@contextlib.contextmanager
def high_entropy_mask_context(mask: Optional[torch.Tensor], total: Optional[float] = None):
    """Publish the driver's batch-level high-entropy mask ([B, T] bool) and the batch's selected-token
    count to ``high_entropy_tokens`` within the block (nothing is published when ``mask`` is None)."""
    token = _HE_MASK.set(None if mask is None else (mask, total))
    try:
        yield
    finally:
        _HE_MASK.reset(token)


def _loss_mode(config) -> Optional[str]:
    try:
        pl = config.policy_loss
        return pl.get("loss_mode", "vanilla") if hasattr(pl, "get") else getattr(pl, "loss_mode", "vanilla")
    except Exception:
        return None


def _entropy_coeff(config) -> Optional[float]:
    """``actor.entropy_coeff`` as a float, ``None`` when it cannot be read."""
    value = config.get("entropy_coeff", None) if hasattr(config, "get") else getattr(config, "entropy_coeff", None)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def entropy_is_value_only(config) -> bool:
    """True when the update pass needs the entropy's value only: ``actor.entropy_coeff == 0``.

    verl's ``ppo_loss`` then adds ``0 * entropy_loss`` to the loss, which keeps the entropy's
    autograd graph (for verl's ``entropy_from_logits``: a float32 ``[N, V]`` softmax per
    micro-batch) alive until the backward pass for a term that contributes nothing.
    """
    coeff = _entropy_coeff(config)
    return coeff is not None and coeff == 0.0


def _padded_response(data, name: str) -> torch.Tensor:
    """Field ``name`` of a micro-batch (nested, response-aligned) as a padded ``[B, T_response]`` tensor,
    the layout of ``old_log_probs`` in verl's ``ppo_loss``."""
    return data.select(name).to_padded_tensor()[name]


def _entropy_loss_metric(entropy_padded, data, config, aggregation):
    """verl's ``actor/entropy_loss`` metric, computed from the detached entropy (no graph)."""
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.metric import Metric

    with torch.no_grad():
        mask = _padded_response(data, "response_mask").to(torch.bool)
        value = agg_loss(
            loss_mat=entropy_padded, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
        )
    return Metric(value=value, aggregation=aggregation)


def wrap_ppo_loss(ppo_loss):
    """Wrap verl's ``ppo_loss(config, model_output, data, dp_group=None)``.

    * When the model output carries entropy and ``actor.entropy_coeff == 0`` (the entropy is needed
      as a value only: by heal's losses, or for verl's ``actor/entropy_loss`` metric), verl's
      ``ppo_loss`` is called without it, so its ``policy_loss -= 0 * entropy_loss`` term is skipped
      and the loss holds no reference to the entropy's autograd graph; the metric
      ``actor/entropy_loss`` is computed from the detached entropy, as verl would.
    * When the selected mode is one of heal's entropy losses, the detached entropy (converted to
      the padded ``[B, T_response]`` layout of ``log_prob``) is published to the loss for the
      duration of the call, together with the batch-level high-entropy mask when the driver
      shipped one (``heal.high_entropy_scope: batch``, field :data:`HIGH_ENTROPY_MASK_KEY`).
    * Otherwise the call goes straight through.
    """
    if getattr(ppo_loss, "__heal_wrapped__", False):
        return ppo_loss

    @functools.wraps(ppo_loss)
    def heal_ppo_loss(config, model_output, data, dp_group=None):
        entropy = model_output.get("entropy", None) if hasattr(model_output, "get") else None
        heal_mode = _loss_mode(config) in ENTROPY_LOSS_MODES
        value_only = entropy is not None and entropy_is_value_only(config)
        if not heal_mode and not value_only:
            return ppo_loss(config, model_output, data, dp_group=dp_group)
        from verl.workers.utils.padding import no_padding_2_padding

        padded = None if entropy is None else no_padding_2_padding(entropy.detach(), data)
        batch_mask = batch_total = None
        if heal_mode and HIGH_ENTROPY_MASK_KEY in data.keys():
            batch_mask = _padded_response(data, HIGH_ENTROPY_MASK_KEY).to(torch.bool)
            if HIGH_ENTROPY_TOTAL_KEY in data.keys():
                batch_total = float(data[HIGH_ENTROPY_TOTAL_KEY].reshape(-1)[0])
        call_output = model_output
        if value_only:
            call_output = {k: v for k, v in model_output.items() if k != "entropy"}
        with entropy_context(padded if heal_mode else None), high_entropy_mask_context(batch_mask, batch_total):
            loss, metrics = ppo_loss(config, call_output, data, dp_group=dp_group)
        if value_only:
            pg = metrics.get("actor/pg_loss", None)
            aggregation = getattr(pg, "aggregation", None)
            if aggregation is not None:
                metrics["actor/entropy_loss"] = _entropy_loss_metric(padded, data, config, aggregation)
        return loss, metrics

    heal_ppo_loss.__heal_wrapped__ = True
    heal_ppo_loss.__wrapped_ppo_loss__ = ppo_loss
    return heal_ppo_loss


def install_ppo_loss_wrapper(losses_module=None) -> None:
    """Replace ``verl.workers.utils.losses.ppo_loss`` by :func:`wrap_ppo_loss` of itself (idempotent).

    Must run before ``verl.workers.engine_workers`` binds the name (the plugin does it from a
    post-import hook on ``verl.workers.utils.losses``); modules that already bound it are updated too.
    """
    import sys

    if losses_module is None:
        from verl.workers.utils import losses as losses_module
    original = losses_module.ppo_loss
    wrapped = wrap_ppo_loss(original)
    losses_module.ppo_loss = wrapped
    raw = getattr(wrapped, "__wrapped_ppo_loss__", original)
    for name in ("verl.workers.engine_workers",):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "ppo_loss", None) is raw:
            mod.ppo_loss = wrapped
