"""What a checker returns when it could not judge a response, and the counts of those reasons.

A checker judges a response (a score in [0, 1]) or, when extracting, running, parsing or comparing
the response raised, scores it 0 with a reason: a :class:`Score` (a ``float``) whose ``error`` names
the checker and the exception, e.g. ``"code/RecursionError"``. Nothing in a response can make a
checker raise. What *does* raise is a fault of the data row or of the machine, never of the
response: :class:`InvalidRowError` (a ground truth or ``extra_info`` value the checker cannot use;
:func:`heal.scoring.validate_row` finds these when a file is loaded) and
:class:`heal.scoring.sandbox.SandboxUnavailableError`.

:func:`heal.scoring.compute_score` counts each reason in this process (:func:`pop_error_metrics`);
:func:`error_metrics` turns reasons collected elsewhere (verl's ``reward_extra_info``) into the same
``scoring/errors/<reason>`` metrics.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Dict, Iterable, Optional, Tuple, Type

__all__ = ["InvalidRowError", "Score", "judge", "failed", "record_error", "pop_error_metrics", "error_metrics",
           "ERROR_METRIC_PREFIX"]

ERROR_METRIC_PREFIX = "scoring/errors/"


class InvalidRowError(ValueError):
    """The data row (its ground truth or an ``extra_info`` value) cannot be used: the row's fault,
    not the response's. Raised (never scored as 0), so that a bad row is fixed rather than trained on;
    :func:`heal.scoring.validate_row` reports the same errors when a file is loaded."""


class Score(float):
    """A checker's score. ``error`` is None when the response was judged, else the reason it scored
    0.0 without being judged (``"<checker>/<exception type>"``); ``detail`` is a short, ASCII-only
    description of the exception."""

    __slots__ = ("error", "detail")

    def __new__(cls, value: float, error: Optional[str] = None, detail: str = "") -> "Score":
        self = super().__new__(cls, value)
        self.error = error
        self.detail = detail
        return self

    def __repr__(self) -> str:
        return float.__repr__(self) if self.error is None else f"Score(0.0, error={self.error!r})"

    def __reduce__(self):  # pickles (Ray, multiprocessing) as a Score, reason included
        return (Score, (float(self), self.error, self.detail))


def failed(checker: str, exc: BaseException) -> Score:
    """Score 0 for a response whose checking raised ``exc``."""
    try:
        detail = ascii(exc)[:300]  # ascii(): the message may hold lone surrogates or huge text
    except Exception:  # a message whose repr itself fails
        detail = type(exc).__name__
    return Score(0.0, f"{checker}/{type(exc).__name__}", detail)


def judge(checker: str, fn: Callable[..., float], *args,
          passthrough: Tuple[Type[BaseException], ...] = ()) -> float:
    """``fn(*args)``, or :func:`failed` when it raises anything but :class:`InvalidRowError` /
    ``passthrough`` (faults of the row or of the machine, re-raised)."""
    try:
        return fn(*args)
    except (InvalidRowError,) + tuple(passthrough):
        raise
    except Exception as exc:  # RecursionError, MemoryError, OverflowError, UnicodeError, ... from the response
        return failed(checker, exc)


_lock = threading.Lock()
_counts: "collections.Counter[str]" = collections.Counter()


def record_error(error: str) -> None:
    """Count one response that scored 0 for ``error`` (called by :func:`heal.scoring.compute_score`)."""
    with _lock:
        _counts[error] += 1


def pop_error_metrics() -> Dict[str, float]:
    """``{"scoring/errors/<reason>": count}`` of the responses this process scored 0 for a reason
    since the last call (thread-safe; empty when none)."""
    with _lock:
        out = {ERROR_METRIC_PREFIX + k: float(v) for k, v in sorted(_counts.items())}
        _counts.clear()
    return out


def error_metrics(errors: Iterable[Optional[str]]) -> Dict[str, float]:
    """``{"scoring/errors/<reason>": count}`` of a batch's reasons (``""`` / None: judged, not counted),
    e.g. the ``scoring_error`` column that :func:`heal.scoring.compute_score_with_info` fills."""
    counts = collections.Counter(str(e) for e in errors if e)
    return {ERROR_METRIC_PREFIX + k: float(v) for k, v in sorted(counts.items())}
