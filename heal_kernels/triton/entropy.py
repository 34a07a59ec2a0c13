"""Triton kernels: token entropy + label log-probabilities from logits, forward and backward.

For one row ``z[0:V]`` of logits, a per-row shift ``c`` (``z[0]``, or 0 when that is ``-inf``) and
``u = (z - c) / T`` (``T`` the temperature; softmax, entropy and log-probs are shift-invariant):

* forward, one pass over the row, float32 accumulation: ``mx = max(u)``,
  ``S = sum exp(u - mx)``, ``M = sum exp(u - mx) * (u - mx)``; writes ``entropy = log S - M / S``,
  ``logprob = (u[label] - mx) - log S`` (when labels are given) and the per-row statistics
  ``(c, mx, log S)`` saved for the backward. Every term is relative to the maximum, so nothing
  cancels at the scale of the logits' magnitude (``z - c`` is nearly exact where ``z / T`` would
  round).
* backward, one read of the row and one write of the gradient, with ``v = u - mx`` recomputed
  bit-for-bit as in the forward::

      dz = ( g_H * (-p * (v - mean)) + g_lp * (onehot(label) - p) ) / T,   p = exp(v - log S)

  and ``mean = log S - entropy`` (``= sum p * v``).

Layout of the forward pass. Each program owns one row and walks it in blocks of ``BLOCK``
columns, keeping *per-lane* running statistics (one ``max``, ``sum exp(u - max)`` and
``sum exp(u - max) * (u - max)`` per lane of the block); the lanes are merged once, after the loop. A
lane update needs a single ``exp`` per element, ``exp(-|u - m|)``, which rescales either the old
sums (new maximum) or the new term, and there is no cross-warp reduction inside the loop, so
every warp streams its part of the row independently. The row is read once; nothing of size
``[N, V]`` is written besides the gradient in the backward.

Special values: ``-inf`` logits (masked vocabulary) have probability 0 and add nothing (no
``0 * inf``); the running maximum starts at ``-inf`` (not 0); lanes past the end of the row
load ``-inf``. A NaN anywhere in a row makes that row's outputs NaN; a row of only ``-inf``
has NaN entropy. Labels outside ``[0, V)`` are never dereferenced: their
log-prob is NaN (the Python entry point rejects them before launching).

An alternative forward with scalar running statistics and one block-wide max / sum per block
(the classic online softmax, :func:`_entropy_fwd_block_kernel`) is selected with
``HEAL_ENTROPY_FWD=block``, to compare the two layouts on a GPU; both are tested.

Block sizes are fixed heuristics of ``V`` and the element size (:func:`launch_config`); the
same single configuration runs under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["entropy_forward", "entropy_backward", "launch_config"]


@triton.jit
def _store_row(row, row_ptr, labels_ptr, entropy_ptr, logprob_ptr, stats_ptr, V, c, inv_t, mx, s, t,
               HAS_LABELS: tl.constexpr):
    """Epilogue of both forward layouts: from the row's ``s = sum exp(u - mx)`` and
    ``t = sum exp(u - mx) * (u - mx)`` (``u = (z - c) / T``) store the entropy, the per-row
    statistics ``(c, mx, log s)`` the backward recomputes ``p`` from, and the label's log-prob."""
    log_s = tl.log(s)  # logsumexp(u) = mx + log_s
    tl.store(entropy_ptr + row, log_s - t / s)
    tl.store(stats_ptr + row * 3, c)
    tl.store(stats_ptr + row * 3 + 1, mx)
    tl.store(stats_ptr + row * 3 + 2, log_s)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ok = (label >= 0) & (label < V)
        zl = tl.load(row_ptr + tl.where(ok, label, 0), mask=ok, other=float("nan"))
        tl.store(logprob_ptr + row, ((zl.to(tl.float32) - c) * inv_t - mx) - log_s)


@triton.jit
def _entropy_fwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    V,
    inv_t,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    # Work in u = (z - c) / T with c = z[0] (0 when z[0] is -inf): entropy and log-probs are
    # shift-invariant, and z - c is (nearly) exact in float32 where z / T alone would round at
    # the scale of |z| (logits far from 0 would lose digits to cancellation).
    z0 = tl.load(row_ptr).to(tl.float32)
    c = tl.where(z0 == neg_inf, 0.0, z0)

    m = tl.full([BLOCK], neg_inf, tl.float32)  # running max of u per lane (starts at -inf, never 0)
    s = tl.zeros([BLOCK], tl.float32)  # sum exp(u - m) per lane
    t = tl.zeros([BLOCK], tl.float32)  # sum exp(u - m) * (u - m) per lane (<= 0, no cancellation)

    for start in range(0, V, BLOCK):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=neg_inf).to(tl.float32)
        u = (z - c) * inv_t
        # -inf entries (and the lanes past V) contribute nothing; NaN stays "valid" and poisons s
        valid = u != neg_inf
        a = -tl.abs(u - m)  # -inf while m is -inf; NaN for -inf - -inf
        d = tl.where(valid, tl.exp(a), 0.0)
        a = tl.where(a > neg_inf, a, 0.0)  # keep 0 * a finite
        new_max = u > m
        # new max: the old sums are rescaled by d and shifted by a; else the new term is d, d * a
        t = tl.where(new_max, d * (t + a * s), t + d * a)
        s = tl.where(new_max, s * d + 1.0, s + d)
        m = tl.where(new_max, u, m)

    # merge the lanes (lanes that saw only -inf have m = -inf and s = t = 0)
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == neg_inf, 0.0, mx)
    live = m != neg_inf
    delta = tl.where(live, m - mx_safe, 0.0)
    scale = tl.where(live, tl.exp(delta), 0.0)
    s_row = tl.sum(s * scale, axis=0)
    t_row = tl.sum(scale * (t + s * delta), axis=0)  # sum exp(u - mx) * (u - mx)
    _store_row(row, row_ptr, labels_ptr, entropy_ptr, logprob_ptr, stats_ptr, V, c, inv_t, mx, s_row, t_row,
               HAS_LABELS)


@triton.jit
def _entropy_fwd_block_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    V,
    inv_t,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Alternative forward (``HEAL_ENTROPY_FWD=block``): scalar running statistics merged with a
    block-wide max / sum per block (the classic online softmax). Same outputs as the per-lane
    kernel; kept to compare the two layouts on a GPU."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    z0 = tl.load(row_ptr).to(tl.float32)
    c = tl.where(z0 == neg_inf, 0.0, z0)

    m = tl.max(tl.full([BLOCK], neg_inf, tl.float32), axis=0)  # running max (a -inf scalar)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # sum exp(u - m)
    t = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # sum exp(u - m) * (u - m)
    for start in range(0, V, BLOCK):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=neg_inf).to(tl.float32)
        u = (z - c) * inv_t
        m_new = tl.maximum(m, tl.max(u, axis=0))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        e = tl.exp(u - m_safe)  # 0 for -inf entries
        w = tl.where(e > 0.0, u - m_safe, 0.0)  # never 0 * -inf
        old = m != neg_inf
        delta = tl.where(old, m - m_safe, 0.0)
        alpha = tl.where(old, tl.exp(delta), 0.0)
        t = alpha * (t + s * delta) + tl.sum(e * w, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    _store_row(row, row_ptr, labels_ptr, entropy_ptr, logprob_ptr, stats_ptr, V, c, inv_t, m, s, t, HAS_LABELS)


@triton.jit
def _entropy_bwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    entropy_ptr,
    stats_ptr,
    g_entropy_ptr,
    g_logprob_ptr,
    grad_ptr,
    stride_grad_row,
    V,
    inv_t,
    HAS_G_ENTROPY: tl.constexpr,
    HAS_G_LOGPROB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK)

    c = tl.load(stats_ptr + row * 3)
    mx = tl.load(stats_ptr + row * 3 + 1)
    log_s = tl.load(stats_ptr + row * 3 + 2)
    if HAS_G_ENTROPY:
        g_h = tl.load(g_entropy_ptr + row)
        mean_u = log_s - tl.load(entropy_ptr + row)  # sum p * (u - mx)
    else:
        g_h = 0.0
        mean_u = 0.0
    if HAS_G_LOGPROB:
        g_lp = tl.load(g_logprob_ptr + row)
        label = tl.load(labels_ptr + row).to(tl.int64)
    else:
        g_lp = 0.0
        label = -1

    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        z = tl.load(row_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
        u = (z - c) * inv_t - mx  # bitwise the forward's u - mx: exactly 0 at the maximum
        p = tl.exp(u - log_s)  # 0 for -inf entries
        if HAS_G_ENTROPY:
            # -inf entries: p = 0 and the (u - mean) factor is taken as 0, never 0 * inf
            centred = tl.where(u == float("-inf"), 0.0, u - mean_u)
            inner = g_h * centred + g_lp
        else:
            inner = tl.zeros([BLOCK], tl.float32) + g_lp
        dz = -p * inner
        if HAS_G_LOGPROB:
            dz = tl.where(offs == label, dz + g_lp, dz)
        dz = dz * inv_t
        tl.store(out_ptr + offs, dz.to(grad_ptr.dtype.element_ty), mask=inb)


def launch_config(vocab: int, element_size: int, interpreted: bool = False) -> Tuple[int, int]:
    """``(BLOCK, num_warps)`` for a row of ``vocab`` elements of ``element_size`` bytes.

    One program per row. Large vocabularies take 4096-column blocks (16 elements per thread at 8
    warps: two 128-bit loads per thread for 16-bit dtypes, four for float32) so that several
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


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def forward_variant() -> str:
    """``lane`` (default: per-lane statistics, :func:`_entropy_fwd_kernel`) or ``block``
    (block-wide reductions, :func:`_entropy_fwd_block_kernel`), from ``HEAL_ENTROPY_FWD``."""
    name = os.environ.get("HEAL_ENTROPY_FWD", "lane").strip().lower()
    if name not in ("lane", "block"):
        raise ValueError(f"HEAL_ENTROPY_FWD must be 'lane' or 'block', got {name!r}")
    return name


def entropy_forward(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    block: Optional[int] = None,
    variant: Optional[str] = None,
):
    """Run the forward kernel on a 2-D ``logits[N, V]`` (last dim contiguous, rows may be strided).

    Returns ``(entropy, logprob, stats)``: float32 ``[N]``, ``[N]`` (empty when ``labels`` is None)
    and ``[N, 3]``, the per-row statistics of the backward ``(c, mx, log_s)``: shift ``c`` in logit
    units, ``mx = max((z - c) / T)`` and ``log_s = log sum exp((z - c) / T - mx)``, so that
    ``logsumexp(z / T) = c / T + mx + log_s``. ``block`` overrides the block size (tests).
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
    cfg_block, warps = launch_config(v, logits.element_size(), _interpreted(logits))
    if block is not None:
        cfg_block = block
    kernel = _entropy_fwd_block_kernel if (variant or forward_variant()) == "block" else _entropy_fwd_kernel
    kernel[(n,)](
        logits,
        logits.stride(0),
        labels if has_labels else entropy,  # dummy pointer, never read
        entropy,
        logprob if has_labels else entropy,
        stats,
        v,
        1.0 / float(temperature),
        HAS_LABELS=has_labels,
        BLOCK=cfg_block,
        num_warps=warps,
    )
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
    ``g_logprob`` (float32 ``[N]`` or None for zero)."""
    n, v = logits.shape
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n == 0 or v == 0:
        return grad
    if g_entropy is None and (g_logprob is None or labels is None):
        return grad.zero_()
    has_gh = g_entropy is not None
    has_glp = g_logprob is not None and labels is not None
    cfg_block, warps = launch_config(v, logits.element_size(), _interpreted(logits))
    if block is not None:
        cfg_block = block
    _entropy_bwd_kernel[(n,)](
        logits,
        logits.stride(0),
        labels if has_glp else entropy,
        entropy,
        stats,
        g_entropy if has_gh else entropy,
        g_logprob if has_glp else entropy,
        grad,
        grad.stride(0),
        v,
        1.0 / float(temperature),
        HAS_G_ENTROPY=has_gh,
        HAS_G_LOGPROB=has_glp,
        BLOCK=cfg_block,
        num_warps=warps,
    )
    return grad
