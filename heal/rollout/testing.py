"""Tiny random causal LMs and a character-level tokenizer built entirely in code (no model hub).

Used by heal's tests and by ``heal demo --tiny`` style smoke runs: the model is random, so its
text is gibberish, but every code path (chat template, left padding, generation, teacher-forced
entropies) is the real one.
"""

from __future__ import annotations

import string
from typing import Any, Tuple

__all__ = ["tiny_tokenizer", "tiny_model", "CHAT_TEMPLATE"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: printable ASCII + ``<pad>``, ``<|im_start|>``,
    ``<|im_end|>`` (EOS), with a ChatML chat template. No padding side is set (the backend sets left)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab_size: int, arch: str = "llama", *, seed: int = 0, hidden_size: int = 32,
               num_layers: int = 2) -> Any:
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (``arch``) in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=2,
                  pad_token_id=0, bos_token_id=1)
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # a sharper random head so that sampling is not uniform noise
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.float().eval()


def tiny_model_and_tokenizer(arch: str = "llama", seed: int = 0) -> Tuple[Any, Any]:
    tok = tiny_tokenizer()
    return tiny_model(len(tok), arch, seed=seed), tok
