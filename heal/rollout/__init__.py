"""Rollouts: N sampled completions per prompt plus their exact per-token entropies.

* :mod:`heal.rollout.base` -- :class:`Completion`, the :class:`RolloutBackend` interface.
* :mod:`heal.rollout.hf` -- :class:`TransformersBackend` (transformers ``generate``, batched, left padding).
* :mod:`heal.rollout.vllm` -- :class:`VLLMBackend` (GPU path; vLLM imported lazily; untested in CI).
* :mod:`heal.rollout.entropy` -- :func:`completion_entropies`: teacher-forced forward pass with
  ``heal_kernels.token_entropy`` at the sampling temperature, batched by a token budget.

:func:`generate_rollouts` = generate + entropies; :func:`make_backend` picks vLLM when installed
(and asked for) and transformers otherwise.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from heal.rollout.base import Completion, Prompt, RolloutBackend, render_prompt, stop_token_ids
from heal.rollout.entropy import completion_entropies, plan_batches
from heal.rollout.hf import TransformersBackend, prepare_tokenizer

__all__ = [
    "Completion", "Prompt", "RolloutBackend", "render_prompt", "stop_token_ids",
    "TransformersBackend", "prepare_tokenizer", "completion_entropies", "plan_batches",
    "generate_rollouts", "make_backend",
]


def make_backend(model: Any, tokenizer: Any, *, engine: str = "auto", **kwargs: Any) -> RolloutBackend:
    """``engine="auto"``: vLLM when it is installed and CUDA is available, else transformers.

    ``"transformers"`` needs ``model`` to be a loaded transformers model; ``"vllm"`` accepts a model
    path / name (``kwargs`` go to ``vllm.LLM``).
    """
    if engine not in ("auto", "transformers", "vllm"):
        raise ValueError(f"engine must be 'auto', 'transformers' or 'vllm', got {engine!r}")
    if engine == "auto":
        import torch

        from heal.rollout.vllm import vllm_available

        engine = "vllm" if (vllm_available() and torch.cuda.is_available() and isinstance(model, str)) else "transformers"
    if engine == "vllm":
        from heal.rollout.vllm import VLLMBackend

        return VLLMBackend(model, tokenizer, **kwargs)
    return TransformersBackend(model, tokenizer, **kwargs)


def generate_rollouts(
    backend: RolloutBackend,
    prompts: Sequence[Prompt],
    *,
    entropy_model: Any,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: Optional[int] = None,
    token_budget: int = 8192,
    progress: bool = True,
) -> List[List[Completion]]:
    """Sample ``n`` completions per prompt and fill each :attr:`Completion.entropy` (a list of floats).

    ``entropy_model``: the transformers model whose entropies are wanted (the policy; for the
    transformers backend simply the same model). Entropies are taken at ``temperature`` (1.0 for
    greedy rollouts, ``temperature == 0``).
    """
    groups = backend.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    flat = [c for row in groups for c in row]
    ents = completion_entropies(entropy_model, flat, temperature if temperature > 0 else 1.0,
                                token_budget=token_budget, progress=progress)
    for c, e in zip(flat, ents):
        c.entropy = e.tolist()
    return groups
