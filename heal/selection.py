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
from the current settings is set aside (renamed ``*.stale``) and scoring starts over. Ctrl-C raises
:class:`SelectionInterrupted` (a ``KeyboardInterrupt`` that says how many questions are cached);
``heal select`` turns it into one line and exit code 130. :meth:`SelectionCache.peek` reads a cache
without touching it, so ``heal select`` loads no model when nothing is left to score.

Checks before any work: :func:`read_pool` (the file, its columns, every row's ground truth) and
:func:`check_k` (``k`` at most the pool's size, as ``heal mix`` treats its ``--k``).

Degenerate pools: with a model that solves none (or all) of a question's samples, Acc is 0 (or 1),
Uncertainty and the score are 0, and the top-K among such questions is decided by the tie-break
(higher Diversity) alone. :func:`selection_note` says so in one or two sentences; the report and
``heal select`` print it.
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
    "REQUIRED_COLUMNS",
    "Pool",
    "read_pool",
    "check_k",
    "cache_settings",
    "SelectionCache",
    "SelectionInterrupted",
    "score_questions",
    "selection_note",
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


REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")


@dataclass
class Pool:
    """A checked pool of candidate questions: the parquet's frame, its rows and their cache keys."""

    path: str
    frame: Any
    rows: List[Dict[str, Any]]
    keys: List[str]

    def __len__(self) -> int:
        return len(self.rows)


def read_pool(path: str) -> Pool:
    """Read and check the verl parquet ``path`` before anything expensive happens: it exists, is a
    parquet file, has the columns selection reads (:data:`REQUIRED_COLUMNS`, ``reward_model`` holding
    ``ground_truth``; ``extra_info`` is optional) and at least one row. Errors name the file, what is
    missing and what is there (``FileNotFoundError`` / ``ValueError``)."""
    import pandas as pd

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input parquet not found: {path}")
    try:
        import pyarrow.parquet as pq

        columns = list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow's ArrowInvalid & co: not a parquet file
        raise ValueError(f"input {path}: not a readable parquet file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"input {path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}; "
            f"heal select reads data_source, prompt and reward_model.ground_truth (verl's layout, as `heal prepare` "
            f"writes it); columns present: {', '.join(columns) if columns else '(none)'}")
    df = pd.read_parquet(path)
    if len(df) == 0:
        raise ValueError(f"input {path}: no rows")
    rows = df.to_dict("records")
    keys = []
    for i, row in enumerate(rows):
        try:
            if row_ground_truth(row) is None:  # (parquet fills a missing struct field with None)
                raise ValueError("row has reward_model.ground_truth = None")
            keys.append(question_key(row))
        except ValueError as exc:
            raise ValueError(f"input {path}: row {i} (0-based): {exc}") from None
    return Pool(path=path, frame=df, rows=rows, keys=keys)


def check_k(k: int, pool: Pool) -> None:
    """``k`` must not exceed the pool, as ``heal mix`` refuses a ``--k`` larger than its rows."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > len(pool):
        raise ValueError(f"--k {k} is larger than the {len(pool)} questions in {pool.path}; "
                         f"use --k {len(pool)} or less")


def cache_settings(*, model_id: str, temperature: float, n: int, max_new_tokens: int, seed: int,
                   top_fraction: float = TOP_FRACTION, entropy_temperature: Any = "sampling") -> Dict[str, Any]:
    """The settings a cache is valid for (its header, less the version): what :func:`score_questions`
    writes, and what ``heal select`` compares before it decides whether a model is needed at all."""
    entropy_temperature = _entropy_temperature_field(entropy_temperature)
    settings = {"model": model_id, "temperature": float(temperature), "n": int(n),
                "max_new_tokens": int(max_new_tokens), "seed": int(seed), "top_fraction": float(top_fraction)}
    if entropy_temperature != "sampling":  # (absent = sampling: caches written before the option stay valid)
        settings["entropy_temperature"] = entropy_temperature
    return settings


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class SelectionCache:
    """Append-only JSONL cache of :class:`QuestionStats`, invalidated by a settings header."""

    def __init__(self, path: Optional[str], settings: Mapping[str, Any]):
        self.path = path
        self.header = self._header(settings)
        self.records: Dict[str, QuestionStats] = {}
        self.stale_path: Optional[str] = None
        if path is None:
            return
        if os.path.exists(path):
            records = self._read(path, self.header)
            if records is None:
                self.stale_path = path + ".stale"
                os.replace(path, self.stale_path)
            else:
                self.records = records
                if not _ends_with_newline(path):  # a line cut short: the next record goes on a line of its own
                    with open(path, "a", encoding="utf-8") as f:
                        f.write("\n")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.header) + "\n")

    @staticmethod
    def _header(settings: Mapping[str, Any]) -> Dict[str, Any]:
        return {"heal_selection_cache": CACHE_VERSION, **{k: _plain(v) for k, v in settings.items()}}

    @staticmethod
    def _read(path: str, header: Mapping[str, Any]) -> Optional[Dict[str, QuestionStats]]:
        """The records of the cache file ``path``, or ``None`` when its header is not ``header``."""
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        try:
            found = json.loads(lines[0]) if lines else None
        except ValueError:
            found = None
        if found != header:
            return None
        records: Dict[str, QuestionStats] = {}
        for ln in lines[1:]:
            try:
                rec = QuestionStats.from_json(json.loads(ln))
            except (ValueError, TypeError):  # a line cut short by an interruption
                continue
            records[rec.key] = rec
        return records

    @classmethod
    def peek(cls, path: Optional[str], settings: Mapping[str, Any]) -> Dict[str, QuestionStats]:
        """The records a run with ``settings`` would reuse from ``path``, read without touching the file
        (no stale renaming, nothing created): empty when there is no file or its settings differ."""
        if path is None or not os.path.isfile(path):
            return {}
        return cls._read(path, cls._header(settings)) or {}

    def get(self, key: str) -> Optional[QuestionStats]:
        return self.records.get(key)

    def add(self, stats: QuestionStats) -> None:
        # on disk first, then in memory: an interruption between the two under-counts, never over-counts
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats.to_json()) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.records[stats.key] = stats


class SelectionInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`score_questions`. Still a :class:`KeyboardInterrupt`; says how far it got:
    ``scored`` of ``total`` questions are in the cache ``cache_path`` (every finished question is
    written there at once, so a run started again with the same settings resumes from there)."""

    def __init__(self, scored: int, total: int, cache_path: Optional[str]):
        super().__init__(f"interrupted: {scored}/{total} questions cached in {cache_path}")
        self.scored, self.total, self.cache_path = scored, total, cache_path


# ---------------------------------------------------------------------------------------------
# scoring a pool of questions
# ---------------------------------------------------------------------------------------------


class _StepProgress:
    """Progress inside a generate call, so that the bar moves before a whole batch of questions is done.

    The ``select`` bar counts questions, and all questions of a batch finish together (one batched
    ``generate``). For a transformers policy (a backend with a torch ``model``) a second, transient
    bar counts the decoding steps of the current batch (one forward pass of the model per new token,
    at most ``max_new_tokens`` per ``generate`` call; fewer when every sample stops early), through a
    forward hook held only while the backend generates (the teacher-forced entropy pass is not
    counted). Its rate and ETA are those of the batch under way; the ``select`` bar's postfix says
    which batch and phase. Other backends (vLLM) keep their own progress bar (``progress=``).
    """

    def __init__(self, backend: Any, bar: Any, max_new_tokens: int, n: int, *, enabled: bool):
        self.bar, self.max_new_tokens, self.n = bar, int(max_new_tokens), int(n)
        self.model = getattr(backend, "model", None)
        self.per_call = getattr(backend, "prompts_per_batch", None)  # prompts per generate call of the backend
        try:
            import torch

            hookable = isinstance(self.model, torch.nn.Module)
        except ImportError:  # pragma: no cover
            hookable = False
        self.steps = None
        if enabled and hookable:
            from tqdm.auto import tqdm

            self.steps = tqdm(total=self.max_new_tokens, desc="decoding", unit="step", leave=False)
        self.label = ""

    def start_batch(self, b: int, n_batches: int, n_questions: int) -> None:
        self.label = f"batch {b}/{n_batches}"
        self.phase(f"{self.label}: sampling {n_questions} questions x {self.n}")
        if self.steps is not None:
            per_call = self.per_call if isinstance(self.per_call, int) and self.per_call > 0 else n_questions
            calls = math.ceil(n_questions / per_call)
            self.steps.reset(total=calls * self.max_new_tokens)
            self.steps.set_description(f"{self.label} decoding", refresh=False)

    def phase(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def wrap(self, backend: Any) -> Any:
        return backend if self.steps is None else _HookedBackend(backend, self)

    def tick(self) -> None:
        if self.steps is not None:
            self.steps.update(1)

    def generated(self) -> None:
        self.phase(f"{self.label}: entropies and answers")
        if self.steps is not None:
            self.steps.update(max(0, self.steps.total - self.steps.n))  # samples that all stopped early

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()


class _HookedBackend:
    """``backend`` whose ``generate`` ticks :class:`_StepProgress` once per forward pass of its model."""

    def __init__(self, backend: Any, progress: _StepProgress):
        self._backend, self._progress = backend, progress

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        handle = self._progress.model.register_forward_pre_hook(lambda module, args: self._progress.tick())
        try:
            out = self._backend.generate(prompts, **kwargs)
        finally:
            handle.remove()
        self._progress.generated()
        return out


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

    ``progress``: a ``select`` bar over the questions (one tick per question scored; its postfix says
    which batch and phase) and, for a transformers backend, a transient bar over the decoding steps
    of the batch under way (see :class:`_StepProgress`), so that progress and ETA show before a whole
    batch is done. Ctrl-C raises :class:`SelectionInterrupted`; every question finished before it is
    in the cache.
    """
    from tqdm.auto import tqdm

    from heal.rollout import generate_rollouts

    if compute_score is None:
        from heal.scoring import compute_score
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if questions_per_batch < 1:
        raise ValueError(f"questions_per_batch must be >= 1, got {questions_per_batch}")
    settings = cache_settings(model_id=model_id, temperature=temperature, n=n, max_new_tokens=max_new_tokens,
                              seed=seed, top_fraction=top_fraction, entropy_temperature=entropy_temperature)
    entropy_temperature = settings.get("entropy_temperature", "sampling")
    cache = SelectionCache(cache_path, settings)
    keys = [question_key(r) for r in rows]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="select", unit="question", disable=not progress)
    if stop_after is not None:
        todo = todo[: max(0, int(stop_after))]
    n_batches = math.ceil(len(todo) / questions_per_batch)
    steps = _StepProgress(backend, bar, max_new_tokens, n, enabled=progress and bool(todo))
    try:
        for b, start in enumerate(range(0, len(todo), questions_per_batch), 1):
            chunk = todo[start : start + questions_per_batch]
            prompts = [_plain(rows[i]["prompt"]) for i in chunk]
            # the seed depends on the questions, not on where a resumed run starts
            chunk_seed = (int(seed) * 1_000_003 + int(keys[chunk[0]][:8], 16)) % (2**31)
            steps.start_batch(b, n_batches, len(chunk))
            groups = generate_rollouts(steps.wrap(backend), prompts, entropy_model=entropy_model, n=n,
                                       temperature=temperature, max_new_tokens=max_new_tokens,
                                       seed=chunk_seed, token_budget=token_budget, progress=False,
                                       entropy_temperature=entropy_temperature)
            steps.phase(f"batch {b}/{n_batches}: checking answers")
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
    except KeyboardInterrupt:
        # every finished question is on disk already (SelectionCache.add writes and fsyncs each one)
        scored = sum(1 for k in keys if cache.get(k) is not None)
        raise SelectionInterrupted(scored, len(keys), cache_path) from None
    finally:
        steps.close()
        bar.close()
    return [cache.get(k) for k in keys if cache.get(k) is not None]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else float("nan")


def _zero_reasons(zero: Sequence[QuestionStats]) -> str:
    """Why these questions scored 0, e.g. ``"7 with Acc 0: no sampled response was right; 1 with Acc 1: ..."``."""
    acc0 = sum(1 for s in zero if s.acc == 0.0)
    acc1 = sum(1 for s in zero if s.acc == 1.0)
    div0 = len(zero) - acc0 - acc1  # 0 < Acc < 1 and still c = 0: every response empty
    return "; ".join(f"{count} with {what}" for count, what in (
        (acc0, "Acc 0: no sampled response was right"), (acc1, "Acc 1: every sampled response was right"),
        (div0, "Diversity 0: empty responses")) if count)


def selection_note(stats: Sequence[QuestionStats], chosen: Sequence[QuestionStats]) -> Optional[str]:
    """One or two sentences saying what decided the top-K when the score could not: ``None`` when most
    questions have a score ``c > 0`` and none of the kept ones is a ``c = 0`` tie.

    ``c = Uncertainty x Diversity`` is 0 for a question the model always or never solves (Acc 1 or 0,
    so Uncertainty 0), common with a small model on hard questions; among equal scores the top-K goes to
    the higher Diversity, then the earlier row (:func:`select_top_k`), so a pool scored mostly 0 is in
    effect selected by diversity alone.
    """
    total = len(stats)
    zero = [s for s in stats if s.score == 0]
    if not total or not zero:
        return None
    why = _zero_reasons(zero)
    kept_zero = sum(1 for s in chosen if s.score == 0)
    tie = "the tie-break alone (highest Diversity, then earliest row)"
    if len(chosen) >= total:
        return (f"{len(zero)} of {total} questions scored c = 0 ({why}); every question was kept, "
                "so the score decided nothing.")
    if len(zero) == total:
        return (f"All {total} questions scored c = 0 ({why}), so Uncertainty x Diversity carries no signal: "
                f"the {len(chosen)} kept were picked by {tie}, i.e. by diversity, not by uncertainty.")
    if kept_zero:
        return (f"{len(zero)} of {total} questions scored c = 0 ({why}): only {len(chosen) - kept_zero} of the "
                f"{len(chosen)} kept were ranked by c = Uncertainty x Diversity; the other {kept_zero} were picked "
                f"among the c = 0 questions by {tie}.")
    if 2 * len(zero) > total:
        return (f"{len(zero)} of {total} questions scored c = 0 ({why}); all {len(chosen)} kept have c > 0, "
                f"but the score ranked only {total - len(zero)} questions.")
    return None


def write_selection_report(stats: Sequence[QuestionStats], chosen: Sequence[QuestionStats], out_dir: str,
                           *, title: str = "General-domain selection", settings: Optional[Mapping[str, Any]] = None,
                           rows: Optional[Sequence[Mapping[str, Any]]] = None, stem: str = "selection") -> Dict[str, str]:
    """``<stem>.md`` + ``<stem>.png`` (score histogram with the cut, chosen-vs-rejected means of
    Acc / Uncertainty / Diversity / score) in ``out_dir``; the markdown carries :func:`selection_note`
    when the score could not rank the pool. Returns ``{"markdown": path, "figure": path}``."""
    from heal.analysis.plots import plot_selection

    os.makedirs(out_dir, exist_ok=True)
    chosen_keys = {s.key for s in chosen}
    rejected = [s for s in stats if s.key not in chosen_keys]
    fig_path = os.path.join(out_dir, f"{stem}.png")
    plot_selection(stats, chosen, fig_path)
    lines = [f"# {title}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    lines += [f"{len(stats)} questions scored, {len(chosen)} kept (top-K by `c = Uncertainty x Diversity`).", ""]
    note = selection_note(stats, chosen)
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += [
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
    with open(md_path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
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
    pool: Optional[Pool] = None,
) -> Dict[str, Any]:
    """Score every row of the verl parquet ``input_path``, write the top-``k`` rows (unchanged, same
    columns) to ``output_path`` and a report next to it (``report_dir``, default: the output's folder).

    ``cache_path`` defaults to ``<output_path>.cache.jsonl``. With ``stop_after`` the run stops early
    (nothing is written but the cache) and the result says ``complete: False``. ``pool``: the
    :func:`read_pool` of ``input_path`` when the caller has read it already. The input is checked
    (:func:`read_pool`, :func:`check_k`: ``k`` larger than the pool is an error) before anything is
    generated. The output parquet appears only once complete (written to a temporary name, then
    renamed), after the report. The result's ``note`` is :func:`selection_note` (``None`` when the
    score ranked the pool). Ctrl-C raises :class:`SelectionInterrupted` (finished questions are cached).
    """
    pool = pool if pool is not None else read_pool(input_path)
    check_k(k, pool)
    df, rows = pool.frame, pool.rows
    cache_path = cache_path or (output_path + ".cache.jsonl")
    stats = score_questions(rows, backend, entropy_model=entropy_model, n=n, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed, cache_path=cache_path, model_id=model_id,
                            questions_per_batch=questions_per_batch, token_budget=token_budget,
                            progress=progress, stop_after=stop_after, entropy_temperature=entropy_temperature)
    if len(stats) < len(rows):
        return {"complete": False, "scored": len(stats), "total": len(rows), "cache": cache_path}
    chosen = select_top_k(stats, k)
    report_dir = report_dir or os.path.dirname(os.path.abspath(output_path))
    stem = os.path.splitext(os.path.basename(output_path))[0] + ".report"
    report = write_selection_report(stats, chosen, report_dir, rows=rows, stem=stem,
                                    settings={"model": model_id, "n": n, "temperature": temperature,
                                              "entropy_temperature": entropy_temperature,
                                              "max_new_tokens": max_new_tokens, "k": k, "seed": seed})
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".tmp"
    try:
        df.iloc[[s.index for s in chosen]].reset_index(drop=True).to_parquet(tmp, index=False)
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"complete": True, "scored": len(stats), "total": len(rows), "kept": len(chosen),
            "output": output_path, "cache": cache_path, "note": selection_note(stats, chosen), **report}
