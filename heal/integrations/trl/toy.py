"""Offline toy setup for HEAL-GRPO with TRL: a character-level tokenizer, a tiny random Qwen2,
a mixed target/general dataset with a ``data_source`` column and a verifiable reward.

No hub access: the tokenizer and the model are built in code. Used by
``examples/trl_heal_grpo.py`` and the TRL integration tests; handy for smoke-testing a setup.
"""

from __future__ import annotations

import random
import string
from typing import List

__all__ = [
    "TARGET_SOURCE",
    "GENERAL_SOURCE",
    "char_tokenizer",
    "tiny_causal_lm",
    "toy_dataset",
    "exact_answer_reward",
]

TARGET_SOURCE = "toy_math"
GENERAL_SOURCE = "toy_letters"
_ALPHABET = string.digits + string.ascii_lowercase + "+-=?:. "


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character of ``0-9 a-z +-=?:.`` and space,
    plus ``<pad>`` (id 0), ``<eos>`` (id 1) and ``<unk>`` (id 2). Decoding joins the characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(_ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_causal_lm(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen2 causal LM sized for the CPU (about 0.1 M parameters)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def toy_dataset(n: int = 64, seed: int = 0):
    """``n`` prompts alternating target (``"3+4="`` -> ``"7"``, source :data:`TARGET_SOURCE`) and
    general (``"after c:"`` -> ``"d"``, source :data:`GENERAL_SOURCE`), as a ``datasets.Dataset``
    with columns ``prompt``, ``answer``, ``data_source``."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: List[dict] = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "data_source": TARGET_SOURCE})
        else:
            c = rng.randrange(25)
            letters = string.ascii_lowercase
            rows.append({"prompt": f"after {letters[c]}:", "answer": letters[c + 1], "data_source": GENERAL_SOURCE})
    return Dataset.from_list(rows)


def exact_answer_reward(prompts, completions, answer, **kwargs):
    """Verifiable accuracy reward: 1.0 when the completion (stripped) starts with the answer."""
    return [1.0 if str(c).strip().startswith(str(a)) else 0.0 for c, a in zip(completions, answer)]
