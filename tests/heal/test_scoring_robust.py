"""Property tests: nothing in a response or in a program's output makes scoring raise.

Random bytes (invalid UTF-8 included, as lone surrogates), deep nesting, huge numbers, NaN / inf and
surrogates go (1) as program output through the code checker's own path, with the sandbox replaced by a
fake that returns that output (the comparison layer is then exactly what a real run reaches), and
through a real sandbox for a few examples; (2) as response text to every checker (choice, math,
physics, code) and to the batch entry points (``compute_score``, ``compute_score_with_info``).
Every call must return a score in [0, 1]; failures to judge carry a reason.
"""

import json
import os
import re
import sys
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from heal import scoring
from heal.scoring import code as code_module
from heal.scoring.choice import check_choice
from heal.scoring.code import CodeCheckConfig, check_code, outputs_match, values_match
from heal.scoring.math_answer import check_math, check_physics
from heal.scoring.sandbox import RunResult

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX rlimits")

FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=4, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPECIAL = [
    "", "\ud800", "\udfff", "a\udc80b", "\x00", "\r\n" * 50, "[" * 5000 + "]" * 5000, "{" * 3000, "[" * 20000,
    '{"a": ' * 2000 + "1" + "}" * 2000, str(10**400), "-" + "9" * 5000, "9" * 5000 + ".5", "1e999999",
    "-1e-999999", "1e400", "NaN", "Infinity", "-Infinity", "nan", "inf", "-0", "0.0", "1_000", "0x1f", "1.0",
    "[NaN, Infinity]", '"\\ud800"', '"\\udfff\\ud800"', "[1, 2.5, true, null]", "\\boxed{", "\\boxed{" * 500,
    "```python\nprint(1)\n```", "```" * 50, "Answer: " * 50, "\\boxed{\\frac{1}{0}}", "\\boxed{9^{9^{9}}}",
    "\\boxed{" + "(" * 3000 + "}", "\\boxed{1/0}", "\\boxed{\ud800}", "\ufeff", "\u202e", "٣",
]
_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.integers(min_value=10**300, max_value=10**400),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.text(max_size=5), _surrogate), max_size=30).map("".join),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),  # invalid UTF-8
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
    st.sampled_from(SPECIAL),
    st.lists(st.sampled_from(SPECIAL) | st.text(max_size=6), max_size=5).map(" ".join),
    st.lists(st.sampled_from(SPECIAL) | st.integers().map(str) | st.floats().map(repr), max_size=6).map("\n".join),
    st.integers(1, 6000).map(lambda n: "[" * n + "]" * n),
    _json_value.map(lambda v: json.dumps(v)),
    st.floats().map(repr),
    st.integers().map(str),
)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# expected outputs come from a data row: valid text (no lone surrogates), anything else allowed
EXPECTED = TEXT.filter(_encodable)


def _ok(score) -> bool:
    return isinstance(score, float) and 0.0 <= score <= 1.0


@pytest.fixture(autouse=True)
def _isolation(monkeypatch):
    from heal.scoring import sandbox

    if not (sys.platform.startswith("linux") and sandbox.bubblewrap_available()):
        monkeypatch.setenv(sandbox.ISOLATION_ENV, "audit-hook-only")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="heal sandbox: running untrusted code with the audit hook only")
        yield


_INT = re.compile(r"-?[0-9]{1,1000}")
CFG = CodeCheckConfig(timeout_s=1.0, memory_mb=256, max_output_bytes=64 << 10, parallel_tests=2)
PROGRAM = "```python\nprint(1)\n```"


def _fake_run(stdout: str):
    def run_python(code, stdin="", **kwargs):
        return RunResult(0, stdout, "", False, False, "fake")
    return run_python


# ---------------------------------------------------------------- program output -> comparison layer
@FAST
@given(got=TEXT, expected=EXPECTED, functional=st.booleans(), score=st.sampled_from(["all", "fraction"]))
@example(got="[" * 5000 + "]" * 5000, expected="1", functional=True, score="all")  # RecursionError in json.loads
@example(got=str(10**400), expected="1.5", functional=True, score="all")  # OverflowError in math.isclose
@example(got="1" * 5000, expected="1.5", functional=True, score="fraction")  # past int()'s digit limit
@example(got="NaN", expected="1e400", functional=True, score="all")
@example(got="999999", expected="1000000", functional=False, score="all")
def test_any_program_output_is_judged_or_scored_zero_with_a_reason(got, expected, functional, score):
    gt = {"inputs": ["", "1"], "outputs": [expected, expected]}
    if functional:
        gt["fn_name"] = "f"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(code_module, "run_python", _fake_run(got))
        result = check_code(PROGRAM, gt, config=CodeCheckConfig(**{**CFG.__dict__, "score": score}))
        assert _ok(result)
        if getattr(result, "error", None) is not None:
            assert result == 0.0 and result.error.startswith("code/")
        elif not functional and got == expected:
            assert result == 1.0  # equal text always matches
        if not functional and _INT.fullmatch(got.strip()) and _INT.fullmatch(expected.strip()):
            assert result == (1.0 if int(got) == int(expected) else 0.0)  # integers: exact
        info = scoring.compute_score_with_info("livecodebench", PROGRAM, json.dumps(gt))
        assert _ok(info["score"]) and isinstance(info["scoring_error"], str)


@FAST
@given(a=TEXT, b=TEXT)
def test_outputs_match_is_total(a, b):
    assert outputs_match(a, b) in (True, False)
    assert outputs_match(a, a)


@FAST
@given(a=_json_value, b=_json_value)
def test_values_match_is_total_and_exact_on_ints(a, b):
    assert values_match(a, b) in (True, False)
    if type(a) is int and type(b) is int:
        assert values_match(a, b) == (a == b)


# ---------------------------------------------------------------- response text -> every checker
@FAST
@given(text=TEXT)
@example(text="\\boxed{\ud800} Answer: \ud800 ```python\nprint('\ud800')\n```")
@example(text="\\boxed{" + "[" * 5000 + "}")
def test_any_response_to_every_checker(text):
    add = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(code_module, "run_python", _fake_run(text))  # what a program in the response might print
        for result in (check_choice(text, "B", {"choices": {"A": "x", "B": text if _encodable(text) else "y"}}),
                       check_math(text, "7"), check_physics(text, "7", {"rel_tol": 0.05}),
                       check_code(text, add, config=CFG), check_code(text, add, {"timeout_s": 1e9})):
            assert _ok(result)
        for source, gt in [("commonsense_qa", "B"), ("deepscaler", "\\frac{1}{2}"), ("webinstruct_physics", "9.8"),
                           ("livecodebench", add)]:
            assert _ok(scoring.compute_score(source, text, gt))
            s = scoring.score_response(source, text, gt)
            assert _ok(s) and (s.error is None or s == 0.0)
            info = scoring.compute_score_with_info(source, text, gt, {"num_turns": None})
            assert sorted(info) == ["acc", "score", "scoring_error"] and _ok(info["score"])
        batch = scoring.compute_score_batch(["commonsense_qa", "livecodebench", "deepscaler"],
                                            [text, text, "\\boxed{7}"], ["B", add, "7"], [None, {"timeout_s": 1.0}, {}])
        assert [sorted(b) for b in batch] == [["acc", "score", "scoring_error"]] * 3
        assert all(_ok(b["score"]) for b in batch) and batch[2]["score"] == 1.0  # the rest of the batch is scored
    scoring.pop_error_metrics()


# ---------------------------------------------------------------- a few through a real sandbox
@FEW
@given(data=st.binary(max_size=2000) | st.sampled_from([b"[" * 5000 + b"]" * 5000, str(10**400).encode(),
                                                         b"\xff\xfe", b"NaN", b"1e999999"]),
       expected=st.sampled_from(["1", "[1, 2]", "1.5", str(10**400), '"x"']))
def test_real_sandbox_output_bytes(data, expected):
    stdin_prog = f"```python\nimport os\nos.write(1, {data!r})\n```"
    call_prog = f"```python\nimport os\ndef f():\n    os.write(1, {data!r})\n    os._exit(0)\n```"
    assert _ok(check_code(stdin_prog, {"inputs": ["\n"], "outputs": [expected]}, config=CFG))
    assert _ok(check_code(call_prog, {"inputs": [""], "outputs": [expected], "fn_name": "f"}, config=CFG))


@FEW
@given(body=TEXT)
@example(body="print('\ud800')")  # UnicodeEncodeError when the program is written out
@example(body="import os\nos.write(1, b'\\xff\\xfe' * 10)")
def test_real_sandbox_response_text(body):
    assert _ok(scoring.compute_score("livecodebench", f"```python\n{body}\n```",
                                     {"inputs": ["\n"], "outputs": ["1\n"]}, {"timeout_s": 1.0, "memory_mb": 256}))
    scoring.pop_error_metrics()
