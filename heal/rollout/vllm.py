"""Rollouts with vLLM (the GPU path). UNTESTED in CI: vLLM needs a GPU and is not installed there.

Kept deliberately thin: vLLM samples the token ids, and the entropies are recomputed afterwards by
:func:`heal.rollout.entropy.completion_entropies` with a transformers copy of the policy (exact,
full vocabulary, the fused op) -- vLLM's own log-probs are never used for them. ``vllm`` is imported
only when a :class:`VLLMBackend` is built.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from heal.rollout.base import Completion, Prompt, render_prompt

__all__ = ["VLLMBackend", "vllm_available"]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """:class:`~heal.rollout.base.RolloutBackend` on ``vllm.LLM``.

    ``model``: a model name or local path (or an already built ``vllm.LLM``); ``tokenizer``: a
    transformers tokenizer used to render chat prompts (the same one the entropy pass uses);
    ``llm_kwargs`` go to ``vllm.LLM`` (``gpu_memory_utilization``, ``dtype``, ...).
    """

    name = "vllm"

    def __init__(self, model: Any, tokenizer: Any, **llm_kwargs: Any):
        import vllm  # noqa: F401  (lazy: only the GPU path needs it)

        self.llm = model if hasattr(model, "generate") and not isinstance(model, str) else vllm.LLM(model=model, **llm_kwargs)
        self.tokenizer = tokenizer

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: Optional[int] = None,
    ) -> List[List[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=int(n), temperature=float(temperature), top_p=1.0, top_k=-1,
                                max_tokens=int(max_new_tokens), seed=seed)
        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        try:
            from vllm.inputs import TokensPrompt

            inputs = [TokensPrompt(prompt_token_ids=x) for x in ids]
        except ImportError:  # older vLLM
            inputs = [{"prompt_token_ids": x} for x in ids]
        results = self.llm.generate(inputs, params)
        out: List[List[Completion]] = []
        for i, res in enumerate(results):
            row = []
            for j, o in enumerate(res.outputs):
                row.append(Completion(i, j, list(ids[i]), list(o.token_ids), o.text,
                                      finished=o.finish_reason == "stop"))
            out.append(row)
        return out
