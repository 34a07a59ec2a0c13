"""Tiny random causal LMs and a character-level tokenizer built entirely in code (no model hub).

Used by heal's tests and by ``heal demo --tiny`` style smoke runs: the model is random, so its
text is gibberish, but every code path (chat template, left padding, generation, teacher-forced
entropies) is the real one.
"""

from __future__ import annotations

import string
from typing import Any, List, Tuple

__all__ = ["tiny_tokenizer", "tiny_model", "tiny_model_and_tokenizer", "write_tiny_gguf", "choice_pool_rows",
           "CHAT_TEMPLATE"]

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


def _byte_alphabet() -> List[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2 convention)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_gguf(path: str, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Write a tiny random Llama model + byte-level BPE tokenizer (ChatML template, ``<|im_end|>``
    = EOS) as a float32 GGUF file, the format of the demo's SmolLM2 file. Needs the ``gguf`` package."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "\u0120 t"]
    tokens = specials + _byte_alphabet() + ["he", "ll", "\u0120t"]
    heads, kv_heads, ff = 4, 2, 2 * hidden_size
    head_dim = hidden_size // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden_size)
    w.add_block_count(num_layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), hidden_size))
    for i in range(num_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden_size, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden_size, hidden_size))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * head_dim, hidden_size))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, hidden_size))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden_size, hidden_size))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden_size, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden_size))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden_size))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden_size, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden_size, np.float32))
    w.add_tensor("output.weight", rand(len(tokens), hidden_size, scale=2.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def choice_pool_rows(n: int) -> List[dict]:
    """``n`` rows of a tiny general-domain pool in verl's layout (``data_source`` ``commonsense_qa``,
    chat ``prompt`` "Question i: pick A or B.", ground truth alternating A / B), as ``heal select``
    reads it."""
    return [{"data_source": "commonsense_qa",
             "prompt": [{"role": "user", "content": f"Question {i}: pick A or B."}],
             "ability": "commonsense",
             "reward_model": {"style": "rule", "ground_truth": "AB"[i % 2]},
             "extra_info": {"index": i, "split": "train"}} for i in range(n)]
