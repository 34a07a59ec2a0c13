"""heal bench static on real compiles (a triton wheel with ptxas / cuobjdump, no GPU): the entropy
backward that ptxas unrolls is costed per element of its unrolled body, and ``heal bench static
--check`` fails on a mutated copy of the committed results, naming the field. The compiles run in a
subprocess without TRITON_INTERPRET (the test session interprets the kernels) and a fresh Triton
cache."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from heal.bench import static

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
V112 = "entropy_bwd_bf16_gH_gLP_V112_B128_w1"  # the example: 128 columns on one warp, 4 per thread


def _toolchain_or_skip(arch=90):
    triton = pytest.importorskip("triton")
    from heal_kernels.triton import aot

    problem = aot.toolchain_problem(arch)
    if problem:
        pytest.skip(problem)
    return triton


def _run(args, tmp_path, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_unrolled_entropy_backward_is_costed_per_element(tmp_path):
    """ptxas unrolls the V=112 backward's row loop 4x on sm_90: the body (LDG / STG bytes 4x the PTX
    loop's, the column index stepping 4 x 128) runs 16 elements per thread, not 4, so its instructions
    per element are the body over 16 (the issue: 37.0 read, 9.25 real)."""
    _toolchain_or_skip()
    out = tmp_path / "rec.json"
    proc = _run(["-m", "heal_kernels.triton.aot", "--arch", "90", "--only", V112, "--json", str(out)], tmp_path)
    recs = json.loads(out.read_text()) if out.exists() else []
    assert recs, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = recs[0]
    u = rec["hot_loop_unroll"]
    assert rec["elements_per_thread_per_iteration"] == 128 / 32
    assert rec["hot_loop_trips"] == 4, f"ptxas no longer unrolls this loop 4x (the test's premise): {u}"
    assert u["sass_load_bytes"] == 4 * u["ptx_load_bytes"] and u["sass_store_bytes"] == 4 * u["ptx_store_bytes"]
    assert u["induction_confirms"] and 4 * 128 in u["sass_steps"] and 128 in u["ptx_steps"], u
    assert rec["elements_per_thread_per_hot_loop_body"] == 16
    assert rec["instructions_per_element"] == round(rec["hot_loop_instructions"] / 16, 3)
    assert rec["instructions_per_element"] < 12  # the launch configuration's 4 elements would read ~37
    assert not any("trips per SASS body" in f for f in rec["failures"]), rec["failures"]


def test_check_fails_naming_a_mutated_register_count(tmp_path):
    """Mutation: a copy of the committed sm_90 results with one register count edited; ``heal bench
    static --check`` (on that variant) regenerates it and fails, naming arch, variant and field."""
    triton = _toolchain_or_skip()
    committed = json.loads((RESULTS / "static-sm_90.json").read_text())
    if committed["triton"] != triton.__version__:
        pytest.skip(f"the committed results are from Triton {committed['triton']}, this is {triton.__version__}")
    rec = next(r for r in committed["variants"] if r["name"] == V112)
    rec["regs"] = 999
    d = tmp_path / "results"
    d.mkdir()
    (d / "static-sm_90.json").write_text(json.dumps(committed, indent=1))
    (d / "static-sm_90.md").write_text((RESULTS / "static-sm_90.md").read_text())
    proc = _run(["-m", "heal", "bench", "static", "--check", str(d), "--only", V112, "--jobs", "1"], tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(rf"^DIFF sm_90 {V112} regs: committed 999, fresh \d+$", proc.stdout, re.M), proc.stdout[-3000:]
    assert "static check FAILED" in proc.stdout


def test_check_refuses_results_of_another_triton(tmp_path):
    """The committed results name their Triton; under another one the check says so and fails before
    compiling anything."""
    triton = pytest.importorskip("triton")
    doc = json.loads((RESULTS / "static-sm_90.json").read_text())
    doc["triton"] = "0.0.1"
    (tmp_path / "static-sm_90.json").write_text(json.dumps(doc))
    lines = []
    assert static.check(tmp_path, out=lines.append, progress=False) == 1
    assert len(lines) == 1 and "generated with Triton 0.0.1" in lines[0], lines
    assert f"this environment has Triton {triton.__version__}" in lines[0]
    assert static.check(tmp_path / "missing", out=lines.append) == 1  # no committed results: a failure too
