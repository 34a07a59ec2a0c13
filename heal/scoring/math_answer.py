"""Math and physics answer checkers (boxed final answers).

The response's answer is the content of its **last** ``\\boxed{...}`` (last one wins); a
response without a box is handed to math-verify, which takes its final expression (scoring 0
when nothing is found). A final answer that offers alternatives (``3 or 4`` in the box, or on
the last line of an unboxed response) scores 0. Equivalence is decided by `math-verify <https://github.com/huggingface/Math-Verify>`_
(``pip install math-verify``, the ``heal[math]`` extra) when installed; otherwise by a small
fallback: string normalisation of common LaTeX, then numeric / symbolic comparison with sympy.

math-verify bounds its own run time with ``signal.alarm``, which works only in the main
thread; elsewhere (verl calls reward functions from a thread pool) it runs without its timeout,
and we bound the work instead by parsing only the last box (or the last ``MAX_TAIL_CHARS``
characters of an unboxed response).

Physics answers carry units and rounding: :func:`check_physics` accepts the math-verify verdict
and otherwise compares the leading numbers of both answers (``3.0 \\times 10^{8}\\,\\text{m/s}``
reads as ``3e8``) with a relative tolerance (``extra_info["rel_tol"]``, default 1e-2; a number
>= 0, clamped to ``MAX_REL_TOL`` = 0.1: a data row cannot make every answer pass).

Nothing in a response makes these checkers raise: an exception while reading or comparing it
scores 0 with the reason (see :mod:`heal.scoring.outcome`). A missing ground truth or a bad
``rel_tol`` raises :class:`heal.scoring.outcome.InvalidRowError`.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Optional

from heal.scoring.choice import extract_boxed
from heal.scoring.outcome import InvalidRowError, judge

__all__ = ["check_math", "check_physics", "math_equal", "leading_number", "too_costly", "physics_rel_tol",
           "HAS_MATH_VERIFY", "DEFAULT_REL_TOL", "MAX_REL_TOL"]

MAX_TAIL_CHARS = 2000
MAX_ANSWER_CHARS = 500
DEFAULT_REL_TOL = 1e-2  # physics: leading numbers equal within this (relative)
MAX_REL_TOL = 0.1  # the most a data row's extra_info["rel_tol"] can ask for

try:  # pragma: no cover - depends on the environment
    import math_verify as _mv

    HAS_MATH_VERIFY = True
except ImportError:  # pragma: no cover
    _mv = None
    HAS_MATH_VERIFY = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv_equal(gold: str, pred: str) -> Optional[bool]:
    """math-verify verdict, or None when it could not parse one side."""
    timeout = 3 if _in_main_thread() else None
    try:
        g = _mv.parse(gold, parsing_timeout=timeout)
        p = _mv.parse(pred, parsing_timeout=timeout)
        if not g or not p:
            return None
        return bool(_mv.verify(g, p, timeout_seconds=timeout))
    except Exception:  # math-verify raises on pathological input; a checker must not
        return None


_STRIP = [
    (r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~", ""),
    (r"\\[dt]frac", r"\\frac"),
    (r"\^\{?\\circ\}?|°", ""),
    (r"\\%|%", ""),
    (r"\\text\{\s*\}", ""),
    (r"\s+", ""),
]


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    for pat, rep in _STRIP:
        s = re.sub(pat, rep, s)
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf)\{([^{}]*)\}", r"\1", s)
    return s.rstrip(".").lower()


def _latex_to_sympy_text(s: str) -> str:
    s = _normalise(s)
    for _ in range(5):
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    return s.replace("{", "(").replace("}", ")")


_SAFE_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "e", "i", "I", "E"}


def _safe_for_sympy(expr: str) -> bool:
    """Only plain arithmetic reaches sympy's parser (it evaluates Python): no attribute access,
    no dunder names, no unknown multi-letter names, no towers of powers or huge literals."""
    if len(expr) > 200 or "__" in expr or re.search(r"\*\*[^+\-/]*\*\*", expr):
        return False  # (a power tower like 9**9**9 would run for ever)
    if not re.fullmatch(r"[0-9A-Za-z+\-*/(). ]*", expr) or re.search(r"[A-Za-z_)]\s*\.", expr):
        return False
    if any(len(d) > 30 for d in re.findall(r"\d+", expr)):
        return False
    return all(len(w) == 1 or w in _SAFE_NAMES for w in re.findall(r"[A-Za-z]+", expr))


def _fallback_equal(gold: str, pred: str) -> bool:
    if _normalise(gold) == _normalise(pred):
        return True
    g_txt, p_txt = _latex_to_sympy_text(gold), _latex_to_sympy_text(pred)
    if not (_safe_for_sympy(g_txt) and _safe_for_sympy(p_txt)):
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                                standard_transformations)

        tr = standard_transformations + (implicit_multiplication_application,)
        g = parse_expr(g_txt, transformations=tr, evaluate=True)
        p = parse_expr(p_txt, transformations=tr, evaluate=True)
        return bool(sympy.simplify(g - p) == 0)
    except Exception:
        return False


_OR_RE = re.compile(r"\bor\b|\\lor\b")
_FACTORIAL_RE = re.compile(r"(?:\d{4,}|[)}\]])\s*!|!\s*!\s*!")
_BIG_EXP_RE = re.compile(r"(?:\^|\*\*)\s*\{?\s*[-+]?\d{5,}")


def _exponents(s: str):
    """The exponent text after each ``^`` (a braced group or one token)."""
    for m in re.finditer(r"\^|\*\*", s):
        rest = s[m.end():].lstrip()
        if rest.startswith("{"):
            depth, j = 0, 0
            for j, ch in enumerate(rest):
                depth += ch == "{"
                depth -= ch == "}"
                if depth == 0:
                    break
            yield rest[1:j]
        else:
            yield rest[:1] if rest[:1] != "(" else rest[: rest.find(")") + 1 if ")" in rest else len(rest)]


def too_costly(expr: str) -> bool:
    """True for answers whose exact evaluation could stall the process (power towers, huge
    exponents or factorials): bigint arithmetic holds the GIL, so no timeout could stop it."""
    if _FACTORIAL_RE.search(expr) or _BIG_EXP_RE.search(expr):
        return True
    return any("^" in e or "**" in e for e in _exponents(expr))


def math_equal(gold: str, pred: str) -> bool:
    """True when two answer strings (LaTeX or plain) are mathematically equivalent."""
    gold, pred = str(gold).strip(), str(pred).strip()
    if not gold or not pred:
        return False
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    if _normalise(gold) == _normalise(pred):
        return True
    if _OR_RE.search(pred) and not _OR_RE.search(gold):
        return False  # "3 or 4": several different answers in the final statement
    if too_costly(pred):
        return False  # (equal strings were accepted above)
    if HAS_MATH_VERIFY:
        got = _mv_equal(f"${gold}$", f"${pred}$")
        if got is not None:
            return got
    return _fallback_equal(gold, pred)


def _final_answer(solution_str: str) -> Optional[str]:
    box = extract_boxed(solution_str)
    if box is not None:
        return box
    return None


def _gold(ground_truth) -> str:
    if ground_truth is None:
        raise InvalidRowError("ground_truth is missing for a math/physics row")
    gt = str(ground_truth).strip()
    box = extract_boxed(gt)
    return box if box is not None else gt


def check_math(solution_str: str, ground_truth, extra_info=None) -> float:
    """1.0 when the response's final answer equals ``ground_truth`` mathematically, else 0.0."""
    return judge("math", _check_math, solution_str, _gold(ground_truth))


def _check_math(solution_str: str, gold: str) -> float:
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a str, got {type(solution_str).__name__}")
    pred = _final_answer(solution_str)
    if pred is not None:
        return 1.0 if math_equal(gold, pred) else 0.0
    # no box: let math-verify look for a final expression in the tail of the response
    if not HAS_MATH_VERIFY:
        return 0.0
    tail = solution_str[-MAX_TAIL_CHARS:]
    last_line = tail.strip().rsplit("\n", 1)[-1]
    if _OR_RE.search(last_line) and not _OR_RE.search(gold):
        return 0.0  # "it could be 3 or 42": several different answers in the final statement
    if too_costly(tail):
        return 0.0
    got = _mv_equal(f"${gold}$", tail)
    return 1.0 if got else 0.0


_NUM_RE = re.compile(
    r"([-+−]?\s*(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:\s*[eE]\s*[-+]?\d+)?)"
    r"(?:\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*([-+−]?\d+)\s*\}?)?"
)


def leading_number(s: str) -> Optional[float]:
    """The first number of an answer string, reading ``a \\times 10^{b}`` and ``aeb``; else None."""
    s = _normalise(str(s)).replace("\\frac", "")
    m = _NUM_RE.search(s.replace("−", "-"))
    if not m:
        return None
    try:
        value = float(m.group(1).replace(",", "").replace(" ", ""))
        if m.group(2) is not None:
            value *= 10.0 ** int(m.group(2).replace("−", "-"))
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def physics_rel_tol(extra_info) -> float:
    """The row's ``extra_info["rel_tol"]`` (a number >= 0, at most :data:`MAX_REL_TOL`), else
    :data:`DEFAULT_REL_TOL`; :class:`InvalidRowError` for anything else."""
    value = extra_info.get("rel_tol") if extra_info is not None and hasattr(extra_info, "get") else None
    if value is None:
        return DEFAULT_REL_TOL
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            or (isinstance(value, float) and not math.isfinite(value))):
        shown = repr(value)[:80] if not isinstance(value, int) or value.bit_length() < 1000 else "a huge int"
        raise InvalidRowError(f"extra_info['rel_tol'] must be a finite number >= 0, got {shown}")
    return MAX_REL_TOL if value >= MAX_REL_TOL else float(value)


def check_physics(solution_str: str, ground_truth, extra_info=None) -> float:
    """Math equivalence, else leading numbers equal within ``extra_info["rel_tol"]`` (default 1e-2)."""
    return judge("physics", _check_physics, solution_str, _gold(ground_truth), physics_rel_tol(extra_info))


def _check_physics(solution_str: str, gold: str, rel_tol: float) -> float:
    if _check_math(solution_str, gold) == 1.0:
        return 1.0
    pred = _final_answer(solution_str)
    if pred is None:
        return 0.0
    g, p = leading_number(gold), leading_number(pred)
    if g is None or p is None:
        return 0.0
    return 1.0 if math.isclose(g, p, rel_tol=rel_tol, abs_tol=1e-12) else 0.0
