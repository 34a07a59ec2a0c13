"""Rollouts with transformers ``generate`` (the backend when vLLM is not installed; CPU or GPU).

Prompts are batched with **left** padding (so every row's generation starts at the same column)
and sampled with ``num_return_sequences=n`` from the full distribution at the given temperature
(``top_k=0``, ``top_p=1``: the distribution whose entropy :mod:`heal.rollout.entropy` computes).
``temperature == 0`` means greedy decoding.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from heal.rollout.base import Completion, Prompt, render_prompt, stop_token_ids

__all__ = ["TransformersBackend", "prepare_tokenizer"]


def prepare_tokenizer(tokenizer: Any, model: Any = None) -> Any:
    """Left padding and a pad token (the first stop token when the tokenizer has none). In place."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        if not stops:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(stops[0])
    return tokenizer


class TransformersBackend:
    """:class:`~heal.rollout.base.RolloutBackend` on a transformers causal LM.

    ``prompts_per_batch``: prompts per ``generate`` call (each expands to ``n`` rows).
    ``progress``: show a tqdm bar over the ``generate`` calls.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, prompts_per_batch: int = 8, progress: bool = True):
        if prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}")
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer, model)
        self.prompts_per_batch = int(prompts_per_batch)
        self.progress = progress
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(model, "generation_config", None))

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: Optional[int] = None,
    ) -> List[List[Completion]]:
        import torch
        from tqdm.auto import tqdm

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        from transformers import StoppingCriteria, StoppingCriteriaList

        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        device = next(self.model.parameters()).device
        out: List[List[Completion]] = []
        starts = range(0, len(texts), self.prompts_per_batch)
        # one tick per decoding step of each batch (a stopping criterion that never stops)
        bar = tqdm(total=len(starts) * int(max_new_tokens), desc=f"generate ({len(texts)} prompts x {n})",
                   unit="step", disable=not self.progress or len(texts) == 0)

        class _Tick(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                bar.update(1)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        for b, start in enumerate(starts):
            chunk = texts[start : start + self.prompts_per_batch]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            if seed is not None:
                torch.manual_seed(int(seed) + start)
            kwargs = dict(max_new_tokens=int(max_new_tokens), num_return_sequences=int(n),
                          pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids or None,
                          stopping_criteria=StoppingCriteriaList([_Tick()]))
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            with torch.no_grad():
                seqs = self.model.generate(**enc, **kwargs)
            width = enc["input_ids"].shape[1]
            mask = enc["attention_mask"]
            for i in range(len(chunk)):
                prompt_ids = enc["input_ids"][i][mask[i].bool()].tolist()
                row: List[Completion] = []
                for j in range(n):
                    gen = seqs[i * n + j, width:].tolist()
                    finished = False
                    for t, tok in enumerate(gen):
                        if tok in self.stop_ids:
                            gen, finished = gen[: t + 1], True
                            break
                    text = self.tokenizer.decode(gen, skip_special_tokens=True)
                    row.append(Completion(start + i, j, prompt_ids, gen, text, finished))
                out.append(row)
            bar.update((b + 1) * int(max_new_tokens) - bar.n)  # batches that stopped early
        bar.close()
        return out
