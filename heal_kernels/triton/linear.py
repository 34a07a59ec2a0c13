"""Triton kernels of the fused linear entropy / log-prob op (:mod:`heal_kernels.ops.linear`).

The matmuls run in torch (cuBLAS); these two kernels do the work between them, on one block of
logits ``z[r, c] = hidden_chunk @ weight_block.T (+ bias)`` (any floating dtype, row stride,
contiguous columns), one program per row, walking the row in ``BLOCK`` columns:

* :func:`block_stats` -- ``x = z / T``; the block row's ``(mb, sb, tb) = (max x, sum exp(x - mb),
  sum exp(x - mb) (x - mb))``, computed by the entropy forward's loop (16-byte chunks per thread, the
  max tracked on raw ``z``, base-2 sums rescaled once per chunk, one ``exp2`` per element, lanes
  merged once after the loop), then merged into the row's running state ``(m, s, t, x_label)``
  (float32 ``[r, 4]``, updated in place)::

      M = max(m, mb), a = exp(m - M), b = exp(mb - M)
      s' = a s + b sb,   t' = a (t + s (m - M)) + b (tb + sb (mb - M))

  and ``x_label = x[label]`` when the row's label lies in the block. The triple merges
  associatively, so blocks (and ranks) may come in any order.
* :func:`block_grad` -- in place, from the row's final ``(lse, mean, g_H, g_lp)`` (float32
  ``[r, 4]``, ``mean = sum p x``)::

      z <- ( -p (g_H (x - mean) + g_lp) + g_lp onehot(label) ) / T,   p = exp(x - lse)

  by the entropy backward's block: ``p = 2^((z - c) k2 - b2)`` with ``c = lse T``, ``k2 = log2(e) / T``
  and ``b2`` the rounding of ``c`` folded back,
  ``dz = p (A (z - c) + B)`` (one FMA, one multiply), the one-hot term written once per row after a
  barrier (the label's logit is read before the row is overwritten). In ``z``'s dtype; ``-inf``
  logits (``p = 0``) get exactly 0, never ``0 * inf``.

The instruction counts per element are the entropy kernels' (``heal bench static``).

Special values: the running maximum starts at ``-inf`` (never 0); ``-inf`` logits add nothing; a
block row of only ``-inf`` leaves the state unchanged; a NaN poisons the row's state.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from heal_kernels.triton._launch import launch

# block rows run the entropy kernels' row passes (one program per row, 16-byte chunks per thread,
# exp2) with their launch options
from heal_kernels.triton.entropy import (TemperatureArgs, _bwd_block, _row_grad, _row_stats, aligned_base,
                                         row_launch_options, temperature_args)

__all__ = ["block_stats", "block_grad", "prepare_temperature"]


@triton.jit
def _block_stats_kernel(
    z_ptr,  # 16-byte aligned: the block starts col0 elements after it
    col0,
    stride_row,
    labels_ptr,
    state_ptr,
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
    o = row * stride_row + col0
    row_ptr = z_ptr + o
    neg_inf = float("-inf")
    # the entropy forward's pass: (max z, sum 2^((z - c) k2), sum 2^((z - c) k2) (z - c) k2)
    c, sb, tb = _row_stats(z_ptr, o, V, k2, CHUNK, BLOCK)
    tb = tb * 0.6931471805599453  # natural units
    mb = c * inv_t  # max x = max z / T (T > 0: the same element)
    nan_row = sb != sb

    # merge into the row's running state
    sp = state_ptr + row * 4
    m0 = tl.load(sp)
    s0 = tl.load(sp + 1)
    t0 = tl.load(sp + 2)
    mm = tl.maximum(m0, mb)
    mm_safe = tl.where(mm == neg_inf, 0.0, mm)
    old = m0 != neg_inf
    d0 = tl.where(old, m0 - mm_safe, 0.0)
    a0 = tl.where(old, tl.exp(d0), 0.0)
    new = mb != neg_inf
    d1 = tl.where(new, mb - mm_safe, 0.0)
    a1 = tl.where(new, tl.exp(d1), 0.0)
    s_new = a0 * s0 + a1 * sb
    t_new = a0 * (t0 + s0 * d0) + a1 * (tb + sb * d1)
    nan = float("nan")
    bad = nan_row | (m0 != m0)
    tl.store(sp, tl.where(bad, nan, mm))
    tl.store(sp + 1, tl.where(bad, nan, s_new))
    tl.store(sp + 2, tl.where(bad, nan, t_new))
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        inside = (label >= 0) & (label < V)
        zl = tl.load(row_ptr + tl.where(inside, label, 0), mask=inside, other=0.0).to(tl.float32)
        tl.store(sp + 3, zl * inv_t, mask=inside)


@triton.jit
def _block_grad_kernel(
    z_ptr,  # 16-byte aligned: the block starts col0 elements after it
    col0,
    stride_row,
    labels_ptr,
    coef_ptr,
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
    o = row * stride_row + col0
    row_ptr = z_ptr + o
    lse = tl.load(coef_ptr + row * 4)
    mean = tl.load(coef_ptr + row * 4 + 1)
    g_h = tl.load(coef_ptr + row * 4 + 2)
    g_lp = tl.load(coef_ptr + row * 4 + 3)
    # the entropy backward's block: p = 2^((z - c) k2 - b2) with c = lse T (logit units) and
    # b2 = (lse - c / T) log2(e), the rounding of c folded back (one FMA: the exact residual), and
    # -p (g_H (x - mean) + g_lp) / T = p (A (z - c) + B) since x = (z - c) / T + lse - r
    c = lse / inv_t
    r = lse - c * inv_t
    b2 = r * 1.4426950408889634
    a_coef = -g_h * inv_t * inv_t
    b_coef = -(g_h * (lse - r - mean) + g_lp) * inv_t
    lo = -8.5e37 / tl.maximum(tl.abs(a_coef), 1.0)
    if HAS_LABELS:  # read before the block is overwritten
        label = tl.load(labels_ptr + row)
        ok = (label >= 0) & (label < V)
        safe = tl.where(ok, label, 0)
        zl = tl.load(row_ptr + safe).to(tl.float32)
    _row_grad(z_ptr, o, z_ptr, o, V, c, k2, b2, a_coef, b_coef, lo, CHUNK, BLOCK, True)  # in place
    if HAS_LABELS:
        # the one-hot term once per row, not a compare per element: rewrite the label's entry after
        # every thread of the program has stored its blocks (the barrier orders them)
        tl.debug_barrier()
        dz = _bwd_block(zl, c, k2, b2, a_coef, b_coef, lo) + g_lp * inv_t
        tl.store(row_ptr + safe, dz.to(z_ptr.dtype.element_ty), mask=ok)


def prepare_temperature(temperature):
    """The temperature as the block launches of one op call take it, computed once for all of them:
    a number stays a number (passed by value); a one-element device tensor becomes its
    :class:`~heal_kernels.triton.entropy.TemperatureArgs` (float32 ``[log2(e) / T, 1 / T]`` on the
    device, a few small device ops), which every launch then passes as it is."""
    if isinstance(temperature, torch.Tensor):
        return temperature_args(temperature, None)
    return temperature


def _launch_spec(kernel, z, labels, rowwise, temperature, interpreted):
    r, c = z.shape
    if isinstance(temperature, TemperatureArgs):  # prepare_temperature's, computed once per op call
        k2, inv_t, temp, in_memory = temperature
    else:
        k2, inv_t, temp, in_memory = temperature_args(temperature, rowwise)
    base, col0 = aligned_base(z)
    args = (base, col0, z.stride(0), labels if labels is not None else rowwise, rowwise, c, k2, inv_t, temp)
    kwargs = dict(HAS_LABELS=labels is not None, **row_launch_options(z, c, interpreted))
    if in_memory:
        kwargs["TEMP_IN_MEMORY"] = True
    return kernel, (r,), args, kwargs


def stats_launch_spec(z, labels, state, temperature, interpreted=None):
    """``(kernel, grid, args, kwargs)`` of a :func:`block_stats` launch (shared with :mod:`.aot`)."""
    return _launch_spec(_block_stats_kernel, z, labels, state, temperature, interpreted)


def grad_launch_spec(z, labels, coef, temperature, interpreted=None):
    """``(kernel, grid, args, kwargs)`` of a :func:`block_grad` launch (shared with :mod:`.aot`)."""
    return _launch_spec(_block_grad_kernel, z, labels, coef, temperature, interpreted)


def block_stats(z: torch.Tensor, labels: Optional[torch.Tensor], state: torch.Tensor, temperature) -> None:
    """Merge the per-row statistics of the logits block ``z[r, c]`` into ``state[r, 4]`` (float32,
    contiguous, updated in place). ``labels``: int64 ``[r]`` label indices relative to the block's
    first column (outside ``[0, c)`` when the label lies in another block), or None. ``temperature``:
    a number, a one-element device tensor, or :func:`prepare_temperature`'s result (what the op
    passes to each of its launches)."""
    if z.shape[0] == 0 or z.shape[1] == 0:
        return
    kernel, grid, args, kwargs = stats_launch_spec(z, labels, state, temperature)
    launch(kernel, grid, args, kwargs)


def block_grad(z: torch.Tensor, labels: Optional[torch.Tensor], coef: torch.Tensor, temperature) -> None:
    """Overwrite the logits block ``z[r, c]`` with its gradient, from ``coef[r, 4] = (lse, mean,
    g_H, g_lp)`` (float32, contiguous); ``labels`` and ``temperature`` as in :func:`block_stats`
    (``labels`` None: no log-prob gradient)."""
    if z.shape[0] == 0 or z.shape[1] == 0:
        return
    kernel, grid, args, kwargs = grad_launch_spec(z, labels, coef, temperature)
    launch(kernel, grid, args, kwargs)
