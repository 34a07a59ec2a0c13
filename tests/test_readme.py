"""The README and docs/*.md are a user's documents: every Python snippet runs as written, every
relative link resolves, the `heal` commands parse, and the two commands CI runs stay first.

Each ```python block of README.md and docs/*.md is executed on the CPU (CUDA where there is one),
as a user would run it: in a fresh namespace, in an empty working folder, with no
HEAL_KERNELS_BACKEND / TRITON_INTERPRET set. The blocks of one file share one interpreter (so torch
is imported once per file), each with its own globals. A failure names the block's first line and
shows the traceback against the document's own line numbers.

A block is marked, on the line right before its opening fence, by
  <!-- no-run: REASON -->      never executed (the reason is required; there may be at most
                               MAX_NO_RUN such blocks in all), or
  <!-- requires: mod1, mod2 --> executed only where those modules import (optional extras such as
                               verl or trl; the test command of the README installs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS]
# every Markdown file whose links are checked (docs/demo/ holds a committed demo report)
LINKED_DOCUMENTS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_NO_RUN = 2
RUN_TIMEOUT_S = 800  # all blocks of one document (pytest's own per-test timeout is 900 s)

FENCE = re.compile(r"^(```+|~~~+)\s*([^\s`]*)(.*)$")
ANNOTATION = re.compile(r"^<!--\s*(no-run|requires)\s*:\s*(.*?)\s*-->$")
MARKER = re.compile(r"^<!--\s*([\w-]+)\s*-->$")


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    info: str  # the rest of the info string
    code: str
    annotation: Optional[Tuple[str, str]]  # ("no-run", reason) / ("requires", "verl, trl")
    marker: Optional[str]  # the plain <!-- name --> comment right before the fence, if any

    @property
    def first_code_line(self) -> int:
        return self.line + 1

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, info = m.group(1), m.group(2).lower(), m.group(3).strip()
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence[0] * len(fence)):
            j += 1
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        before = lines[prev].strip() if prev >= 0 else ""
        ann = ANNOTATION.match(before)
        mark = MARKER.match(before)
        blocks.append(Block(path, start + 1, lang, info, "\n".join(lines[start + 1 : j]),
                            (ann.group(1), ann.group(2)) if ann else None, mark.group(1) if mark else None))
        i = j + 1
    return blocks


PY_BLOCKS = [b for p in DOCUMENTS for b in code_blocks(p) if b.lang == "python"]


def _missing_modules(block: Block) -> List[str]:
    if not block.annotation or block.annotation[0] != "requires":
        return []
    names = [n.strip() for n in block.annotation[1].split(",") if n.strip()]
    return [n for n in names if importlib.util.find_spec(n) is None]


def _runnable(block: Block) -> bool:
    return not (block.annotation and block.annotation[0] == "no-run") and not _missing_modules(block)


# One interpreter per document; each block compiled against the document's path, padded so that
# tracebacks carry the document's line numbers, and executed with its own globals.
_RUNNER = textwrap.dedent(
    """
    import json, os, sys, tempfile, time, traceback
    blocks, out = json.load(sys.stdin), sys.argv[1]
    results = []
    for b in blocks:
        workdir = tempfile.mkdtemp(prefix="heal-doc-block-")
        os.chdir(workdir)
        t0 = time.perf_counter()
        print(f"--- {b['where']}", file=sys.stderr, flush=True)
        try:
            code = compile("\\n" * (b["first"] - 1) + b["code"], b["path"], "exec")
            exec(code, {"__name__": "__main__", "__file__": b["path"]})
            error = None
        except BaseException:
            error = traceback.format_exc()
        results.append({"where": b["where"], "error": error, "seconds": time.perf_counter() - t0})
        with open(out, "w") as f:
            json.dump(results, f)
    """
)

_RESULTS: Dict[Path, Dict[str, dict]] = {}


def _run_document(path: Path) -> Dict[str, dict]:
    if path in _RESULTS:
        return _RESULTS[path]
    blocks = [b for b in PY_BLOCKS if b.path == path and _runnable(b)]
    env = {k: v for k, v in os.environ.items() if k not in ("HEAL_KERNELS_BACKEND", "TRITON_INTERPRET")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the checkout's packages, where heal is not installed (an installed heal comes first)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    payload = [{"where": b.where, "path": str(b.path), "first": b.first_code_line, "code": b.code} for b in blocks]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        try:
            proc = subprocess.run([sys.executable, "-c", _RUNNER, str(out)], input=json.dumps(payload), env=env,
                                  cwd=tmp, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
            ended, stderr = f"exited with {proc.returncode}", proc.stderr
        except subprocess.TimeoutExpired as exc:
            ended = f"was stopped after {RUN_TIMEOUT_S} s"
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        results = {r["where"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    for b in blocks:  # a block the interpreter never finished (it died or hung): say so, with its output
        results.setdefault(b.where, {"where": b.where, "seconds": 0.0, "error": (
            f"the interpreter {ended} before this block finished\n--- stderr (tail) ---\n{stderr[-4000:]}")})
    _RESULTS[path] = results
    return results


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.where for b in PY_BLOCKS])
def test_python_block_runs(block: Block):
    if block.annotation and block.annotation[0] == "no-run":
        pytest.skip(f"no-run: {block.annotation[1]}")
    missing = _missing_modules(block)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)")
    result = _run_document(block.path)[block.where]
    if result["error"]:
        pytest.fail(f"the python block at {block.where} failed:\n{result['error']}", pytrace=False)


def test_documents_have_python_blocks_and_few_are_not_run():
    assert sum(b.path == README for b in PY_BLOCKS) >= 5, "README.md lost its python blocks (or the parser broke)"
    no_run = [b for b in PY_BLOCKS if b.annotation and b.annotation[0] == "no-run"]
    for b in no_run:
        assert len(b.annotation[1]) >= 10, f"{b.where}: a no-run block needs its reason: <!-- no-run: why -->"
        compile(b.code, b.where, "exec")  # not run, but still valid Python
    assert len(no_run) <= MAX_NO_RUN, f"too many python blocks are not run: {[b.where for b in no_run]}"
    for b in PY_BLOCKS:
        if b.annotation and b.annotation[0] == "requires":
            assert b.annotation[1].strip(), f"{b.where}: <!-- requires: module, ... --> names no module"
        assert not b.info, f"{b.where}: mark blocks with <!-- no-run: reason --> / <!-- requires: mod -->, not {b.info!r}"


def test_every_annotation_belongs_to_a_python_block():
    """A mistyped or misplaced <!-- no-run --> must not silently leave a block unmarked."""
    for path in DOCUMENTS:
        lines = path.read_text(encoding="utf-8").splitlines()
        annotated = {b.line for b in code_blocks(path) if b.annotation and b.lang == "python"}
        for n, line in enumerate(lines, 1):
            if re.match(r"^<!--\s*(no[-_ ]?run|requires)\b", line.strip(), flags=re.I):
                nxt = next((k for k in range(n + 1, len(lines) + 1) if lines[k - 1].strip()), None)
                assert ANNOTATION.match(line.strip()) and nxt in annotated, (
                    f"{path.relative_to(ROOT)}:{n}: {line.strip()!r} must be '<!-- no-run: reason -->' or "
                    "'<!-- requires: module -->' right before a ```python fence")
    for b in (b for p in DOCUMENTS for b in code_blocks(p)):
        assert b.lang not in ("py", "python3", "pycon", "ipython"), f"{b.where}: use ```python so that it is run"


# --- the two commands CI runs verbatim (.ci/run reads the first block after each marker) -------------

def _block_after_marker(name: str) -> Optional[Block]:
    """What .ci/run's awk does: the first fenced block after the line holding <!-- name -->."""
    lines = README.read_text(encoding="utf-8").splitlines()
    at = next((n for n, line in enumerate(lines, 1) if f"<!-- {name} -->" in line), None)
    if at is None:
        return None
    return next((b for b in code_blocks(README) if b.line > at), None)


def test_readme_starts_with_the_two_commands_ci_runs():
    blocks = code_blocks(README)
    main, test = _block_after_marker("main-command"), _block_after_marker("test-command")
    assert main is not None and test is not None, "README.md lost a main-command / test-command marker"
    assert [main.line, test.line] == [blocks[0].line, blocks[1].line], "the two CI commands must be README.md's first code blocks"
    for b in (main, test):
        assert b.lang == "bash" and len(b.code.strip().splitlines()) == 1, f"{b.where}: one bash line, run verbatim by CI"
    assert "heal demo" in main.code and "pytest" in test.code and " tests" in test.code
    verl_cpu = _block_after_marker("verl-cpu-command")  # .ci/verl-job runs it verbatim
    assert verl_cpu is not None and verl_cpu.lang == "bash" and "cpu_smoke.sh" in verl_cpu.code


def test_readme_has_a_table_of_contents_right_after_the_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    test_cmd = _block_after_marker("test-command")
    first_section = next(n for n, line in enumerate(lines, 1) if line.startswith("## ") and n > test_cmd.line)
    assert lines[first_section - 1].strip().lower() == "## contents", "the first section after the two commands is the contents"
    entries = []
    for line in lines[first_section:]:
        if line.startswith("## "):
            break
        entries += re.findall(r"\]\(#([^)]+)\)", line)
    assert len(entries) >= 5 and set(entries) <= _anchors(README), f"contents entries without a heading: {set(entries) - _anchors(README)}"


# --- links --------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _strip_fences(text: str) -> str:
    return re.sub(r"^(```+|~~~+).*?^\1\s*$", "", text, flags=re.S | re.M)


def _strip_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link: its text
    h = h.replace("`", "").lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(path: Path) -> set:
    seen: Dict[str, int] = {}
    out = set()
    for line in _strip_fences(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("path", LINKED_DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in LINKED_DOCUMENTS])
def test_relative_links_resolve(path: Path):
    bad = []
    for target in LINK.findall(_strip_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)} has broken links:\n  " + "\n  ".join(bad)


# --- shell snippets -----------------------------------------------------------------------------------

def _heal_commands():
    import shlex

    for b in (b for p in DOCUMENTS for b in code_blocks(p) if b.lang in ("bash", "sh", "shell")):
        text = b.code.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("heal "):
                yield b.where, shlex.split(line)


def test_heal_commands_in_the_documents_parse():
    from heal.cli import build_parser

    commands = list(_heal_commands())
    assert {c[1] for _, c in commands} >= {"prepare", "select", "mix", "plot", "bench", "env"}
    parser = build_parser()
    for where, cmd in commands:
        try:
            parser.parse_args(cmd[1:])
        except SystemExit as exc:
            if exc.code not in (0, None):  # argparse printed the bad option on stderr
                pytest.fail(f"{where}: `{' '.join(cmd)}` does not parse with heal's CLI")


def test_no_issue_numbers_or_development_history():
    for path in DOCUMENTS:
        text = _strip_code(path.read_text(encoding="utf-8"))
        for n, line in enumerate(text.splitlines(), 1):
            assert not re.search(r"(?<![\w&/])#\d+\b", line), f"{path.relative_to(ROOT)}: issue number in {line.strip()!r}"
            assert not re.search(r"\b(issue|PR|pull request)\s*#?\d+", line, flags=re.I), (
                f"{path.relative_to(ROOT)}: issue reference in {line.strip()!r}")
