"""Exact per-token entropies captured inside vLLM while it samples (no second forward pass).

:class:`EntropyProcessor` is a vLLM (v1 engine) logits processor. vLLM calls it at every decoding
step with the float32 ``[num_reqs, vocab]`` logits of the batch *after* penalties, temperature and
``min_p`` and before top-k / top-p (it declares itself argmax-invariant, which is what places it
there; it returns the logits unchanged). For every request that opted in, it takes the exact
full-vocabulary entropy of that step's row with ``heal_kernels.token_entropy`` (the fused Triton
kernel on CUDA, the C++ kernel on CPU) and files it under the position of the token being sampled,
so a finished request owns one entropy per sampled token, aligned with its ``token_ids``.

Opting in is per request, through ``SamplingParams.extra_args``::

    SamplingParams(..., seed=s, extra_args={"heal_entropy": {"tag": "call-id/prompt-3",
                                                              "temperature": "sampling"}})

* ``tag``: a string naming the request (unique per ``generate`` call and prompt);
* ``temperature``: ``"sampling"`` (default) = the entropy of the distribution actually sampled from
  (``softmax(z / T)``); a number ``t`` = the entropy of ``softmax(z / t)`` for the same logits ``z``
  (``1.0``: the raw distribution, which is what vLLM's own log-probs describe by default).

With ``n > 1`` vLLM splits a request into ``n`` child requests that share the parent's
``SamplingParams`` and, when ``seed`` is set, get ``seed + j`` (``j`` = the sample index): the
processor keys its records by ``(tag, seed)``, so always set a seed (``VLLMBackend`` does).

Batch rows are mapped to requests through vLLM's ``BatchUpdate`` (removed, then added, then moved
or swapped rows). The position of the token a row samples is ``len(output_token_ids)`` at that step
(vLLM keeps that list up to date, with placeholders under async scheduling), so a row that samples
a token vLLM then discards (the chunks of a chunked prefill) is overwritten by the real one, and a
preempted request that is resumed continues where it stopped.

Reading the results: :class:`EntropyWorkerExtension` is a vLLM worker extension; with it,
``llm.collective_rpc("heal_take_entropies", args=(tags,))`` returns (and forgets) the records of
the given tags from the worker, in-process or across vLLM's engine processes alike.

No host synchronisation per step: each step's entropies stay on the logits' device in a list; every
``HEAL_VLLM_ENTROPY_FLUSH`` steps (default 64) they are concatenated and copied to pinned host memory
asynchronously (a CUDA event marks completion), and only :meth:`EntropyProcessor.take` waits.
(vLLM itself synchronises once per step under async scheduling whenever any custom logits processor
is installed, to fill in ``output_token_ids``; that cost is vLLM's.)

This module imports vLLM; load it only where vLLM is installed (``heal.rollout.vllm`` does so lazily).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

__all__ = ["EXTRA_ARGS_KEY", "PROCESSOR_FQCN", "EXTENSION_FQCN", "EntropyProcessor", "EntropyWorkerExtension",
           "entropy_extra_args", "parse_entropy_spec"]

EXTRA_ARGS_KEY = "heal_entropy"
PROCESSOR_FQCN = "heal.rollout.vllm_entropy:EntropyProcessor"
EXTENSION_FQCN = "heal.rollout.vllm_entropy.EntropyWorkerExtension"
_SAMPLING_EPS = 1e-5  # vLLM treats temperatures below this as greedy

# every live processor of this process (the worker extension looks them up here)
_PROCESSORS: "weakref.WeakSet[EntropyProcessor]" = weakref.WeakSet()
_LOCK = threading.Lock()


def entropy_extra_args(tag: str, temperature: Any = "sampling") -> Dict[str, Any]:
    """The ``SamplingParams.extra_args`` that make a request record its entropies."""
    spec = {"tag": str(tag), "temperature": temperature if temperature == "sampling" else float(temperature)}
    parse_entropy_spec(spec, sampling_temperature=1.0)  # validates
    return {EXTRA_ARGS_KEY: spec}


def parse_entropy_spec(spec: Any, sampling_temperature: float) -> Tuple[str, float]:
    """``(tag, scale)`` from an ``extra_args["heal_entropy"]`` value: the processor multiplies the
    post-temperature logits by ``scale = T_sampling / T_entropy`` (1.0 for ``"sampling"``).

    Raises ``ValueError`` naming the field for anything malformed.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"extra_args['{EXTRA_ARGS_KEY}'] must be a dict with 'tag' (and 'temperature'), "
                         f"got {type(spec).__name__}")
    tag = spec.get("tag")
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"extra_args['{EXTRA_ARGS_KEY}']['tag'] must be a non-empty string, got {tag!r}")
    t = spec.get("temperature", "sampling")
    if t == "sampling":
        return tag, 1.0
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(float(t)) or not float(t) > 0:
        raise ValueError(f"extra_args['{EXTRA_ARGS_KEY}']['temperature'] must be 'sampling' or a number > 0, "
                         f"got {t!r}")
    return tag, float(sampling_temperature) / float(t)


@dataclass
class _Record:
    """The entropies of one (child) request: ``values[pos]`` belongs to output token ``pos``."""

    tag: str
    seed: Optional[int]
    output_ids: List[int]
    values: List[float] = field(default_factory=list)

    def put(self, pos: int, value: float) -> None:
        if pos == len(self.values):
            self.values.append(value)
        elif pos < len(self.values):
            self.values[pos] = value  # a discarded sample (chunked prefill) or a replayed step
        else:  # cannot happen while vLLM reports every step; keep positions honest anyway
            self.values.extend([float("nan")] * (pos - len(self.values)))
            self.values.append(value)


def _entropy_fn():
    from heal_kernels import token_entropy

    return token_entropy


class EntropyProcessor(LogitsProcessor):
    """vLLM v1 logits processor recording exact per-token entropies of opted-in requests (see the module doc)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = torch.device(device)
        self.pin_memory = bool(is_pin_memory) and self.device.type == "cuda"
        self.flush_every = max(1, int(os.environ.get("HEAL_VLLM_ENTROPY_FLUSH", "64")))
        self._rows: Dict[int, Tuple[_Record, float]] = {}  # batch row -> (record, logit scale)
        self._records: Dict[Tuple[str, Any], _Record] = {}
        self._plan: Optional[tuple] = None  # cached (rows, device index or None, device scale or None, records)
        self._pending: List[Tuple[torch.Tensor, List[Tuple[_Record, int]]]] = []
        self._inflight: List[Tuple[torch.Tensor, Any, List[Tuple[_Record, int]]]] = []
        self._entropy = _entropy_fn()
        with _LOCK:
            _PROCESSORS.add(self)

    # -- vLLM interface ------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        if EXTRA_ARGS_KEY not in extra:
            return
        temperature = float(sampling_params.temperature)
        if temperature < _SAMPLING_EPS:
            raise ValueError(f"temperature must be > 0 to record entropies while sampling (got {temperature}): "
                             "vLLM skips argmax-invariant logits processors for greedy requests")
        parse_entropy_spec(extra[EXTRA_ARGS_KEY], temperature)

    def is_argmax_invariant(self) -> bool:
        # True places the processor after temperature (the distribution sampled from); it never
        # changes the logits, so the claim holds.
        return True

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        rows = self._rows
        for index in batch_update.removed:
            rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            extra = getattr(params, "extra_args", None) or {}
            spec = extra.get(EXTRA_ARGS_KEY)
            if spec is None:
                rows.pop(index, None)
                continue
            tag, scale = parse_entropy_spec(spec, params.temperature)
            seed = params.seed
            key = (tag, seed if seed is not None else id(output_ids))
            rec = self._records.get(key)
            if rec is None:
                rec = self._records[key] = _Record(tag, seed, output_ids)
            else:
                rec.output_ids = output_ids  # a resumed request may bring a new list
            rows[index] = (rec, scale)
        for a, b, direction in batch_update.moved:
            ra = rows.pop(a, None)
            rb = rows.pop(b, None)
            if direction == MoveDirectionality.SWAP and rb is not None:
                rows[a] = rb
            if ra is not None:
                rows[b] = ra
        self._plan = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        if self._plan is None:
            self._plan = self._make_plan(logits.shape[0], logits.device)
        order, index, scale, records = self._plan
        x = logits if index is None else logits.index_select(0, index)
        if scale is not None:
            x = x * scale
        ent = self._entropy(x, temperature=1.0)
        # the token sampled now is output token number len(output_ids) of each request
        self._pending.append((ent, [(rec, len(rec.output_ids)) for rec in records]))
        if len(self._pending) >= self.flush_every:
            self._flush()
        return logits

    # -- bookkeeping ---------------------------------------------------------------------------

    def _make_plan(self, num_rows: int, device: torch.device) -> tuple:
        order = sorted(i for i in self._rows if i < num_rows)
        records = [self._rows[i][0] for i in order]
        scales = [self._rows[i][1] for i in order]
        index = None
        if order != list(range(num_rows)):
            index = torch.tensor(order, dtype=torch.long, pin_memory=self.pin_memory).to(device, non_blocking=True)
        scale = None
        if any(s != 1.0 for s in scales):
            scale = torch.tensor(scales, dtype=torch.float32, pin_memory=self.pin_memory).to(device, non_blocking=True)
            scale = scale.unsqueeze(1)
        return order, index, scale, records

    def _flush(self) -> None:
        """Start copying the pending step entropies to the host (asynchronously on CUDA)."""
        if not self._pending:
            return
        vals = torch.cat([e.reshape(-1) for e, _ in self._pending]).to(torch.float32)
        targets = [t for _, ts in self._pending for t in ts]
        self._pending = []
        event = None
        if vals.device.type == "cuda":
            host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=self.pin_memory)
            host.copy_(vals, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = vals
        self._inflight.append((host, event, targets))
        self._settle(wait=False)

    def _settle(self, wait: bool) -> None:
        """File the copied entropies into their records (waiting for the copies when ``wait``)."""
        while self._inflight:
            host, event, targets = self._inflight[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            for (rec, pos), v in zip(targets, host.tolist()):
                rec.put(pos, v)
            self._inflight.pop(0)

    def take(self, tags: Iterable[str]) -> Dict[str, List[Dict[str, Any]]]:
        """Records of the given tags, removed from the processor: ``{tag: [{"seed", "token_ids",
        "entropy"}, ...]}`` (one entry per child request seen; token ids as vLLM holds them).
        Call it once the requests have finished (after ``LLM.generate`` returned)."""
        self._flush()
        self._settle(wait=True)
        wanted = set(tags)
        out: Dict[str, List[Dict[str, Any]]] = {}
        for key in [k for k, r in self._records.items() if r.tag in wanted]:
            rec = self._records.pop(key)
            out.setdefault(rec.tag, []).append({"seed": rec.seed, "token_ids": [int(t) for t in rec.output_ids],
                                                "entropy": list(rec.values)})
        return out

    def discard(self, tags: Iterable[str]) -> None:
        """Forget the records of ``tags`` (a generate call that failed)."""
        wanted = set(tags)
        for key in [k for k, r in self._records.items() if r.tag in wanted]:
            del self._records[key]


def take_entropies(tags: Iterable[str]) -> Dict[str, List[Dict[str, Any]]]:
    """:meth:`EntropyProcessor.take` over every processor of this process."""
    tags = list(tags)
    out: Dict[str, List[Dict[str, Any]]] = {}
    with _LOCK:
        procs = list(_PROCESSORS)
    for proc in procs:
        for tag, recs in proc.take(tags).items():
            out.setdefault(tag, []).extend(recs)
    return out


class EntropyWorkerExtension:
    """vLLM worker extension (``LLM(worker_extension_cls=EXTENSION_FQCN)``): methods callable with
    ``llm.collective_rpc(name, args=...)`` in whichever process the worker runs."""

    def heal_take_entropies(self, tags: List[str]) -> Dict[str, List[Dict[str, Any]]]:
        return take_entropies(tags)

    def heal_discard_entropies(self, tags: List[str]) -> bool:
        with _LOCK:
            procs = list(_PROCESSORS)
        for proc in procs:
            proc.discard(tags)
        return True

    def heal_entropy_processors(self) -> int:
        """How many entropy processors this worker has (0: the LLM was built without heal's processor)."""
        with _LOCK:
            return len(_PROCESSORS)
