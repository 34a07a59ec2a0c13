"""Triton kernels of the fused linear entropy / log-prob op (:mod:`heal_kernels.ops.linear`).

The matmuls run in torch (cuBLAS); these two kernels do the work between them, on one block of
logits ``z[r, c] = hidden_chunk @ weight_block.T (+ bias)`` (any floating dtype, row stride,
contiguous columns), one program per row, walking the row in ``BLOCK`` columns:

* :func:`block_stats` -- ``x = z / T``; the block row's ``(mb, sb, tb) = (max x, sum exp(x - mb),
  sum exp(x - mb) (x - mb))`` with per-lane running statistics (one ``exp`` per element, lanes merged
  once after the loop), then merged into the row's running state ``(m, s, t, x_label)`` (float32
  ``[r, 4]``, updated in place)::

      M = max(m, mb), a = exp(m - M), b = exp(mb - M)
      s' = a s + b sb,   t' = a (t + s (m - M)) + b (tb + sb (mb - M))

  and ``x_label = x[label]`` when the row's label lies in the block. The triple merges
  associatively, so blocks (and ranks) may come in any order.
* :func:`block_grad` -- in place, from the row's final ``(lse, mean, g_H, g_lp)`` (float32
  ``[r, 4]``, ``mean = sum p x``)::

      z <- ( -p (g_H (x - mean) + g_lp) + g_lp onehot(label) ) / T,   p = exp(x - lse)

  in ``z``'s dtype; ``-inf`` logits (``p = 0``) get exactly 0, never ``0 * inf``.

Special values: the running maximum starts at ``-inf`` (never 0); ``-inf`` logits add nothing; a
block row of only ``-inf`` leaves the state unchanged; a NaN poisons the row's state.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# block rows take the entropy kernels' block / warp heuristic (one program per row, same reductions)
from heal_kernels.triton.entropy import launch_config

__all__ = ["block_stats", "block_grad"]


@triton.jit
def _block_stats_kernel(
    z_ptr,
    stride_row,
    labels_ptr,
    state_ptr,
    V,
    inv_t,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = z_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    m = tl.full([BLOCK], neg_inf, tl.float32)  # running max of x per lane (starts at -inf)
    s = tl.zeros([BLOCK], tl.float32)  # sum exp(x - m) per lane
    t = tl.zeros([BLOCK], tl.float32)  # sum exp(x - m) * (x - m) per lane
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < V, other=neg_inf).to(tl.float32) * inv_t
        valid = x != neg_inf  # NaN stays "valid" and poisons s
        a = -tl.abs(x - m)
        d = tl.where(valid, tl.exp(a), 0.0)
        a = tl.where(a > neg_inf, a, 0.0)
        new_max = x > m
        t = tl.where(new_max, d * (t + a * s), t + d * a)
        s = tl.where(new_max, s * d + 1.0, s + d)
        m = tl.where(new_max, x, m)

    # merge the lanes
    mb = tl.max(m, axis=0)
    mb_safe = tl.where(mb == neg_inf, 0.0, mb)
    live = m != neg_inf
    delta = tl.where(live, m - mb_safe, 0.0)
    scale = tl.where(live, tl.exp(delta), 0.0)
    sb = tl.sum(s * scale, axis=0)
    tb = tl.sum(scale * (t + s * delta), axis=0)
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
    z_ptr,
    stride_row,
    labels_ptr,
    coef_ptr,
    V,
    inv_t,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = z_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    lse = tl.load(coef_ptr + row * 4)
    mean = tl.load(coef_ptr + row * 4 + 1)
    g_h = tl.load(coef_ptr + row * 4 + 2)
    g_lp = tl.load(coef_ptr + row * 4 + 3)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
    else:
        label = -1
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        x = tl.load(row_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(x - lse)  # 0 for -inf entries
        centred = tl.where(x == float("-inf"), 0.0, x - mean)
        dz = -p * (g_h * centred + g_lp)
        if HAS_LABELS:
            dz = tl.where(offs == label, dz + g_lp, dz)
        dz = dz * inv_t
        tl.store(row_ptr + offs, dz.to(z_ptr.dtype.element_ty), mask=inb)


def block_stats(z: torch.Tensor, labels: Optional[torch.Tensor], state: torch.Tensor, temperature: float) -> None:
    """Merge the per-row statistics of the logits block ``z[r, c]`` into ``state[r, 4]`` (float32,
    contiguous, updated in place). ``labels``: int64 ``[r]`` label indices relative to the block's
    first column (outside ``[0, c)`` when the label lies in another block), or None."""
    r, c = z.shape
    if r == 0 or c == 0:
        return
    block, warps = launch_config(c, z.element_size(), z.device.type != "cuda")
    _block_stats_kernel[(r,)](
        z,
        z.stride(0),
        labels if labels is not None else state,
        state,
        c,
        1.0 / float(temperature),
        HAS_LABELS=labels is not None,
        BLOCK=block,
        num_warps=warps,
    )


def block_grad(z: torch.Tensor, labels: Optional[torch.Tensor], coef: torch.Tensor, temperature: float) -> None:
    """Overwrite the logits block ``z[r, c]`` with its gradient, from ``coef[r, 4] = (lse, mean,
    g_H, g_lp)`` (float32, contiguous); ``labels`` as in :func:`block_stats` (None: no log-prob
    gradient)."""
    r, c = z.shape
    if r == 0 or c == 0:
        return
    block, warps = launch_config(c, z.element_size(), z.device.type != "cuda")
    _block_grad_kernel[(r,)](
        z,
        z.stride(0),
        labels if labels is not None else coef,
        coef,
        c,
        1.0 / float(temperature),
        HAS_LABELS=labels is not None,
        BLOCK=block,
        num_warps=warps,
    )
