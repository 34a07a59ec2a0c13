"""Exact per-token entropies of sampled completions by a teacher-forced forward pass.

For every completion, the policy is run over ``prompt + completion`` and the entropy of
``softmax(logits / T)`` (full vocabulary, ``heal_kernels.token_entropy``) is taken at each position
that predicts a completion token: position ``P - 1 + t`` for completion token ``t`` (``P`` = prompt
length). The result is one float32 sequence per completion (ragged; empty for an empty completion).

Memory stays bounded by two knobs:

* ``token_budget``: sequences are sorted by length and grouped so that each forward pass holds at
  most ``token_budget`` (padded) tokens (a single longer sequence runs alone);
* ``logits_chunk``: for architectures whose logits are ``lm_head(last_hidden_state)`` with a plain
  linear head (Llama, Qwen2/3, Mistral, SmolLM, ... i.e. no logit soft-capping / scaling in the
  config; :func:`linear_head_split`), only the hidden states of completion positions go to
  :func:`heal_kernels.linear_token_entropy`, which projects them one ``[logits_chunk x 4096]`` block
  of logits at a time, so the ``[tokens, vocab]`` logits never exist. Other models fall back to the
  full ``model(...).logits`` of each forward group.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from heal.rollout.base import Completion

__all__ = ["completion_entropies", "plan_batches", "token_entropy_fn", "linear_head_split"]

_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_entropy_fn():
    """``heal_kernels.token_entropy`` (the fused op)."""
    from heal_kernels import token_entropy

    return token_entropy


def plan_batches(lengths: Sequence[int], token_budget: int) -> List[List[int]]:
    """Indices grouped so that ``len(group) * max(length in group) <= token_budget``.

    Sorted by decreasing length (less padding); a sequence longer than the budget runs alone.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: List[List[int]] = []
    cur: List[int] = []
    cur_max = 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and (len(cur) + 1) * m > token_budget:
            groups.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        groups.append(cur)
    return groups


def linear_head_split(model: Any) -> Optional[Tuple[Any, Any]]:
    """``(decoder, lm_head)`` when ``logits == lm_head(decoder(...).last_hidden_state)`` with
    ``lm_head`` a plain ``torch.nn.Linear`` (no soft-capping or scaling of the logits), else None."""
    import torch

    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of every caller
        return None
    if not isinstance(model, PreTrainedModel):  # e.g. a PEFT wrapper, whose base_model returns logits
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model or not isinstance(head, torch.nn.Linear):
        return None
    if not isinstance(base, PreTrainedModel):
        return None
    cfg = getattr(model, "config", None)
    for key in _LOGIT_MODIFIERS:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return None
    return base, head


_head_split = linear_head_split  # the old private name


def completion_entropies(
    model: Any,
    completions: Sequence[Completion],
    temperature: float = 1.0,
    *,
    token_budget: int = 8192,
    logits_chunk: int = 1024,
    progress: bool = True,
    entropy_fn=None,
) -> List["Any"]:
    """Per-token entropies (float32 CPU tensors, one per completion, in input order).

    ``temperature`` must be > 0 (use 1.0 for greedy rollouts). With a plain linear head the
    entropies come straight from the hidden states (:func:`heal_kernels.linear_token_entropy`); else,
    or when ``entropy_fn(logits, temperature)`` is given, from the logits (default
    ``heal_kernels.token_entropy``). The model runs in eval mode under ``no_grad``.
    """
    import torch
    from tqdm.auto import tqdm

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_chunk < 1:
        raise ValueError(f"logits_chunk must be >= 1, got {logits_chunk}")
    from_hidden = entropy_fn is None
    entropy_fn = entropy_fn or token_entropy_fn()
    device = next(model.parameters()).device
    results: List[Any] = [torch.zeros(0, dtype=torch.float32) for _ in completions]
    todo = [i for i, c in enumerate(completions) if c.completion_ids]
    for i in todo:
        if not completions[i].prompt_ids:
            raise ValueError(f"completions[{i}] has an empty prompt: nothing predicts its first token")
    lengths = [len(completions[i].prompt_ids) + len(completions[i].completion_ids) - 1 for i in todo]
    groups = plan_batches(lengths, token_budget)
    split = _head_split(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for group in tqdm(groups, desc="entropy", unit="batch", disable=not progress or not groups):
                idx = [todo[g] for g in group]
                width = max(lengths[g] for g in group)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                att = torch.zeros(len(idx), width, dtype=torch.long)
                rows, cols, sizes = [], [], []
                for r, i in enumerate(idx):
                    c = completions[i]
                    # the last completion token predicts nothing we need: feed all but it
                    seq = (list(c.prompt_ids) + list(c.completion_ids))[:-1]
                    ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    att[r, : len(seq)] = 1
                    p, n = len(c.prompt_ids), len(c.completion_ids)
                    rows.extend([r] * n)
                    cols.extend(range(p - 1, p - 1 + n))
                    sizes.append(n)
                ids, att = ids.to(device), att.to(device)
                rows_t = torch.tensor(rows, device=device)
                cols_t = torch.tensor(cols, device=device)
                if split is not None:
                    base, head = split
                    hidden = base(input_ids=ids, attention_mask=att).last_hidden_state[rows_t, cols_t]
                    if from_hidden:
                        from heal_kernels import linear_token_entropy

                        w = head.weight
                        b = head.bias
                        ent = linear_token_entropy(hidden.to(w.dtype), w, temperature, bias=b, chunk_tokens=logits_chunk)
                    else:
                        parts = [entropy_fn(head(hidden[s : s + logits_chunk]), temperature)
                                 for s in range(0, hidden.shape[0], logits_chunk)]
                        ent = torch.cat(parts)
                else:
                    logits = model(input_ids=ids, attention_mask=att).logits
                    ent = entropy_fn(logits[rows_t, cols_t], temperature)
                ent = ent.to(device="cpu", dtype=torch.float32)
                for i, piece in zip(idx, torch.split(ent, sizes)):
                    results[i] = piece.clone()
    finally:
        model.train(was_training)
    return results
