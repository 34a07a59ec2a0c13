"""The Triton kernels compiled for real GPU targets without a GPU (compile gate), the list of
launched variants kept in step with the launchers, and the static model's SASS reading."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heal_kernels.triton import _launch, aot

ROOT = Path(__file__).resolve().parents[2]


def _toolchain_or_skip():
    problem = aot.toolchain_problem()
    if problem:
        pytest.skip(problem)


def test_compile_gate(tmp_path):
    """Every launched variant compiles for sm_80, sm_90 (and sm_100 when this Triton accepts it)
    with no register spill (stack, local memory, LDL/STL); in the pairwise kernels every
    floating-point division is div.rn (no approx / full / rz / rm / rp / .ftz division, no rcp) and
    the pair kernel's stretched index is a plain multiply then truncate (no fma). A fresh
    TRITON_CACHE_DIR: nothing is reused between runs. The rules' mutation tests:
    test_aot_gate_mutations.py."""
    _toolchain_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out_json = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "heal_kernels.triton.aot", "--arch", "80", "90", "100", "--jobs", "2",
         "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    import json

    recs = json.loads(out_json.read_text())
    archs = {r["arch"] for r in recs}
    assert {"sm_80", "sm_90"} <= archs
    names = {r["name"] for r in recs}
    assert any(n.startswith("entropy_fwd") for n in names) and any(n.startswith("entropy_bwd") for n in names)
    assert any(n.startswith("linear_fwd") for n in names) and any(n.startswith("linear_bwd") for n in names)
    assert any(n.startswith("pairwise") for n in names)
    for r in recs:
        assert r["spill_bytes"] == 0 and r["ldl_stl"] == 0, r
        assert r["instructions_per_element"] > 0, r
        if r["family"].startswith("pairwise"):
            assert r["inexact_division"] == 0 and set(r["division"]) <= {"div.rn.f32", "div.rn.f64"}, r
        if r["family"] == "pairwise":
            idx = r["stretched_index"]
            assert idx["problems"] == [] and idx["ptx_truncations"] > 0 and idx["sass_truncations"] > 0, r
    assert any(r["division"].get("div.rn.f32") for r in recs if r["family"] == "pairwise"), "the rule read no division"


def _ops_under_interpreter(monkeypatch):
    """Run every launcher path the ops have, on tiny CPU inputs through the Triton interpreter."""
    from heal_kernels.ops import pairwise as pw
    from heal_kernels.ops.entropy import entropy_and_logprobs, token_entropy
    from heal_kernels.triton import pairwise as tri

    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "triton")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        z = torch.randn(3, 40).to(dtype)
        labels = torch.randint(0, 40, (3,))
        for with_labels in (True, False):
            zg = z.clone().requires_grad_(True)
            if with_labels:
                ent, lp = entropy_and_logprobs(zg, labels, 0.8)
                for loss in (ent.sum() + lp.sum(), lp.sum()):  # autograd materialises a zero gH for the second
                    torch.autograd.grad(loss, zg, retain_graph=True)
            else:
                torch.autograd.grad(token_entropy(zg, 0.8).sum(), zg)
    # a vocabulary slice of a wider tensor: its rows and its gradient's sit at different offsets
    wide = torch.randn(3, 48).to(torch.bfloat16).requires_grad_(True)
    ent, lp = entropy_and_logprobs(wide[:, :37], torch.randint(0, 37, (3,)), 0.8)
    torch.autograd.grad(ent.sum() + lp.sum(), wide)
    from heal_kernels.ops.linear import linear_entropy_and_logprobs, linear_token_entropy

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = torch.randn(3, 8).to(dtype).requires_grad_(True)
        w = torch.randn(40, 8).to(dtype).requires_grad_(True)
        labels = torch.randint(0, 40, (3,))
        ent, lp = linear_entropy_and_logprobs(h, w, labels, 0.8)
        torch.autograd.grad(ent.sum() + lp.sum(), (h, w))
        torch.autograd.grad(linear_token_entropy(h, w, 0.8).sum(), (h, w))
    lengths = [5, 0, 9, 3, 12, 7]
    values = torch.rand(sum(lengths))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    groups = torch.tensor([0, 1, 0, 1, 1, 0])
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    for direction in ("scored_first", "short_first"):
        pw.pairwise_similarity(values, cu, kl_direction=direction)
        for exclude_self in (True, False):
            for p in (None, pids):
                pw.grouped_max_similarity(values, cu, groups, 2, exclude_self=exclude_self, prompt_ids=p,
                                          kl_direction=direction)
    monkeypatch.setattr(tri, "CLAMP_FREE_TOTAL", 0)
    pw.grouped_max_similarity(values, cu, groups, 2)


def test_variants_match_recorded_launches(monkeypatch):
    """The AOT list and the launchers agree: every launch of the interpreter run is a listed
    specialisation (kernel, argument dtypes, constexpr flags) and every listed one is launched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches through the Triton interpreter (CPU run)")
    listed = {aot.kernel_key(v.kernel, v.args, v.kwargs) for v in aot.variants()}
    seen = set()
    monkeypatch.setattr(_launch, "RECORDERS", [lambda k, a, kw: seen.add(aot.kernel_key(k, a, kw))])
    _ops_under_interpreter(monkeypatch)
    assert seen, "no launch recorded"
    assert seen - listed == set(), f"launched but not in aot.variants(): {sorted(seen - listed)}"
    assert listed - seen == set(), f"listed but never launched: {sorted(listed - seen)}"


def test_variants_describe_real_launches():
    """Names, families, launch options and the per-trip element counts of the listed variants."""
    vs = aot.variants()
    names = [v.name for v in vs]
    assert len(names) == len(set(names))
    from heal_kernels.triton.entropy import launch_config

    for v in vs:
        assert v.name.startswith(v.family + "_")
        assert v.family in ("entropy_fwd", "entropy_bwd", "linear_fwd", "linear_bwd", "pairwise_pack", "pairwise")
        assert v.kwargs["enable_fp_fusion"] is True and "num_warps" in v.kwargs and "num_stages" in v.kwargs
        threads = 32 * v.kwargs["num_warps"]
        if v.family.startswith(("entropy", "linear")):  # one program per row, the entropy block config
            vocab = v.meta["vocab"]
            block, warps = launch_config(vocab, v.args[0].element_size())
            assert (v.kwargs["BLOCK"], v.kwargs["num_warps"]) == (block, warps)
            assert v.elements_per_thread_per_iteration == block / threads
            assert v.args[0].data_ptr() % 16 == 0 and v.args[0].shape[1] == vocab
            assert v.kwargs["CHUNK"] * v.args[0].element_size() == 16 or v.kwargs["CHUNK"] == block
        elif v.family == "pairwise_pack":  # one program per sequence, the CUDA packing config
            from heal_kernels.triton.pairwise import PACK

            assert (v.kwargs["BLOCK"], v.kwargs["num_warps"]) == (PACK["BLOCK"], PACK["num_warps"])
            assert v.args[0].dtype == torch.float32 and v.args[1].dtype == torch.int64  # values, cu
            assert v.args[3].dtype == torch.float32 and v.args[3].data_ptr() % 16 == 0  # (x, e) pairs
        else:
            kw = v.kwargs
            assert v.elements_per_thread_per_iteration == kw["ROWS"] * kw["BLOCK_J"] * kw["BLOCK_T"] / threads
            assert v.args[0].dtype == torch.int64  # interleaved (x, e)
    dtypes = {v.meta.get("dtype") for v in vs if v.family == "entropy_fwd"}
    assert dtypes == {"fp32", "bf16", "fp16"}


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   IADD3 R2, R0, 0x1, RZ ;
        /*0030*/                   FADD R3, R2, R2 ;
        /*0040*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0050*/                   FFMA R5, R4, R4, R3 ;
        /*0060*/                   NOP ;
        /*0070*/               @P0 BRA 0x30 ;
        /*0080*/               @P1 LDG.E R6, desc[UR4][R2.64] ;
        /*0090*/                   FADD R6, R6, R5 ;
        /*00a0*/               @P2 BRA 0x80 ;
        /*00b0*/                   IADD3 R7, R7, 0x1, RZ ;
        /*00c0*/               @P3 BRA 0x20 ;
        /*00d0*/                   STL [R1], R6 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0;
"""


def test_sass_loop_reading():
    """The hot loop is the unmasked innermost loop (NOPs not counted), the masked one is the tail,
    and the enclosing loop's own instructions are the per-tile overhead."""
    instrs = aot.parse_sass(SASS)
    assert len(instrs) == 16 and instrs[7][1:3] == ("@P0", "BRA")
    s = aot.loop_structure(instrs)
    (start, end), body = s["hot"]
    assert (start, end) == (0x30, 0x70) and len(body) == 4  # FADD LDG FFMA BRA
    assert len(s["tail"][1]) == 3
    assert s["outer_overhead"] == 3  # IADD3 at 0x20, IADD3 at 0xb0, BRA at 0xc0
    assert sum(1 for i in instrs if i[2] in ("LDL", "STL")) == 1


def test_occupancy():
    assert aot.occupancy(32, 0, 8, 90) == 64  # register-light: the 64-warp limit
    assert aot.occupancy(255, 0, 4, 90) == 8  # 255 registers: two 4-warp blocks
    assert aot.occupancy(128, 0, 8, 90) == 16


def test_index_rule_needs_no_clamp_below_2_22():
    """The pairwise kernel drops the rule's min(., m - 1) while every length is below 2^22: check
    that floor(f32(t) * f32(m / n)) <= m - 1 at t = n - 1 (the largest t) for every m <= n <= 4096."""
    n = torch.arange(1, 4097, dtype=torch.int64)
    for m0 in range(1, 4097, 512):
        m = torch.arange(m0, min(m0 + 512, 4097), dtype=torch.int64)[:, None]
        mm, nn = torch.broadcast_tensors(m, n[None, :])
        keep = mm <= nn
        scale = mm.to(torch.float32) / nn.to(torch.float32)
        src = torch.floor((nn - 1).to(torch.float32) * scale).to(torch.int64)
        assert bool((src[keep] <= mm[keep] - 1).all())
    # the bound the kernel relies on, at the edge: n just below 2^22
    nn = torch.tensor([2**22 - 1] * 4)
    mm = torch.tensor([1, 2, 2**21, 2**22 - 2])
    src = torch.floor((nn - 1).to(torch.float32) * (mm.to(torch.float32) / nn.to(torch.float32))).to(torch.int64)
    assert bool((src <= mm - 1).all())
    assert math.isfinite(float(src.max()))
