"""heal's entropy capture for vLLM's Model Runner V2 logits-processor interface.

Model Runner V2 (``vllm.v1.worker.gpu``, vLLM's default runner on GPUs with Triton since 0.32) has
its own processor interface (``vllm.v1.worker.gpu.sample.logits_processor``), and its loader
rejects V1-interface processors. :class:`EntropyProcessorV2` implements it with the same semantics
as the V1 :class:`heal.rollout.vllm_entropy.EntropyProcessor` (read that module's doc first; vLLM is
given :class:`heal.rollout.vllm_entropy.EntropyCapture`, which builds this class under Model Runner V2):

* **Temperature and min_p.** ``apply()`` runs after bias, penalties, bad words and grammar masks but
  *before* temperature and ``min_p``, on the unscaled float32 logits. Each request's temperature
  ``T``, ``min_p`` and entropy temperature are taken from its ``SamplingParams`` at
  ``add_request()``; the entropy is that of ``softmax(z / T)`` after vLLM's ``min_p`` rule (tokens
  with ``p < min_p * max p`` dropped), before top-k / top-p -- what the V1 processor sees -- or of
  ``softmax(z / t)`` (after the same mask) for an entropy temperature ``t``.
* **Rows are not requests.** A step's rows are reordered every step and, under speculative
  decoding, a request owns one row per draft token plus one; ``ctx.expanded_idx_mapping`` maps
  every row to its request's persistent slot, and only the slots the runner names are touched
  (a finished request's slot is never read again).
* **Slots are recycled.** ``add_request()`` overwrites everything the slot held: a request that
  did not opt in leaves it untracked, however the previous occupant was set up.
* **Positions.** A row at input position ``pos`` samples sequence position ``pos + 1``, i.e.
  output token ``pos + 1 - prompt_len`` (``prompt_len`` read on the device from the runner's
  request state, so there is no host synchronisation). A negative index is a chunk of a chunked
  prefill (the sample is discarded) and is skipped; a resumed request (preempted, then re-added
  with its partial output as prefill) continues at its first new token, and any of its old
  positions that a chunk replays is overwritten by the same distribution's entropy. Draft rows
  that are rejected are overwritten at the next step, or lie past the completion's end, as do
  rows of a step scheduled before a stop was seen (async scheduling): records are therefore
  marked ``exact=False`` and cut to the completion's length by the reader.
* **Tokens.** The token each row feeds (``ctx.input_ids``) is the output token at the previous
  position; the records keep them so the reader can check that a record belongs to the completion
  (the last token is never fed back; draft placeholders ``-1`` are skipped).
* **n > 1, preemption.** Records are keyed by ``(tag, seed)`` as in V1 (children get ``seed + j``);
  a resumed request finds its record again. Every value carries the request's tenure (how often
  it was added), so that under batch-sharded sampling -- each tensor-parallel rank samples the
  rows of the slots it owns, and a resumed request may land on another rank -- the readers merge
  the ranks' records to the latest write (``heal.rollout.vllm._merge_worker_records``).
* **No host synchronisation per step**: entropies, positions, slots and tokens of a step are one
  device tensor, queued and copied to the host in bulk like the V1 processor's; the slot -> record
  map of each step is kept with it, so slots recycled later do not misfile earlier steps.

``add_request()`` returns True for an opted-in request, which makes the runner call ``apply()``
even for batches whose sampling parameters need no processing (temperature 1, no top-k / top-p);
``apply()`` never changes the logits.

This module imports vLLM's V2 interface module (import-light by vLLM's design).
"""

from __future__ import annotations

from functools import partial
from typing import Any, List, Optional

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcessor

from heal.rollout.vllm_entropy import (EXTRA_ARGS_KEY, _EntropyStore, _Record, parse_entropy_spec,
                                       validate_entropy_params)

__all__ = ["EntropyProcessorV2"]

_INV_T, _SCALE, _MIN_P = 0, 1, 2  # rows of the per-slot parameter table


class EntropyProcessorV2(LogitsProcessor, _EntropyStore):
    """Model Runner V2 logits processor recording exact per-token entropies (see the module doc)."""

    interface = "v2"

    def __init__(self, vllm_config: Any, req_states: Any):
        self.req_states = req_states
        self._init_store(req_states.device, pin_memory=True)
        n = int(req_states.max_num_reqs)
        self._slot_records: List[Optional[_Record]] = [None] * n
        self._tracked = np.zeros(n, dtype=bool)
        # per slot: 1 / T_sampling, T_sampling / T_entropy, min_p (device copy made when changed)
        self._params = np.zeros((3, n), dtype=np.float32)
        self._params[_INV_T] = 1.0
        self._params[_SCALE] = 1.0
        self._entropy_t = np.ones(n, dtype=np.float64)  # T_entropy per slot (host only: the one-temperature path)
        self._params_dev: Optional[torch.Tensor] = None
        self._table: Optional[list] = None  # slot -> (record, tenure) for the steps queued from now

    # -- vLLM interface ------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_entropy_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        extra = getattr(sampling_params, "extra_args", None) or {}
        spec = extra.get(EXTRA_ARGS_KEY)
        self._table = None
        self._params_dev = None
        if spec is None:  # the slot may hold a previous occupant's state: neutralise all of it
            self._slot_records[req_idx] = None
            self._tracked[req_idx] = False
            self._params[:, req_idx] = (1.0, 1.0, 0.0)
            self._entropy_t[req_idx] = 1.0
            return False
        t = float(sampling_params.temperature)
        tag, scale = parse_entropy_spec(spec, t)
        rec = self._record(tag, sampling_params.seed, object())
        if rec.tokens is None:
            rec.tokens, rec.stamps, rec.token_stamps = [], [], []
        rec.tenure += 1  # every rank adds every request: the count agrees across ranks
        self._slot_records[req_idx] = rec
        self._tracked[req_idx] = True
        self._params[:, req_idx] = (1.0 / t, scale, float(getattr(sampling_params, "min_p", 0.0) or 0.0))
        self._entropy_t[req_idx] = t / scale
        return True

    def apply_staged_writes(self) -> None:
        if self._params_dev is None:
            self._params_dev = torch.from_numpy(self._params.copy()).to(self.device)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        batch = np.asarray(ctx.idx_mapping_np)
        tracked = self._tracked[batch]
        if not tracked.any():
            return logits
        self.apply_staged_writes()  # no-op unless a request was added since the runner's call
        if self._table is None:
            self._table = [None if r is None else (r, r.tenure) for r in self._slot_records]
        slots = ctx.expanded_idx_mapping.long()
        ours = batch[tracked]
        temps = self._entropy_t[ours]
        if not (self._params[_MIN_P, ours] > 0).any() and (temps == temps[0]).all():
            # one entropy temperature for every tracked row, no min_p: no copy of the logits (rows of
            # requests that did not opt in are computed too and dropped when filed)
            ent = self._entropy(logits, temperature=float(temps[0]))
        else:
            params = self._params_dev.index_select(1, slots)  # [3, rows]
            x = logits * params[_INV_T].unsqueeze(1)
            if (self._params[_MIN_P, ours] > 0).any():
                x = _apply_min_p(x, params[_MIN_P])
            if (self._params[_SCALE, ours] != 1.0).any():
                x = x * params[_SCALE].unsqueeze(1)
            ent = self._entropy(x, temperature=1.0)
        prompt_len = self.req_states.prompt_len.gpu.index_select(0, slots).long()
        out_pos = ctx.pos.long() + 1 - prompt_len  # the output token each row samples
        step = torch.stack([ent.to(torch.float64), out_pos.to(torch.float64), slots.to(torch.float64),
                            ctx.input_ids.to(torch.float64)])
        self._queue(step, partial(_file_v2, self._table))
        return logits


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """vLLM's min_p rule (``vllm.v1.sample.logits_processor.builtin.MinPLogitsProcessor``) on the
    temperature-scaled logits ``x``, per row; rows with ``min_p = 0`` keep every token."""
    p = torch.softmax(x, dim=-1)
    cut = p.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return x.masked_fill(p < cut, float("-inf"))


def _file_v2(table: list, vals: Any) -> None:
    """File one step: ``vals`` is the flattened ``[4, rows]`` (entropy, output position, slot, fed token);
    ``table`` the slot -> (record, tenure) map of that step."""
    ent, pos, slot, tok = vals.reshape(4, -1).tolist()
    for e, p, s, t in zip(ent, pos, slot, tok):
        entry = table[int(s)]
        if entry is None:
            continue
        rec, tenure = entry
        p = int(p)
        if p < 0:  # a chunk of a chunked prefill: vLLM discards the sample
            continue
        rec.put(p, e, tenure)
        if p >= 1 and t >= 0:  # the row fed output token p - 1 (-1: a draft placeholder)
            rec.put_token(p - 1, int(t), tenure)
