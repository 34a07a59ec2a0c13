"""The compile gate's exactness and spill rules can fail: each forbidden form, injected into a copy of
the pair kernel's source (heal_kernels/triton/pairwise.py), makes :func:`heal_kernels.triton.aot.analyse`
report a failure, and the unmodified copy passes.

One variant (the EDA default path, ``pairwise_grouped_fp32_scored_first_exself``), one arch (sm_90)
per mutation, compiled in a subprocess without ``TRITON_INTERPRET`` and with a fresh
``TRITON_CACHE_DIR`` (as ``test_compile_gate``); skipped where the triton wheel cannot compile for
CUDA (no triton, no ``ptxas`` / ``cuobjdump``). The rules' reading of PTX and SASS text is also
tested on hand-written listings, which needs no Triton.

``python tests/heal_kernels/test_aot_gate_mutations.py [--arch 90] [--jobs 2]`` prints each
mutation's verdict."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from heal_kernels.triton import aot

ROOT = Path(__file__).resolve().parents[2]
KERNEL_SOURCE = ROOT / "heal_kernels" / "triton" / "pairwise.py"
VARIANT = "pairwise_grouped_fp32_scored_first_exself_J"  # the EDA default path (name prefix)
ARCH = 90
LIBDEVICE = "from triton.language.extra import libdevice\n"

# the sites (each must occur exactly once in pairwise.py)
DIRECT_SCALE = "tl.math.div_rn(ms_c.to(tl.float32), tl.maximum(nl_d, 1).to(tl.float32))"
RL_SCALE = "tl.math.div_rn(ms_f, nl_f)"
RECIP_SEED = "tl.math.div_rn(1.0, q.to(tl.float32))"
INDEX = "src = ((tg0 + _k * BLOCK_T)[None, :] * scale[:, None]).to(tl.int32)  # trunc = floor (>= 0)"
TILES = "num_warps=16, maxnreg=128)"

# name -> ([(old, new)], what the gate must report: substrings of one failure)
MUTATIONS = {
    "unmutated": ([], None),
    # the direct form's scale by libdevice's fast division (div.approx.ftz.f32 / div.approx.f32)
    "fast_dividef": (
        [(DIRECT_SCALE, "libdevice.fast_dividef(ms_c.to(tl.float32), tl.maximum(nl_d, 1).to(tl.float32))")],
        ("inexact division", "div.approx"),
    ),
    # the run-length form's scale rounded toward zero (libdevice: div.rz.ftz.f32)
    "div_rz": ([(RL_SCALE, "libdevice.div_rz(ms_f, nl_f)")], ("inexact division", "div.rz.")),
    # Triton's own `/` on float32 (div.full.f32: 2 ulp, not correctly rounded)
    "slash_div_full": ([(DIRECT_SCALE, "(ms_c.to(tl.float32) / tl.maximum(nl_d, 1).to(tl.float32))")],
                       ("inexact division", "div.full.f32")),
    # an explicit reciprocal (rcp.rn.f32 is correctly rounded, but a reciprocal times a value is not a division)
    "rcp": ([(RECIP_SEED, "libdevice.rcp_rn(q.to(tl.float32))")], ("inexact division", "rcp.")),
    # the index distributed over the trip's offset: t * s = tf0 * s + t0 * s, which contraction folds
    # into one fma (one rounding of a different expression: a different index near segment edges)
    "fma_index": ([(INDEX, "src = (tf0[None, :] * scale[:, None]"
                           " + ((t0f + _k * BLOCK_T) * scale)[:, None]).to(tl.int32)")],
                  ("stretched index", "fma")),
    # a tiny register budget: ptxas spills to local memory
    "maxnreg_spill": ([(TILES, "num_warps=16, maxnreg=32)")], ("spills",)),
}


def mutate(source: str, edits) -> str:
    for old, new in edits:
        n = source.count(old)
        if n != 1:
            raise AssertionError(f"the mutation site {old!r} occurs {n} times in pairwise.py (expected once): "
                                 "update the mutation to the kernel")
        source = source.replace(old, new)
    if edits and "libdevice." in source:
        source = source.replace("import triton.language as tl\n", "import triton.language as tl\n" + LIBDEVICE, 1)
    return source


def _load(path: Path):
    name = f"heal_gate_mutant_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton.jit reads the source back through the module
    spec.loader.exec_module(mod)
    return mod


def _analyse_mutant(job):
    path, arch = job
    mod = _load(Path(path))
    vs = [v for v in aot._pairwise_variants(mod) if v.name.startswith(VARIANT) and arch in v.archs]
    assert len(vs) == 1, [v.name for v in vs]
    rec = aot.analyse(vs[0], arch)
    return Path(path).stem, rec


def run_mutations(workdir: Path, arch: int = ARCH, jobs: int = 1, names=None):
    """Write each mutant next to the others in ``workdir``, compile and analyse it: ``{name: record}``."""
    source = KERNEL_SOURCE.read_text()
    todo = []
    for name, (edits, _) in MUTATIONS.items():
        if names and name not in names:
            continue
        path = workdir / f"{name}.py"
        path.write_text(mutate(source, edits))
        todo.append((str(path), arch))
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            return dict(pool.map(_analyse_mutant, todo, chunksize=1))
    return dict(map(_analyse_mutant, todo))


def verdict(rec) -> str:
    if rec.get("error"):
        return "ERROR " + rec["error"]
    return "FAIL: " + "; ".join(rec["failures"]) if rec.get("failures") else "pass"


# ---------------------------------------------------------------------------------------------
# the gate on compiled mutants (needs a triton wheel that compiles for CUDA)
# ---------------------------------------------------------------------------------------------


def _toolchain_or_skip():
    pytest.importorskip("triton")
    problem = aot.toolchain_problem(ARCH)
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def gate_records(tmp_path_factory):
    """Every mutant compiled once, in one subprocess (2 compile processes)."""
    _toolchain_or_skip()
    tmp = tmp_path_factory.mktemp("gate-mutants")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp / "records.json"
    proc = subprocess.run(
        [sys.executable, __file__, "--arch", str(ARCH), "--jobs", "2", "--workdir", str(tmp), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"the mutation run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_unmutated_kernel_passes(gate_records):
    rec = gate_records["unmutated"]
    assert not rec.get("error") and rec["failures"] == [], rec
    assert rec["division"] and set(rec["division"]) <= {"div.rn.f32", "div.rn.f64"}, rec["division"]
    idx = rec["stretched_index"]
    assert idx["ptx_truncations"] > 0 and idx["sass_truncations"] > 0 and idx["problems"] == [], idx


@pytest.mark.parametrize("name", [n for n in MUTATIONS if n != "unmutated"])
def test_mutation_fails_the_gate(gate_records, name):
    rec = gate_records[name]
    expected = MUTATIONS[name][1]
    assert not rec.get("error"), f"{name}: the mutant did not compile, so it tests nothing: {rec['error']}"
    assert rec["failures"], f"{name} passed the gate: {rec}"
    assert any(all(s in f for s in expected) for f in rec["failures"]), (name, expected, rec["failures"])
    if name == "fma_index":  # caught by the index rule alone: its divisions are still exact
        assert not any("inexact division" in f for f in rec["failures"]), rec["failures"]
        assert any("SASS" in p and "FFMA" in p for p in rec["stretched_index"]["problems"]), rec["stretched_index"]


# ---------------------------------------------------------------------------------------------
# the rules' reading of PTX and SASS (no Triton needed)
# ---------------------------------------------------------------------------------------------

FORBIDDEN_DIVISIONS = [
    "div.approx.f32", "div.approx.ftz.f32", "div.full.f32", "div.full.ftz.f32", "div.rn.ftz.f32",
    "div.rz.f32", "div.rm.f32", "div.rp.f32", "div.rz.ftz.f32", "div.rm.ftz.f32", "div.rp.ftz.f32",
    "div.rz.f64", "div.rm.f64", "div.rp.f64",
    "rcp.approx.f32", "rcp.approx.ftz.f32", "rcp.rn.f32", "rcp.rn.ftz.f32", "rcp.rz.f32", "rcp.rm.f32",
    "rcp.rp.f32", "rcp.rn.f64", "rcp.rz.f64", "rcp.approx.ftz.f64",
]


@pytest.mark.parametrize("op", FORBIDDEN_DIVISIONS)
def test_every_inexact_division_form_is_refused(op):
    operands = "%fd1, %fd2, %fd3" if op.startswith("div") and op.endswith("f64") else (
        "%fd1, %fd2" if op.endswith("f64") else ("%r1, %r2, %r3" if op.startswith("div") else "%r1, %r2"))
    ptx = f"\t@%p1 {op} \t{operands};\n\t{op} \t{operands}; // again\n"
    forms = aot.division_forms(aot.parse_ptx(ptx))
    assert forms == {op: 2}
    assert aot.inexact_division(forms) == {op: 2}


def test_exact_and_integer_division_pass_and_comments_are_not_read():
    ptx = """
    .reg .b32 %r<4>;                          // div.approx.f32 in a comment
    $L__BB0_1:
    \tdiv.rn.f32 \t%r1, %r2, %r3;
    \tdiv.rn.f64 \t%fd1, %fd2, %fd3;
    \tdiv.s32 \t%r1, %r2, %r3;
    \tdiv.u64 \t%rd1, %rd2, %rd3;
    \t{ .reg .pred %p9; div.rn.f32 %r1, %r2, %r3; }
    \tmul.f32 \t%r4, %r1, %r2;  // rcp.approx.ftz.f64
    """
    forms = aot.division_forms(aot.parse_ptx(ptx))
    assert forms == {"div.rn.f32": 2, "div.rn.f64": 1}
    assert aot.inexact_division(forms) == {}


INDEX_PTX = """
\tdiv.rn.f32 \t%r31, %r107, %r109;
\tmov.b32 \t%r40, %r31;
\tadd.f32 \t%r115, %r817, %r13;
\t{mul} \t%r116, %r40, %r115;
\tcvt.rzi.s32.f32 \t%r117, %r116;
"""
INDEX_SASS = """
        /*0d80*/                   FMUL R18, R18, R61.reuse ;
        /*0d90*/                   FADD R24, R10, R73 ;
        /*0de0*/                   F2I.TRUNC.NTZ R18, R18 ;
"""


def _index(ptx, sass=INDEX_SASS):
    return aot.stretched_index(aot.parse_ptx(ptx), aot.parse_sass(sass))


def test_stretched_index_reading():
    ok = _index(INDEX_PTX.replace("{mul}", "mul.f32"))
    assert ok == dict(ptx_truncations=1, sass_truncations=1, problems=[])
    assert _index(INDEX_PTX.replace("{mul}", "mul.rn.f32"))["problems"] == []
    for mul in ("fma.rn.f32", "mul.ftz.f32", "mul.rz.f32", "mul.sat.f32"):  # contracted, flushed, other rounding
        ptx = INDEX_PTX.replace("{mul}", mul)
        if mul == "fma.rn.f32":
            ptx = ptx.replace("%r40, %r115;", "%r40, %r115, %r13;")
        assert _index(ptx)["problems"], mul
    # the product also feeds an add: ptxas may fuse them into an FFMA
    assert _index(INDEX_PTX.replace("{mul}", "mul.f32") + "\tadd.f32 \t%r5, %r116, %r6;\n")["problems"]
    # the scale is not a correctly rounded division (here m * (1 / n))
    assert _index(INDEX_PTX.replace("{mul}", "mul.f32").replace("div.rn.f32", "mul.f32"))["problems"]
    # floor instead of trunc, or another conversion
    assert _index(INDEX_PTX.replace("{mul}", "mul.f32").replace("cvt.rzi.s32", "cvt.rmi.s32"))["problems"]
    # SASS: the truncated value comes from an FFMA
    bad = _index(INDEX_PTX.replace("{mul}", "mul.f32"), INDEX_SASS.replace("FMUL R18, R18, R61.reuse",
                                                                            "FFMA R18, R18, R61, R3"))
    assert len(bad["problems"]) == 1 and "FFMA" in bad["problems"][0]
    # ptxas' unsigned integer division idiom is no float index
    idiom = INDEX_SASS + """
        /*0e00*/                   MUFU.RCP R4, R3 ;
        /*0e10*/                   F2I.FTZ.U32.TRUNC.NTZ R5, R4 ;
"""
    assert _index(INDEX_PTX.replace("{mul}", "mul.f32"), idiom) == ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile each mutant of the pair kernel and print the gate's verdict")
    parser.add_argument("--arch", type=int, default=ARCH)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the mutants are written (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--only", nargs="*", default=None, help="only these mutations")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    with tempfile.TemporaryDirectory() as tmp:
        recs = run_mutations(Path(args.workdir or tmp), args.arch, args.jobs, args.only)
    for name, rec in recs.items():
        print(f"sm_{args.arch} {name}: {verdict(rec)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
