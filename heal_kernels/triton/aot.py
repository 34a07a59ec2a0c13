"""Every Triton kernel specialisation heal launches, compiled ahead of time for CUDA targets.

No GPU is needed: Triton compiles for any ``GPUTarget`` on a CPU machine, and the Linux triton
wheel ships ``ptxas``, ``cuobjdump`` and ``nvdisasm``. This module

* lists the launched variants (:func:`variants`): each carries the kernel, the example arguments
  exactly as the launcher passes them (CPU tensors stand in for CUDA ones, with the launcher's
  dtypes, sizes and 16-byte alignment) and the launch keyword arguments (constexprs, ``num_warps``,
  ``num_stages``, ``enable_fp_fusion``). The arguments come from the launchers' own
  ``*_launch_spec`` functions at the benchmark shapes, so Triton's binder specialises them exactly
  as a real launch would (16-byte divisibility, i32 / i64);
* compiles a variant for ``sm_XX`` (:func:`compile_variant`) and reads the cubin
  (:func:`analyse`): registers, stack / local memory, ``LDL`` / ``STL`` in the SASS, theoretical
  occupancy (:func:`occupancy`: registers and shared memory -- static, Triton's dynamic, CUDA's 1 KB
  per-block reserve once), the hot loop's SASS instructions per element (per the elements its body
  handles: :func:`unroll_factor` reads how many source-loop trips ptxas unrolled into one body, from
  the body's global memory bytes against the PTX loop's), the PTX's floating-point divisions and
  reciprocals (:func:`division_forms`); for the pair kernel the stretched index's instructions
  (:func:`stretched_index`), its nine loops (:func:`pairwise_loops`: per form -- direct,
  run-length P = L, run-length P = S' -- the unrolled, single and masked trips, with their pipe
  mix) and its per-tile code, which the static model (``heal bench static``) costs.

``python -m heal_kernels.triton.aot [--arch 80 90 100] [--jobs 2] [--json out.json]`` compiles every
variant, prints one line each and exits 1 when a gate fails: a compile error, a spill, a hot loop
whose trips per SASS body cannot be read (or a pair-kernel main loop not running KD / KR trips), or in the
pairwise kernels (packing and pairs) a floating-point division other than ``div.rn.f32`` /
``div.rn.f64`` or any ``rcp`` (:func:`inexact_division`), or a stretched index that FP
contraction could change (:func:`stretched_index`); ``tests/heal_kernels/test_aot_gate_mutations.py``
injects each forbidden form and expects a failure. It must run without ``TRITON_INTERPRET`` (the
test suite starts it in a subprocess with a fresh ``TRITON_CACHE_DIR``).

Adding a kernel: give its launcher a ``*_launch_spec`` function returning
``(kernel, grid, args, kwargs)``, launch through :func:`heal_kernels.triton._launch.launch`, and
yield its specialisations from a ``_<family>_variants()`` generator listed in :func:`variants`
(name prefix = the family, e.g. ``linear_fwd``); the launch-recording test then checks it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from heal_kernels.triton.shapes import (  # noqa: F401 - the benchmark shapes, re-exported
    BENCH_VOCAB,
    EDA_BATCH,
    EDA_GENERAL_FRACTION,
    EDA_MAX_LEN,
    EDA_MIN_LEN,
    SLICED_VOCAB,
    SMALL_VOCABS,
    UNALIGNED_VOCAB,
    make_batch,
)

ARCHS = (80, 90, 100)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Variant:
    """One launched specialisation of a kernel."""

    name: str
    kernel: object  # the triton JITFunction
    args: tuple  # positional arguments as the launcher passes them
    kwargs: dict  # constexprs, num_warps, num_stages, enable_fp_fusion
    elements_per_thread_per_iteration: float  # elements (or aligned pair positions) per thread per hot-loop trip
    family: str = ""  # entropy_fwd / entropy_bwd / pairwise
    archs: tuple = ARCHS  # the SM versions whose launches use this variant
    bytes_per_element: float = 0.0  # HBM bytes per element (entropy; 0 for pairwise)
    meta: dict = field(default_factory=dict)

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))


def kernel_key(kernel, args, kwargs) -> tuple:
    """What identifies a specialisation independently of sizes: the kernel's name, the dtypes of its
    tensor arguments and its constexpr flags (block sizes and launch options excluded)."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    types = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
    flags = tuple(
        sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool) and k not in ("enable_fp_fusion",))
    )
    return name, types, flags


def _threads(kwargs) -> int:
    return 32 * int(kwargs.get("num_warps", 4))


def _row_variant(name, family, kernel, args, kwargs, bytes_per_element, meta) -> Variant:
    """A kernel that walks rows in ``BLOCK``-element trips (entropy, linear, packing)."""
    return Variant(name=f"{name}_B{kwargs['BLOCK']}_w{kwargs['num_warps']}", kernel=kernel, args=args, kwargs=kwargs,
                   elements_per_thread_per_iteration=kwargs["BLOCK"] / _threads(kwargs), family=family,
                   bytes_per_element=bytes_per_element, meta=meta)


def _entropy_variants() -> Iterator[Variant]:
    from heal_kernels.triton import entropy as ent

    rows = 4
    temperature = 0.7
    for vocab in (BENCH_VOCAB,) + SMALL_VOCABS:
        dtypes = (torch.bfloat16, torch.float16, torch.float32) if vocab == BENCH_VOCAB else (torch.bfloat16,)
        for dtype in dtypes:
            logits = torch.empty(rows, vocab, dtype=dtype)
            labels = torch.zeros(rows, dtype=torch.int64)
            entropy = torch.empty(rows)
            stats = torch.empty(rows, 3)
            es = logits.element_size()
            lab_opts = (True, False) if vocab == BENCH_VOCAB else (True,)
            for with_labels in lab_opts:
                logprob = torch.empty(rows if with_labels else 0)
                kernel, _, args, kwargs = ent.forward_launch_spec(
                    logits, labels if with_labels else None, entropy, logprob, stats, temperature, interpreted=False
                )
                tag = "labels" if with_labels else "nolabels"
                yield _row_variant(f"entropy_fwd_{_DTYPE_NAMES[dtype]}_{tag}_V{vocab}", "entropy_fwd", kernel, args,
                                   kwargs, float(es), dict(vocab=vocab, dtype=_DTYPE_NAMES[dtype]))
            grad = torch.empty(rows, vocab, dtype=dtype)
            g = torch.empty(rows)
            # autograd materialises a zero g_entropy when only the log-probs are used, so the ops
            # launch (gH, gLP) with labels and (gH) without; a gLP-only launch never happens
            flag_sets = ((True, True), (True, False)) if vocab == BENCH_VOCAB else ((True, True),)
            for has_gh, has_glp in flag_sets:
                kernel, _, args, kwargs = ent.backward_launch_spec(
                    logits, labels, entropy, stats, g if has_gh else None, g if has_glp else None, grad,
                    temperature, interpreted=False,
                )
                tag = "gH_gLP" if has_glp else "gH"
                yield _row_variant(f"entropy_bwd_{_DTYPE_NAMES[dtype]}_{tag}_V{vocab}", "entropy_bwd", kernel, args,
                                   kwargs, 2.0 * es, dict(vocab=vocab, dtype=_DTYPE_NAMES[dtype]))
    # rows that do not start on 16-byte boundaries (bf16): contiguous rows of an odd vocabulary, and
    # a vocabulary slice of a wider tensor; the gradient allocated as the op allocates it
    wide, sliced = SLICED_VOCAB
    for name, logits in ((f"V{UNALIGNED_VOCAB}", torch.empty(rows, UNALIGNED_VOCAB, dtype=torch.bfloat16)),
                         (f"V{sliced}_of{wide}", torch.empty(rows, wide, dtype=torch.bfloat16)[:, :sliced])):
        labels = torch.zeros(rows, dtype=torch.int64)
        entropy, stats, g = torch.empty(rows), torch.empty(rows, 3), torch.empty(rows)
        meta = dict(vocab=logits.shape[1], dtype="bf16")
        kernel, _, args, kwargs = ent.forward_launch_spec(logits, labels, entropy, torch.empty(rows), stats,
                                                          temperature, interpreted=False)
        yield _row_variant(f"entropy_fwd_bf16_labels_{name}", "entropy_fwd", kernel, args, kwargs, 2.0, meta)
        kernel, _, args, kwargs = ent.backward_launch_spec(logits, labels, entropy, stats, g, g,
                                                           ent.gradient_buffer(logits), temperature, interpreted=False)
        yield _row_variant(f"entropy_bwd_bf16_gH_gLP_{name}", "entropy_bwd", kernel, args, kwargs, 4.0, meta)


def _linear_variants() -> Iterator[Variant]:
    """The fused linear op's two block kernels on its CUDA logits blocks (``chunk_tokens x
    chunk_vocab`` = 8192 x 8192, contiguous rows; the last vocabulary block of 151936 is 4480 wide,
    the same specialisation)."""
    from heal_kernels.ops.linear import default_chunks
    from heal_kernels.triton import linear as lin

    rows = 4
    _, cols = default_chunks(torch.device("cuda"))
    temperature = 0.7
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        z = torch.empty(rows, cols, dtype=dtype)
        es = z.element_size()
        labels = torch.zeros(rows, dtype=torch.int64)
        state = torch.empty(rows, 4)
        for with_labels in (True, False):
            tag = "labels" if with_labels else "nolabels"
            lab = labels if with_labels else None
            for family, spec, bpe in (("linear_fwd", lin.stats_launch_spec, float(es)),
                                      ("linear_bwd", lin.grad_launch_spec, 2.0 * es)):  # bwd rewrites z
                kernel, _, args, kwargs = spec(z, lab, state, temperature, interpreted=False)
                yield _row_variant(f"{family}_{_DTYPE_NAMES[dtype]}_{tag}_C{cols}", family, kernel, args, kwargs, bpe,
                                   dict(vocab=cols, dtype=_DTYPE_NAMES[dtype]))
    # an unaligned block width: the last vocabulary block of GPT-2's 50257 (bf16), rows at every offset
    last = UNALIGNED_VOCAB % cols
    z = torch.empty(rows, last, dtype=torch.bfloat16)
    labels = torch.zeros(rows, dtype=torch.int64)
    state = torch.empty(rows, 4)
    for family, spec, bpe in (("linear_fwd", lin.stats_launch_spec, 2.0), ("linear_bwd", lin.grad_launch_spec, 4.0)):
        kernel, _, args, kwargs = spec(z, labels, state, temperature, interpreted=False)
        yield _row_variant(f"{family}_bf16_labels_C{last}", family, kernel, args, kwargs, bpe,
                           dict(vocab=last, dtype="bf16"))


def eda_batch(seed: int = 0):
    """The EDA benchmark's batch (``heal bench eda`` defaults): packed float32 values, int32
    ``cu_seqlens``, int64 groups, lengths."""
    values, cu, groups, lens = make_batch(EDA_BATCH, EDA_MIN_LEN, EDA_MAX_LEN, EDA_GENERAL_FRACTION, seed, "cpu")
    return values, cu, groups, lens


def _pairwise_variants(tri=None) -> Iterator[Variant]:
    """The pair kernels' variants; ``tri``: the module holding the kernels and their launch specs
    (default :mod:`heal_kernels.triton.pairwise`; the gate's mutation tests pass a modified copy)."""
    if tri is None:
        from heal_kernels.triton import pairwise as tri

    values, cu, groups, lens = eda_batch()
    cu64 = cu.to(torch.int64)
    pids = torch.arange(EDA_BATCH, dtype=torch.int64) // 8
    cuda = torch.device("cuda")
    kernel, _, args, kwargs, packed = tri.pack_launch_spec(values, cu64, interpreted=False)
    # bytes per element: x read twice (4 + 4), the (x, e) pair written (8), the two float64 prefixes (16)
    yield _row_variant("pairwise_pack_fp32", "pairwise_pack", kernel, args, kwargs, 32.0, dict(lengths=lens.tolist()))
    # one set of variants per tile configuration, each for the archs that launch it
    configs = {}
    for arch in ARCHS:
        configs.setdefault(tuple(sorted(tri.tiles_for_arch(arch).items())), []).append(arch)
    for archs in configs.values():
        arch = archs[0]
        for short_first in (False, True):
            direction = "short_first" if short_first else "scored_first"
            kernel, _, args, kwargs, _ = tri.launch_spec(packed, short_first, True, device=cuda, arch=arch)
            yield _pairwise_variant(f"pairwise_full_fp32_{direction}", kernel, args, kwargs, "full", lens, archs, tri)
            for exclude_self in (True, False):
                for with_pids in (False, True):
                    kernel, _, args, kwargs, _ = tri.launch_spec(
                        packed, short_first, False, groups, 2, exclude_self, pids if with_pids else None, device=cuda,
                        arch=arch,
                    )
                    tag = ("exself" if exclude_self else "inself") + ("_pid" if with_pids else "")
                    yield _pairwise_variant(f"pairwise_grouped_fp32_{direction}_{tag}", kernel, args, kwargs,
                                            "grouped", lens, archs, tri)
        # batches of 2^22 values or more keep the index rule's min(., m - 1) (the EDA default path)
        saved = tri.CLAMP_FREE_TOTAL
        tri.CLAMP_FREE_TOTAL = 0
        try:
            kernel, _, args, kwargs, _ = tri.launch_spec(packed, False, False, groups, 2, True, None, device=cuda,
                                                         arch=arch)
        finally:
            tri.CLAMP_FREE_TOTAL = saved
        yield _pairwise_variant("pairwise_grouped_fp32_scored_first_exself_clamp", kernel, args, kwargs, "grouped",
                                lens, archs, tri)


def _pairwise_variant(name, kernel, args, kwargs, mode, lens, archs, tri) -> Variant:
    per_iter = tri.positions_per_iteration(kwargs)
    return Variant(
        name=f"{name}_J{kwargs['BLOCK_J']}_T{kwargs['BLOCK_T']}_w{kwargs['num_warps']}",
        kernel=kernel,
        args=args,
        kwargs=kwargs,
        elements_per_thread_per_iteration=per_iter / _threads(kwargs),
        family="pairwise",
        archs=tuple(archs),
        meta=dict(mode=mode, lengths=lens.tolist(), segments_per_thread_per_trip=tri.segments_per_iteration(kwargs)
                  / _threads(kwargs)),
    )


def pairwise_section_variants(v: Variant) -> Dict[int, Variant]:
    """Builds of the pair kernel variant ``v`` with only some of its sections compiled (``SECTIONS``
    bit mask: 1 direct, 2 run-length; 0 none), for the static model: each
    section's share of the per-tile code (setup, lane sums) is its build's tile-loop code less the
    build without loops. Not launched (the launchers always pass every section)."""
    out = {}
    for sections in (0, 1, 2):
        kw = dict(v.kwargs, SECTIONS=sections)
        out[sections] = Variant(name=f"{v.name}_sections{sections}", kernel=v.kernel, args=v.args, kwargs=kw,
                                elements_per_thread_per_iteration=v.elements_per_thread_per_iteration, family=v.family,
                                archs=v.archs, meta=dict(v.meta))
    return out


def variants() -> List[Variant]:
    """Every kernel specialisation the launchers can use, at the benchmark shapes."""
    return list(_entropy_variants()) + list(_linear_variants()) + list(_pairwise_variants())


# ---------------------------------------------------------------------------------------------
# compiling and reading the cubin
# ---------------------------------------------------------------------------------------------


def _bin(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})")
    return str(path)


def compile_variant(v: Variant, arch: int):
    """Compile ``v`` for ``sm_<arch>`` through Triton's own binder (the launch's specialisation)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = v.kernel
    if not hasattr(fn, "params"):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1); compile in a process without it")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*v.args, **v.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(v.kwargs), bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(sass: str):
    """``[(address, predicate, opcode, operands)]`` of the SASS listing (one function)."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return out


def _loops(instrs):
    """``(target, branch_address)`` of every backward branch."""
    loops = []
    for addr, _pred, op, operands in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) < addr:  # not the `BRA .` trap after EXIT
                loops.append((int(m.group(1), 16), addr))
    return loops


def _body(instrs, lp):
    return [i for i in instrs if lp[0] <= i[0] <= lp[1] and i[2] != "NOP"]


def loop_structure(instrs) -> Dict:
    """The loops of a kernel's SASS: ``hot`` (among the innermost loops, i.e. backward branches whose
    body from target to branch holds no other backward branch, those without predicated global loads
    -- a kernel's unmasked main loop rather than its masked tail -- the longest), ``tail`` (the
    longest other innermost loop, e.g. a masked remainder loop) and ``outer_overhead`` (instructions
    of the smallest loop enclosing the hot loop that lie outside its inner loops: per-tile work)."""
    loops = _loops(instrs)
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    if not inner:
        return {}

    def masked(lp):
        return any(i[1] and i[2].startswith("LDG") for i in _body(instrs, lp))

    unmasked = [lp for lp in inner if not masked(lp)]
    hot = max(unmasked or inner, key=lambda lp: lp[1] - lp[0])
    others = [lp for lp in inner if lp != hot]
    out = {"hot": (hot, _body(instrs, hot))}
    if others:
        tail = max(others, key=lambda lp: lp[1] - lp[0])
        out["tail"] = (tail, _body(instrs, tail))
    outer = [lp for lp in loops if lp != hot and lp[0] <= hot[0] and hot[1] <= lp[1]]
    if outer:
        enc = min(outer, key=lambda lp: lp[1] - lp[0])
        nested = [lp for lp in loops if lp != enc and enc[0] <= lp[0] and lp[1] <= enc[1]]
        rest = [i for i in _body(instrs, enc) if not any(lp[0] <= i[0] <= lp[1] for lp in nested)]
        out["outer_overhead"] = len(rest)
    return out


def hot_loop(instrs):
    """``(start, end, body)`` of the hot loop (see :func:`loop_structure`), ``None`` without loops."""
    hot = loop_structure(instrs).get("hot")
    if hot is None:
        return None
    (start, end), body = hot
    return start, end, body


def _classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK"):
        return "fp32"
    if base == "MUFU":
        return "mufu"
    if base in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDGSTS", "ATOM", "RED"):
        return "memory"
    if base in ("F2F", "F2FP", "PRMT", "I2F", "F2I", "I2FP", "F2IP"):
        return "convert"
    if base in ("BRA", "BAR", "EXIT", "BSYNC", "BSSY", "WARPSYNC", "SHFL", "VOTE", "S2R", "S2UR", "CS2R"):
        return "control"
    return "int"


def pipe_class(op: str) -> str:
    """The execution pipe of a SASS opcode, for the static model's pessimistic bound: ``fp32`` (FADD,
    FMUL, FFMA), ``fp64`` (DADD, DMUL, DFMA, DSETP), ``xu`` (MUFU and type conversions: the
    transcendental / conversion unit), ``lsu`` (loads, stores), ``shfl``, ``control`` (branches,
    barriers, special registers), ``alu`` (integer, logic, compares, selects, moves, address
    arithmetic: everything else)."""
    base = op.split(".")[0]
    if base in ("FADD", "FMUL", "FFMA"):
        return "fp32"
    if base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX"):
        return "fp64"
    if base == "MUFU" or base in ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"):
        return "xu"
    if base in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDGSTS", "ATOM", "RED", "LDC"):
        return "lsu"
    if base == "SHFL":
        return "shfl"
    if base in ("BRA", "BAR", "EXIT", "BSYNC", "BSSY", "WARPSYNC", "VOTE", "S2R", "S2UR", "CS2R", "CALL", "RET"):
        return "control"
    return "alu"


PAIRWISE_FORMS = ("direct", "rl")  # the pair kernel's forms, in source (= address) order
FOLD_TRIPS = {"direct": "KD", "rl": "KR"}  # each form's launch keyword: trips per float32 partial sum
PAIRWISE_LOOPS = tuple(f"{form}_{kind}" for form in PAIRWISE_FORMS for kind in ("main", "single", "tail"))


def _mix(body) -> Dict[str, int]:
    mix: Dict[str, int] = {}
    for i in body:
        c = pipe_class(i[2])
        mix[c] = mix.get(c, 0) + 1
    return mix


def pairwise_loops(instrs) -> Dict:
    """The pair kernel's innermost loops, three per form (:data:`PAIRWISE_LOOPS`; forms in source =
    address order: direct, run-length): the unrolled unmasked loop (``main``,
    KD or KR trips per iteration), the single unmasked trips (``single``) and the masked trips
    (``tail``), and the instructions of the column-tile loop outside them (``tile_code``, every form's
    setup and sums included). Each loop: ``instructions`` (its body, label to backward branch),
    ``mix`` (per :func:`pipe_class`), ``load_bytes`` (its global loads' bytes per thread) and
    ``wide_loads`` (its 16-byte global loads), and for ``main`` and ``tail`` the source trips one
    body runs (``trips``: its loads over one trip's); LLVM may unroll a ``single`` loop, which then
    reads as an unrolled loop and its remainder: ``unrolled`` (instructions of the unrolled body)
    and ``factor`` are added. Checks the reading (run-length loops shuffle, direct ones do not; the
    last loop of a form is the only masked one); only ``tile_code`` when the SASS does not have
    this shape."""
    loops = _loops(instrs)
    if not loops:
        return {}
    tile = max(loops, key=lambda lp: lp[1] - lp[0])  # the column-tile loop encloses the others
    nested = [lp for lp in loops if lp != tile and tile[0] <= lp[0] and lp[1] <= tile[1]]
    out: Dict = {"tile_code": sum(1 for i in _body(instrs, tile) if not any(lp[0] <= i[0] <= lp[1] for lp in nested))}
    inner = sorted(lp for lp in nested if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in nested))
    seq = []
    for lp in inner:
        body = _body(instrs, lp)
        seq.append(dict(instructions=len(body), mix=_mix(body),
                        masked=any(i[1] and i[2].startswith("LDG") for i in body),
                        load_bytes=sum(_sass_access_bytes(i[2]) for i in body if i[2].split(".")[0] == "LDG"),
                        wide_loads=sum(1 for i in body
                                       if i[2].split(".")[0] == "LDG" and _sass_access_bytes(i[2]) == 16)))
    # split into forms: each form's loops end with its (only) masked loop
    forms, cur = [], []
    for lp in seq:
        cur.append(lp)
        if lp["masked"]:
            forms.append(cur)
            cur = []
    if cur or len(forms) != len(PAIRWISE_FORMS):
        return out
    loops_out = {}
    for form, group in zip(PAIRWISE_FORMS, forms):
        if any((lp["mix"].get("shfl", 0) > 0) != form.startswith("rl") for lp in group) or len(group) not in (3, 4):
            return out
        single = dict(group[-2])
        per_trip = single["load_bytes"]  # one trip's loads: the single loop's body (its remainder, if unrolled)
        if len(group) == 4:  # runtime unrolling: the unrolled body, then the remainder
            single["unrolled"] = group[1]["instructions"]
            single["factor"] = (round(group[1]["load_bytes"] / per_trip) if per_trip else
                                max(1, round(group[1]["instructions"] / max(1, group[2]["instructions"]))))
        main = dict(group[0])
        # trips per main body: its loads against one trip's (KD / KR unless ptxas unrolled it further)
        main["trips"] = round(main["load_bytes"] / per_trip) if per_trip else None
        # the masked loop may be unrolled too (its loads are predicated copies of one trip's)
        tail = dict(group[-1])
        tail["trips"] = max(1, round(tail["load_bytes"] / per_trip)) if per_trip else 1
        for kind, lp in (("main", main), ("single", single), ("tail", tail)):
            loops_out[f"{form}_{kind}"] = {k: v for k, v in lp.items() if k != "masked"}
    out.update(loops_out)
    return out


# ---------------------------------------------------------------------------------------------
# exactness: the pair kernels' divisions and the stretched index, read from the PTX (and SASS)
# ---------------------------------------------------------------------------------------------

# PTX ISA 8.x grammar of the forms the rules read (``{}`` optional):
#   div.approx{.ftz}.f32, div.full{.ftz}.f32, div.rnd{.ftz}.f32, div.rnd.f64   (.rnd: .rn .rz .rm .rp)
#   rcp.approx{.ftz}.f32, rcp.rnd{.ftz}.f32, rcp.rnd.f64, rcp.approx.ftz.f64
#   cvt.irnd{.ftz}{.sat}.dtype.atype  (float -> integer: .irnd .rni .rzi .rmi .rpi required)
#   mul{.rnd}{.ftz}{.sat}.f32, fma.rnd{.ftz}{.sat}.f32
# Integer division (div.s32, div.u64, ...) names an integer type and is not a float division.
FLOAT_DIVISION = re.compile(r"^div(?:\.[a-z0-9]+)*\.f(?:16|32|64)(?:x2)?$")  # any floating-point division
EXACT_DIVISION = re.compile(r"^div\.rn\.f(?:32|64)$")  # the one accepted: IEEE round-to-nearest, no .ftz
RECIPROCAL = re.compile(r"^rcp(?:\.[a-z0-9]+)*$")  # any reciprocal (approx, rounded, .ftz, f32 / f64): refused
FLOAT_TO_INT = re.compile(r"^cvt(?:\.[a-z0-9]+)*\.[su](?:8|16|32|64)\.f(?:16|32|64)$")  # every float -> int conversion
STRETCHED_TRUNC = "cvt.rzi.s32.f32"  # the index rule's truncation (int32 toward zero = floor: t * scale >= 0)
PLAIN_PRODUCT = re.compile(r"^mul(?:\.rn)?\.f32$")  # one rounding, no .ftz / .sat; not an fma
SASS_PLAIN_PRODUCT = "FMUL"  # no .FTZ / .SAT / rounding modifier; not FFMA
# float -> signed integer in the SASS (F2I.TRUNC.NTZ, F2I.S64.TRUNC, ...); not ptxas' integer division
# idiom (I2F.RP, MUFU.RCP, F2I.FTZ.U32.TRUNC.NTZ), which is no float index
SASS_INDEX_TRUNC = re.compile(r"^F2I(?!.*\.(?:FTZ|U8|U16|U32|U64)\b)(?:\.[A-Z0-9]+)*$")
_PTX_REG = re.compile(r"%[A-Za-z_][\w]*")


def _ptx_statements(ptx: str):
    """The PTX in order: ``("label", name)`` for each label and ``("instr", opcode, operands, guarded)``
    for each instruction (comments, directives and braces dropped; ``guarded``: it had a guard
    predicate ``@%p`` / ``@!%p``, which is dropped). One instruction per ``;``."""
    for line in ptx.splitlines():
        line = line.split("//", 1)[0]
        if ";" not in line:
            m = re.match(r"^\s*([$\w.]+):\s*$", line)
            if m:
                yield ("label", m.group(1))
            continue  # directives (.loc, .reg, ...), braces
        for stmt in line.split(";")[:-1]:
            for lab in re.findall(r"^(?:\s*[{}]|\s*([$\w]+):)", stmt):
                if lab:
                    yield ("label", lab)
            stmt = re.sub(r"^(?:\s*[{}]|\s*[$\w]+:)+", "", stmt).strip()
            guarded = bool(re.match(r"^@!?%\w+\s+", stmt))
            stmt = re.sub(r"^@!?%\w+\s+", "", stmt)
            if not stmt or stmt.startswith("."):
                continue
            m = re.match(r"([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)\s*(.*)$", stmt, re.S)
            if not m:
                continue
            operands, depth, cur = [], 0, ""
            for ch in m.group(2):
                if ch in "{[(":
                    depth += 1
                elif ch in "}])":
                    depth -= 1
                if ch == "," and depth == 0:
                    operands.append(cur.strip())
                    cur = ""
                else:
                    cur += ch
            if cur.strip():
                operands.append(cur.strip())
            yield ("instr", m.group(1), operands, guarded)


def parse_ptx(ptx: str):
    """``[(opcode, [operands])]`` of the PTX's instructions in order (comments, directives, labels and
    braces dropped; a guard predicate ``@%p`` / ``@!%p`` dropped). One instruction per ``;``."""
    return [(st[1], st[2]) for st in _ptx_statements(ptx) if st[0] == "instr"]


def division_forms(ptx_instrs) -> Dict[str, int]:
    """``{opcode: count}`` of the floating-point divisions and reciprocals in the PTX."""
    forms: Dict[str, int] = {}
    for op, _ in ptx_instrs:
        if FLOAT_DIVISION.match(op) or RECIPROCAL.match(op):
            forms[op] = forms.get(op, 0) + 1
    return forms


def inexact_division(forms: Dict[str, int]) -> Dict[str, int]:
    """The forms of :func:`division_forms` the exactness rule refuses: every floating-point division
    other than ``div.rn.f32`` / ``div.rn.f64`` (approx, full, rz / rm / rp, any ``.ftz``) and every
    reciprocal."""
    return {op: n for op, n in forms.items() if RECIPROCAL.match(op) or not EXACT_DIVISION.match(op)}


def _ptx_dataflow(ptx_instrs):
    """``defs``, ``uses``: register -> ``[(opcode, operands)]`` (the first operand is the destination
    unless it is an address ``[...]``, as in ``st``)."""
    defs: Dict[str, list] = {}
    uses: Dict[str, list] = {}
    for ins in ptx_instrs:
        op, operands = ins
        if not operands:
            continue
        first_is_dest = not operands[0].startswith("[") and not op.startswith(("bra", "call", "ret", "bar"))
        if first_is_dest:
            for r in _PTX_REG.findall(operands[0]):
                defs.setdefault(r, []).append(ins)
        for o in operands[1:] if first_is_dest else operands:
            for r in _PTX_REG.findall(o):
                uses.setdefault(r, []).append(ins)
    return defs, uses


def _sass_regs(operand: str):
    return re.findall(r"\bU?R(?:\d+|Z)\b", operand)


def stretched_index(ptx_instrs, sass_instrs) -> Dict:
    """The pair kernel's float-to-integer conversions (its only one is the float32 index rule's
    ``src = trunc(f32(t) * scale)``, ``scale = fl32(m / n)``), checked so that FP contraction cannot
    change the index: in the PTX each is ``cvt.rzi.s32.f32`` of a register written only by a plain
    ``mul.f32`` / ``mul.rn.f32`` (not ``fma``, no ``.ftz``) whose factor is a ``div.rn.f32`` result
    (through ``mov``) and whose product feeds nothing but such truncations (ptxas fuses a ``mul.f32``
    only into an add that uses it); in the SASS each signed ``F2I`` (:data:`SASS_INDEX_TRUNC`)
    converts the result of an ``FMUL`` (the nearest earlier instruction writing its source register;
    not ``FFMA``). ``{ptx_truncations,
    sass_truncations, problems}`` (``problems``: one line per kind, with its count and first instance)."""
    defs, uses = _ptx_dataflow(ptx_instrs)
    found: Dict[str, list] = {}  # kind of problem -> instances

    def problem(kind, where):
        found.setdefault(kind, []).append(where)

    def from_div(reg, depth=0):
        for op, operands in defs.get(reg, []):
            if EXACT_DIVISION.match(op) and op.endswith(".f32"):
                return True
            if op.startswith("mov") and depth < 8 and len(operands) > 1:
                if any(from_div(r, depth + 1) for r in _PTX_REG.findall(operands[1])):
                    return True
        return False

    n_ptx = 0
    for op, operands in ptx_instrs:
        if not FLOAT_TO_INT.match(op):
            continue
        n_ptx += 1
        if op != STRETCHED_TRUNC:
            problem(f"PTX {op} (the index rule truncates with {STRETCHED_TRUNC})", ", ".join(operands))
        srcs = _PTX_REG.findall(operands[1]) if len(operands) > 1 else []
        for src in srcs:
            writers = defs.get(src, [])
            if not writers:
                problem(f"PTX {op} of a register no instruction writes", src)
            for wop, wargs in writers:
                if not PLAIN_PRODUCT.match(wop):
                    problem(f"PTX {op} of a {wop} result (the index must be a plain product, one rounding)",
                            f"{wop} {', '.join(wargs)}")
                elif not any(from_div(r) for a in wargs[1:] for r in _PTX_REG.findall(a)):
                    problem(f"PTX {op} of a {wop} with no div.rn.f32 factor (the scale must be fl32(m / n))",
                            f"{wop} {', '.join(wargs)}")
            for uop, _ in uses.get(src, []):
                if not FLOAT_TO_INT.match(uop):
                    problem(f"PTX product also feeds {uop} (ptxas may contract it into an FFMA)", src)
    n_sass = 0
    for k, (addr, _pred, op, operands) in enumerate(sass_instrs):
        if not SASS_INDEX_TRUNC.match(op):
            continue
        n_sass += 1
        regs = [_sass_regs(o) for o in operands.split(",")]
        src = regs[1][0] if len(regs) > 1 and regs[1] else None
        writer = None
        for b in range(k - 1, -1, -1):
            first = sass_instrs[b][3].split(",")[0]
            if src is not None and _sass_regs(first) == [src]:
                writer = sass_instrs[b]
                break
        if writer is None:
            problem(f"SASS {op} of a register no earlier instruction writes", f"{addr:#x}")
        elif writer[2] != SASS_PLAIN_PRODUCT:
            problem(f"SASS {op} of a {writer[2]} result (the index must be a plain {SASS_PLAIN_PRODUCT})",
                    f"{addr:#x} <- {writer[0]:#x} {writer[2]} {writer[3]}")
    problems = [f"{kind}: {len(where)}x, first {where[0]}" for kind, where in found.items()]
    return dict(ptx_truncations=n_ptx, sass_truncations=n_sass, problems=problems)


# ---------------------------------------------------------------------------------------------
# unrolling: how many trips of the source loop one SASS loop body runs
# ---------------------------------------------------------------------------------------------

_PTX_TYPE_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}
_SASS_ADD = ("IADD3", "UIADD3", "VIADD", "UIADD", "IADD", "IADD32I")


def _ptx_access_bytes(op: str) -> int:
    """Bytes one thread moves with a PTX ``ld`` / ``st``: ``ld.global.v2.b32`` 8, ``st.global.b16`` 2."""
    parts = op.split(".")
    vec = next((int(p[1:]) for p in parts if p in ("v2", "v4", "v8")), 1)
    m = re.fullmatch(r"[bsuf]f?(8|16|32|64|128)", parts[-1])
    return vec * (_PTX_TYPE_BYTES[m.group(1)] if m else 4)


def _sass_access_bytes(op: str) -> int:
    """Bytes one thread moves with a SASS ``LDG`` / ``STG``: ``.128`` 16, ``.64`` 8, ``.U16`` / ``.S16`` 2,
    ``.U8`` / ``.S8`` 1, else 4."""
    parts = op.split(".")
    for mod, n in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in parts:
            return n
    return 4


def _imm(text: str) -> Optional[int]:
    text = text.strip()
    if re.fullmatch(r"-?0x[0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return None


def _sass_steps(body) -> List[int]:
    """Immediates added in place to a register in a SASS loop body (``IADD3 R16, P3, R16, 0x400, RZ``,
    ``UIADD3 UR4, UP0, UR4, 0x200, URZ``): the loop-carried increments (induction variables, pointers)."""
    steps = set()
    for _addr, _pred, op, operands in body:
        parts = op.split(".")
        if parts[0] not in _SASS_ADD or "X" in parts[1:]:
            continue  # .X: the high word's carry
        ops = [o.strip() for o in operands.split(",")]
        srcs = [o for o in ops[1:] if not re.fullmatch(r"!?U?P(?:\d+|T)", o)]  # drop carry predicates
        if ops and ops[0] in srcs:
            steps.update(x for x in (_imm(o) for o in srcs) if x)
    return sorted(steps)


def _ptx_steps(body) -> List[int]:
    """Immediates added in place to an integer register in a PTX loop body (``add.s64 %rd39, %rd39, 128``)."""
    steps = set()
    for st in body:
        op, operands = st[1], st[2]
        if re.fullmatch(r"add\.[su](?:32|64)", op) and len(operands) == 3 and operands[0] == operands[1]:
            x = _imm(operands[2])
            if x:
                steps.add(x)
    return sorted(steps)


def ptx_loops(ptx: str) -> List[Dict]:
    """The PTX's loops, one per branch back to an earlier label: ``span`` (statement indices of the
    label and the branch), ``body`` (its ``("instr", ...)`` statements, nested loops included),
    ``masked`` (a guarded ``ld.global`` in it)."""
    stmts = list(_ptx_statements(ptx))
    labels: Dict[str, int] = {}
    out = []
    for i, st in enumerate(stmts):
        if st[0] == "label":
            labels[st[1]] = i
        elif st[1].split(".")[0] == "bra" and st[2] and st[2][-1] in labels:
            body = [x for x in stmts[labels[st[2][-1]]:i + 1] if x[0] == "instr"]
            out.append(dict(span=(labels[st[2][-1]], i), body=body,
                            masked=any(x[3] and x[1].startswith("ld.global") for x in body)))
    return out


def ptx_hot_loop(ptx: str) -> Optional[Dict]:
    """The PTX loop the SASS hot loop (:func:`loop_structure`) comes from, chosen by the same rule:
    among the innermost loops, those without guarded global loads, the longest."""
    loops = ptx_loops(ptx)
    inner = [lp for lp in loops if not any(o is not lp and lp["span"][0] <= o["span"][0] and o["span"][1] <= lp["span"][1]
                                           for o in loops)]
    if not inner:
        return None
    unmasked = [lp for lp in inner if not lp["masked"]]
    return max(unmasked or inner, key=lambda lp: len(lp["body"]))


def unroll_factor(sass_body, ptx_body) -> Dict:
    """How many trips of its source loop one SASS loop body runs (ptxas unrolls loops: the PTX loop is
    one trip of the source loop). Read from the global memory traffic, which unrolling multiplies and
    nothing else changes: bytes per thread of the body's ``LDG`` / ``STG`` against the PTX loop's
    ``ld.global`` / ``st.global`` (bytes, not instructions, so that ptxas merging two copies' loads
    into a wider one reads the same). ``factor`` is that ratio when loads and stores agree on one
    integer >= 1, else ``None``. The induction variable cross-checks it: ``induction_confirms`` when
    an in-place increment of the SASS body is ``factor`` times one of the PTX loop's
    (``UIADD3 UR4, UR4, 0x200`` against ``add.s64 %rd39, %rd39, 128``: 4 trips of 128 columns)."""
    sl = sum(_sass_access_bytes(i[2]) for i in sass_body if i[2].split(".")[0] == "LDG")
    ss = sum(_sass_access_bytes(i[2]) for i in sass_body if i[2].split(".")[0] == "STG")
    pl = sum(_ptx_access_bytes(st[1]) for st in ptx_body if st[1].startswith("ld.global"))
    ps = sum(_ptx_access_bytes(st[1]) for st in ptx_body if st[1].startswith("st.global"))
    s_steps, p_steps = _sass_steps(sass_body), _ptx_steps(ptx_body)
    ratios = {(s / p if p else math.inf) for s, p in ((sl, pl), (ss, ps)) if p or s}  # traffic the PTX lacks: inf
    out: Dict = dict(factor=None, sass_load_bytes=sl, ptx_load_bytes=pl, sass_store_bytes=ss, ptx_store_bytes=ps,
                     sass_steps=s_steps, ptx_steps=p_steps, induction_confirms=False)
    if len(ratios) == 1:
        r = next(iter(ratios))
        if 1 <= r < math.inf and float(r).is_integer():
            out["factor"] = int(r)
    if out["factor"]:
        out["induction_confirms"] = any(s == out["factor"] * p for s in s_steps for p in p_steps)
    return out


def hot_loop_figures(body, ptx: Optional[str], elements_per_trip: float) -> Dict:
    """Figures of a hot loop's SASS ``body``: ``hot_loop_instructions``; ``hot_loop_trips``, the trips
    of the source loop one body runs (:func:`unroll_factor` against the PTX's hot loop, with the
    evidence in ``hot_loop_unroll``; 1 when ``ptx`` is ``None``); the elements one thread handles per
    trip (``elements_per_trip``, from the launch configuration) and per body; and
    ``instructions_per_element`` = instructions / elements per body. ``problem``: why the trips could
    not be read (then counted as 1)."""
    out: Dict = dict(hot_loop_instructions=len(body))
    trips = 1
    if ptx is not None:
        ptx_loop = ptx_hot_loop(ptx)
        unroll = unroll_factor(body, ptx_loop["body"] if ptx_loop else [])
        out["hot_loop_unroll"] = unroll
        if unroll["factor"] is None:
            out["problem"] = (f"hot loop: trips per SASS body not read (LDG / STG bytes {unroll['sass_load_bytes']} / "
                              f"{unroll['sass_store_bytes']} against the PTX loop's {unroll['ptx_load_bytes']} / "
                              f"{unroll['ptx_store_bytes']})")
        trips = unroll["factor"] or 1
    out["hot_loop_trips"] = trips
    out["elements_per_thread_per_iteration"] = elements_per_trip
    out["elements_per_thread_per_hot_loop_body"] = trips * elements_per_trip
    out["instructions_per_element"] = round(len(body) / (trips * elements_per_trip), 3)
    return out


# ---------------------------------------------------------------------------------------------
# occupancy
# ---------------------------------------------------------------------------------------------

SHARED_RESERVE = 1024  # bytes of shared memory CUDA reserves per block on sm_80 and later
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024, 100: 228 * 1024}  # bytes of shared memory an SM can give blocks
SHARED_GRANULE = 128  # bytes: shared memory is allocated to a block in 128-byte units


def shared_per_block(static: int, dynamic: int, arch: int) -> int:
    """Shared memory one block holds: its static shared memory (cuobjdump's ``SHARED``), Triton's
    dynamic shared memory (the kernel metadata's ``shared``, passed at launch) and CUDA's 1 KB
    per-block reserve, counted once. On sm_90 and later ptxas lays the reserve out at the start of
    the block's static window whenever the kernel uses shared memory, so ``SHARED`` already holds it
    (a kernel whose only shared memory is Triton's dynamic buffer reads ``SHARED:1024`` there, 0 on
    sm_80): it is added only where ``SHARED`` does not include it. Rounded up to 128 bytes."""
    static, dynamic = max(static, 0), max(dynamic, 0)
    reserve_in_static = arch >= 90 and static >= SHARED_RESERVE
    total = static + dynamic + (0 if reserve_in_static else SHARED_RESERVE)
    return -(-total // SHARED_GRANULE) * SHARED_GRANULE


def occupancy(regs: int, shared: int, num_warps: int, arch: int, dynamic_shared: int = 0) -> int:
    """Theoretical resident warps per SM: blocks per SM limited by registers (256-register allocation
    units per warp, 64K registers), by shared memory (:func:`shared_per_block` of the static
    ``shared`` and Triton's ``dynamic_shared`` against the SM's 164 KB on sm_80, 228 KB on
    sm_90 / sm_100) and by the 64-warp / 32-block limits."""
    max_warps = 64
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (65536 // regs_per_warp) // num_warps
    by_smem = SHARED_PER_SM.get(arch, SHARED_PER_SM[90]) // shared_per_block(shared, dynamic_shared, arch)
    blocks = max(0, min(32, max_warps // num_warps, by_regs, by_smem))
    return blocks * num_warps


def analyse(v: Variant, arch: int) -> Dict:
    """Compile ``v`` for ``sm_<arch>`` and read the cubin: a dict of figures and gate failures."""
    rec: Dict = dict(name=v.name, arch=f"sm_{arch}", family=v.family, num_warps=v.num_warps)
    t0 = time.perf_counter()
    try:
        k = compile_variant(v, arch)
    except Exception as exc:  # noqa: BLE001 - the gate reports every compile error
        rec["error"] = f"compile error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    regs, stack, shared, local = (int(x) for x in m.groups()) if m else (k.n_regs, -1, -1, -1)
    instrs = parse_sass(sass)
    ldl_stl = sum(1 for i in instrs if i[2].split(".")[0] in ("LDL", "STL"))
    structure = loop_structure(instrs)
    loop = hot_loop(instrs)
    rec.update(regs=regs, stack_bytes=stack, local_bytes=local, shared_bytes=shared, ldl_stl=ldl_stl,
               spill_bytes=max(stack, 0) + max(local, 0), sass_instructions=len(instrs))
    dynamic = int(getattr(k.metadata, "shared", 0) or 0)  # Triton's dynamic shared memory, passed at launch
    rec.update(dynamic_shared_bytes=dynamic, shared_per_block_bytes=shared_per_block(shared, dynamic, arch))
    rec["warps_per_sm"] = occupancy(regs, max(shared, 0), v.num_warps, arch, dynamic)
    unroll_problem = None
    if loop is not None:
        start, end, body = loop
        mix: Dict[str, int] = {}
        for i in body:
            c = _classify(i[2])
            mix[c] = mix.get(c, 0) + 1
        rec["hot_loop_mix"] = mix
        # the pair kernel's loops (ptxas unrolling included) are read by pairwise_loops below
        figs = hot_loop_figures(body, k.asm["ptx"] if v.family != "pairwise" else None,
                                v.elements_per_thread_per_iteration)
        unroll_problem = figs.pop("problem", None)
        rec.update(figs)
        if "tail" in structure:
            rec["tail_loop_instructions"] = len(structure["tail"][1])
        if "outer_overhead" in structure:
            rec["outer_loop_overhead_instructions"] = structure["outer_overhead"]
        rec["kwargs"] = {k: val for k, val in v.kwargs.items() if isinstance(val, (bool, int, float))}
    if v.family == "pairwise":
        pl = pairwise_loops(instrs)
        rec["tile_code_instructions"] = pl.get("tile_code")
        rec["pair_layout"] = pair_layout(k.asm["ttgir"], v.kwargs["BLOCK_T"], v.num_warps)
        if all(n in pl for n in PAIRWISE_LOOPS):
            kw = v.kwargs
            seg = v.meta["segments_per_thread_per_trip"]
            pos = v.elements_per_thread_per_iteration
            rec["loops"] = {n: pl[n] for n in PAIRWISE_LOOPS}
            # trips per main body, read from its loads (the source unrolls KD / KR; ptxas could add more)
            trips = {f: pl[f"{f}_main"].get("trips") or kw[FOLD_TRIPS[f]] for f in PAIRWISE_FORMS}
            for f, n in trips.items():
                if n != kw[FOLD_TRIPS[f]]:
                    unroll_problem = (f"pair kernel: the {f} main loop runs {n} trips per body, not "
                                      f"{FOLD_TRIPS[f]} (the model's groups assume it)")
            # per element of each main loop: aligned positions (direct) or short positions (run-length)
            rec["instructions_per_position_direct"] = round(pl["direct_main"]["instructions"] / (trips["direct"] * pos), 3)
            rec["instructions_per_segment_rl"] = round(pl["rl_main"]["instructions"] / (trips["rl"] * seg), 3)
            # the headline figure: the run-length loop (both directions), instructions per short position
            rec["hot_loop_instructions"] = pl["rl_main"]["instructions"]
            rec["hot_loop_mix"] = pl["rl_main"]["mix"]
            rec["hot_loop_trips"] = trips["rl"]
            rec["elements_per_thread_per_iteration"] = seg
            rec["elements_per_thread_per_hot_loop_body"] = trips["rl"] * seg
            rec["instructions_per_element"] = rec["instructions_per_segment_rl"]
        elif v.kwargs.get("SECTIONS", 3) == 3:
            loop = None  # the gate's "no hot loop": the kernel no longer has the loops the model reads
    ptx_instrs = parse_ptx(k.asm["ptx"])
    rec["division"] = division_forms(ptx_instrs)
    bad_div = inexact_division(rec["division"])
    rec["inexact_division"] = sum(bad_div.values())
    failures = []
    if rec["spill_bytes"] > 0 or ldl_stl:
        failures.append(f"spills: stack {stack} B, local {local} B, {ldl_stl} LDL/STL")
    if v.family.startswith("pairwise") and bad_div:
        failures.append("inexact division in the PTX: " + ", ".join(f"{n} {op}" for op, n in sorted(bad_div.items()))
                        + " (only div.rn.f32 / div.rn.f64, no rcp)")
    if v.family == "pairwise":
        idx = stretched_index(ptx_instrs, instrs)
        rec["stretched_index"] = idx
        failures.extend(f"stretched index: {p}" for p in idx["problems"])
        if v.kwargs.get("SECTIONS", 3) & 1 and not (idx["ptx_truncations"] and idx["sass_truncations"]):
            failures.append("stretched index: no float -> int truncation in the direct form's PTX / SASS")
    if loop is None:
        failures.append("no hot loop found in the SASS")
    elif unroll_problem:
        failures.append(unroll_problem)
    rec["failures"] = failures
    return rec


_BLOCKED = re.compile(r"#ttg\.blocked<\{sizePerThread = \[([0-9, ]+)\], threadsPerWarp = \[([0-9, ]+)\], "
                      r"warpsPerCTA = \[([0-9, ]+)\], order = \[([0-9, ]+)\]\}>")


def pair_layout(ttgir: str, block_t: int, num_warps: int) -> Optional[Dict[str, int]]:
    """How the pair kernel's ``[P, BLOCK_T]`` tiles sit on a warp, read from the TTGIR: the 2-D blocked
    layout with one element per thread, ``BLOCK_T`` lanes along the positions (fastest) and the warps
    along the pairs. ``{"pairs_per_warp": 32 // BLOCK_T, "lanes_per_pair": BLOCK_T}`` (a warp's lanes
    hold consecutive pairs), or ``None`` when the kernel has no such layout (the static model then
    shares no line between pairs)."""
    for m in _BLOCKED.finditer(ttgir):
        spt, tpw, wpc, order = ([int(x) for x in g.split(",")] for g in m.groups())
        if (len(tpw) == 2 and spt == [1, 1] and tpw[1] == block_t and tpw[0] * tpw[1] == 32
                and wpc == [num_warps, 1] and order == [1, 0]):
            return {"pairs_per_warp": tpw[0], "lanes_per_pair": tpw[1]}
    return None


def toolchain_problem(arch: Optional[int] = None) -> Optional[str]:
    """Why this machine cannot compile for CUDA, or ``None``: the installed Triton wheel must ship
    ``ptxas`` and ``cuobjdump`` (Linux x86-64 wheels do) and, with ``arch``, accept ``sm_<arch>``."""
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas", "cuobjdump"):
        if not (bindir / tool).exists():
            return f"the installed triton wheel ships no {tool} (not a Linux x86-64 wheel?)"
    if arch is not None and arch not in accepted_archs((arch,)):
        return f"this triton does not compile for sm_{arch}"
    return None


def accepted_archs(archs=ARCHS) -> List[int]:
    """The architectures the installed Triton compiles for (sm_100 needs a recent Triton)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    ok = []
    for arch in archs:
        try:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            backend.parse_options({"enable_fp_fusion": True})
        except Exception:  # noqa: BLE001
            continue
        ok.append(arch)
    return ok


def _work(job):
    idx, arch = job
    return analyse(variants_cached()[idx], arch)


_CACHE: List[Variant] = []


def variants_cached() -> List[Variant]:
    if not _CACHE:
        _CACHE.extend(variants())
    return _CACHE


def compile_all(archs=ARCHS, jobs: int = 1, only: Optional[str] = None, progress=True) -> List[Dict]:
    """:func:`analyse` every variant (whose name contains ``only``) for every accepted arch."""
    vs = variants_cached()
    archs = accepted_archs(archs)
    todo = [(i, a) for a in archs for i, v in enumerate(vs) if (only is None or only in v.name) and a in v.archs]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            it = pool.imap(_work, todo)
            return _collect(it, len(todo), progress)
    return _collect(map(_work, todo), len(todo), progress)


def _collect(it, total, progress):
    out = []
    for n, rec in enumerate(it, 1):
        out.append(rec)
        if progress:
            flag = "FAIL " + "; ".join(rec.get("failures", [])) if rec.get("failures") or rec.get("error") else "ok"
            if rec.get("error"):
                flag = "FAIL " + rec["error"]
            print(f"[{n}/{total}] {rec['arch']} {rec['name']}: regs {rec.get('regs')}, "
                  f"{rec.get('instructions_per_element')} instr/elem, {flag}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile every launched Triton variant for CUDA targets (no GPU needed)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default 80 90 100)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes (default 1)")
    parser.add_argument("--only", default=None, help="only variants whose name contains this")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    recs = compile_all(args.arch, args.jobs, args.only)
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    bad = [r for r in recs if r.get("error") or r.get("failures")]
    for r in bad:
        print(f"GATE FAILED {r['arch']} {r['name']}: {r.get('error') or '; '.join(r['failures'])}")
    print(f"{len(recs)} compiles, {len(bad)} failed, archs {sorted({r['arch'] for r in recs})}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
