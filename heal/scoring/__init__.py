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
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from heal.scoring.choice import check_choice, extract_boxed, extract_choice
from heal.scoring.code import CodeCheckConfig, check_code, extract_code, run_tests
from heal.scoring.math_answer import check_math, check_physics, math_equal

__all__ = [
    "compute_score", "register_checker", "register_data_source", "resolve_checker", "CHECKERS",
    "check_choice", "check_math", "check_physics", "check_code", "extract_choice", "extract_boxed",
    "extract_code", "math_equal", "run_tests", "CodeCheckConfig",
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


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """Accuracy reward in [0, 1] of one response (verl's custom reward-function signature).

    ``kwargs`` that verl may pass (``reward_router_address`` ...) are ignored.
    """
    checker = CHECKERS[resolve_checker(data_source, extra_info)]
    return float(checker(solution_str, ground_truth, extra_info))
