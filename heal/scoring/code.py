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

Outputs match when they are equal line by line after stripping trailing whitespace and trailing
blank lines, or token by token with numbers equal within 1e-6 (relative or absolute).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

from heal.scoring.sandbox import ISOLATION_MODES, run_python

__all__ = ["CodeCheckConfig", "DEFAULT_CODE_CONFIG", "extract_code", "parse_tests", "outputs_match",
           "run_tests", "check_code"]


@dataclasses.dataclass
class CodeCheckConfig:
    """Limits and scoring of :func:`check_code` (any field but ``isolation`` can be overridden per
    row through ``extra_info`` keys of the same name: a data row cannot weaken the sandbox).

    ``score``: ``"all"`` (1.0 only when every test passes; the paper's binary accuracy reward,
    stops at the first failure) or ``"fraction"`` (the share of tests passed).
    """

    timeout_s: float = 4.0  # wall-clock limit per test
    memory_mb: int = 1024  # address-space limit per test
    max_output_bytes: int = 4 << 20
    max_tests: Optional[int] = None  # run at most this many tests (the first ones)
    total_timeout_s: float = 60.0  # stop running further tests after this much wall time
    parallel_tests: int = 4  # a row's tests run in this many sandboxes at once (1: one after another)
    score: str = "all"
    # sandbox layer: None = HEAL_SANDBOX_ISOLATION or "auto" (kernel isolation, refuse without it);
    # "audit-hook-only" opts in to the weak mode (see heal.scoring.sandbox)
    isolation: Optional[str] = None

    def validate(self) -> "CodeCheckConfig":
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb is not None and self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0, got {self.memory_mb}")
        if self.score not in ("all", "fraction"):
            raise ValueError(f"score must be 'all' or 'fraction', got {self.score!r}")
        if not (isinstance(self.parallel_tests, int) and self.parallel_tests >= 1):
            raise ValueError(f"parallel_tests must be an int >= 1, got {self.parallel_tests!r}")
        if self.max_tests is not None and self.max_tests < 1:
            raise ValueError(f"max_tests must be >= 1, got {self.max_tests}")
        if self.isolation is not None and self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)} or None, got {self.isolation!r}")
        return self


DEFAULT_CODE_CONFIG = CodeCheckConfig()

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
    """``(inputs, outputs, fn_name)`` from a ground-truth dict / JSON string / list of cases."""
    gt = ground_truth
    if isinstance(gt, (bytes, str)):
        try:
            gt = json.loads(gt)
        except ValueError as exc:
            raise ValueError(f"code ground_truth is not valid JSON: {exc}") from None
    fn_name = None
    if isinstance(gt, dict) and "inputs" in gt:
        inputs, outputs = gt.get("inputs"), gt.get("outputs")
        fn_name = gt.get("fn_name") or None
    elif isinstance(gt, (list, tuple)):
        try:
            inputs = [c["input"] for c in gt]
            outputs = [c["output"] for c in gt]
        except (TypeError, KeyError):
            raise ValueError("code ground_truth list items must be {'input': ..., 'output': ...}") from None
        if any(isinstance(c, dict) and c.get("testtype") == "functional" for c in gt):
            raise ValueError("functional test cases need 'fn_name': use {'inputs', 'outputs', 'fn_name'}")
    else:
        raise ValueError("code ground_truth must hold 'inputs' and 'outputs' (or be a list of "
                         "{'input', 'output'} cases)")
    if not isinstance(inputs, (list, tuple)) or not isinstance(outputs, (list, tuple)):
        raise ValueError("code ground_truth 'inputs' and 'outputs' must be lists")
    if len(inputs) != len(outputs):
        raise ValueError(f"code ground_truth has {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError("code ground_truth has no test cases")
    as_text = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    return [as_text(i) for i in inputs], [as_text(o) for o in outputs], fn_name


def _lines(s: str) -> List[str]:
    out = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while out and not out[-1]:
        out.pop()
    return out


def outputs_match(got: str, expected: str) -> bool:
    """Line-wise equality (trailing whitespace ignored) or token-wise with numeric tolerance 1e-6."""
    if _lines(got) == _lines(expected):
        return True
    a, b = got.split(), expected.split()
    if len(a) != len(b) or not a:
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not (math.isfinite(fx) and math.isfinite(fy) and math.isclose(fx, fy, rel_tol=1e-6, abs_tol=1e-6)):
            return False
    return True


def _json_match(got: str, expected: str) -> bool:
    try:
        g, e = json.loads(got), json.loads(expected)
    except ValueError:
        return outputs_match(got, expected)
    if g == e:
        return True
    if isinstance(g, (int, float)) and isinstance(e, (int, float)) and not isinstance(g, bool):
        return math.isclose(g, e, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(g, (list, tuple)) and isinstance(e, (list, tuple)):
        return list(g) == list(e)
    return False


def run_tests(code: str, ground_truth, config: CodeCheckConfig = DEFAULT_CODE_CONFIG) -> List[bool]:
    """Pass/fail of each test, in order (stops after the first failure when ``config.score == "all"``:
    with ``parallel_tests > 1`` the tests already running then finish, later ones never start)."""
    config.validate()
    inputs, outputs, fn_name = parse_tests(ground_truth)
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
        res = run_python(
            code, inputs[i], timeout_s=config.timeout_s, memory_mb=config.memory_mb,
            max_output_bytes=config.max_output_bytes, mode="call" if fn_name else "stdin", fn_name=fn_name,
            isolation=config.isolation,
        )
        exp = outputs[i]
        passed = res.ok and (_json_match(res.stdout, exp) if fn_name else outputs_match(res.stdout, exp))
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


def _config_for(extra_info) -> CodeCheckConfig:
    if not extra_info or not hasattr(extra_info, "get"):
        return DEFAULT_CODE_CONFIG
    overrides = {f.name: extra_info.get(f.name) for f in dataclasses.fields(CodeCheckConfig)
                 if f.name != "isolation" and extra_info.get(f.name) is not None}
    return dataclasses.replace(DEFAULT_CODE_CONFIG, **overrides) if overrides else DEFAULT_CODE_CONFIG


def check_code(solution_str: str, ground_truth, extra_info=None,
               config: Optional[CodeCheckConfig] = None) -> float:
    """Score of the response's last Python code block on the row's tests (see :class:`CodeCheckConfig`)."""
    cfg = (config or _config_for(extra_info)).validate()
    n_tests = len(parse_tests(ground_truth)[0])  # validates the ground truth even without code
    if cfg.max_tests is not None:
        n_tests = min(n_tests, cfg.max_tests)
    code = extract_code(solution_str)
    if code is None:
        return 0.0
    results = run_tests(code, ground_truth, cfg)
    if cfg.score == "all":
        return 1.0 if len(results) == n_tests and all(results) else 0.0
    return sum(results) / n_tests
