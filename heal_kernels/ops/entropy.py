"""Token entropy and label log-probabilities straight from logits (DESIGN.md section 3.1).

Public API::

    token_entropy(logits, temperature=1.0) -> entropy                      # float32, logits.shape[:-1]
    entropy_and_logprobs(logits, labels, temperature=1.0, *, check=False) -> (entropy, logprobs)

With ``x = logits / temperature`` and ``p = softmax(x)`` over the last dimension:
``entropy = logsumexp(x) - sum(p * x)`` and ``logprob = x[label] - logsumexp(x)``. Both outputs are
differentiable w.r.t. ``logits`` for any mix of upstream gradients; the backward recomputes ``p``
from ``logits`` and two saved per-row floats and never stores a ``[N, V]`` tensor besides the
gradient itself.

Implementation: two ``torch.library`` custom ops, ``heal::entropy_fwd`` and ``heal::entropy_bwd``,
with fake (meta) implementations, so the functions trace under ``torch.compile(fullgraph=True)``,
and ``torch.library.register_autograd`` tying them together. Dispatch follows
:func:`heal_kernels._backend.resolve_backend`: CUDA tensors run the Triton kernels
(:mod:`heal_kernels.triton.entropy`); CPU tensors run a memory-bounded chunked-torch
implementation (a few row blocks of at most ~8 MB of float32 temporaries each); with
``HEAL_KERNELS_BACKEND=triton`` and ``TRITON_INTERPRET=1`` CPU tensors run the Triton kernels under
the interpreter (tests).

Inputs: logits of any floating dtype (float32 / bfloat16 / float16; float64 is accepted and
computed in float32), any leading shape (including empty), last dimension ``V >= 1``; rows may be
strided (a slice of a wider tensor); ``-inf`` entries (masked vocabulary) are valid. A row with a
NaN, a ``+inf``, or only ``-inf`` entries has no distribution: NaN comes out for that row, and
``check=True`` raises a ``ValueError`` naming the first such row. Labels: integer tensor of shape
``logits.shape[:-1]`` with values in ``[0, V)`` (no ignore index).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from heal_kernels._backend import resolve_backend

__all__ = ["token_entropy", "entropy_and_logprobs"]

# float32 temporaries per chunk of rows on the CPU path (three buffers of this size at most)
_CPU_CHUNK_BYTES = 8 << 20
_FLT_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# CPU: chunked torch, memory-bounded
# ---------------------------------------------------------------------------------------------


def _chunk_rows(vocab: int, chunk_bytes: Optional[int] = None) -> int:
    budget = _CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, budget // (4 * max(vocab, 1)))


def _scaled_rows(zc: torch.Tensor, buf: torch.Tensor, inv_t: float, need_copy: bool) -> torch.Tensor:
    """``zc * inv_t`` in float32: ``zc`` itself when no conversion is needed, else in ``buf``."""
    if not need_copy and zc.dtype == torch.float32 and inv_t == 1.0:
        return zc
    x = buf[: zc.shape[0]]
    x.copy_(zc)
    if inv_t != 1.0:
        x.mul_(inv_t)
    return x


def _torch_forward(z: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, chunk_bytes=None):
    n, v = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    entropy = torch.empty(n, **f32)
    lse = torch.empty(n, **f32)
    logprob = torch.empty(n if labels is not None else 0, **f32)
    if n == 0:
        return entropy, logprob, lse
    inv_t = 1.0 / temperature
    rows = min(n, _chunk_rows(v, chunk_bytes))
    xbuf = torch.empty((rows, v), **f32)
    lpbuf = torch.empty((rows, v), **f32)
    pbuf = torch.empty((rows, v), **f32)
    for i in range(0, n, rows):
        zc = z[i : i + rows]
        r = zc.shape[0]
        x = _scaled_rows(zc, xbuf, inv_t, need_copy=False)
        mx, arg = x.max(dim=-1)
        lp = lpbuf[:r]
        torch._log_softmax(x, -1, False, out=lp)
        # lse = max - log_softmax(argmax): exact to the rounding of the log-softmax
        lse[i : i + r] = mx - lp.gather(1, arg.unsqueeze(1)).squeeze(1)
        if labels is not None:
            logprob[i : i + r] = lp.gather(1, labels[i : i + r].unsqueeze(1)).squeeze(1)
        p = torch.exp(lp, out=pbuf[:r])
        lp.clamp_(min=-_FLT_MAX)  # -inf log-probs have p = 0: make 0 * log p = 0, not NaN
        torch.linalg.vecdot(p, lp, out=entropy[i : i + r])
    entropy.neg_()
    # a row with only -inf entries has no distribution: NaN entropy (lse stays -inf or NaN)
    return entropy, logprob, lse


def _torch_backward(
    z: torch.Tensor,
    labels: Optional[torch.Tensor],
    entropy: torch.Tensor,
    lse: torch.Tensor,
    g_entropy: Optional[torch.Tensor],
    g_logprob: Optional[torch.Tensor],
    temperature: float,
    chunk_bytes=None,
) -> torch.Tensor:
    n, v = z.shape
    grad = torch.empty((n, v), dtype=z.dtype, device=z.device)
    has_gh = g_entropy is not None
    has_glp = g_logprob is not None and labels is not None
    if n == 0 or not (has_gh or has_glp):
        return grad.zero_()
    inv_t = 1.0 / temperature
    rows = min(n, _chunk_rows(v, chunk_bytes))
    f32 = dict(dtype=torch.float32, device=z.device)
    xbuf = torch.empty((rows, v), **f32)
    pbuf = torch.empty((rows, v), **f32)
    spx = lse - entropy  # sum p * x per row
    for i in range(0, n, rows):
        zc = z[i : i + rows]
        r = zc.shape[0]
        x = _scaled_rows(zc, xbuf, inv_t, need_copy=True)  # writable float32 copy of x
        p = torch.sub(x, lse[i : i + r].unsqueeze(1), out=pbuf[:r]).exp_()
        if has_gh:
            # dH/dx = -p * (x - spx); for -inf entries p = 0 and the product must be 0
            c = x.sub_(spx[i : i + r].unsqueeze(1)).clamp_(min=-_FLT_MAX).mul_(p)
            c.mul_(g_entropy[i : i + r].unsqueeze(1).neg())
        else:
            c = x.zero_()
        if has_glp:
            glp = g_logprob[i : i + r].unsqueeze(1)
            c.addcmul_(p, glp, value=-1.0)  # -p * g_lp
            lab = labels[i : i + r].unsqueeze(1)
            c.scatter_add_(1, lab, glp.to(c.dtype))  # + onehot(label) * g_lp
        if inv_t != 1.0:
            c.mul_(inv_t)
        grad[i : i + r].copy_(c)
    return grad


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("heal::entropy_fwd", mutates_args=())
def _entropy_fwd(
    logits: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, backend: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entropy[N], logprob[N] or [0], lse[N])`` float32 for 2-D ``logits[N, V]``."""
    if backend == "triton":
        from heal_kernels.triton.entropy import entropy_forward

        return entropy_forward(logits, labels, temperature)
    return _torch_forward(logits, labels, temperature)


@_entropy_fwd.register_fake
def _entropy_fwd_fake(logits, labels, temperature, backend):
    n = logits.shape[0]
    ent = logits.new_empty((n,), dtype=torch.float32)
    lp = logits.new_empty((n,) if labels is not None else (0,), dtype=torch.float32)
    lse = logits.new_empty((n,), dtype=torch.float32)
    return ent, lp, lse


@torch.library.custom_op("heal::entropy_bwd", mutates_args=())
def _entropy_bwd(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    entropy: torch.Tensor,
    lse: torch.Tensor,
    g_entropy: Optional[torch.Tensor],
    g_logprob: Optional[torch.Tensor],
    temperature: float,
    backend: str,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits[N, V]`` (its dtype, contiguous)."""
    if g_entropy is not None:
        g_entropy = g_entropy.to(torch.float32).contiguous()
    if g_logprob is not None:
        g_logprob = g_logprob.to(torch.float32).contiguous()
    if backend == "triton":
        from heal_kernels.triton.entropy import entropy_backward

        return entropy_backward(logits, labels, entropy, lse, g_entropy, g_logprob, temperature)
    return _torch_backward(logits, labels, entropy, lse, g_entropy, g_logprob, temperature)


@_entropy_bwd.register_fake
def _entropy_bwd_fake(logits, labels, entropy, lse, g_entropy, g_logprob, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, backend = inputs
    entropy, _, lse = output
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.has_labels = labels is not None
    if ctx.has_labels:
        ctx.save_for_backward(logits, entropy, lse, labels)
    else:
        ctx.save_for_backward(logits, entropy, lse)


def _backward(ctx, g_entropy, g_logprob, g_lse):
    if ctx.has_labels:
        logits, entropy, lse, labels = ctx.saved_tensors
    else:
        logits, entropy, lse = ctx.saved_tensors
        labels = None
        g_logprob = None
    grad = torch.ops.heal.entropy_bwd(
        logits, labels, entropy, lse, g_entropy, g_logprob, ctx.temperature, ctx.backend
    )
    return grad, None, None, None


torch.library.register_autograd("heal::entropy_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def _check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a single number, got a tensor of shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _flatten_logits(logits) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor (float32/bfloat16/float16), got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary (last) dimension, got a 0-d tensor")
    v = logits.shape[-1]
    if v == 0:
        raise ValueError(f"logits must have a non-empty vocabulary (last) dimension, got shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    z = logits.reshape(-1, v)
    if z.stride(1) != 1 and v > 1:
        z = z.contiguous()
    return z, lead


def _flatten_labels(labels, logits: torch.Tensor, lead, vocab: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have shape logits.shape[:-1] = {lead}, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}; put them on one device")
    flat = labels.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    if flat.numel() and not torch.compiler.is_compiling():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must lie in [0, {vocab}) (the vocabulary size), found {bad}")
    return flat.contiguous()


def _raise_bad_rows(entropy: torch.Tensor, lse: torch.Tensor, lead) -> None:
    bad = torch.isnan(entropy) | ~torch.isfinite(lse)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), lead)) if len(lead) > 1 else (idx,)
        count = int(bad.sum())
        raise ValueError(
            f"logits row {idx} (index {where} of the leading shape {lead}) has no valid distribution "
            f"(a NaN or +inf entry, or every entry -inf); {count} bad row(s) in all"
        )


def _run(logits, labels, temperature, check):
    z, lead = _flatten_logits(logits)
    t = _check_temperature(temperature)
    lab = None if labels is None else _flatten_labels(labels, logits, lead, z.shape[1])
    backend = resolve_backend(z.device)
    entropy, logprob, lse = torch.ops.heal.entropy_fwd(z, lab, t, backend)
    if check:
        _raise_bad_rows(entropy, lse, lead)
    return entropy.reshape(lead), (None if lab is None else logprob.reshape(lead))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dimension.

    Args:
        logits: floating tensor ``[..., V]`` (float32 / bfloat16 / float16), any leading shape,
            rows may be strided; ``-inf`` entries are masked-out vocabulary.
        temperature: finite number > 0.

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``; differentiable w.r.t. ``logits``. A row
        with a NaN / ``+inf`` entry or only ``-inf`` entries gives NaN.

    Raises:
        TypeError: ``logits`` not a floating tensor, ``temperature`` not a number.
        ValueError: ``temperature`` <= 0 or not finite; ``logits`` 0-d or with ``V = 0``.
    """
    return _run(logits, None, temperature, False)[0]


def entropy_and_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    check: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entropy of ``softmax(logits / temperature)`` and the log-probability of ``labels``, in one
    pass over the logits.

    Args:
        logits: floating tensor ``[..., V]`` (float32 / bfloat16 / float16), any leading shape,
            rows may be strided; ``-inf`` entries are masked-out vocabulary.
        labels: integer tensor of shape ``logits.shape[:-1]`` on the same device, values in
            ``[0, V)``.
        temperature: finite number > 0 (logits are divided by it).
        check: when True, raise ``ValueError`` naming the first row without a valid distribution
            (NaN or ``+inf`` entry, or all entries ``-inf``). Costs one small device-to-host sync.

    Returns:
        ``(entropy, logprobs)``, both float32 of shape ``logits.shape[:-1]`` and differentiable
        w.r.t. ``logits`` (any mix of upstream gradients). Bad rows give NaN when ``check`` is
        False.

    Raises:
        TypeError: non-floating ``logits``, non-integer ``labels``, non-numeric ``temperature``.
        ValueError: ``temperature`` <= 0 or not finite; ``labels`` of the wrong shape, on another
            device, or outside ``[0, V)``; a bad row with ``check=True``.
    """
    if labels is None:
        raise TypeError("labels must be an integer tensor; use token_entropy(logits) for the entropy alone")
    return _run(logits, labels, temperature, check)
