"""Rollouts: N sampled completions per prompt plus their exact per-token entropies.

* :mod:`heal.rollout.base` -- :class:`Completion`, the :class:`RolloutBackend` interface.
* :mod:`heal.rollout.hf` -- :class:`TransformersBackend` (transformers ``generate``, batched, left padding).
* :mod:`heal.rollout.vllm` -- :class:`VLLMBackend` (vLLM, CUDA or CPU build; imported lazily). It
  captures the exact entropies while vLLM samples (:mod:`heal.rollout.vllm_entropy`, a vLLM logits
  processor): no second model, no second forward pass.
* :mod:`heal.rollout.entropy` -- :func:`completion_entropies`: teacher-forced forward pass with
  ``heal_kernels.token_entropy``, batched by a token budget (the transformers backend's entropies,
  and the fallback / cross-check for vLLM).

:func:`generate_rollouts` = generate + entropies; :func:`make_backend` picks vLLM when installed
(and asked for) and transformers otherwise.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from heal.rollout.base import Completion, Prompt, RolloutBackend, render_prompt, stop_token_ids
from heal.rollout.entropy import completion_entropies, plan_batches
from heal.rollout.hf import TransformersBackend, prepare_tokenizer

__all__ = [
    "Completion", "Prompt", "RolloutBackend", "render_prompt", "stop_token_ids",
    "TransformersBackend", "prepare_tokenizer", "completion_entropies", "plan_batches",
    "generate_rollouts", "make_backend", "resolve_entropy_temperature",
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


def resolve_entropy_temperature(entropy_temperature: Union[str, float], temperature: float) -> float:
    """The temperature the entropies are taken at: ``"sampling"`` -> the sampling ``temperature``
    (1.0 for greedy decoding, ``temperature == 0``), a number -> that number (must be > 0)."""
    if entropy_temperature == "sampling":
        return float(temperature) if temperature > 0 else 1.0
    if isinstance(entropy_temperature, bool) or not isinstance(entropy_temperature, (int, float)) \
            or not float(entropy_temperature) > 0:
        raise ValueError(f"entropy_temperature must be 'sampling' or a number > 0, got {entropy_temperature!r}")
    return float(entropy_temperature)


def generate_rollouts(
    backend: RolloutBackend,
    prompts: Sequence[Prompt],
    *,
    entropy_model: Any = None,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: Optional[int] = None,
    token_budget: int = 8192,
    progress: bool = True,
    entropy_temperature: Union[str, float] = "sampling",
) -> List[List[Completion]]:
    """Sample ``n`` completions per prompt and fill each :attr:`Completion.entropy` (a list of floats).

    Backends that capture entropies while sampling (``backend.captures_entropy``: vLLM with heal's
    processor) return them filled; every other completion gets a teacher-forced pass through
    ``entropy_model`` (the transformers policy; for the transformers backend simply the same model),
    which is then required. ``entropy_temperature``: ``"sampling"`` (default: the distribution
    sampled from; 1.0 for greedy rollouts) or a number > 0 (1.0: the raw distribution).
    """
    t_ent = resolve_entropy_temperature(entropy_temperature, temperature)
    if getattr(backend, "captures_entropy", False):
        groups = backend.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                  entropy_temperature=entropy_temperature)
    else:
        groups = backend.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    todo = [c for row in groups for c in row if c.entropy is None]
    if todo:
        if entropy_model is None:
            raise ValueError(f"entropy_model is required: backend {getattr(backend, 'name', backend)!r} returned "
                             f"{len(todo)} completions without entropies (they need a teacher-forced pass)")
        ents = completion_entropies(entropy_model, todo, t_ent, token_budget=token_budget, progress=progress)
        for c, e in zip(todo, ents):
            c.entropy = e.tolist()
    return groups
