"""Triton kernels: token entropy + label log-probabilities from logits, forward and backward.

For one row ``z[0:V]`` of logits and ``x = z / T`` (``T`` the temperature):

* forward, one pass over the row: ``lse = logsumexp(x)``, ``spx = sum(p * x)`` with
  ``p = softmax(x)``; writes ``entropy = lse - spx``, ``logprob = x[label] - lse`` (when labels are
  given) and ``lse`` (saved for the backward). Accumulation in float32.
* backward, one read of the row and one write of the gradient::

      dz = ( g_H * (-p * (x - spx)) + g_lp * (onehot(label) - p) ) / T,   p = exp(x - lse)

  with ``spx = lse - entropy`` recomputed from the saved outputs.

Layout of the forward pass. Each program owns one row and walks it in blocks of ``BLOCK``
columns, keeping *per-lane* running statistics (one ``max``, ``sum exp(x - max)`` and
``sum exp(x - max) * x`` per lane of the block); the lanes are merged once, after the loop. A
lane update needs a single ``exp`` per element, ``exp(-|x - m|)``, which rescales either the old
sums (new maximum) or the new term, and there is no cross-warp reduction inside the loop, so
every warp streams its part of the row independently. The row is read once; nothing of size
``[N, V]`` is written besides the gradient in the backward.

Special values: ``-inf`` logits (masked vocabulary) have probability 0 and add nothing (no
``0 * inf``); the running maximum starts at ``-inf`` (not 0); lanes past the end of the row
load ``-inf``. A NaN anywhere in a row makes that row's outputs NaN; a row of only ``-inf``
has ``lse = -inf`` and NaN entropy. Labels outside ``[0, V)`` are never dereferenced: their
log-prob is NaN (the Python entry point rejects them before launching).

Block sizes are fixed heuristics of ``V`` and the element size (:func:`launch_config`); the
same single configuration runs under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["entropy_forward", "entropy_backward", "launch_config"]


@triton.jit
def _entropy_fwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    entropy_ptr,
    logprob_ptr,
    lse_ptr,
    V,
    inv_t,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)

    neg_inf = float("-inf")
    m = tl.full([BLOCK], neg_inf, tl.float32)  # running max per lane (starts at -inf, never 0)
    s = tl.zeros([BLOCK], tl.float32)  # sum exp(x - m) per lane
    t = tl.zeros([BLOCK], tl.float32)  # sum exp(x - m) * x per lane

    for start in range(0, V, BLOCK):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=neg_inf)
        x = z.to(tl.float32) * inv_t
        # -inf entries (and the lanes past V) contribute nothing; NaN stays "valid" and poisons s, t
        valid = x != neg_inf
        xv = tl.where(valid, x, 0.0)
        d = tl.where(valid, tl.exp(-tl.abs(x - m)), 0.0)  # exp(-inf) = 0 when m is still -inf
        new_max = x > m
        s = tl.where(new_max, s * d + 1.0, s + d)
        t = tl.where(new_max, t * d + xv, t + d * xv)
        m = tl.where(new_max, x, m)

    # merge the lanes
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == neg_inf, 0.0, mx)
    scale = tl.where(m == neg_inf, 0.0, tl.exp(m - mx_safe))
    s_row = tl.sum(s * scale, axis=0)
    t_row = tl.sum(t * scale, axis=0)
    lse = mx + tl.log(s_row)
    entropy = lse - t_row / s_row
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ok = (label >= 0) & (label < V)
        zl = tl.load(row_ptr + tl.where(ok, label, 0), mask=ok, other=float("nan"))
        tl.store(logprob_ptr + row, zl.to(tl.float32) * inv_t - lse)


@triton.jit
def _entropy_bwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    entropy_ptr,
    lse_ptr,
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

    lse = tl.load(lse_ptr + row)
    if HAS_G_ENTROPY:
        g_h = tl.load(g_entropy_ptr + row).to(tl.float32)
        spx = lse - tl.load(entropy_ptr + row)  # sum p * x
    else:
        g_h = 0.0
        spx = 0.0
    if HAS_G_LOGPROB:
        g_lp = tl.load(g_logprob_ptr + row).to(tl.float32)
        label = tl.load(labels_ptr + row).to(tl.int64)
    else:
        g_lp = 0.0
        label = -1

    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        z = tl.load(row_ptr + offs, mask=inb, other=float("-inf"))
        x = z.to(tl.float32) * inv_t
        p = tl.exp(x - lse)  # 0 for -inf entries
        if HAS_G_ENTROPY:
            # -inf entries: p = 0 and the (x - spx) factor is taken as 0, never 0 * inf
            centred = tl.where(x == float("-inf"), 0.0, x - spx)
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


def entropy_forward(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    block: Optional[int] = None,
):
    """Run the forward kernel on a 2-D ``logits[N, V]`` (last dim contiguous, rows may be strided).

    Returns ``(entropy, logprob, lse)``, each float32 ``[N]``; ``logprob`` is an empty tensor when
    ``labels`` is None. ``block`` overrides the block size (tests).
    """
    assert logits.dim() == 2 and (logits.stride(1) == 1 or logits.shape[1] <= 1)
    n, v = logits.shape
    dev = logits.device
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    has_labels = labels is not None
    logprob = torch.empty(n if has_labels else 0, dtype=torch.float32, device=dev)
    if n == 0:
        return entropy, logprob, lse
    cfg_block, warps = launch_config(v, logits.element_size(), _interpreted(logits))
    if block is not None:
        cfg_block = block
    _entropy_fwd_kernel[(n,)](
        logits,
        logits.stride(0),
        labels if has_labels else entropy,  # dummy pointer, never read
        entropy,
        logprob if has_labels else entropy,
        lse,
        v,
        1.0 / float(temperature),
        HAS_LABELS=has_labels,
        BLOCK=cfg_block,
        num_warps=warps,
    )
    return entropy, logprob, lse


def entropy_backward(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    entropy: torch.Tensor,
    lse: torch.Tensor,
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
        labels if has_glp else lse,
        entropy,
        lse,
        g_entropy if has_gh else lse,
        g_logprob if has_glp else lse,
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
