"""Exact per-token entropies captured inside vLLM while it samples (no second forward pass).

vLLM has two logits-processor interfaces, one per model runner, and heal implements both:

* :class:`EntropyProcessor` -- the V1 interface (``vllm.v1.sample.logits_processor``), used by
  vLLM's V1 GPU model runner and by its CPU runner. vLLM calls it at every decoding step with the
  float32 ``[num_reqs, vocab]`` logits of the batch *after* penalties, temperature and ``min_p``
  and before top-k / top-p (it declares itself argmax-invariant, which is what places it there).
  Batch rows are mapped to requests through vLLM's ``BatchUpdate`` (removed, then added, then moved
  or swapped rows); the position of the token a row samples is ``len(output_token_ids)``.
* :class:`heal.rollout.vllm_entropy_v2.EntropyProcessorV2` -- the Model Runner V2 interface
  (``vllm.v1.worker.gpu.sample.logits_processor``), vLLM's default runner on GPUs with Triton since
  0.32. There ``apply()`` sees the logits *before* temperature and ``min_p``, so the processor
  applies both itself (from each request's ``SamplingParams``, taken at ``add_request()``); rows
  are mapped to persistent request slots through ``LogitsContext.expanded_idx_mapping``, and the
  position of the token a row samples is ``pos + 1 - prompt_len`` (see that module).

Both take the exact full-vocabulary entropy of the distribution sampled from (``softmax(z / T)``
after ``min_p``, before top-k / top-p) with ``heal_kernels.token_entropy`` (the fused Triton kernel
on CUDA, the C++ kernel on CPU), return the logits unchanged, and file every value under the
position of the token being sampled, so a finished request owns one entropy per sampled token.
A row whose sample vLLM discards (a chunk of a chunked prefill, a rejected draft token, a step
scheduled after a stop) is overwritten by the real one or lies past the completion's end.

**Which one runs** is decided by vLLM's own choice of runner: vLLM is given one class,
:data:`PROCESSOR_FQCN` (:class:`EntropyCapture`), which passes both interfaces' loaders and, when a
runner instantiates it, builds the processor that :func:`select_processor_class` picks from
``vllm_config.use_v2_model_runner`` (checked against the constructor arguments the runner passed).
Nothing for the user to set; where neither can apply (speculative decoding on the V1 runner, a vLLM
without the interface its runner needs) the error says why.

Opting in is per request, through ``SamplingParams.extra_args``::

    SamplingParams(..., seed=s, extra_args={"heal_entropy": {"tag": "call-id/prompt-3",
                                                              "temperature": "sampling"}})

* ``tag``: a string naming the request (unique per ``generate`` call and prompt);
* ``temperature``: ``"sampling"`` (default) = the entropy of the distribution actually sampled from
  (``softmax(z / T)``); a number ``t`` = the entropy of ``softmax(z / t)`` for the same logits ``z``
  (``1.0``: the raw distribution, which is what vLLM's own log-probs describe by default).

With ``n > 1`` vLLM splits a request into ``n`` child requests that share the parent's
``SamplingParams`` and, when ``seed`` is set, get ``seed + j`` (``j`` = the sample index): the
processors key their records by ``(tag, seed)``, so always set a seed (``VLLMBackend`` does). A
preempted request that is resumed finds its record again by that key and continues where it stopped.

Reading the results: :class:`EntropyWorkerExtension` is a vLLM worker extension; with it,
``llm.collective_rpc("heal_take_entropies", args=(tags,))`` returns (and forgets) the records of
the given tags from the worker, in-process or across vLLM's engine processes alike.

No host synchronisation per step: each step's entropies stay on the logits' device in a list; every
``HEAL_VLLM_ENTROPY_FLUSH`` steps (default 64) they are concatenated and copied to pinned host memory
asynchronously (a CUDA event marks completion), and only ``take()`` waits.
(vLLM's V1 runner itself synchronises once per step under async scheduling whenever any custom
logits processor is installed, to fill in ``output_token_ids``; that cost is vLLM's.)

This module imports vLLM; load it only where vLLM is installed (``heal.rollout.vllm`` does so lazily).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from heal.rollout.vllm import EXTENSION_FQCN, PROCESSOR_FQCN, EntropyCaptureError

try:  # the V1 interface (vLLM >= 0.10); also what the CPU runner uses
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
except ImportError:  # pragma: no cover - a vLLM without it
    BatchUpdate = MoveDirectionality = _V1LogitsProcessor = None
try:  # the Model Runner V2 interface (vLLM >= 0.32); import-light by vLLM's design
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState as _V2RequestState
except ImportError:  # pragma: no cover - a vLLM without it
    _V2LogitsProcessor = _V2RequestState = None

__all__ = ["EXTRA_ARGS_KEY", "PROCESSOR_FQCN", "EXTENSION_FQCN", "EntropyCapture", "EntropyProcessor",
           "EntropyWorkerExtension", "EntropyCaptureError", "entropy_extra_args", "parse_entropy_spec",
           "validate_entropy_params", "runner_interface", "select_processor_class", "take_entropies"]

EXTRA_ARGS_KEY = "heal_entropy"
_SAMPLING_EPS = 1e-5  # vLLM treats temperatures below this as greedy

# every live processor of this process (the worker extension looks them up here)
_PROCESSORS: "weakref.WeakSet[_EntropyStore]" = weakref.WeakSet()
_LOCK = threading.Lock()


def entropy_extra_args(tag: str, temperature: Any = "sampling") -> Dict[str, Any]:
    """The ``SamplingParams.extra_args`` that make a request record its entropies."""
    spec = {"tag": str(tag), "temperature": temperature if temperature == "sampling" else float(temperature)}
    parse_entropy_spec(spec, sampling_temperature=1.0)  # validates
    return {EXTRA_ARGS_KEY: spec}


def parse_entropy_spec(spec: Any, sampling_temperature: float) -> Tuple[str, float]:
    """``(tag, scale)`` from an ``extra_args["heal_entropy"]`` value: the entropy is that of the
    post-temperature logits multiplied by ``scale = T_sampling / T_entropy`` (1.0 for ``"sampling"``).

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


def validate_entropy_params(sampling_params: Any) -> None:
    """The per-request check of both processors (vLLM runs it when a request is admitted)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if EXTRA_ARGS_KEY not in extra:
        return
    temperature = float(sampling_params.temperature)
    if temperature < _SAMPLING_EPS:
        raise ValueError(f"temperature must be > 0 to record entropies while sampling (got {temperature}): "
                         "greedy decoding samples from no distribution, and vLLM's V1 runner skips "
                         "argmax-invariant logits processors for greedy requests")
    parse_entropy_spec(extra[EXTRA_ARGS_KEY], temperature)


@dataclass
class _Record:
    """The entropies of one (child) request: ``values[pos]`` belongs to output token ``pos``.

    ``output_ids``: vLLM's own list of the request's output tokens (V1 runner). ``tokens``: the
    output tokens as the V2 processor saw them fed back to the model (-1 where not seen, e.g. the
    last token, which is never fed back). ``tenure``: how often the V2 runner has added the request
    (1 + its resumptions); ``stamps[pos]`` / ``token_stamps[pos]``: the tenure that wrote the value,
    so that records of one request from several ranks merge to the latest write (see
    ``heal.rollout.vllm._merge_worker_records``).
    """

    tag: str
    seed: Optional[int]
    output_ids: Optional[List[int]] = None
    values: List[float] = field(default_factory=list)
    tokens: Optional[List[int]] = None
    tenure: int = 0
    stamps: Optional[List[int]] = None
    token_stamps: Optional[List[int]] = None

    def put(self, pos: int, value: float, stamp: Optional[int] = None) -> None:
        vals = self.values
        if pos < len(vals):
            vals[pos] = value  # a discarded sample (chunked prefill, rejected draft) or a replayed step
        else:  # pos > len only if vLLM skipped a step; keep positions honest anyway
            vals.extend([float("nan")] * (pos - len(vals)))
            vals.append(value)
        if stamp is not None:
            _put(self.stamps, pos, stamp, -1)

    def put_token(self, pos: int, token: int, stamp: int) -> None:
        _put(self.tokens, pos, token, -1)
        _put(self.token_stamps, pos, stamp, -1)

    def result(self) -> Dict[str, Any]:
        if self.output_ids is not None:  # V1: vLLM's list, exactly as long as the completion
            return {"seed": self.seed, "token_ids": [int(t) for t in self.output_ids],
                    "entropy": list(self.values), "exact": True}
        n = len(self.values)
        # V2: may run past the completion's last token (a step scheduled before the stop was seen, rejected
        # draft rows); the reader cuts it to the completion's length
        return {"seed": self.seed, "token_ids": _fit(self.tokens, n), "entropy": list(self.values), "exact": False,
                "stamps": _fit(self.stamps, n), "token_stamps": _fit(self.token_stamps, n)}


def _put(seq: List[Any], pos: int, value: Any, fill: Any) -> None:
    if pos >= len(seq):
        seq.extend([fill] * (pos + 1 - len(seq)))
    seq[pos] = value


def _fit(seq: Optional[List[int]], n: int) -> List[int]:
    out = list(seq or [])[:n]
    return out + [-1] * (n - len(out))


def _entropy_fn():
    from heal_kernels import token_entropy

    return token_entropy


class _EntropyStore:
    """What both processors share: the records, the per-step device buffers and their bulk copy to the
    host, ``take`` / ``discard``. A step is queued as ``(device tensor, filer)``; once its values are on
    the host, ``filer(values)`` files them (a numpy float64 array, the tensor flattened)."""

    def _init_store(self, device: Any, pin_memory: bool) -> None:
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self.flush_every = max(1, int(os.environ.get("HEAL_VLLM_ENTROPY_FLUSH", "64")))
        self._records: Dict[Tuple[str, Any], _Record] = {}
        self._pending: List[Tuple[torch.Tensor, Callable[[Any], None]]] = []
        self._inflight: List[Tuple[torch.Tensor, Any, List[Tuple[Callable[[Any], None], int]]]] = []
        self._entropy = _entropy_fn()
        with _LOCK:
            _PROCESSORS.add(self)

    def _queue(self, values: torch.Tensor, filer: Callable[[Any], None]) -> None:
        self._pending.append((values, filer))
        if len(self._pending) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        """Start copying the pending step values to the host (asynchronously on CUDA)."""
        if not self._pending:
            return
        vals = torch.cat([v.reshape(-1).to(torch.float64) for v, _ in self._pending])
        filers = [(f, v.numel()) for v, f in self._pending]
        self._pending = []
        event = None
        if vals.device.type == "cuda":
            host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=self.pin_memory)
            host.copy_(vals, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = vals
        self._inflight.append((host, event, filers))
        self._settle(wait=False)

    def _settle(self, wait: bool) -> None:
        """File the copied values into their records (waiting for the copies when ``wait``)."""
        while self._inflight:
            host, event, filers = self._inflight[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            arr = host.numpy()
            off = 0
            for filer, n in filers:
                filer(arr[off:off + n])
                off += n
            self._inflight.pop(0)

    def take(self, tags: Iterable[str]) -> Dict[str, List[Dict[str, Any]]]:
        """Records of the given tags, removed from the processor: ``{tag: [{"seed", "token_ids",
        "entropy", "exact"}, ...]}`` (one entry per child request seen; ``exact``: False where the
        entropies may run past the completion's last token, see :meth:`_Record.result`).
        Call it once the requests have finished (after ``LLM.generate`` returned)."""
        self._flush()
        self._settle(wait=True)
        wanted = set(tags)
        out: Dict[str, List[Dict[str, Any]]] = {}
        for key in [k for k, r in self._records.items() if r.tag in wanted]:
            rec = self._records.pop(key)
            out.setdefault(rec.tag, []).append(rec.result())
        return out

    def discard(self, tags: Iterable[str]) -> None:
        """Forget the records of ``tags`` (a generate call that failed)."""
        wanted = set(tags)
        for key in [k for k, r in self._records.items() if r.tag in wanted]:
            del self._records[key]

    def _record(self, tag: str, seed: Optional[int], anonymous: Any) -> _Record:
        """The record of ``(tag, seed)``, made when new; ``anonymous`` keys a request without a seed."""
        key = (tag, seed if seed is not None else anonymous)
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = _Record(tag, seed)
        return rec


class EntropyProcessor(_V1LogitsProcessor or object, _EntropyStore):
    """vLLM V1-interface logits processor (V1 GPU runner, CPU runner) recording exact per-token
    entropies of opted-in requests (see the module doc)."""

    interface = "v1"

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        if _V1LogitsProcessor is None:
            raise EntropyCaptureError("this vLLM has no V1 logits-processor interface "
                                      "(vllm.v1.sample.logits_processor)")
        self._init_store(device, is_pin_memory)
        self._rows: Dict[int, Tuple[_Record, float]] = {}  # batch row -> (record, logit scale)
        self._plan: Optional[tuple] = None  # cached (rows, device index or None, device scale or None, records)

    # -- vLLM interface ------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_entropy_params(sampling_params)

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
            rec = self._record(tag, params.seed, id(output_ids))
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
        targets = [(rec, len(rec.output_ids)) for rec in records]
        self._queue(ent, lambda vals, targets=targets: _file_v1(targets, vals))
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


def _file_v1(targets: List[Tuple[_Record, int]], vals: Any) -> None:
    for (rec, pos), v in zip(targets, vals.tolist()):
        rec.put(pos, v)


# ------------------------------------------------------------------ which processor for which runner


def runner_interface(vllm_config: Any) -> str:
    """``"v2"`` where vLLM runs Model Runner V2 (``vllm_config.use_v2_model_runner``, vLLM's own
    decision: its default on GPUs with Triton since 0.32, ``VLLM_USE_V2_MODEL_RUNNER`` overrides), else
    ``"v1"`` (the V1 GPU runner, the CPU runner, a vLLM older than the V2 runner; also no config)."""
    if vllm_config is None:
        return "v1"
    return "v2" if bool(getattr(vllm_config, "use_v2_model_runner", False)) else "v1"


def select_processor_class(vllm_config: Any) -> type:
    """The processor class for the runner ``vllm_config`` makes vLLM use; :class:`EntropyCaptureError`
    naming why where neither can capture entropies."""
    import vllm

    version = getattr(vllm, "__version__", "?")
    if runner_interface(vllm_config) == "v2":
        if _V2LogitsProcessor is None:
            raise EntropyCaptureError(
                f"vLLM {version} runs Model Runner V2 but has no V2 logits-processor interface "
                "(vllm.v1.worker.gpu.sample.logits_processor, vLLM >= 0.32): upgrade vLLM, or run the V1 runner "
                "(VLLM_USE_V2_MODEL_RUNNER=0)")
        from heal.rollout.vllm_entropy_v2 import EntropyProcessorV2

        return EntropyProcessorV2
    if _V1LogitsProcessor is None:
        raise EntropyCaptureError(f"vLLM {version} runs its V1 model runner but has no V1 logits-processor "
                                  "interface (vllm.v1.sample.logits_processor)")
    if getattr(vllm_config, "speculative_config", None):
        raise EntropyCaptureError(
            "vLLM's V1 model runner rejects custom logits processors under speculative decoding; Model Runner V2 "
            "accepts them (vLLM >= 0.32 on a GPU with Triton, VLLM_USE_V2_MODEL_RUNNER=1), or drop the "
            "speculative config")
    return EntropyProcessor


def _called_interface(args: tuple, kwargs: dict) -> Optional[str]:
    """Which runner's loader is constructing the processor, from the arguments it passes:
    V1 ``(vllm_config, device, is_pin_memory)``, V2 ``(vllm_config, req_states)``."""
    if not kwargs and len(args) == 1 and _V2RequestState is not None and isinstance(args[0], _V2RequestState):
        return "v2"
    if len(args) + len(kwargs) == 2 and set(kwargs) <= {"device", "is_pin_memory"}:
        return "v1"
    return None


class EntropyCapture(*(tuple(b for b in (_V1LogitsProcessor, _V2LogitsProcessor) if b is not None) or (object,))):
    """The class heal gives vLLM (:data:`PROCESSOR_FQCN`): a subclass of both interfaces' base classes, so
    either runner's loader accepts it; instantiating it builds the processor :func:`select_processor_class`
    picks for vLLM's runner, after checking that the runner calling it is that one."""

    def __new__(cls, vllm_config: Any = None, *args: Any, **kwargs: Any):
        chosen = select_processor_class(vllm_config)
        called = _called_interface(args, kwargs)
        if called != chosen.interface:
            raise EntropyCaptureError(
                f"vLLM's config selects its {chosen.interface.upper()} model runner "
                f"(use_v2_model_runner={runner_interface(vllm_config) == 'v2'}), but heal's entropy processor is "
                f"being built with {'the ' + called.upper() + ' interface' if called else 'unknown'} arguments "
                f"({', '.join(type(a).__name__ for a in args)}): this vLLM's runners and config disagree")
        return chosen(vllm_config, *args, **kwargs)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_entropy_params(sampling_params)


# ------------------------------------------------------------------ reading the results


def take_entropies(tags: Iterable[str]) -> Dict[str, List[Dict[str, Any]]]:
    """``take`` over every processor of this process."""
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

    def heal_entropy_interfaces(self) -> List[str]:
        """The interfaces (``"v1"`` / ``"v2"``) of this worker's entropy processors."""
        with _LOCK:
            return sorted({p.interface for p in _PROCESSORS})
