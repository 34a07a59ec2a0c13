"""Code checker: run the response's program against test cases in a sandbox.

The program is the **last** fenced code block of the response (```` ```python ````, ```` ```py ````
or a bare ```` ``` ````); a response without one scores 0. Each test runs in its own sandboxed
process (:func:`heal.scoring.sandbox.run_python`: kernel isolation through bubblewrap, with an audit
hook as a second layer; time, memory, output, disk and process limits; no network, no host files but
the interpreter's standard library, read-only). Where the machine has no kernel isolation, scoring
raises :class:`heal.scoring.sandbox.SandboxUnavailableError` unless ``isolation="audit-hook-only"``
is chosen explicitly (``CodeCheckConfig.isolation`` or ``HEAL_SANDBOX_ISOLATION``).
A row's tests run ``CodeCheckConfig.parallel_tests`` (default 4) at a time.

Test cases (``ground_truth``: a dict or its JSON string), as :mod:`heal.data.convert` writes them:

* ``{"inputs": [str, ...], "outputs": [str, ...]}``: standard input -> expected standard output
  (the APPS / verl ``prime_code`` layout);
* with ``"fn_name": "name"``: functional tests: each input holds the JSON arguments one per line,
  each output the JSON of the expected return value (LiveCodeBench's functional layout); the
  function is ``Solution().name`` when the program defines ``class Solution``;
* a list of ``{"input": ..., "output": ...}`` dicts (LiveCodeBench's public/private test layout)
  is accepted too.

**Comparison rules.** A test passes when the program ends normally within its limits and its
output matches:

* *Standard output* (:func:`outputs_match`): equal line by line once trailing whitespace of each
  line and trailing blank lines are dropped (``\\r\\n`` reads as ``\\n``); or else the same number
  of whitespace-separated tokens (line breaks not significant), pairwise equal. Two tokens are equal
  when their text is, or when both are plain decimal numbers (``[+-]digits[.digits][e[+-]digits]``;
  ``inf``, ``nan``, ``0x1f``, ``1_000`` are text) and

  - the expected token is an integer: the answer has exactly its value, however many digits
    (``+7``, ``007``, ``7.0`` and ``7e0`` are 7; ``6.9999999`` and ``7.0000001`` are not);
  - the expected token has a fraction or an exponent: the two are within 1e-6, relative or absolute
    (finite values; beyond the float range, equal decimal values).

* *Functional tests* (``fn_name``): the return value leaves the sandbox as JSON (``json.dumps`` in
  the sandbox, ``json.loads`` here), so only plain JSON values arrive: a ``float`` subclass is
  written by ``float.__repr__``, a ``str`` subclass as its characters, and an object with its own
  ``__eq__`` is not serialisable and fails; no code of the program runs in the grader. Values are
  compared by type-aware equality, at any depth: ``bool`` only equals ``bool``; an ``int`` only an
  ``int`` of exactly the same value (never a float, never by tolerance, any size); an expected
  ``float`` a float or int within 1e-6, relative or absolute (finite; an int too large for a float
  fails); strings and ``null`` exactly; lists element-wise with the same length; objects with the
  same keys. An output that is not JSON is compared as standard output.

The peers, for comparison (read from their sources: LiveCodeBench ``lcb_runner/evaluation/
testing_util.py``; verl ``verl/utils/reward_score/prime_code/testing_util.py``, derived from APPS):

* LiveCodeBench, standard output: the whole output is stripped and split into lines, each line
  stripped; the number of lines must match, and each line is equal as text or as a list of
  ``decimal.Decimal`` tokens, exactly (no tolerance; ``1.0`` equals ``1``). Functional:
  ``prediction == expected`` in the grader's process after tuple -> list, so ``1.0`` and ``True``
  equal ``1`` and a returned object's own ``__eq__`` decides.
* verl ``prime_code`` / APPS, standard output: stripped text, then the lists of stripped non-empty
  lines; then, unless every line is a plain integer (``str.isdigit``), each line converted with
  ``float`` and compared with ``np.allclose`` (rtol 1e-5, atol 1e-8): a negative integer (not
  ``isdigit``), or an integer line next to a non-integer one, is compared with tolerance
  (``-999999`` passes for ``-1000000``). Functional:
  ``==`` in the grader's process (tuple -> list; also against ``expected[0]``), no tolerance.

Where heal deliberately differs: integers are exact in every position (unlike ``prime_code``);
numbers with a fraction or exponent get a 1e-6 tolerance (LiveCodeBench demands exact decimals:
heal accepts ``0.3333333`` for ``0.33333333``); line breaks are not significant in the token
comparison (LiveCodeBench requires the same lines); functional results are compared by type
(both peers accept ``1.0`` or ``True`` for ``1``), with the float tolerance at any depth (both peers:
exact ``==``), and only after the JSON round trip, so no model-defined ``__eq__`` runs in the grader.

**Limits from a data row.** ``extra_info`` may carry ``timeout_s``, ``total_timeout_s``,
``memory_mb`` (numbers > 0), ``max_output_bytes``, ``parallel_tests``, ``max_tests`` (ints >= 1) and
``score`` (``"all"`` / ``"fraction"``). Each is validated (:func:`row_limits`: a wrong type or
range raises :class:`heal.scoring.outcome.InvalidRowError` naming the key; ``heal prepare`` and
the parquet loader of :mod:`heal.data.io` check every row when a file is read or written) and then
**clamped to the configured value** (the ``config`` argument, else :data:`DEFAULT_CODE_CONFIG`): a
row can tighten a limit, never raise it. ``isolation`` is never taken from a row.

**Nothing in a response makes the checker raise**: an exception from extracting, running, parsing
or comparing one response scores it 0 with a reason (a :class:`heal.scoring.outcome.Score` whose
``error`` is e.g. ``"code/RecursionError"``), which :func:`heal.scoring.compute_score` counts in
the ``scoring/errors/<reason>`` metrics.
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import math
import numbers
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Tuple

from heal.scoring.outcome import InvalidRowError, judge
from heal.scoring.sandbox import ISOLATION_MODES, SandboxUnavailableError, run_python

__all__ = ["CodeCheckConfig", "DEFAULT_CODE_CONFIG", "extract_code", "parse_tests", "outputs_match",
           "values_match", "row_limits", "run_tests", "check_code", "REL_TOL", "ABS_TOL", "ROW_LIMITS"]

REL_TOL = 1e-6  # tolerance of numbers with a fraction or exponent (relative or absolute)
ABS_TOL = 1e-6


@dataclasses.dataclass
class CodeCheckConfig:
    """Limits and scoring of :func:`check_code`. A data row's ``extra_info`` can lower the limits
    (see :data:`ROW_LIMITS`), never raise them; ``isolation`` is never taken from a row.

    ``score``: ``"all"`` (1.0 only when every test passes; the paper's binary accuracy reward,
    stops at the first failure) or ``"fraction"`` (the share of tests passed).
    """

    timeout_s: float = 4.0  # wall-clock limit per test
    memory_mb: Optional[float] = 1024  # address-space limit per test (None: none)
    max_output_bytes: int = 4 << 20
    max_tests: Optional[int] = None  # run at most this many tests (the first ones)
    total_timeout_s: float = 60.0  # stop running further tests after this much wall time
    parallel_tests: int = 4  # a row's tests run in this many sandboxes at once (1: one after another)
    score: str = "all"
    # sandbox layer: None = HEAL_SANDBOX_ISOLATION or "auto" (kernel isolation, refuse without it);
    # "audit-hook-only" opts in to the weak mode (see heal.scoring.sandbox)
    isolation: Optional[str] = None

    def validate(self) -> "CodeCheckConfig":
        if not _is_real(self.timeout_s) or not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")
        if not _is_real(self.total_timeout_s) or not self.total_timeout_s > 0:
            raise ValueError(f"total_timeout_s must be a finite number > 0, got {self.total_timeout_s!r}")
        if self.memory_mb is not None and (not _is_real(self.memory_mb) or not self.memory_mb > 0):
            raise ValueError(f"memory_mb must be a finite number > 0 or None, got {self.memory_mb!r}")
        if not (_is_int(self.max_output_bytes) and self.max_output_bytes >= 1):
            raise ValueError(f"max_output_bytes must be an int >= 1, got {self.max_output_bytes!r}")
        if self.score not in ("all", "fraction"):
            raise ValueError(f"score must be 'all' or 'fraction', got {self.score!r}")
        if not (_is_int(self.parallel_tests) and self.parallel_tests >= 1):
            raise ValueError(f"parallel_tests must be an int >= 1, got {self.parallel_tests!r}")
        if self.max_tests is not None and not (_is_int(self.max_tests) and self.max_tests >= 1):
            raise ValueError(f"max_tests must be an int >= 1, got {self.max_tests!r}")
        if self.isolation is not None and self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)} or None, got {self.isolation!r}")
        return self


DEFAULT_CODE_CONFIG = CodeCheckConfig()

# extra_info keys a data row may set: key -> kind ("number": finite > 0; "int": int >= 1, no float
# or bool; "choice": one of the allowed strings). Numbers and ints are clamped to the configured value.
ROW_LIMITS: Dict[str, str] = {
    "timeout_s": "number",
    "total_timeout_s": "number",
    "memory_mb": "number",
    "max_output_bytes": "int",
    "parallel_tests": "int",
    "max_tests": "int",
    "score": "choice",
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _is_real(v) -> bool:
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float: finite
        return True


def row_limits(extra_info) -> Dict[str, Any]:
    """The limits a data row sets (``extra_info`` keys of :data:`ROW_LIMITS`; None / absent: unset),
    validated: :class:`InvalidRowError` naming the key for a wrong type or range. Not yet clamped."""
    if extra_info is None:
        return {}
    if not isinstance(extra_info, Mapping):
        if hasattr(extra_info, "get"):
            extra_info = {k: extra_info.get(k) for k in ROW_LIMITS}
        else:
            return {}
    out: Dict[str, Any] = {}
    for key, kind in ROW_LIMITS.items():
        value = extra_info.get(key)
        if value is None:
            continue
        if kind == "choice":
            if value not in ("all", "fraction"):
                raise InvalidRowError(f"extra_info[{key!r}] must be 'all' or 'fraction', got {value!r}")
            out[key] = str(value)
        elif kind == "int":
            if not _is_int(value):
                raise InvalidRowError(f"extra_info[{key!r}] must be an int >= 1, got {type(value).__name__} "
                                      f"{_short(value)}")
            if value < 1:
                raise InvalidRowError(f"extra_info[{key!r}] must be an int >= 1, got {_short(value)}")
            out[key] = int(value)
        else:
            if not _is_real(value) or not value > 0:
                raise InvalidRowError(f"extra_info[{key!r}] must be a finite number > 0, got "
                                      f"{type(value).__name__} {_short(value)}")
            out[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def _short(value) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. an int past the digit limit of str()
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _clamp(value, ceiling):
    if ceiling is None:
        return value
    if isinstance(value, float) or isinstance(ceiling, float):
        try:
            return value if float(value) < float(ceiling) else ceiling
        except OverflowError:  # an int beyond the float range: above any float ceiling
            return ceiling
    return min(value, ceiling)


def _config_for(extra_info, base: Optional[CodeCheckConfig] = None) -> CodeCheckConfig:
    """``base`` (default :data:`DEFAULT_CODE_CONFIG`) tightened by the row's limits (never loosened)."""
    base = base if base is not None else DEFAULT_CODE_CONFIG
    limits = row_limits(extra_info)
    if not limits:
        return base
    changes = {}
    for key, value in limits.items():
        if ROW_LIMITS[key] == "choice":
            changes[key] = value
        else:
            changes[key] = _clamp(value, getattr(base, key))
    return dataclasses.replace(base, **changes)


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]{0,20})[^\n`]{0,200}\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> Optional[str]:
    """The last fenced code block that is Python (or unlabelled); None when there is none."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    for lang, body in reversed(blocks):
        if lang in ("python", "py", "python3", ""):
            return body if body.strip() else None
    return None


def parse_tests(ground_truth) -> Tuple[List[str], List[str], Optional[str]]:
    """``(inputs, outputs, fn_name)`` from a ground-truth dict / JSON string / list of cases
    (:class:`InvalidRowError`, a ``ValueError``, when it is not usable)."""
    gt = ground_truth
    if isinstance(gt, (bytes, str)):
        try:
            gt = json.loads(gt)
        except (ValueError, RecursionError) as exc:
            raise InvalidRowError(f"code ground_truth is not valid JSON: {exc}") from None
    fn_name = None
    if isinstance(gt, Mapping) and "inputs" in gt:
        inputs, outputs = gt.get("inputs"), gt.get("outputs")
        fn_name = gt.get("fn_name") or None
        if fn_name is not None and not isinstance(fn_name, str):
            raise InvalidRowError(f"code ground_truth 'fn_name' must be a str, got {type(fn_name).__name__}")
    elif isinstance(gt, (list, tuple)):
        try:
            inputs = [c["input"] for c in gt]
            outputs = [c["output"] for c in gt]
        except (TypeError, KeyError, IndexError):
            raise InvalidRowError("code ground_truth list items must be {'input': ..., 'output': ...}") from None
        if any(isinstance(c, Mapping) and c.get("testtype") == "functional" for c in gt):
            raise InvalidRowError("functional test cases need 'fn_name': use {'inputs', 'outputs', 'fn_name'}")
    else:
        raise InvalidRowError("code ground_truth must hold 'inputs' and 'outputs' (or be a list of "
                              "{'input', 'output'} cases)")
    if not isinstance(inputs, (list, tuple)) or not isinstance(outputs, (list, tuple)):
        raise InvalidRowError("code ground_truth 'inputs' and 'outputs' must be lists")
    if len(inputs) != len(outputs):
        raise InvalidRowError(f"code ground_truth has {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise InvalidRowError("code ground_truth has no test cases")

    def as_text(v) -> str:
        try:
            text = v if isinstance(v, str) else json.dumps(v)
            text.encode("utf-8")  # (a lone surrogate could never reach the program)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidRowError(f"code ground_truth holds a test value that is not text or JSON: {exc}") from None
        return text

    return [as_text(i) for i in inputs], [as_text(o) for o in outputs], fn_name


# ------------------------------------------------------------------------------ comparison
_INT_RE = re.compile(r"[+-]?[0-9]+")
_NUM_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _lines(s: str) -> List[str]:
    out = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while out and not out[-1]:
        out.pop()
    return out


def _int_text(token: str) -> str:
    """Canonical text of an integer token: no '+', no leading zeros, no '-0' (exact for any length,
    where int() refuses more than 4300 digits)."""
    digits = token.lstrip("+-").lstrip("0") or "0"
    return "-" + digits if token.startswith("-") and digits != "0" else digits


def _decimal_equal(a: str, b: str) -> bool:
    try:
        return decimal.Decimal(a) == decimal.Decimal(b)
    except (ArithmeticError, ValueError):
        return False


def _tokens_equal(got: str, expected: str) -> bool:
    if got == expected:
        return True
    if not (_NUM_RE.fullmatch(got) and _NUM_RE.fullmatch(expected)):
        return False
    if _INT_RE.fullmatch(expected):  # an integer answer: exactly its value
        if _INT_RE.fullmatch(got):
            return _int_text(got) == _int_text(expected)
        return _decimal_equal(got, expected)  # "7.0" / "7e0" for 7
    fg, fe = float(got), float(expected)  # (plain decimal text: float() cannot fail; huge -> inf)
    if math.isfinite(fg) and math.isfinite(fe):
        return math.isclose(fg, fe, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return _decimal_equal(got, expected)


def outputs_match(got: str, expected: str) -> bool:
    """Standard output ``got`` matches ``expected`` (the rules in the module docstring): line-wise
    equality (trailing whitespace ignored), or token-wise with integers exact and numbers with a
    fraction or exponent within 1e-6."""
    if _lines(got) == _lines(expected):
        return True
    a, b = got.split(), expected.split()
    if len(a) != len(b) or not a:
        return False
    return all(_tokens_equal(x, y) for x, y in zip(a, b))


def values_match(got, expected) -> bool:
    """Type-aware equality of two JSON values (the functional rule in the module docstring)."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is bool and type(expected) is bool and got == expected
    if type(expected) is int:
        return type(got) is int and got == expected
    if type(expected) is float:
        if type(got) is int:
            try:
                got = float(got)
            except OverflowError:
                return False
        elif type(got) is not float:
            return False
        if got == expected:
            return True
        return (math.isfinite(got) and math.isfinite(expected)
                and math.isclose(got, expected, rel_tol=REL_TOL, abs_tol=ABS_TOL))
    if type(expected) is str:
        return type(got) is str and got == expected
    if expected is None:
        return got is None
    if type(expected) is list:
        return (type(got) is list and len(got) == len(expected)
                and all(values_match(g, e) for g, e in zip(got, expected)))
    if type(expected) is dict:
        return (type(got) is dict and got.keys() == expected.keys()
                and all(values_match(got[k], v) for k, v in expected.items()))
    return False


def _json_match(got: str, expected: str) -> bool:
    try:
        e = json.loads(expected)
        g = json.loads(got)
    except ValueError:  # not JSON (or an int past the digit limit): compared as standard output
        return outputs_match(got, expected)
    return values_match(g, e)


# ------------------------------------------------------------------------------ running
def _run_parsed(code: str, tests, config: CodeCheckConfig) -> List[bool]:
    inputs, outputs, fn_name = tests
    if config.max_tests is not None:
        inputs, outputs = inputs[: config.max_tests], outputs[: config.max_tests]
    start = time.monotonic()
    stop = threading.Event()

    def one(i: int) -> Optional[bool]:
        if stop.is_set():
            return None  # not run: an earlier test failed (score "all")
        if time.monotonic() - start > config.total_timeout_s:
            stop.set()
            return False
        try:
            res = run_python(
                code, inputs[i], timeout_s=config.timeout_s, memory_mb=config.memory_mb,
                max_output_bytes=int(config.max_output_bytes), mode="call" if fn_name else "stdin", fn_name=fn_name,
                isolation=config.isolation,
            )
            exp = outputs[i]
            passed = res.ok and (_json_match(res.stdout, exp) if fn_name else outputs_match(res.stdout, exp))
        except BaseException:
            stop.set()  # the response scores 0 (with the reason): no point running the other tests
            raise
        if not passed and config.score == "all":
            stop.set()
        return passed

    workers = min(config.parallel_tests, len(inputs))
    if workers <= 1:
        raw = []
        for i in range(len(inputs)):
            raw.append(one(i))
            if stop.is_set():
                break
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="heal-code-test") as pool:
            raw = list(pool.map(one, range(len(inputs))))
    results: List[bool] = []
    for r in raw:
        if r is None:
            break
        results.append(r)
        if not r and (config.score == "all" or stop.is_set()):
            break
    return results


def run_tests(code: str, ground_truth, config: Optional[CodeCheckConfig] = None) -> List[bool]:
    """Pass/fail of each test, in order (stops after the first failure when ``config.score == "all"``:
    with ``parallel_tests > 1`` the tests already running then finish, later ones never start).
    Exceptions propagate (:func:`check_code` turns those into a score of 0 with a reason)."""
    config = (config if config is not None else DEFAULT_CODE_CONFIG).validate()
    return _run_parsed(code, parse_tests(ground_truth), config)


def _score(solution_str: str, tests, cfg: CodeCheckConfig) -> float:
    n_tests = len(tests[0]) if cfg.max_tests is None else min(len(tests[0]), cfg.max_tests)
    code = extract_code(solution_str)
    if code is None:
        return 0.0
    results = _run_parsed(code, tests, cfg)
    if cfg.score == "all":
        return 1.0 if len(results) == n_tests and all(results) else 0.0
    return sum(results) / n_tests


def check_code(solution_str: str, ground_truth, extra_info=None,
               config: Optional[CodeCheckConfig] = None) -> float:
    """Score of the response's last Python code block on the row's tests (see :class:`CodeCheckConfig`).

    ``config`` (default :data:`DEFAULT_CODE_CONFIG`) holds the limits; ``extra_info`` can only lower
    them. Never raises because of the response: an exception from extracting, running, parsing or
    comparing it gives a :class:`heal.scoring.outcome.Score` of 0 with the reason. Raises
    :class:`InvalidRowError` for a ground truth or ``extra_info`` limit that cannot be used,
    ``ValueError`` for a bad ``config`` and :class:`SandboxUnavailableError` where the machine
    cannot isolate the program.
    """
    cfg = _config_for(extra_info, config).validate()
    tests = parse_tests(ground_truth)  # validates the ground truth even without code
    return judge("code", _score, solution_str, tests, cfg, passthrough=(SandboxUnavailableError,))
