"""Triton kernels: token entropy + label log-probabilities from logits, forward and backward.

Notation for one row ``z[0:V]`` of logits at temperature ``T``: ``c = max z`` (0 when every entry is
``-inf``), ``d = z - c`` (computed in logit units, so it is exact or nearly so whatever ``|z|``),
``k2 = log2(e) / T``. Then ``p = softmax(z / T) = 2^(d k2) / S`` with ``S = sum 2^(d k2)``.

* forward, one pass over the row, float32 accumulation: ``S`` and ``M = sum 2^(d k2) (d k2)``,
  ``entropy = log S - ln2 * M / S``, ``logprob = d[label] / T - log S``, and the per-row statistics
  ``(c, 0, log S)`` saved for the backward (the same statistics as the CPU paths:
  ``logsumexp(z / T) = c / T + 0 + log S``).
* backward, one read of the row and one write of the gradient, ``p = 2^(d k2 - log2 S)``::

      dz = p * (A d + B)  (+ g_lp / T at the label),   A = -g_H / T^2,   B = (g_H * mean - g_lp) / T

  with ``mean = sum p * d / T = log S - entropy``; ``A d + B`` is
  ``-(g_H (d / T - mean) + g_lp) / T`` regrouped so that one FMA per element does it.

Layout. One program per row, walking it in blocks of ``BLOCK`` columns viewed as ``[BLOCK / CHUNK,
CHUNK]``: ``CHUNK`` contiguous elements (16 bytes: 8 bf16/fp16, 4 fp32) per thread, one vector load.
The forward keeps running statistics per chunk lane, a max of the *raw* logits ``m`` and
``s = sum 2^((z - m) k2)``, ``t = sum 2^((z - m) k2) (z - m) k2``; each block takes the chunk's max
in registers and rescales ``s, t`` once per chunk (one ``exp2`` per chunk), then one ``exp2`` per
element. The lanes are merged once, after the loop. Any vocabulary size, row stride or slice:
the kernels take a 16-byte aligned base pointer and each row's offset from it
(:func:`aligned_base`), peel the elements before the row's first 16-byte boundary as one masked
block, run whole blocks from the boundary unmasked (16-byte loads and stores; the backward's
gradient is allocated at the logits' offset from a boundary, so contiguous logits of any ``V`` get
16-byte stores too), and mask only the partial last block. sm_90, bf16: 10.3 SASS instructions
per element forward and 9.1 backward for V = 151936, 50257 or a slice alike (a slice whose rows
sit at another offset than its gradient's: 9.5, scalar loads). ``exp2`` is one MUFU instruction
(``exp`` adds a multiply and fix-ups).

FP contraction: the launchers pass ``enable_fp_fusion=True`` explicitly (Triton's default differs
between versions). It only fuses the products the comments say it fuses (``a * b + c`` forms); the
subtraction ``z - c`` is never contracted (nothing multiplies into it), which keeps ``d`` exact.

Special values: ``-inf`` logits (masked vocabulary) have ``p = 0`` and add nothing (never
``0 * inf``); the running maximum starts at ``-inf``; a NaN anywhere in a row makes its outputs NaN
(``2^NaN`` poisons ``S``); so does ``+inf`` (``inf - inf``); a row of only ``-inf`` has ``S = 0`` and
NaN entropy. Labels outside ``[0, V)`` are never dereferenced: their log-prob is NaN (the Python
entry point can reject them, see ``check``), and the backward then adds nothing at the label.

Block sizes are fixed heuristics of ``V`` and the element size (:func:`launch_config`); under the
Triton interpreter (``TRITON_INTERPRET=1``) the block is capped at 1024 to keep it quick.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from heal_kernels.triton._launch import launch

__all__ = ["entropy_forward", "entropy_backward", "launch_config", "row_launch_options", "forward_launch_spec",
           "backward_launch_spec"]

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
FP_FUSION = True  # passed at every launch: fuse a * b + c into FMA where the comments say so


@triton.jit
def _fwd_block(z, m, s, t, k2):
    """Fold one block ``z[ROWS, CHUNK]`` (float32) into the per-chunk-lane ``(m, s, t)``."""
    neg_inf = float("-inf")
    m_new = tl.maximum(m, tl.max(z, axis=1))  # max of raw logits: in-thread over the chunk
    m_safe = tl.where(m_new == neg_inf, 0.0, m_new)  # lanes that saw only -inf: any finite shift
    # rescale the old sums once per chunk: s, t are relative to m, now to m_new (2^r <= 1)
    r = (m - m_safe) * k2  # -inf while the lane has seen only -inf (then s = t = 0)
    alpha = tl.math.exp2(r)
    t = alpha * (t + s * tl.maximum(r, -3.0e38))  # never 0 * -inf
    s = alpha * s
    a = (z - m_safe[:, None]) * k2  # exact subtraction, then one multiply (not contracted)
    e = tl.math.exp2(a)  # 0 for -inf entries, NaN for NaN / +inf rows
    s = s + tl.sum(e, axis=1)
    t = t + tl.sum(e * tl.maximum(a, -3.0e38), axis=1)  # FMA per element; clamp: never 0 * -inf
    return m_new, s, t


@triton.jit
def _head(o, V, CHUNK: tl.constexpr):
    """Elements before the row's first 16-byte boundary: the row starts ``o`` elements after a
    16-byte aligned base (``o`` int64), so ``o + head`` is a multiple of ``CHUNK`` (at most ``V``)."""
    return tl.minimum((CHUNK - o % CHUNK) % CHUNK, V).to(tl.int32)


@triton.jit
def _row_stats(base_ptr, o, V, k2, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the row ``base_ptr[o:o + V]`` (``base_ptr`` 16-byte aligned, ``o`` int64):
    ``(c, S, M)`` with ``c = max z`` (``-inf`` for a row of only ``-inf``), ``S = sum 2^((z - c) k2)``,
    ``M = sum 2^((z - c) k2) (z - c) k2`` (shift 0 when ``c = -inf``; then ``S = M = 0``). Any
    ``o`` and ``V``: the elements before the first 16-byte boundary (fewer than ``CHUNK``) form a
    masked head block, then whole blocks from the boundary run unmasked with 16-byte loads, then
    the partial last block masked; the chunk lanes are merged once, after the loop."""
    ROWS: tl.constexpr = BLOCK // CHUNK
    cols = tl.arange(0, ROWS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # int32
    neg_inf = float("-inf")
    m = tl.full([ROWS], neg_inf, tl.float32)  # running max of raw z per chunk lane
    s = tl.zeros([ROWS], tl.float32)  # sum 2^((z - m) k2)
    t = tl.zeros([ROWS], tl.float32)  # sum 2^((z - m) k2) * (z - m) k2  (<= 0: no cancellation)
    head = _head(o, V, CHUNK)
    if head > 0:  # the unaligned first elements
        z = tl.load(base_ptr + o + cols, mask=cols < head, other=neg_inf).to(tl.float32)
        m, s, t = _fwd_block(z, m, s, t, k2)
    row_ptr = base_ptr + tl.multiple_of(o + head, CHUNK)  # 16-byte aligned
    rest = V - head
    v_full = (rest // BLOCK) * BLOCK
    for start in range(0, v_full, BLOCK):  # whole blocks: no mask
        z = tl.load(row_ptr + start + cols).to(tl.float32)
        m, s, t = _fwd_block(z, m, s, t, k2)
    if v_full < rest:  # the partial last block
        offs = v_full + cols
        z = tl.load(row_ptr + offs, mask=offs < rest, other=neg_inf).to(tl.float32)
        m, s, t = _fwd_block(z, m, s, t, k2)
    # merge the lanes (a lane that saw only -inf has m = -inf and s = t = 0)
    c = tl.max(m, axis=0)
    c_safe = tl.where(c == neg_inf, 0.0, c)
    r = (m - c_safe) * k2
    w = tl.math.exp2(r)  # 0 for -inf lanes
    s_row = tl.sum(w * s, axis=0)
    t_row = tl.sum(w * (t + s * tl.maximum(r, -3.0e38)), axis=0)  # sum 2^(d k2) d k2
    return c, s_row, t_row


@triton.jit
def _entropy_fwd_kernel(
    logits_ptr,  # 16-byte aligned (see aligned_base): the logits start col0 elements after it
    col0,
    stride_row,
    labels_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    V,
    k2,
    inv_t,
    temp_ptr,  # float32 [2] = (k2, inv_t) on the device, read where TEMP_IN_MEMORY (else never)
    HAS_LABELS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    TEMP_IN_MEMORY: tl.constexpr = False,
):
    if TEMP_IN_MEMORY:  # a temperature tensor on the device: no host read-back
        k2 = tl.load(temp_ptr)
        inv_t = tl.load(temp_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    o = row * stride_row + col0  # the row's first element, from the aligned base
    row_ptr = logits_ptr + o
    c, s_row, t_row = _row_stats(logits_ptr, o, V, k2, CHUNK, BLOCK)
    c = tl.where(c == float("-inf"), 0.0, c)
    log_s = tl.log(s_row)
    tl.store(entropy_ptr + row, log_s - tl.math.div_rn(t_row, s_row) * 0.6931471805599453)
    tl.store(stats_ptr + row * 3, c)
    tl.store(stats_ptr + row * 3 + 1, 0.0)
    tl.store(stats_ptr + row * 3 + 2, log_s)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        ok = (label >= 0) & (label < V)
        zl = tl.load(row_ptr + tl.where(ok, label, 0), mask=ok, other=float("nan")).to(tl.float32)
        tl.store(logprob_ptr + row, (zl - c) * inv_t - log_s)


@triton.jit
def _bwd_block(z, c, k2, b2, a_coef, b_coef, lo):
    """``dz`` for one block ``z`` (float32): ``p * (A d + B)`` with ``p = 2^(d k2 - b2)``."""
    d = z - c  # exact subtraction (nothing multiplies into it: never contracted)
    p = tl.math.exp2(d * k2 - b2)  # FMA + MUFU; 0 for -inf entries
    # -inf entries: p = 0; clamping d at lo (|lo * A| <= FLT_MAX / 4) keeps A d + B finite: never 0 * inf
    return p * (tl.maximum(d, lo) * a_coef + b_coef)  # FMA, then one multiply


@triton.jit
def _row_grad(in_base, o_in, out_base, o_out, V, c, k2, b2, a_coef, b_coef, lo, CHUNK: tl.constexpr,
              BLOCK: tl.constexpr, SAME_ALIGN: tl.constexpr):
    """``out_base[o_out:o_out + V] = dz`` of :func:`_bwd_block` for the row ``in_base[o_in:o_in + V]``,
    in ``out_base``'s dtype (both bases 16-byte aligned, offsets int64). The output may be the input
    (in place: each element is read before the same thread writes it). The head before the output's
    first 16-byte boundary is a masked block, then whole blocks unmasked (16-byte stores; 16-byte
    loads too where ``SAME_ALIGN``: the input's rows sit at the same offset from a boundary), then
    the partial last block masked."""
    ROWS: tl.constexpr = BLOCK // CHUNK
    cols = tl.arange(0, ROWS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # int32
    head = _head(o_out, V, CHUNK)
    if head > 0:  # the unaligned first elements
        inb = cols < head
        z = tl.load(in_base + o_in + cols, mask=inb, other=float("-inf")).to(tl.float32)
        dz = _bwd_block(z, c, k2, b2, a_coef, b_coef, lo)
        tl.store(out_base + o_out + cols, dz.to(out_base.dtype.element_ty), mask=inb)
    out_ptr = out_base + tl.multiple_of(o_out + head, CHUNK)
    if SAME_ALIGN:
        row_ptr = in_base + tl.multiple_of(o_in + head, CHUNK)
    else:
        row_ptr = in_base + (o_in + head)
    rest = V - head
    v_full = (rest // BLOCK) * BLOCK
    for start in range(0, v_full, BLOCK):  # whole blocks: no mask
        z = tl.load(row_ptr + start + cols).to(tl.float32)
        dz = _bwd_block(z, c, k2, b2, a_coef, b_coef, lo)
        tl.store(out_ptr + start + cols, dz.to(out_base.dtype.element_ty))
    if v_full < rest:
        offs = v_full + cols
        inb = offs < rest
        z = tl.load(row_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
        dz = _bwd_block(z, c, k2, b2, a_coef, b_coef, lo)
        tl.store(out_ptr + offs, dz.to(out_base.dtype.element_ty), mask=inb)


@triton.jit
def _entropy_bwd_kernel(
    logits_ptr,  # 16-byte aligned: the logits start col0 elements after it
    col0,
    stride_row,
    labels_ptr,
    entropy_ptr,
    stats_ptr,
    g_entropy_ptr,
    g_logprob_ptr,
    grad_ptr,  # 16-byte aligned: the gradient starts grad_col0 elements after it
    grad_col0,
    stride_grad_row,
    V,
    k2,
    inv_t,
    temp_ptr,  # float32 [2] = (k2, inv_t) on the device, read where TEMP_IN_MEMORY (else never)
    HAS_G_ENTROPY: tl.constexpr,
    HAS_G_LOGPROB: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SAME_ALIGN: tl.constexpr,
    TEMP_IN_MEMORY: tl.constexpr = False,
):
    if TEMP_IN_MEMORY:  # a temperature tensor on the device: no host read-back
        k2 = tl.load(temp_ptr)
        inv_t = tl.load(temp_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    o_in = row * stride_row + col0
    o_out = row * stride_grad_row + grad_col0
    row_ptr = logits_ptr + o_in
    out_ptr = grad_ptr + o_out

    c = tl.load(stats_ptr + row * 3)
    mx = tl.load(stats_ptr + row * 3 + 1)  # 0 from the Triton forward; any shift is allowed
    log_s = tl.load(stats_ptr + row * 3 + 2)
    b2 = (mx + log_s) * 1.4426950408889634  # p = 2^((z - c) k2 - b2)
    if HAS_G_ENTROPY:
        g_h = tl.load(g_entropy_ptr + row)
        mean = log_s - tl.load(entropy_ptr + row) + mx  # sum p * (z - c) / T
    else:
        g_h = 0.0
        mean = 0.0
    if HAS_G_LOGPROB:
        g_lp = tl.load(g_logprob_ptr + row)
    else:
        g_lp = 0.0
    a_coef = -g_h * inv_t * inv_t
    b_coef = (g_h * mean - g_lp) * inv_t
    lo = -8.5e37 / tl.maximum(tl.abs(a_coef), 1.0)

    _row_grad(logits_ptr, o_in, grad_ptr, o_out, V, c, k2, b2, a_coef, b_coef, lo, CHUNK, BLOCK, SAME_ALIGN)
    if HAS_G_LOGPROB:
        # the one-hot term, once per row instead of a compare per element: rewrite the label's
        # entry after every thread of the program has stored its blocks (the barrier orders them)
        label = tl.load(labels_ptr + row)
        ok = (label >= 0) & (label < V)
        tl.debug_barrier()
        safe = tl.where(ok, label, 0)
        zl = tl.load(row_ptr + safe).to(tl.float32)
        # g_lp read again (volatile: not merged with the first read), so that it holds no register
        # across the row's loops (it did, and ptxas spilled it on sm_90 with float32 logits)
        g_lp_again = tl.load(g_logprob_ptr + row, volatile=True)
        dz = _bwd_block(zl, c, k2, b2, a_coef, b_coef, lo) + g_lp_again * inv_t
        tl.store(out_ptr + safe, dz.to(grad_ptr.dtype.element_ty), mask=ok)


def launch_config(vocab: int, element_size: int, interpreted: bool = False) -> Tuple[int, int]:
    """``(BLOCK, num_warps)`` for a row of ``vocab`` elements of ``element_size`` bytes.

    One program per row. Large vocabularies take 4096-column blocks at 8 warps (16 elements per
    thread: two 16-byte loads per thread for 16-bit dtypes, four for float32) so that several
    programs fit on one SM and enough bytes are in flight to saturate HBM; small vocabularies take
    the next power of two. Under the interpreter the block is capped at 1024 to keep it quick.
    """
    cap = 1024 if interpreted else 4096
    block = max(16, min(cap, triton.next_power_of_2(max(int(vocab), 1))))
    if block >= 4096:
        warps = 8
    elif block >= 1024:
        warps = 4
    else:
        warps = 2 if block >= 256 else 1
    return block, warps


def chunk_elements(element_size: int, block: int) -> int:
    """Elements per 16-byte chunk (one vector load per thread), at most the block."""
    return max(1, min(block, 16 // max(1, element_size)))


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def row_launch_options(rows: torch.Tensor, v: int, interpreted: Optional[bool] = None, block: Optional[int] = None):
    """The launch keywords shared by the row kernels (entropy, fused linear): ``CHUNK``, ``BLOCK``,
    ``num_warps`` (:func:`launch_config` for rows of ``v`` elements of ``rows``' dtype; ``block``
    overrides the block), ``num_stages`` and the explicit FP contraction setting."""
    if interpreted is None:
        interpreted = _interpreted(rows)
    cfg_block, warps = launch_config(v, rows.element_size(), interpreted)
    if block is not None:
        cfg_block = block
    return dict(CHUNK=chunk_elements(rows.element_size(), cfg_block), BLOCK=cfg_block, num_warps=warps, num_stages=1,
                enable_fp_fusion=FP_FUSION)


def aligned_base(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(base, col0)``: ``base`` a view of ``t``'s storage whose data pointer is the 16-byte boundary
    at or before ``t``'s, and ``col0`` = ``t``'s offset from it in elements, so that a kernel can
    find every row's first 16-byte boundary and run 16-byte loads from it whatever the slice. ``(t, 0)``
    when ``t`` is aligned already, or its storage starts after that boundary (then the kernels
    still compute the right values, with narrower loads)."""
    k = _boundary_offset(t)
    if k == 0 or t.storage_offset() < k:
        return t, 0
    return t.as_strided((1,), (1,), t.storage_offset() - k), k


def _boundary_offset(t: torch.Tensor) -> int:
    """``t``'s offset in elements from the 16-byte boundary at or before its data pointer; 0 when it
    is aligned, or not even aligned to its element size (no boundary lies a whole number of elements
    before it). The one definition of a row's offset, for :func:`aligned_base` and
    :func:`gradient_buffer`."""
    es = t.element_size()
    mis = t.data_ptr() % 16
    return 0 if mis % es else mis // es


def gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous ``[N, V]`` tensor of ``logits``' dtype that starts as far from a
    16-byte boundary as ``logits`` does (a view into a buffer ``CHUNK`` elements longer), so that
    the backward's rows of contiguous logits and of their gradient share their offset from a
    boundary: 16-byte loads and stores after the same head."""
    n, v = logits.shape
    es = logits.element_size()
    chunk = chunk_elements(es, 16)
    col0 = _boundary_offset(logits)
    buf = torch.empty(n * v + chunk, dtype=logits.dtype, device=logits.device)
    off = (col0 - _boundary_offset(buf)) % chunk
    return buf[off:off + n * v].view(n, v)


def _constants(temperature: float):
    t = float(temperature)
    return LOG2E / t, 1.0 / t


class TemperatureArgs(NamedTuple):
    """A launch's temperature arguments (:func:`temperature_args`)."""

    k2: float
    inv_t: float
    temp: torch.Tensor  # the ``temp_ptr`` argument
    in_memory: bool  # the kernel reads ``temp`` (``TEMP_IN_MEMORY``)


def temperature_args(temperature, dummy: Optional[torch.Tensor]) -> TemperatureArgs:
    """``(k2, inv_t, temp_ptr, in_memory)`` for a launch: a number goes by value; a one-element tensor
    (the ops pass one only where reading it would be a host sync: on the device) stays where it is:
    ``temp_ptr`` = float32 ``[log2(e) / T, 1 / T]`` computed there in float64 and rounded once (the
    values the by-value path passes), read by the kernel, so that nothing is copied back to the host.
    That takes a few small device ops: a caller that launches several kernels at one temperature
    computes it once and passes the result on (:func:`heal_kernels.triton.linear.prepare_temperature`).
    ``dummy``: any float32 tensor, the pointer passed when the kernel does not read it (unused for a
    tensor)."""
    if isinstance(temperature, torch.Tensor):
        t64 = temperature.reshape(1).to(torch.float64)
        return TemperatureArgs(1.0, 1.0, torch.cat([LOG2E / t64, 1.0 / t64]).to(torch.float32), True)
    k2, inv_t = _constants(temperature)
    return TemperatureArgs(k2, inv_t, dummy, False)


def forward_launch_spec(logits, labels, entropy, logprob, stats, temperature, block=None, interpreted=None):
    """``(kernel, grid, args, kwargs)`` of the forward launch (shared with :mod:`.aot`)."""
    n, v = logits.shape
    has_labels = labels is not None
    k2, inv_t, temp, in_memory = temperature_args(temperature, stats)
    base, col0 = aligned_base(logits)
    args = (
        base,
        col0,
        logits.stride(0),
        labels if has_labels else entropy,  # dummy pointer, never read
        entropy,
        logprob if has_labels else entropy,
        stats,
        v,
        k2,
        inv_t,
        temp,
    )
    kwargs = dict(HAS_LABELS=has_labels, **row_launch_options(logits, v, interpreted, block))
    if in_memory:
        kwargs["TEMP_IN_MEMORY"] = True
    return _entropy_fwd_kernel, (n,), args, kwargs


def backward_launch_spec(logits, labels, entropy, stats, g_entropy, g_logprob, grad, temperature, block=None,
                         interpreted=None):
    """``(kernel, grid, args, kwargs)`` of the backward launch (shared with :mod:`.aot`)."""
    n, v = logits.shape
    has_gh = g_entropy is not None
    has_glp = g_logprob is not None and labels is not None
    k2, inv_t, temp, in_memory = temperature_args(temperature, stats)
    base, col0 = aligned_base(logits)
    gbase, gcol0 = aligned_base(grad)
    opts = row_launch_options(logits, v, interpreted, block)
    chunk = opts["CHUNK"]
    # the input's rows sit as far from a 16-byte boundary as the gradient's: 16-byte loads as well
    same = (col0 - gcol0) % chunk == 0 and (logits.stride(0) - grad.stride(0)) % chunk == 0
    args = (
        base,
        col0,
        logits.stride(0),
        labels if has_glp else entropy,
        entropy,
        stats,
        g_entropy if has_gh else entropy,
        g_logprob if has_glp else entropy,
        gbase,
        gcol0,
        grad.stride(0),
        v,
        k2,
        inv_t,
        temp,
    )
    kwargs = dict(HAS_G_ENTROPY=has_gh, HAS_G_LOGPROB=has_glp, SAME_ALIGN=bool(same), **opts)
    if in_memory:
        kwargs["TEMP_IN_MEMORY"] = True
    return _entropy_bwd_kernel, (n,), args, kwargs


def entropy_forward(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature,
    block: Optional[int] = None,
):
    """Run the forward kernel on a 2-D ``logits[N, V]`` (last dim contiguous, rows may be strided).

    Returns ``(entropy, logprob, stats)``: float32 ``[N]``, ``[N]`` (empty when ``labels`` is None)
    and ``[N, 3]``, the per-row statistics of the backward ``(c, 0, log_s)``: ``c`` the row's max
    logit and ``log_s = log sum exp((z - c) / T)``, so that ``logsumexp(z / T) = c / T + log_s``.
    ``block`` overrides the block size (tests).
    """
    assert logits.dim() == 2 and (logits.stride(1) == 1 or logits.shape[1] <= 1)
    n, v = logits.shape
    dev = logits.device
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty((n, 3), dtype=torch.float32, device=dev)
    has_labels = labels is not None
    logprob = torch.empty(n if has_labels else 0, dtype=torch.float32, device=dev)
    if n == 0:
        return entropy, logprob, stats
    launch(*forward_launch_spec(logits, labels, entropy, logprob, stats, temperature, block))
    return entropy, logprob, stats


def entropy_backward(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    entropy: torch.Tensor,
    stats: torch.Tensor,
    g_entropy: Optional[torch.Tensor],
    g_logprob: Optional[torch.Tensor],
    temperature: float,
    block: Optional[int] = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits[N, V]`` (same dtype, contiguous) for upstream ``g_entropy`` /
    ``g_logprob`` (float32 ``[N]`` or None for zero). The gradient starts as far from a 16-byte
    boundary as the logits do, so that rows of contiguous logits of any ``V`` (or a slice of them
    starting mid-chunk) are read and written with 16-byte accesses."""
    n, v = logits.shape
    grad = gradient_buffer(logits)
    if n == 0 or v == 0:
        return grad
    if g_entropy is None and (g_logprob is None or labels is None):
        return grad.zero_()
    launch(*backward_launch_spec(logits, labels, entropy, stats, g_entropy, g_logprob, grad, temperature, block))
    return grad
