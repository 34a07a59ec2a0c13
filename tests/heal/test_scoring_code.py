"""Code checker and its sandbox, including hostile programs. Timeouts are kept at ~1 s."""

import json
import os
import sys
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
    monkeypatch.setattr(sandbox, "_bubblewrap_probe", lambda: (False, "bubblewrap (`bwrap`) is not installed"))
    monkeypatch.delenv(sandbox.ISOLATION_ENV, raising=False)
    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    with pytest.raises(sandbox.SandboxUnavailableError):
        check_code(good, ADD, config=FAST)
    monkeypatch.setattr(sandbox, "_warned_once", [])
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
