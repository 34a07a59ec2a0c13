"""The rollout backend interface and the records it returns.

A backend turns prompts into ``n`` sampled completions each. Prompts are either chat messages
(``[{"role": "user", "content": ...}, ...]``, verl's ``prompt`` column) rendered with the
tokenizer's chat template, or plain strings used as they are.

Every completion keeps its token ids (prompt and completion) so that the entropies can be
recomputed exactly by a teacher-forced forward pass (:mod:`heal.rollout.entropy`); the sampler's
own log-probs are never used for entropies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Protocol, Sequence, Union, runtime_checkable

__all__ = ["Completion", "RolloutBackend", "Prompt", "render_prompt", "stop_token_ids"]

Prompt = Union[str, Sequence[dict]]


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``completion_ids`` are the generated tokens up to and including the first stop token
    (EOS / end-of-turn) when one was generated, without padding; ``finished`` says whether a
    stop token ended it (else it hit ``max_new_tokens``). ``text`` is the decoded completion
    without special tokens.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: List[int]
    completion_ids: List[int]
    text: str
    finished: bool = False
    entropy: Optional[List[float]] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class RolloutBackend(Protocol):
    """What :func:`heal.rollout.generate_rollouts` needs from a generation engine."""

    name: str

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: Optional[int] = None,
    ) -> List[List[Completion]]:
        """``n`` completions for every prompt, in prompt order (``result[i][j]``: sample j of prompt i)."""
        ...


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text fed to the model: the chat template with the generation prompt for message lists.

    Raises ``ValueError`` for a message list when the tokenizer has no chat template and
    ``TypeError`` for anything that is neither a string nor a list of messages.
    """
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "tolist"):  # numpy object array from a parquet column
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError(f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("prompt is a list of chat messages but the tokenizer has no chat_template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> List[int]:
    """Token ids that end a completion: the generation config's EOS id(s), the tokenizer's EOS and
    the chat end-of-turn markers (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``) the vocabulary has."""
    ids: List[int] = []

    def add(x):
        if x is None:
            return
        if isinstance(x, (list, tuple)):
            for y in x:
                add(y)
            return
        x = int(x)
        if x >= 0 and x not in ids:
            ids.append(x)

    if generation_config is not None:
        add(getattr(generation_config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        if marker in vocab:
            add(vocab[marker])
    return ids
