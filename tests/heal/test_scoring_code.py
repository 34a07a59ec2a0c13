"""Code checker and its sandbox, including hostile programs. Timeouts are kept at ~1 s."""

import json
import os
import sys
import time
import uuid
import warnings

import pytest

from heal.scoring import compute_score
from heal.scoring.code import (CodeCheckConfig, check_code, extract_code, outputs_match, parse_tests,
                               run_tests)
from heal.scoring.sandbox import network_namespace_available, run_python

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX rlimits")


@pytest.fixture(autouse=True)
def _isolation(monkeypatch):
    """The checker's tests run under kernel isolation where the machine has it (CI installs
    bubblewrap), else with the audit hook alone (opted in here; the isolation tests themselves are in
    test_scoring_sandbox.py and skip with the reason)."""
    from heal.scoring import sandbox

    if not (sys.platform.startswith("linux") and sandbox.bubblewrap_available()):
        monkeypatch.setenv(sandbox.ISOLATION_ENV, "audit-hook-only")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="heal sandbox: running untrusted code with the audit hook only")
        yield

FAST = CodeCheckConfig(timeout_s=1.0, memory_mb=256, max_output_bytes=64 << 10)
ADD = json.dumps({"inputs": ["1 2\n", "3 4\n", "-5 5\n"], "outputs": ["3\n", "7\n", "0\n"]})


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_extract_code_last_python_block():
    text = "```python\nprint(1)\n```\ntext\n```cpp\nint main(){}\n```\n```py\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\n   \n```") is None
    assert extract_code("```cpp\nint main(){}\n```") is None


def test_parse_tests_layouts_and_errors():
    assert parse_tests(ADD)[0] == ["1 2\n", "3 4\n", "-5 5\n"]
    ins, outs, fn = parse_tests([{"input": "1", "output": "2", "testtype": "stdin"}])
    assert (ins, outs, fn) == (["1"], ["2"], None)
    assert parse_tests({"inputs": ["[1]"], "outputs": ["1"], "fn_name": "f"})[2] == "f"
    with pytest.raises(ValueError, match="inputs"):
        parse_tests({"inputs": ["1"], "outputs": []})
    with pytest.raises(ValueError, match="JSON"):
        parse_tests("{not json")
    with pytest.raises(ValueError, match="no test cases"):
        parse_tests({"inputs": [], "outputs": []})
    with pytest.raises(ValueError, match="fn_name"):
        parse_tests([{"input": "1", "output": "2", "testtype": "functional"}])


def test_outputs_match():
    assert outputs_match("3\n", "3")
    assert outputs_match("1 2  \n3\n\n", "1 2\n3")
    assert outputs_match("0.3333333", "0.33333333")
    assert not outputs_match("0.33", "0.3333333")
    assert not outputs_match("3", "4")
    assert not outputs_match("", "1")


def test_correct_program_passes_and_wrong_one_fails():
    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    assert check_code(good, ADD, config=FAST) == 1.0
    wrong = fenced("a, b = map(int, input().split())\nprint(a + b if a > 0 else 1)")
    assert check_code(wrong, ADD, config=FAST) == 0.0
    frac = CodeCheckConfig(**{**FAST.__dict__, "score": "fraction"})
    assert check_code(wrong, ADD, config=frac) == pytest.approx(2 / 3)
    # routed through compute_score with limits from extra_info
    assert compute_score("livecodebench", good, ADD, {"timeout_s": 1.0, "memory_mb": 256}) == 1.0


def test_functional_tests_call_solution_method():
    gt = json.dumps({"inputs": ["[1, 2, 3]\n2", "[]\n0"], "outputs": ["8", "0"], "fn_name": "f"})
    code = fenced("class Solution:\n    def f(self, xs, k):\n        print('noise')\n        return sum(xs) + k")
    assert check_code(code, gt, config=FAST) == 1.0
    assert check_code(fenced("def f(xs, k):\n    return sum(xs) + k"), gt, config=FAST) == 1.0
    assert check_code(fenced("def g(xs, k):\n    return 0"), gt, config=FAST) == 0.0


@pytest.mark.parametrize("text", ["", "I cannot solve this.", "```cpp\nint main(){}\n```"])
def test_no_code_scores_zero(text):
    assert check_code(text, ADD, config=FAST) == 0.0


def test_all_mode_stops_at_first_failure():
    assert run_tests("print(0)", ADD, FAST) == [False]
    assert run_tests("print(0)", ADD, CodeCheckConfig(**{**FAST.__dict__, "score": "fraction"})) == [False, False, True]


# ---------------------------------------------------------------- adversarial programs
def _run(code, stdin=""):
    return run_python(code, stdin, timeout_s=1.0, memory_mb=256, max_output_bytes=64 << 10)


def test_infinite_loop_is_killed():
    r = _run("while True:\n    pass")
    assert r.timed_out and not r.ok
    assert check_code(fenced("while True:\n    pass"), ADD, config=FAST) == 0.0


def test_sleeping_program_is_killed_by_wall_timeout():
    r = _run("import time\ntime.sleep(60)")
    assert r.timed_out


def test_memory_bomb_fails():
    r = _run("x = bytearray(2 * 1024**3)\nprint(len(x))")
    assert not r.ok and "MemoryError" in r.stderr
    r = _run("x = [0] * (10**9)")
    assert not r.ok


def test_huge_output_is_truncated_and_fails():
    r = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)")
    assert r.output_truncated and not r.ok
    assert len(r.stdout) == 64 << 10
    assert check_code(fenced("print('3\\n' * 10**7)"), ADD, config=FAST) == 0.0


def test_reading_files_outside_the_folder_is_blocked():
    for code in [
        "print(open('/etc/passwd').read())",
        "import os\nfd = os.open('/etc/passwd', os.O_RDONLY)\nprint(os.read(fd, 100))",
        "import pathlib\nprint(pathlib.Path('/etc/passwd').read_text())",
        "print(open('../io/stdin').read())",
        "import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').read())",
        "import os\nprint(os.listdir('/'))",
    ]:
        r = _run(code)
        assert r.returncode != 0, code
        assert "root:" not in r.stdout and "PermissionError" in r.stderr, code


def test_writing_outside_the_folder_is_blocked_inside_is_allowed(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}"
    r = _run(f"open({str(target)!r}, 'w').write('x')")
    assert r.returncode != 0 and not target.exists()
    r = _run("open('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())")
    assert r.ok and r.stdout.strip() == "hi"


def test_process_creation_is_blocked():
    for code in [
        "import os\nos.system('cat /etc/passwd')",
        "import subprocess\nprint(subprocess.run(['cat', '/etc/passwd'], capture_output=True).stdout)",
        "import os\nos.fork()",
        "import ctypes\nctypes.CDLL(None).system(b'id')",
    ]:
        r = _run(code)
        assert r.returncode != 0 and "PermissionError" in r.stderr, code
        assert "root:" not in r.stdout


@pytest.mark.parametrize("isolate_network", [True, False])
def test_socket_connection_is_blocked(isolate_network):
    code = "import socket\ns = socket.create_connection(('127.0.0.1', 9), timeout=0.5)\nprint('connected')"
    r = run_python(code, timeout_s=1.0, memory_mb=256, isolate_network=isolate_network)
    assert r.returncode != 0 and "connected" not in r.stdout
    assert "PermissionError" in r.stderr


def test_network_namespace_probe_is_a_bool():
    assert isinstance(network_namespace_available(), bool)


def test_standard_library_imports_work():
    r = _run("import heapq, collections, math, fractions, itertools, bisect, re, random, decimal, json\n"
             "print(sum(heapq.nsmallest(2, [5, 1, 3])))")
    assert r.ok and r.stdout.strip() == "4"


def test_exceptions_and_exit_codes():
    assert _run("raise SystemExit(0)").ok
    r = _run("raise ValueError('boom')")
    assert r.returncode == 1 and "boom" in r.stderr


def test_run_python_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        run_python("print(1)", mode="shell")
    with pytest.raises(ValueError, match="fn_name"):
        run_python("print(1)", mode="call")
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(TypeError, match="code"):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="score"):
        CodeCheckConfig(score="most").validate()
    with pytest.raises(ValueError, match="isolation"):
        CodeCheckConfig(isolation="none").validate()


def test_isolation_is_not_taken_from_the_data_row(monkeypatch):
    from heal.scoring import sandbox
    from heal.scoring.code import _config_for

    assert _config_for({"isolation": "audit-hook-only", "timeout_s": 1.5}).isolation is None
    # and a config's choice reaches run_python: without kernel isolation, auto refuses, the opt-in runs
    monkeypatch.setattr(sandbox.isolation, "_bubblewrap_probe", lambda: (False, "bubblewrap (`bwrap`) is not installed"))
    monkeypatch.delenv(sandbox.ISOLATION_ENV, raising=False)
    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    with pytest.raises(sandbox.SandboxUnavailableError):
        check_code(good, ADD, config=FAST)
    monkeypatch.setattr(sandbox.isolation, "_warned_once", [])
    with pytest.warns(RuntimeWarning, match="not a security boundary"):
        weak = CodeCheckConfig(**{**FAST.__dict__, "isolation": "audit-hook-only"})
        assert check_code(good, ADD, config=weak) == 1.0


def test_hook_cannot_be_switched_off_from_the_program():
    for code in [
        # rebinding the wrapper's globals or builtins does not reach the hook's closure
        "import sys, builtins\nm = sys.modules['__main__']\nfor k in list(vars(m)):\n    setattr(m, k, None)\n"
        "builtins.any = lambda *a: True\nbuiltins.isinstance = lambda *a: False\nprint(open('/etc/passwd').read())",
        # a path object that shows the check one path and the system call another
        "class P:\n    n = 0\n    def __fspath__(self):\n        P.n += 1\n        return 'ok.txt' if P.n == 1 else '/etc/passwd'\n"
        "print(open(P()).read())",
        "class S(str):\n    def startswith(self, *a):\n        return True\nprint(open(S('/etc/passwd')).read())",
        "import gc\nprint(len(gc.get_objects()))",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import os\nos.chdir('/')\nprint(open('etc/passwd').read())",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    ]:
        r = _run(code)
        assert r.returncode != 0, code
        assert "root:" not in r.stdout, code
        # open() resolves __fspath__ once, before the audit event: that case ends in FileNotFoundError
        assert "PermissionError" in r.stderr or "FileNotFoundError: [Errno 2] No such file or directory: 'ok.txt'" \
            in r.stderr, (code, r.stderr[-300:])


def test_pathlib_inside_the_folder_works():
    r = _run("import pathlib\np = pathlib.Path('a.txt')\np.write_text('ok')\nprint(p.read_text())")
    assert r.ok and r.stdout.strip() == "ok"


def test_concurrent_checks_from_threads():
    # verl scores from a thread pool
    from concurrent.futures import ThreadPoolExecutor

    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    with ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda _: check_code(good, ADD, config=FAST), range(4)))
    assert scores == [1.0] * 4


def test_parallel_tests_give_the_sequential_results():
    gt = json.dumps({"inputs": [f"{i}\n" for i in range(6)], "outputs": ["0\n", "1\n", "2\n", "9\n", "4\n", "9\n"]})
    code = "print(int(input()))"
    for score in ("all", "fraction"):
        seq = run_tests(code, gt, CodeCheckConfig(**{**FAST.__dict__, "score": score, "parallel_tests": 1}))
        par = run_tests(code, gt, CodeCheckConfig(**{**FAST.__dict__, "score": score, "parallel_tests": 4}))
        assert seq == par, score
    assert seq == [True, True, True, False, True, False]  # fraction: every test
    assert run_tests(code, gt, CodeCheckConfig(**{**FAST.__dict__, "parallel_tests": 4})) == [True, True, True, False]
    with pytest.raises(ValueError, match="parallel_tests"):
        CodeCheckConfig(parallel_tests=0).validate()


# ---------------------------------------------------------------- exact verdicts
def test_integer_tokens_compare_exactly():
    assert not outputs_match("999999\n", "1000000\n")
    assert not outputs_match("12345678901234567999", "12345678901234567890")  # 20 digits, last 3 wrong
    assert not outputs_match("-999999", "-1000000")
    assert not outputs_match("1 2 999999", "1 2 1000000")
    big = "7" * 5000  # past int()'s 4300-digit limit: compared as text, exactly
    assert outputs_match(big, big) and outputs_match("+00" + big, big) and not outputs_match(big[:-1] + "8", big)
    assert outputs_match("+7", "7") and outputs_match("007", "7") and outputs_match("-0", "0")
    assert outputs_match("7.0", "7") and outputs_match("7e0", "7")  # the exact value of the expected integer
    assert not outputs_match("6.9999999", "7") and not outputs_match("7.0000001", "7")
    # numbers with a fraction or exponent keep the tolerance
    assert outputs_match("0.3333333", "0.33333333") and outputs_match("1000000", "1000000.5")
    assert outputs_match("1e6", "1000000.1") and not outputs_match("1.01", "1.0")
    assert outputs_match("1e400", "1.0e400") and not outputs_match("1e400", "2e400")  # beyond floats: exact
    # inf / nan / hex / underscores are text, never numbers
    assert not outputs_match("inf", "1e999") and not outputs_match("nan", "nan0") and not outputs_match("1_000", "1000")
    assert not outputs_match("0x10", "16") and outputs_match("nan", "nan")


def test_functional_results_compare_by_type():
    from heal.scoring.code import _json_match, values_match

    assert not values_match(1000000999, 1000000000) and values_match(10**400, 10**400)
    assert not values_match(1.0, 1) and not values_match(True, 1) and not values_match(1, True)
    assert not values_match(10**400, 1.5) and not values_match(1.5, 10**400)  # no OverflowError
    assert values_match(2, 2.0) and values_match(0.3333333, 0.33333333) and not values_match(0.33, 0.3333333)
    assert values_match([1, [2.0000001, {"a": "x"}]], [1, [2.0, {"a": "x"}]])
    assert not values_match([1, [2, {"a": "x"}]], [1, [2, {"a": "y"}]]) and not values_match([1], [1, 2])
    assert not values_match({"a": 1, "b": 2}, {"a": 1}) and not values_match(None, 0) and values_match(None, None)
    assert not values_match(float("nan"), float("nan")) and values_match(float("inf"), float("inf"))
    assert not _json_match("1000000999", "1000000000") and _json_match(str(10**400), str(10**400))
    assert not _json_match("true", "1") and not _json_match("1.0", "1") and _json_match("[1, 2.0]", "[1, 2]") is False


def test_issue_examples_score_zero():
    one = {"inputs": ["\n"], "outputs": ["1000000\n"]}
    assert check_code(fenced("print(999999)"), one, config=FAST) == 0.0
    assert check_code(fenced("print(1000000)"), one, config=FAST) == 1.0
    twenty = {"inputs": ["\n"], "outputs": ["12345678901234567890\n"]}
    assert check_code(fenced("print(12345678901234567999)"), twenty, config=FAST) == 0.0
    fn = {"inputs": [""], "outputs": ["1000000000"], "fn_name": "f"}
    assert check_code(fenced("def f():\n    return 1000000999"), fn, config=FAST) == 0.0
    assert check_code(fenced("def f():\n    return 1000000000"), fn, config=FAST) == 1.0


def test_subclasses_and_eq_overrides_cannot_pass():
    # the value leaves the sandbox as JSON: a subclass's __eq__ / __repr__ never reaches the grader
    code = fenced(
        "class F(float):\n    def __eq__(self, o): return True\n    def __repr__(self): return '42.0'\n"
        "class S(str):\n    def __eq__(self, o): return True\n"
        "class I(int):\n    def __eq__(self, o): return True\n    def __repr__(self): return '42'\n"
        "class A:\n    def __eq__(self, o): return True\n"
        "def f(k):\n    return [F(1.0), S('no'), I(1), A(), True][k]")
    gt = {"inputs": ["0", "1", "2", "3", "4"], "outputs": ["42.0", '"42"', "42", "42", "1"], "fn_name": "f"}
    frac = CodeCheckConfig(**{**FAST.__dict__, "score": "fraction"})
    assert run_tests(code.split("```python\n")[1].split("```")[0], gt, frac) == [False] * 5
    assert check_code(code, gt, config=frac) == 0.0


# ---------------------------------------------------------------- never raises on a response
def test_huge_return_value_is_judged_without_overflow():
    for expected, want in [("1.5", 0.0), ("1", 0.0), (str(10**400), 1.0)]:
        got = check_code(fenced("def f():\n    return 10**400"), {"inputs": [""], "outputs": [expected],
                                                                  "fn_name": "f"}, config=FAST)
        assert got == want and getattr(got, "error", None) is None, expected  # judged, not an error


def test_deeply_nested_output_scores_zero_with_a_reason():
    prog = fenced("import os\ndef f():\n    os.write(1, b'[' * 5000 + b']' * 5000)\n    os._exit(0)")
    gt = json.dumps({"inputs": [""], "outputs": ["1"], "fn_name": "f"})
    got = check_code(prog, gt, config=FAST)  # json.loads: RecursionError
    assert got == 0.0 and got.error == "code/RecursionError"
    from heal.scoring import outcome

    outcome.pop_error_metrics()
    assert compute_score("livecodebench", prog, gt) == 0.0
    assert outcome.pop_error_metrics() == {"scoring/errors/code/RecursionError": 1.0}


def test_lone_surrogate_in_the_response_scores_zero_with_a_reason():
    text = fenced("print('\ud800')")
    got = check_code(text, ADD, config=FAST)  # writing solution.py: UnicodeEncodeError
    assert got == 0.0 and got.error == "code/UnicodeEncodeError"
    from heal.scoring import compute_score_with_info, outcome

    outcome.pop_error_metrics()
    assert compute_score_with_info("livecodebench", text, ADD) == {
        "score": 0.0, "acc": 0.0, "scoring_error": "code/UnicodeEncodeError"}
    assert outcome.pop_error_metrics() == {"scoring/errors/code/UnicodeEncodeError": 1.0}
    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    assert compute_score_with_info("livecodebench", good, ADD) == {"score": 1.0, "acc": 1.0, "scoring_error": ""}


def test_row_errors_still_raise_named():
    from heal.scoring import InvalidRowError

    with pytest.raises(InvalidRowError, match="not valid JSON"):
        check_code(fenced("print(1)"), "{nope")
    with pytest.raises(InvalidRowError, match="not text or JSON"):
        parse_tests({"inputs": ["\ud800"], "outputs": ["1"]})


# ---------------------------------------------------------------- limits from a data row
def test_row_limits_are_clamped_to_the_configured_ones():
    from heal.scoring.code import DEFAULT_CODE_CONFIG as D, _config_for

    cfg = _config_for({"timeout_s": 1e9, "memory_mb": 1e9, "parallel_tests": 1000, "max_output_bytes": 10**12,
                       "total_timeout_s": 10**400, "max_tests": 10**30})
    assert (cfg.timeout_s, cfg.memory_mb, cfg.parallel_tests) == (D.timeout_s, D.memory_mb, D.parallel_tests)
    assert (cfg.max_output_bytes, cfg.total_timeout_s, cfg.max_tests) == (D.max_output_bytes, D.total_timeout_s, 10**30)
    tight = _config_for({"timeout_s": 0.5, "memory_mb": 128, "parallel_tests": 2, "max_output_bytes": 100,
                         "score": "fraction", "num_turns": None, "rollout_reward_scores": {}})
    assert (tight.timeout_s, tight.memory_mb, tight.parallel_tests, tight.max_output_bytes, tight.score) == (
        0.5, 128, 2, 100, "fraction")
    # an explicit config is the ceiling too
    assert _config_for({"timeout_s": 1e9, "memory_mb": 4096}, FAST).timeout_s == FAST.timeout_s
    assert _config_for({"memory_mb": 4096}, FAST).memory_mb == FAST.memory_mb
    assert _config_for({"memory_mb": 0.5}, CodeCheckConfig(memory_mb=None)).memory_mb == 0.5
    from heal.scoring.sandbox.limits import _job

    assert _job(1.0, 0.5, 10, "stdin", None, 4, True, True)["mem_bytes"] == 1 << 19  # not 0 (= no limit)


@pytest.mark.parametrize("key, value", [
    ("max_output_bytes", 4194304.0), ("max_output_bytes", 0), ("max_output_bytes", "4096"), ("max_output_bytes", True),
    ("parallel_tests", 2.0), ("parallel_tests", 0), ("max_tests", -1), ("memory_mb", 0), ("memory_mb", -5),
    ("memory_mb", float("nan")), ("memory_mb", float("inf")), ("memory_mb", "512"), ("timeout_s", float("nan")),
    ("timeout_s", 0), ("timeout_s", -1.0), ("timeout_s", [1]), ("total_timeout_s", float("inf")), ("score", "most"),
])
def test_bad_row_limits_are_named_errors(key, value):
    from heal.scoring import InvalidRowError, validate_row

    with pytest.raises(InvalidRowError, match=f"extra_info\\['{key}'\\]"):
        check_code(fenced("print(1)"), ADD, {key: value}, config=FAST)
    with pytest.raises(InvalidRowError, match=f"extra_info\\['{key}'\\]"):
        validate_row({"data_source": "livecodebench", "reward_model": {"ground_truth": ADD},
                      "extra_info": {key: value}})


def test_a_row_cannot_raise_the_limits_when_run(monkeypatch):
    # a 6 s sleep and a 3 GB allocation with the row asking for 1e9 s / 1e9 MiB: the configured limits hold
    from heal.scoring import code as code_module

    monkeypatch.setattr(code_module, "DEFAULT_CODE_CONFIG", FAST)  # the configured limits (1 s, 256 MiB)
    gt = {"inputs": ["\n"], "outputs": ["ok\n"]}
    t0 = time.monotonic()
    assert compute_score("livecodebench", fenced("import time\ntime.sleep(6)\nprint('ok')"), gt,
                         {"timeout_s": 1e9}) == 0.0
    assert time.monotonic() - t0 < 5
    assert compute_score("livecodebench", fenced("import mmap\nm = mmap.mmap(-1, 3 * 1024**3)\nprint('ok')"), gt,
                         {"memory_mb": 1e9}) == 0.0
    # max_output_bytes=10**12: clamped, so no MemoryError / TypeError when scoring
    assert compute_score("livecodebench", fenced("print('ok')"), gt,
                         {"max_output_bytes": 10**12, "parallel_tests": 1000}) == 1.0
    assert compute_score("livecodebench", fenced("print('ok')"), gt, {"max_output_bytes": 4 << 20}) == 1.0


def test_bad_row_limits_stop_the_loader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heal.data.io import read_parquet_rows, write_parquet_rows
    from heal.scoring import InvalidRowError

    def row(**extra):
        return {"data_source": "livecodebench", "prompt": [{"role": "user", "content": "q"}],
                "reward_model": {"style": "rule", "ground_truth": ADD}, "extra_info": {"index": 0, **extra}}

    good = [row(timeout_s=1e9, memory_mb=1e9, parallel_tests=1000, max_output_bytes=10**12)]  # clamped later
    assert len(read_parquet_rows(write_parquet_rows(good, tmp_path / "good.parquet"))) == 1
    for bad, key in [(row(max_output_bytes=4194304.0), "max_output_bytes"), (row(memory_mb=-1), "memory_mb")]:
        with pytest.raises(InvalidRowError, match=f"row 2 \\(1-based\\): extra_info\\['{key}'\\]"):
            write_parquet_rows([row(), bad], tmp_path / "bad.parquet")
        path = tmp_path / f"bad-{key}.parquet"
        pq.write_table(pa.Table.from_pylist([row(), bad]), path)  # written by something else
        with pytest.raises(InvalidRowError, match=f"bad-{key}.parquet: row 2 \\(1-based\\): extra_info\\['{key}'\\]"):
            read_parquet_rows(path)
