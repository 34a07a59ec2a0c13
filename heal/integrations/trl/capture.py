"""Completion entropies captured while transformers ``generate`` samples (no second forward).

:class:`EntropyCapture` is a transformers ``LogitsProcessor``. ``generate`` calls it once per new
token with the float32 ``[B, V]`` next-token logits; it stores ``heal_kernels.token_entropy(logits,
temperature)`` (the exact full-vocabulary entropy of ``softmax(z / T)``) under that token's position
and returns the logits unchanged, so sampling is untouched.

Definition: the same as :func:`heal.integrations.trl.trainer.completion_entropies` (the teacher-forced
pass): the policy's raw logits ``z`` divided by the training temperature, over the whole vocabulary,
no top-k / top-p / min-p truncation. transformers places user processors after its own logit-changing
processors (repetition penalty, minimum length, suppressed or forced tokens, ...) and before the
sampling warpers (temperature, top-k, top-p, min-p): the capture sees the raw logits only when none
of the former is active. :func:`logits_changed_before_capture` lists the generation options that would
add one; the trainer captures only when it returns nothing.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional

import torch
from transformers import LogitsProcessor

__all__ = ["EntropyCapture", "logits_changed_before_capture"]


def _set(v: Any) -> bool:
    return v is not None


def _positive(v: Any) -> bool:
    return v is not None and v > 0


def _not_one(v: Any) -> bool:
    return v is not None and float(v) != 1.0


# The GenerationConfig options for which transformers (5.x, GenerationMixin._get_logits_processor)
# inserts a logits processor *before* the user-supplied ones: each changes the logits the capture sees.
_BEFORE_CAPTURE = {
    "guidance_scale": _not_one,
    "sequence_bias": _set,
    "encoder_repetition_penalty": _not_one,
    "repetition_penalty": _not_one,
    "no_repeat_ngram_size": _positive,
    "encoder_no_repeat_ngram_size": _positive,
    "bad_words_ids": _set,
    "min_length": _positive,
    "min_new_tokens": _positive,
    "forced_bos_token_id": _set,
    "forced_eos_token_id": _set,
    "remove_invalid_values": lambda v: v is True,
    "exponential_decay_length_penalty": _set,
    "suppress_tokens": _set,
    "begin_suppress_tokens": _set,
}


def logits_changed_before_capture(generation_config: Any, model_generation_config: Any = None) -> List[str]:
    """Names of the active generation options that make transformers change the logits before a
    user logits processor sees them (empty: the capture sees the model's raw logits).

    An option left ``None`` in ``generation_config`` takes the model's ``generation_config`` value, as
    ``generate`` does."""
    active = []
    for name, is_active in _BEFORE_CAPTURE.items():
        value = getattr(generation_config, name, None)
        if value is None and model_generation_config is not None:
            value = getattr(model_generation_config, name, None)
        if is_active(value):
            active.append(name)
    return active


class EntropyCapture(LogitsProcessor):
    """Records the entropy of every row's next-token distribution at each ``generate`` step.

    ``prompt_width``: the width of the (left-padded) prompt tensor given to ``generate``; the step
    whose ``input_ids`` has ``prompt_width + t`` columns samples completion token ``t``.
    ``temperature``: the temperature of the recorded entropy (``softmax(z / temperature)``).

    After ``generate``: :meth:`entropies` is the float32 ``[B, steps]`` matrix (row ``b``, column
    ``t``: the distribution completion token ``t`` of row ``b`` was drawn from; rows that already
    finished keep getting values, which the caller masks), :attr:`time_s` the host time spent here.
    """

    def __init__(self, temperature: float, prompt_width: int):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.prompt_width = int(prompt_width)
        self.steps: List[torch.Tensor] = []
        self.time_s = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import heal_kernels

        t0 = time.perf_counter()
        position = input_ids.size(1) - self.prompt_width
        if position != len(self.steps):
            raise RuntimeError(
                f"EntropyCapture: generate step for completion position {position}, expected {len(self.steps)} "
                "(one call per generated token, prompt width given at construction)"
            )
        self.steps.append(heal_kernels.token_entropy(scores, temperature=self.temperature).float())
        self.time_s += time.perf_counter() - t0
        return scores

    def entropies(self) -> Optional[torch.Tensor]:
        """``[B, steps]`` float32 entropies (None before the first step)."""
        if not self.steps:
            return None
        return torch.stack(self.steps, dim=1)
