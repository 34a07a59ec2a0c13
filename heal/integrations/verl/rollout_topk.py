"""The reference implementation's entropy proxy: a truncated sum over the rollout's top-k log-probs.

For each generated token the rollout engine (vLLM with ``logprobs=k``) returns the log-probs
``l_1..l_k`` of the k most likely next tokens; the reference HEAL code used

    H_topk = - sum_{j <= k} exp(l_j) * l_j        (k = 20, no renormalisation)

as the token's entropy. It is a lower bound of the exact entropy (the tail is dropped). heal's
default is the exact entropy of the old-log-prob pass (``heal.entropy_source=actor``); this is
only for reproducing the reference numbers. See :data:`heal.integrations.verl.settings.ROLLOUT_TOPK_MISSING`
for what verl 0.9.1 lacks to provide the top-k log-probs.
"""

from __future__ import annotations

import torch

__all__ = ["truncated_topk_entropy"]


def truncated_topk_entropy(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """``-sum_j exp(l_j) * l_j`` over the last dimension of ``topk_logprobs[..., k]`` (float32).

    ``-inf`` entries (fewer than k candidates) contribute 0; NaN propagates. Positive entries are
    not log-probabilities: ``ValueError``.
    """
    if not isinstance(topk_logprobs, torch.Tensor) or topk_logprobs.dim() < 1:
        raise ValueError("topk_logprobs must be a tensor [..., k] of log-probabilities")
    x = topk_logprobs.to(torch.float32)
    if bool((x > 1e-4).any()):
        raise ValueError("topk_logprobs must hold log-probabilities (<= 0); got positive values")
    finite = torch.isfinite(x)
    term = torch.where(finite, torch.exp(x) * torch.where(finite, x, torch.zeros_like(x)), torch.zeros_like(x))
    term = torch.where(torch.isnan(x), x, term)
    return -term.sum(dim=-1)
