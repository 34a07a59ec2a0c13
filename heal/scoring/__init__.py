"""Verifiable answer checkers: the accuracy reward ``r_acc`` of RLVR.

:func:`compute_score` has verl's custom reward-function signature; point verl at it with::

    reward.custom_reward_function.path=pkg://heal.scoring
    reward.custom_reward_function.name=compute_score

(verl 0.9 imports ``pkg://`` paths as packages, so checkers registered with
:func:`register_checker` in the same process are seen; or call it from your own reward function). It routes each row to a checker:

1. ``data_source`` registered with :func:`register_data_source` (exact name);
2. else ``extra_info["checker"]`` (written by ``heal prepare``: ``choice`` / ``math`` /
   ``physics`` / ``code``);
3. else keywords in the ``data_source`` name (``commonsense``, ``medqa``, ``physics``, ``math``,
   ``gsm8k``, ``livecodebench``, ``code`` ... see ``_KEYWORDS``);
4. else ``ValueError`` naming the data_source.

Checkers (each ``fn(solution_str, ground_truth, extra_info) -> float`` in [0, 1]):
``choice`` (:mod:`heal.scoring.choice`), ``math`` and ``physics`` (:mod:`heal.scoring.math_answer`),
``code`` (:mod:`heal.scoring.code`). Add your own with :func:`register_checker`.

**Nothing in a response makes scoring raise.** An exception from extracting, running, parsing or
comparing one response scores it 0 with a reason (``"<checker>/<exception type>"``, e.g.
``code/RecursionError``; the built-in checkers do this themselves, :func:`compute_score` also for
registered ones), and the rest of the batch is scored. The reasons are counted as
``scoring/errors/<reason>`` metrics: in this process by :func:`compute_score`
(:func:`pop_error_metrics`, for a trainer that scores in-process such as TRL), and per response by
:func:`compute_score_with_info`, verl's custom reward function returning
``{"score", "acc", "scoring_error"}`` (the reason, ``""`` when judged), whose ``scoring_error``
column :func:`error_metrics` turns into the same metrics (:func:`compute_score_batch`: the same for
verl's batch reward manager). What raises is never the response's
fault: a routing error (``ValueError``), a data row the checker cannot use
(:class:`InvalidRowError`: :func:`validate_row` finds those when a file is loaded) and a machine
without kernel isolation (:class:`heal.scoring.sandbox.SandboxUnavailableError`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from heal.scoring.choice import check_choice, choice_ground_truth, extract_boxed, extract_choice
from heal.scoring.code import CodeCheckConfig, check_code, extract_code, parse_tests, row_limits, run_tests
from heal.scoring.math_answer import check_math, check_physics, math_equal, physics_rel_tol
from heal.scoring.outcome import InvalidRowError, Score, error_metrics, failed, pop_error_metrics, record_error
from heal.scoring.sandbox import SandboxUnavailableError

__all__ = [
    "compute_score", "compute_score_with_info", "compute_score_batch", "score_response", "validate_row",
    "register_checker", "register_data_source", "resolve_checker", "CHECKERS", "check_choice", "check_math",
    "check_physics", "check_code", "extract_choice", "extract_boxed", "extract_code", "math_equal", "run_tests",
    "CodeCheckConfig", "Score", "InvalidRowError", "error_metrics", "pop_error_metrics",
]

Checker = Callable[..., float]

CHECKERS: Dict[str, Checker] = {
    "choice": check_choice,
    "math": check_math,
    "physics": check_physics,
    "code": check_code,
}

# exact data_source -> checker name (filled by register_data_source; the names heal prepare writes)
DATA_SOURCES: Dict[str, str] = {
    "commonsense_qa": "choice",
    "tau/commonsense_qa": "choice",
    "medqa": "choice",
    "medbullets": "choice",
    "medxpertqa": "choice",
    "webinstruct_physics": "physics",
    "physics": "physics",
    "deepscaler": "math",
    "livecodebench": "code",
}

# keyword in data_source (lower case) -> checker name; first match wins, in this order
_KEYWORDS = (
    ("code", "code"), ("livecodebench", "code"), ("apps", "code"), ("taco", "code"),
    ("humaneval", "code"), ("mbpp", "code"),
    ("commonsense", "choice"), ("csqa", "choice"), ("medqa", "choice"), ("medbullets", "choice"),
    ("medxpert", "choice"), ("medmcqa", "choice"), ("mmlu", "choice"), ("choice", "choice"),
    ("mcq", "choice"),
    ("physics", "physics"), ("webinstruct", "physics"),
    ("math", "math"), ("gsm8k", "math"), ("aime", "math"), ("amc", "math"), ("deepscaler", "math"),
    ("olympiad", "math"), ("minerva", "math"),
)


def register_checker(name: str, fn: Checker) -> None:
    """Add (or replace) a checker ``fn(solution_str, ground_truth, extra_info) -> float``."""
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty str")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    CHECKERS[name] = fn


def register_data_source(data_source: str, checker: str) -> None:
    """Route rows whose ``data_source`` is exactly ``data_source`` to checker ``checker``."""
    if checker not in CHECKERS:
        raise ValueError(f"checker must be one of {sorted(CHECKERS)}, got {checker!r}")
    DATA_SOURCES[data_source] = checker


def resolve_checker(data_source: str, extra_info: Optional[dict] = None) -> str:
    """The checker name for a row (see the module docstring for the order of the rules)."""
    if data_source in DATA_SOURCES:
        return DATA_SOURCES[data_source]
    if extra_info is not None and hasattr(extra_info, "get"):
        name = extra_info.get("checker")
        if name:
            if name not in CHECKERS:
                raise ValueError(f"extra_info['checker'] must be one of {sorted(CHECKERS)}, got {name!r}")
            return name
    low = str(data_source).lower()
    for key, name in _KEYWORDS:
        if key in low:
            return name
    raise ValueError(
        f"no answer checker for data_source {data_source!r}: register one with "
        "heal.scoring.register_data_source(data_source, checker) or set extra_info['checker']"
    )


def score_response(data_source, solution_str, ground_truth, extra_info=None) -> Score:
    """Score of one response as a :class:`Score` (its ``error``: the reason it scored 0 without being
    judged, else None); the reason is counted (:func:`pop_error_metrics`). Raises only for faults that
    are not the response's (see the module docstring)."""
    name = resolve_checker(data_source, extra_info)
    try:
        result = CHECKERS[name](solution_str, ground_truth, extra_info)
        score = Score(float(result), getattr(result, "error", None), getattr(result, "detail", ""))
    except (InvalidRowError, SandboxUnavailableError):
        raise
    except Exception as exc:  # a registered checker that raised on this response
        score = failed(name, exc)
    if score.error is not None:
        record_error(score.error)
    return score


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """Accuracy reward in [0, 1] of one response (verl's custom reward-function signature).

    ``kwargs`` that verl may pass (``reward_router_address`` ...) are ignored. A response the checker
    could not judge scores 0, and its reason is counted (:func:`pop_error_metrics`).
    """
    return float(score_response(data_source, solution_str, ground_truth, extra_info))


def compute_score_with_info(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> Dict[str, Any]:
    """:func:`compute_score` for verl, with the reason: ``{"score": s, "acc": s, "scoring_error": reason}``
    (``""`` when judged). The keys are the same for every response, as verl's reward managers need;
    verl puts them in ``reward_extra_info`` (the batch's non-tensor columns), and
    ``error_metrics(batch.non_tensor_batch["scoring_error"])`` gives the ``scoring/errors/*`` metrics::

        reward.custom_reward_function.path=pkg://heal.scoring
        reward.custom_reward_function.name=compute_score_with_info
    """
    score = score_response(data_source, solution_str, ground_truth, extra_info)
    return {"score": float(score), "acc": float(score), "scoring_error": score.error or ""}


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos=None,
                        **kwargs) -> List[Dict[str, Any]]:
    """:func:`compute_score_with_info` over a batch (verl's batch reward-manager signature,
    ``reward_model.reward_manager=batch``): one dict per response, in order; a response that cannot be
    judged scores 0 with its reason and the rest of the batch is scored."""
    n = len(solution_strs)
    if len(data_sources) != n or len(ground_truths) != n or (extra_infos is not None and len(extra_infos) != n):
        raise ValueError("data_sources, solution_strs, ground_truths and extra_infos must have the same length")
    extras = extra_infos if extra_infos is not None else [None] * n
    return [compute_score_with_info(d, s, g, e)
            for d, s, g, e in zip(data_sources, solution_strs, ground_truths, extras)]


def validate_row(row: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRowError`, naming the problem, when a verl row could not be scored as it
    stands: ``extra_info`` limits of the wrong type or range (code rows: :func:`heal.scoring.code.row_limits`;
    physics: ``rel_tol``), or a ground truth the row's checker cannot use. Rows of a ``data_source``
    no checker is registered for (yet) are not checked. :mod:`heal.data.io` calls this for every row
    it reads or writes, so that a bad row stops ``heal prepare`` / ``heal mix``, not training."""
    if not isinstance(row, Mapping):
        raise InvalidRowError(f"a row must be a mapping, got {type(row).__name__}")
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, Mapping):
        raise InvalidRowError(f"extra_info must be a mapping, got {type(extra).__name__}")
    try:
        name = resolve_checker(row.get("data_source"), extra)
    except ValueError:
        return  # routed by a checker registered later, or not a scored row
    reward = row.get("reward_model")
    ground_truth = reward.get("ground_truth") if isinstance(reward, Mapping) else None
    if name == "code":
        row_limits(extra)
        if ground_truth is not None:
            parse_tests(ground_truth)
    elif name == "choice" and ground_truth is not None:
        choice_ground_truth(ground_truth)
    elif name == "physics":
        physics_rel_tol(extra)
