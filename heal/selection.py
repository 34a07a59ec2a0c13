"""General-domain data selection (paper section 3.1, DESIGN.md section 5) and ``heal select``.

For a candidate general question ``x`` with ``N`` sampled trajectories ``y_1..y_N``:

* ``Acc(x) = mean_i acc(y_i)`` with ``acc`` from a verifiable checker (``heal.scoring.compute_score``,
  any value in [0, 1]);
* ``Uncertainty(x) = 1 - 2 |Acc(x) - 1/2|`` (1 at Acc = 1/2, 0 when all right or all wrong);
* ``Diversity(x) = mean_i top_mean(H(y_i))`` where ``top_mean`` is the mean entropy of the
  ``k = max(1, ceil(0.2 * len))`` highest-entropy tokens of one trajectory. **An empty trajectory
  contributes 0** to that mean (it still counts in ``N``), so questions that make the model stop at
  once are not favoured;
* score ``c(x) = Uncertainty(x) * Diversity(x)``; keep the top ``K`` (ties: higher Diversity, then the
  earlier row).

Entropies are exact full-vocabulary entropies at the sampling temperature (:mod:`heal.rollout`).

Resuming: :func:`score_questions` appends one JSON line per finished question to a cache file whose
first line is a header ``{"heal_selection_cache": 1, "model": ..., "temperature": ..., "n": ...,
"max_new_tokens": ..., "seed": ...}``. On restart, questions whose key (a hash of data_source,
prompt and ground truth) is in the cache are not generated again; a cache whose header differs
from the current settings is set aside (renamed ``*.stale``) and scoring starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "TOP_FRACTION",
    "uncertainty",
    "top_entropy_mean",
    "diversity",
    "selection_score",
    "QuestionStats",
    "question_stats",
    "question_key",
    "select_top_k",
    "SelectionCache",
    "score_questions",
    "write_selection_report",
    "run_selection",
    "SelectConfig",
]

TOP_FRACTION = 0.2
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# the maths (pure functions)
# ---------------------------------------------------------------------------------------------


def uncertainty(acc: float) -> float:
    """``1 - 2 |acc - 1/2|`` for ``acc`` in [0, 1]."""
    acc = float(acc)
    if not (0.0 <= acc <= 1.0):
        raise ValueError(f"acc must be in [0, 1], got {acc}")
    return 1.0 - 2.0 * abs(acc - 0.5)


def top_entropy_mean(entropy: Sequence[float], top_fraction: float = TOP_FRACTION) -> float:
    """Mean of the ``max(1, ceil(top_fraction * len))`` largest entropies; 0.0 for an empty sequence."""
    if not (0.0 < top_fraction <= 1.0):
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    values = [float(v) for v in entropy]
    if not values:
        return 0.0
    if any(math.isnan(v) for v in values):
        raise ValueError("entropy contains NaN")
    k = max(1, math.ceil(top_fraction * len(values)))
    top = sorted(values, reverse=True)[:k]
    return math.fsum(top) / k


def diversity(entropies: Sequence[Sequence[float]], top_fraction: float = TOP_FRACTION) -> float:
    """Mean over trajectories of :func:`top_entropy_mean` (empty trajectories count as 0)."""
    if len(entropies) == 0:
        raise ValueError("entropies must hold at least one trajectory")
    return math.fsum(top_entropy_mean(e, top_fraction) for e in entropies) / len(entropies)


def selection_score(acc: float, div: float) -> float:
    """``c = Uncertainty(acc) * Diversity``."""
    return uncertainty(acc) * float(div)


@dataclass
class QuestionStats:
    """Selection statistics of one question (one cache record)."""

    key: str
    index: int
    acc: float
    uncertainty: float
    diversity: float
    score: float
    n: int
    mean_tokens: float
    accs: List[float] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "QuestionStats":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def question_stats(key: str, index: int, accs: Sequence[float], entropies: Sequence[Sequence[float]],
                   top_fraction: float = TOP_FRACTION) -> QuestionStats:
    """Acc / Uncertainty / Diversity / score of one question from its trajectories' accuracies and entropies."""
    if len(accs) != len(entropies) or not accs:
        raise ValueError(f"accs and entropies must have the same non-zero length, got {len(accs)} and {len(entropies)}")
    acc = math.fsum(float(a) for a in accs) / len(accs)
    acc = min(1.0, max(0.0, acc))
    div = diversity(entropies, top_fraction)
    unc = uncertainty(acc)
    return QuestionStats(key=key, index=int(index), acc=acc, uncertainty=unc, diversity=div,
                         score=unc * div, n=len(accs),
                         mean_tokens=sum(len(e) for e in entropies) / len(entropies),
                         accs=[float(a) for a in accs])


def _rank_key(s: "QuestionStats"):
    return (-s.score, -s.diversity, s.index)


def select_top_k(stats: Sequence[QuestionStats], k: int) -> List[QuestionStats]:
    """The ``k`` highest scores, best first. Equal scores (common at ``c = 0``: a question the model
    always or never solves) go to the higher Diversity, then to the lower ``index``."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return sorted(stats, key=_rank_key)[:k]


# ---------------------------------------------------------------------------------------------
# rows, keys, cache
# ---------------------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """numpy arrays / scalars from a parquet row -> plain Python (for hashing and JSON)."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _plain(x.tolist())
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def row_ground_truth(row: Mapping[str, Any]) -> Any:
    rm = _plain(row.get("reward_model"))
    if not isinstance(rm, Mapping) or "ground_truth" not in rm:
        raise ValueError("row has no reward_model.ground_truth (verl schema)")
    return rm["ground_truth"]


def question_key(row: Mapping[str, Any]) -> str:
    """Stable id of a question: sha256 of its data_source, prompt and ground truth."""
    payload = json.dumps({"data_source": _plain(row.get("data_source")), "prompt": _plain(row.get("prompt")),
                          "ground_truth": row_ground_truth(row)}, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class SelectionCache:
    """Append-only JSONL cache of :class:`QuestionStats`, invalidated by a settings header."""

    def __init__(self, path: Optional[str], settings: Mapping[str, Any]):
        self.path = path
        self.header = {"heal_selection_cache": CACHE_VERSION, **{k: _plain(v) for k, v in settings.items()}}
        self.records: Dict[str, QuestionStats] = {}
        self.stale_path: Optional[str] = None
        if path is None:
            return
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            header = None
            try:
                header = json.loads(lines[0]) if lines else None
            except ValueError:
                pass
            if header != self.header:
                self.stale_path = path + ".stale"
                os.replace(path, self.stale_path)
            else:
                for ln in lines[1:]:
                    try:
                        rec = QuestionStats.from_json(json.loads(ln))
                    except (ValueError, TypeError):  # a line cut short by an interruption
                        continue
                    self.records[rec.key] = rec
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.header) + "\n")

    def get(self, key: str) -> Optional[QuestionStats]:
        return self.records.get(key)

    def add(self, stats: QuestionStats) -> None:
        self.records[stats.key] = stats
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats.to_json()) + "\n")
                f.flush()
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# scoring a pool of questions
# ---------------------------------------------------------------------------------------------


def score_questions(
    rows: Sequence[Mapping[str, Any]],
    backend: Any,
    *,
    entropy_model: Any = None,
    n: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = 1024,
    seed: int = 0,
    cache_path: Optional[str] = None,
    model_id: str = "",
    questions_per_batch: int = 8,
    compute_score: Optional[Callable[..., float]] = None,
    top_fraction: float = TOP_FRACTION,
    token_budget: int = 8192,
    progress: bool = True,
    stop_after: Optional[int] = None,
    on_question: Optional[Callable[[QuestionStats], None]] = None,
    entropy_temperature: Any = "sampling",
) -> List[QuestionStats]:
    """Selection statistics for every row (verl schema: ``data_source``, ``prompt``,
    ``reward_model.ground_truth``, ``extra_info``), in row order.

    Rows already in the cache (same settings) are not generated again. Generation runs
    ``questions_per_batch`` questions at a time; each finished question is written to the cache
    at once. ``stop_after``: stop after scoring that many *new* questions (for tests and for
    chunked runs); the returned list then holds only the questions scored so far.
    ``on_question`` is called for each newly scored question. ``entropy_model``: the transformers
    policy for the teacher-forced entropy pass (``None`` when the backend captures the entropies
    itself, as vLLM with heal's processor does). ``entropy_temperature``: ``"sampling"`` (default)
    or a number (see :func:`heal.rollout.generate_rollouts`).

    Sampling is seeded per generate call from ``seed`` and the first question of the call, so a
    run is reproducible for the same ``questions_per_batch``; a resumed run batches the remaining
    questions differently and so draws other (equally valid) samples for them.
    """
    from tqdm.auto import tqdm

    from heal.rollout import generate_rollouts

    if compute_score is None:
        from heal.scoring import compute_score
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if questions_per_batch < 1:
        raise ValueError(f"questions_per_batch must be >= 1, got {questions_per_batch}")
    entropy_temperature = _entropy_temperature_field(entropy_temperature)
    settings = {"model": model_id, "temperature": float(temperature), "n": int(n),
                "max_new_tokens": int(max_new_tokens), "seed": int(seed), "top_fraction": float(top_fraction)}
    if entropy_temperature != "sampling":  # (absent = sampling: caches written before the option stay valid)
        settings["entropy_temperature"] = entropy_temperature
    cache = SelectionCache(cache_path, settings)
    keys = [question_key(r) for r in rows]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="select", unit="question", disable=not progress)
    if stop_after is not None:
        todo = todo[: max(0, int(stop_after))]
    try:
        for start in range(0, len(todo), questions_per_batch):
            chunk = todo[start : start + questions_per_batch]
            prompts = [_plain(rows[i]["prompt"]) for i in chunk]
            # the seed depends on the questions, not on where a resumed run starts
            chunk_seed = (int(seed) * 1_000_003 + int(keys[chunk[0]][:8], 16)) % (2**31)
            groups = generate_rollouts(backend, prompts, entropy_model=entropy_model, n=n,
                                       temperature=temperature, max_new_tokens=max_new_tokens,
                                       seed=chunk_seed, token_budget=token_budget, progress=False,
                                       entropy_temperature=entropy_temperature)
            for i, comps in zip(chunk, groups):
                row = rows[i]
                gt = row_ground_truth(row)
                extra = _plain(row.get("extra_info")) or None
                accs = [float(compute_score(row.get("data_source"), c.text, gt, extra)) for c in comps]
                st = question_stats(keys[i], i, accs, [c.entropy or [] for c in comps], top_fraction)
                cache.add(st)
                if on_question is not None:
                    on_question(st)
                bar.update(1)
    finally:
        bar.close()
    return [cache.get(k) for k in keys if cache.get(k) is not None]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else float("nan")


def write_selection_report(stats: Sequence[QuestionStats], chosen: Sequence[QuestionStats], out_dir: str,
                           *, title: str = "General-domain selection", settings: Optional[Mapping[str, Any]] = None,
                           rows: Optional[Sequence[Mapping[str, Any]]] = None, stem: str = "selection") -> Dict[str, str]:
    """``<stem>.md`` + ``<stem>.png`` (score histogram with the cut, chosen-vs-rejected means of
    Acc / Uncertainty / Diversity / score) in ``out_dir``. Returns ``{"markdown": path, "figure": path}``."""
    from heal.analysis.plots import plot_selection

    os.makedirs(out_dir, exist_ok=True)
    chosen_keys = {s.key for s in chosen}
    rejected = [s for s in stats if s.key not in chosen_keys]
    fig_path = os.path.join(out_dir, f"{stem}.png")
    plot_selection(stats, chosen, fig_path)
    lines = [f"# {title}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    lines += [f"{len(stats)} questions scored, {len(chosen)} kept (top-K by `c = Uncertainty x Diversity`).", "",
              "| group | n | Acc | Uncertainty | Diversity | score c |", "|---|---:|---:|---:|---:|---:|"]
    for name, group in (("chosen", list(chosen)), ("rejected", rejected), ("all", list(stats))):
        lines.append(f"| {name} | {len(group)} | {_mean([s.acc for s in group]):.3f} | "
                     f"{_mean([s.uncertainty for s in group]):.3f} | {_mean([s.diversity for s in group]):.3f} | "
                     f"{_mean([s.score for s in group]):.3f} |")
    lines += ["", f"![score distribution and chosen vs rejected]({os.path.basename(fig_path)})", "",
              "## Per question (best first)", "",
              "| rank | row | chosen | Acc | Uncertainty | Diversity | score | mean tokens | question |",
              "|---:|---:|:---:|---:|---:|---:|---:|---:|---|"]
    for rank, s in enumerate(sorted(stats, key=_rank_key), 1):
        q = ""
        if rows is not None:
            q = _question_text(rows[s.index])
        lines.append(f"| {rank} | {s.index} | {'yes' if s.key in chosen_keys else ''} | {s.acc:.2f} | "
                     f"{s.uncertainty:.2f} | {s.diversity:.3f} | {s.score:.3f} | {s.mean_tokens:.1f} | {q} |")
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"markdown": md_path, "figure": fig_path}


def _question_text(row: Mapping[str, Any], width: int = 70) -> str:
    prompt = _plain(row.get("prompt"))
    if isinstance(prompt, list) and prompt:
        prompt = prompt[-1].get("content", "")
    text = " ".join(str(prompt).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class SelectConfig:
    """Options of ``heal select`` (also the keys of its ``--config`` YAML/JSON file)."""

    input: Optional[str] = None
    output: Optional[str] = None
    model: Optional[str] = None
    k: int = 384
    samples: int = 8
    temperature: float = 0.7
    max_new_tokens: int = 1024
    seed: int = 0
    cache: Optional[str] = None
    report_dir: Optional[str] = None
    engine: str = "auto"
    entropy_temperature: Any = "sampling"
    device: str = "auto"
    dtype: str = "auto"
    questions_per_batch: int = 8
    token_budget: int = 8192
    limit: Optional[int] = None
    # vLLM engine options (--backend vllm only): None = vLLM's / heal's default
    tensor_parallel_size: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None
    max_model_len: Optional[int] = None
    enforce_eager: Optional[bool] = None
    vllm_args: Dict[str, Any] = dataclasses.field(default_factory=dict)  # any other vllm.LLM argument

    def require(self) -> "SelectConfig":
        """The fields without a default must be set (from the command line or the file)."""
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise ValueError(f"field '{name}' is required (--{name} or the config file)")
        return self.validate()

    def validate(self) -> "SelectConfig":
        """Ranges and choices (called by heal.config after loading a file)."""
        for name in ("k", "samples", "max_new_tokens", "questions_per_batch", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"field 'limit' must be >= 0, got {self.limit}")
        if not self.temperature > 0:
            raise ValueError(f"field 'temperature' must be > 0, got {self.temperature}")
        if self.engine not in ("auto", "transformers", "vllm"):
            raise ValueError(f"field 'engine' must be auto, transformers or vllm, got {self.engine!r}")
        self.entropy_temperature = _entropy_temperature_field(self.entropy_temperature)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"field 'device' must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"field 'dtype' must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("tensor_parallel_size", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"field 'gpu_memory_utilization' must be in (0, 1], got {self.gpu_memory_utilization}")
        for key in self.vllm_args:
            if not str(key).isidentifier():
                raise ValueError(f"field 'vllm_args': key {key!r} is not a vllm.LLM argument name")
            if key in _VLLM_ARGS_WITH_AN_OPTION:
                raise ValueError(f"field 'vllm_args': {key!r} has an option of its own: "
                                 f"{_VLLM_ARGS_WITH_AN_OPTION[key]}")
        return self

    def vllm_options(self) -> Dict[str, Any]:
        """The vLLM engine options given (named ones and ``vllm_args``), as ``vllm.LLM`` keyword arguments."""
        named = {k: getattr(self, k) for k in _VLLM_NAMED_OPTIONS if getattr(self, k) is not None}
        return {**self.vllm_args, **named}

    def vllm_engine_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``heal.rollout.vllm.VLLMBackend`` for ``heal select --backend vllm``."""
        return {"dtype": self.dtype, **self.vllm_options()}


_VLLM_NAMED_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager")
_VLLM_ARGS_WITH_AN_OPTION = {
    "model": "--model", "dtype": "--dtype", "tensor_parallel_size": "--tensor-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization", "max_model_len": "--max-model-len",
    "enforce_eager": "--enforce-eager", "worker_extension_cls": "none (heal's entropy processor uses it)",
}


def _entropy_temperature_field(value: Any) -> Any:
    """``"sampling"`` or a float > 0 (strings such as ``"1.0"`` from the command line are converted)."""
    if value is None or value == "sampling":
        return "sampling"
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(value, bool) or not t > 0 or math.isinf(t):
        raise ValueError(f"field 'entropy_temperature' must be 'sampling' or a number > 0, got {value!r}")
    return t


# ---------------------------------------------------------------------------------------------
# the whole `heal select` job
# ---------------------------------------------------------------------------------------------


def run_selection(
    input_path: str,
    output_path: str,
    *,
    k: int,
    backend: Any,
    entropy_model: Any = None,
    model_id: str,
    n: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = 1024,
    seed: int = 0,
    cache_path: Optional[str] = None,
    report_dir: Optional[str] = None,
    questions_per_batch: int = 8,
    token_budget: int = 8192,
    progress: bool = True,
    stop_after: Optional[int] = None,
    entropy_temperature: Any = "sampling",
) -> Dict[str, Any]:
    """Score every row of the verl parquet ``input_path``, write the top-``k`` rows (unchanged, same
    columns) to ``output_path`` and a report next to it (``report_dir``, default: the output's folder).

    ``cache_path`` defaults to ``<output_path>.cache.jsonl``. With ``stop_after`` the run stops early
    (nothing is written but the cache) and the result says ``complete: False``.
    """
    import pandas as pd

    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input parquet not found: {input_path}")
    df = pd.read_parquet(input_path)
    for col in ("prompt", "reward_model", "data_source"):
        if col not in df.columns:
            raise ValueError(f"input {input_path}: missing column {col!r} (verl schema)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = df.to_dict("records")
    cache_path = cache_path or (output_path + ".cache.jsonl")
    stats = score_questions(rows, backend, entropy_model=entropy_model, n=n, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed, cache_path=cache_path, model_id=model_id,
                            questions_per_batch=questions_per_batch, token_budget=token_budget,
                            progress=progress, stop_after=stop_after, entropy_temperature=entropy_temperature)
    if len(stats) < len(rows):
        return {"complete": False, "scored": len(stats), "total": len(rows), "cache": cache_path}
    chosen = select_top_k(stats, k)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    df.iloc[[s.index for s in chosen]].reset_index(drop=True).to_parquet(output_path, index=False)
    report_dir = report_dir or os.path.dirname(os.path.abspath(output_path))
    stem = os.path.splitext(os.path.basename(output_path))[0] + ".report"
    report = write_selection_report(stats, chosen, report_dir, rows=rows, stem=stem,
                                    settings={"model": model_id, "n": n, "temperature": temperature,
                                              "entropy_temperature": entropy_temperature,
                                              "max_new_tokens": max_new_tokens, "k": k, "seed": seed})
    return {"complete": True, "scored": len(stats), "total": len(rows), "kept": len(chosen),
            "output": output_path, "cache": cache_path, **report}
