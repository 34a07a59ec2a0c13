"""Token entropy and label log-probabilities straight from logits (DESIGN.md section 3.1).

Public API::

    token_entropy(logits, temperature=1.0) -> entropy                      # float32, logits.shape[:-1]
    entropy_and_logprobs(logits, labels, temperature=1.0, *, check=False) -> (entropy, logprobs)

With ``x = logits / temperature`` and ``p = softmax(x)`` over the last dimension:
``entropy = logsumexp(x) - sum(p * x)`` and ``logprob = x[label] - logsumexp(x)``. Both outputs are
differentiable w.r.t. ``logits`` for any mix of upstream gradients; the backward recomputes ``p``
from ``logits`` and four saved per-row floats and never stores a ``[N, V]`` tensor besides the
gradient itself.

Implementation: two ``torch.library`` custom ops, ``heal::entropy_fwd`` and ``heal::entropy_bwd``,
with fake (meta) implementations, so the functions trace under ``torch.compile(fullgraph=True)``,
and ``torch.library.register_autograd`` tying them together. Dispatch follows
:func:`heal_kernels._backend.resolve_backend`: CUDA tensors run the Triton kernels
(:mod:`heal_kernels.triton.entropy`); CPU tensors (backend ``cpu``) run the C++/OpenMP kernels of
``csrc/entropy.cpp`` (one parallel region over the rows, AVX2 when available, built on first use by
:func:`heal_kernels.cpu.load_extension`), falling back to a memory-bounded chunked-torch
implementation (blocks of rows with two float32 temporaries of at most ~4 MB each) when no
compiler is present; backend ``torch`` forces the chunked-torch path; with
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

# device types on which reading a tensor's contents from the host (``.item()``, ``bool()``, ``.cpu()``,
# a data-dependent output size) waits for the device: a device-to-host synchronisation. Every
# ``check=False`` decision of the ops and of heal's EDA step goes through :func:`reading_syncs`, so a
# CPU test can follow the CUDA path's Python logic by adding ``"cpu"`` here
# (tests/heal_kernels/test_no_host_sync.py).
_SYNCING_DEVICE_TYPES = ("cuda",)


def reading_syncs(device) -> bool:
    """Whether reading a tensor's contents on ``device`` from the host synchronises with the device
    (CUDA: yes; the CPU: no, the contents are already host memory)."""
    return torch.device(device).type in _SYNCING_DEVICE_TYPES

# bytes of each of the two float32 temporaries per block of rows on the CPU path
_CPU_CHUNK_BYTES = 4 << 20
_FLT_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# CPU: chunked torch, memory-bounded
# ---------------------------------------------------------------------------------------------


def _chunk_rows(vocab: int, chunk_bytes: Optional[int] = None) -> int:
    budget = _CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, budget // (4 * max(vocab, 1)))


def _shifted_rows(zc: torch.Tensor, buf: torch.Tensor, shift: Optional[torch.Tensor], inv_t: float):
    """``u = (zc - shift) / T`` in float32 in ``buf`` (``shift`` = row max of ``zc`` when None).

    Returns ``(u, shift)``. The subtraction happens in logit units before the scaling, so it is
    (nearly) exact: ``u`` carries no rounding at the scale of ``|z|``.
    """
    if shift is None:
        shift = zc.amax(dim=-1).to(torch.float32)
    u = torch.sub(zc, shift.unsqueeze(1), out=buf[: zc.shape[0]])
    if inv_t != 1.0:
        u.mul_(inv_t)
    return u, shift


def _torch_forward(z: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, chunk_bytes=None):
    """Chunked-torch forward: ``(entropy, logprob, stats)`` like the Triton kernel.

    Per block of rows (two float32 buffers of at most ``_CPU_CHUNK_BYTES``): ``u = (z - max z) / T``,
    ``e = exp(u)``, ``S = sum e``, ``entropy = log S - sum(e * u) / S``; ``stats = (max z, 0, log S)``.
    """
    n, v = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    entropy = torch.empty(n, **f32)
    stats = torch.zeros((n, 3), **f32)
    logprob = torch.empty(n if labels is not None else 0, **f32)
    if n == 0:
        return entropy, logprob, stats
    inv_t = 1.0 / temperature
    rows = min(n, _chunk_rows(v, chunk_bytes))
    ubuf = torch.empty((rows, v), **f32)
    ebuf = torch.empty((rows, v), **f32)
    for i in range(0, n, rows):
        zc = z[i : i + rows]
        r = zc.shape[0]
        u, c = _shifted_rows(zc, ubuf, None, inv_t)
        e = torch.exp(u, out=ebuf[:r])
        s = e.sum(dim=-1)
        log_s = s.log()
        if labels is not None:
            logprob[i : i + r] = u.gather(1, labels[i : i + r].unsqueeze(1)).squeeze(1) - log_s
        # -inf entries have e = 0: make 0 * u = 0, not NaN (NaN entries stay NaN)
        mean = torch.linalg.vecdot(e, u.clamp_(min=-_FLT_MAX)).div_(s)
        entropy[i : i + r] = log_s - mean
        stats[i : i + r, 0] = c
        stats[i : i + r, 2] = log_s
    # a row of only -inf has max -inf and u = NaN: NaN entropy and log S
    return entropy, logprob, stats


def _torch_backward(
    z: torch.Tensor,
    labels: Optional[torch.Tensor],
    entropy: torch.Tensor,
    stats: torch.Tensor,
    g_entropy: Optional[torch.Tensor],
    g_logprob: Optional[torch.Tensor],
    temperature: float,
    chunk_bytes=None,
) -> torch.Tensor:
    """Chunked-torch backward: ``v = (z - c) / T - mx``, ``p = exp(v - log S)`` recomputed per block
    of rows, ``dz = (-g_H * p * (v - mean) - g_lp * p + g_lp * onehot(label)) / T`` in ``z``'s dtype."""
    n, v = z.shape
    grad = torch.empty((n, v), dtype=z.dtype, device=z.device)
    has_gh = g_entropy is not None
    has_glp = g_logprob is not None and labels is not None
    if n == 0 or not (has_gh or has_glp):
        return grad.zero_()
    inv_t = 1.0 / temperature
    rows = min(n, _chunk_rows(v, chunk_bytes))
    f32 = dict(dtype=torch.float32, device=z.device)
    ubuf = torch.empty((rows, v), **f32)
    pbuf = torch.empty((rows, v), **f32)
    shift, mx, log_s = stats[:, 0], stats[:, 1].unsqueeze(1), stats[:, 2].unsqueeze(1)
    mean = log_s - entropy.unsqueeze(1)  # sum p * v per row
    for i in range(0, n, rows):
        zc = z[i : i + rows]
        r = zc.shape[0]
        u, _ = _shifted_rows(zc, ubuf, shift[i : i + r], inv_t)
        u.sub_(mx[i : i + r])
        p = torch.sub(u, log_s[i : i + r], out=pbuf[:r]).exp_()
        if has_gh:
            # dH/dv = -p * (v - mean); for -inf entries p = 0 and the product must be 0
            c = u.sub_(mean[i : i + r]).clamp_(min=-_FLT_MAX).mul_(p)
            c.mul_(g_entropy[i : i + r].unsqueeze(1).neg())
        else:
            c = u.zero_()
        if has_glp:
            glp = g_logprob[i : i + r].unsqueeze(1)
            c.addcmul_(p, glp, value=-1.0)  # -p * g_lp
            c.scatter_add_(1, labels[i : i + r].unsqueeze(1), glp)  # + onehot(label) * g_lp
        if inv_t != 1.0:
            c.mul_(inv_t)
        grad[i : i + r].copy_(c)
    return grad


_CPP_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cpp_forward(z: torch.Tensor, labels: Optional[torch.Tensor], temperature: float):
    """The C++/OpenMP forward (``csrc/entropy.cpp``): one parallel region over the rows, each row
    converted once into a float scratch row and reduced in two in-cache passes (AVX2 when the
    compiler targets it). ``None`` when the extension is unavailable (no compiler,
    ``HEAL_KERNELS_NO_BUILD=1``) or the dtype is not handled."""
    if z.device.type != "cpu" or z.dtype not in _CPP_DTYPES:
        return None
    from heal_kernels.cpu import EXTENSIONS, load_extension

    ext = load_extension("heal_entropy", EXTENSIONS["heal_entropy"])
    if ext is None:
        return None
    n, v = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    entropy = torch.empty(n, **f32)
    stats = torch.empty((n, 3), **f32)
    logprob = torch.empty(n if labels is not None else 0, **f32)
    if n:
        ext.forward(
            z.data_ptr(),
            _CPP_DTYPES[z.dtype],
            n,
            v,
            z.stride(0),
            float(temperature),
            labels.data_ptr() if labels is not None else 0,
            entropy.data_ptr(),
            logprob.data_ptr() if labels is not None else 0,
            stats.data_ptr(),
            torch.get_num_threads(),
        )
    return entropy, logprob, stats


def _cpp_backward(z, labels, entropy, stats, g_entropy, g_logprob, temperature):
    """The C++/OpenMP backward (``csrc/entropy.cpp``) or ``None`` when unavailable."""
    if z.device.type != "cpu" or z.dtype not in _CPP_DTYPES:
        return None
    from heal_kernels.cpu import EXTENSIONS, load_extension

    ext = load_extension("heal_entropy", EXTENSIONS["heal_entropy"])
    if ext is None:
        return None
    n, v = z.shape
    grad = torch.empty((n, v), dtype=z.dtype, device=z.device)
    has_glp = g_logprob is not None and labels is not None
    if n == 0 or (g_entropy is None and not has_glp):
        return grad.zero_()
    entropy = entropy.contiguous()
    stats = stats.contiguous()
    ok = ext.backward(
        z.data_ptr(),
        _CPP_DTYPES[z.dtype],
        n,
        v,
        z.stride(0),
        float(temperature),
        labels.data_ptr() if has_glp else 0,
        entropy.data_ptr(),
        stats.data_ptr(),
        g_entropy.data_ptr() if g_entropy is not None else 0,
        g_logprob.data_ptr() if has_glp else 0,
        grad.data_ptr(),
        torch.get_num_threads(),
    )
    return grad if ok else None


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


def _device_temperature(temperature: float, temperature_t: Optional[torch.Tensor], backend: str):
    """What a backend takes: the device tensor for Triton (read by the kernels), else a float (the
    torch fallback on a device reads the tensor back: one host sync, only on that path)."""
    if temperature_t is None:
        return temperature
    return temperature_t if backend == "triton" else float(temperature_t)


@torch.library.custom_op("heal::entropy_fwd", mutates_args=())
def _entropy_fwd(
    logits: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, backend: str,
    temperature_t: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entropy[N], logprob[N] or [0], stats[N, 3])`` float32 for 2-D ``logits[N, V]``.

    ``stats = (c, mx, log_s)`` are the per-row statistics of the backward:
    ``logsumexp(logits / T) = c / T + mx + log_s``. ``temperature_t``: the temperature as a
    one-element device tensor (then ``temperature`` is not used), read by the Triton kernels from
    device memory.
    """
    temperature = _device_temperature(temperature, temperature_t, backend)
    if backend == "triton":
        from heal_kernels.triton.entropy import entropy_forward

        return entropy_forward(logits, labels, temperature)
    if backend == "cpu":
        out = _cpp_forward(logits, labels, temperature)
        if out is not None:
            return out
    return _torch_forward(logits, labels, temperature)


@_entropy_fwd.register_fake
def _entropy_fwd_fake(logits, labels, temperature, backend, temperature_t=None):
    n = logits.shape[0]
    ent = logits.new_empty((n,), dtype=torch.float32)
    lp = logits.new_empty((n,) if labels is not None else (0,), dtype=torch.float32)
    return ent, lp, logits.new_empty((n, 3), dtype=torch.float32)


@torch.library.custom_op("heal::entropy_bwd", mutates_args=())
def _entropy_bwd(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    entropy: torch.Tensor,
    stats: torch.Tensor,
    g_entropy: Optional[torch.Tensor],
    g_logprob: Optional[torch.Tensor],
    temperature: float,
    backend: str,
    temperature_t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits[N, V]`` (its dtype, contiguous); None upstream gradients are zero.
    ``temperature_t`` as in ``heal::entropy_fwd``."""
    temperature = _device_temperature(temperature, temperature_t, backend)
    if g_entropy is not None:
        g_entropy = g_entropy.to(torch.float32).contiguous()
    if g_logprob is not None:
        g_logprob = g_logprob.to(torch.float32).contiguous()
    if backend == "triton":
        from heal_kernels.triton.entropy import entropy_backward

        return entropy_backward(logits, labels, entropy, stats, g_entropy, g_logprob, temperature)
    if backend == "cpu":
        grad = _cpp_backward(logits, labels, entropy, stats, g_entropy, g_logprob, temperature)
        if grad is not None:
            return grad
    return _torch_backward(logits, labels, entropy, stats, g_entropy, g_logprob, temperature)


@_entropy_bwd.register_fake
def _entropy_bwd_fake(logits, labels, entropy, stats, g_entropy, g_logprob, temperature, backend,
                      temperature_t=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, backend, temperature_t = inputs
    entropy, _, stats = output
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.has_labels = labels is not None
    ctx.has_temperature_t = temperature_t is not None
    saved = [logits, entropy, stats] + ([labels] if ctx.has_labels else [])
    ctx.save_for_backward(*saved, *([temperature_t] if ctx.has_temperature_t else []))


def _backward(ctx, g_entropy, g_logprob, g_stats):
    saved = list(ctx.saved_tensors)
    temperature_t = saved.pop() if ctx.has_temperature_t else None
    if ctx.has_labels:
        logits, entropy, stats, labels = saved
    else:
        logits, entropy, stats = saved
        labels = None
        g_logprob = None
    grad = torch.ops.heal.entropy_bwd(
        logits, labels, entropy, stats, g_entropy, g_logprob, ctx.temperature, ctx.backend, temperature_t
    )
    return grad, None, None, None, None


torch.library.register_autograd("heal::entropy_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def _check_temperature(temperature):
    """The temperature as a float, or, for a one-element tensor whose contents cannot be read without
    a host sync (on CUDA), the tensor itself: the Triton kernels read it from device memory. Such a
    tensor's value is not checked (reading it is the sync); a number or a CPU tensor must be finite
    and > 0."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a single number, got a tensor of shape {tuple(temperature.shape)}")
        if not (temperature.dtype.is_floating_point or temperature.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"temperature must be a real number, got a tensor of dtype {temperature.dtype}")
        if reading_syncs(temperature.device):
            return temperature.detach().reshape(())
        temperature = temperature.item()  # host memory: free
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


def _flatten_labels(labels, ref: torch.Tensor, lead, vocab: int, check: bool = True, ref_name: str = "logits",
                    vocab_what: str = "the vocabulary size") -> torch.Tensor:
    """Labels as a contiguous int64 ``[N]``, validated against ``ref`` (the ``logits``, or the
    ``hidden`` states of the linear op: same device, shape ``ref_name.shape[:-1] == lead``). Their
    range ``[0, vocab)`` is checked on the CPU always and on CUDA only with ``check`` (reading
    ``min`` / ``max`` back is a device-to-host sync, :func:`reading_syncs`); unchecked CUDA labels
    outside ``[0, V)`` are never dereferenced: their log-prob is NaN."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have shape {ref_name}.shape[:-1] = {lead}, got {tuple(labels.shape)}")
    if labels.device != ref.device:
        verb = "are" if ref_name == "logits" else "is"
        raise ValueError(f"labels are on {labels.device} but {ref_name} {verb} on {ref.device}; put them on one device")
    flat = labels.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    if flat.numel() and not torch.compiler.is_compiling() and (check or not reading_syncs(flat.device)):
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            msg = f"labels must lie in [0, {vocab}) ({vocab_what}), found {bad}"
            if lo < 0 and bool((flat == IGNORE_INDEX).any()):
                msg += f"; {IGNORE_INDEX_HINT}"
            raise ValueError(msg)
    return flat.contiguous()


IGNORE_INDEX = -100
IGNORE_INDEX_HINT = (
    "-100 is the ignore index of HF / TRL losses, but these ops take a real token at every position: "
    "replace it before the call (e.g. labels.masked_fill(labels == -100, 0)) and drop those positions "
    "from what you use afterwards (multiply the log-probs / entropies by your response or attention mask)"
)


def _raise_bad_rows(entropy: torch.Tensor, stats: torch.Tensor, lead) -> None:
    bad = torch.isnan(entropy) | ~torch.isfinite(stats).all(dim=1)
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
    lab = None if labels is None else _flatten_labels(labels, logits, lead, z.shape[1], check)
    backend = resolve_backend(z.device)
    if isinstance(t, torch.Tensor):  # on the device: the kernels read it there
        entropy, logprob, stats = torch.ops.heal.entropy_fwd(z, lab, 1.0, backend, t)
    else:
        entropy, logprob, stats = torch.ops.heal.entropy_fwd(z, lab, t, backend)
    if check:
        _raise_bad_rows(entropy, stats, lead)
    return entropy.reshape(lead), (None if lab is None else logprob.reshape(lead))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dimension.

    Args:
        logits: floating tensor ``[..., V]`` (float32 / bfloat16 / float16), any leading shape,
            rows may be strided; ``-inf`` entries are masked-out vocabulary.
        temperature: finite number > 0 (a Python number or a one-element tensor).

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``; differentiable w.r.t. ``logits``. A row
        with a NaN / ``+inf`` entry or only ``-inf`` entries gives NaN.

    On CUDA neither the forward nor the backward synchronises with the host, whether the temperature
    is a number or a CUDA tensor (the kernels read it from device memory; its value is then not
    checked).

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
            ``[0, V)``. There is no ignore index: where HF / TRL labels hold ``-100``, put any valid
            id there (``labels.masked_fill(labels == -100, 0)``) and mask those positions' outputs.
        temperature: finite number > 0 (logits are divided by it).
        check: when True, raise ``ValueError`` naming the first row without a valid distribution
            (NaN or ``+inf`` entry, or all entries ``-inf``), and on CUDA also check that the labels
            lie in ``[0, V)``. Costs small device-to-host syncs. With False (the default) the CUDA
            path never synchronises with the host: an out-of-range label then gives a NaN
            log-prob instead of an error (CPU labels are always checked). A temperature given as
            a CUDA tensor is read by the kernels from device memory: no sync (its value is then
            not checked).

    Returns:
        ``(entropy, logprobs)``, both float32 of shape ``logits.shape[:-1]`` and differentiable
        w.r.t. ``logits`` (any mix of upstream gradients). Bad rows give NaN when ``check`` is
        False.

    Raises:
        TypeError: non-floating ``logits``, non-integer ``labels``, non-numeric ``temperature``.
        ValueError: ``temperature`` <= 0 or not finite; ``labels`` of the wrong shape, on another
            device, or outside ``[0, V)`` (CUDA: only with ``check=True``); a bad row with ``check=True``.
    """
    if labels is None:
        raise TypeError("labels must be an integer tensor; use token_entropy(logits) for the entropy alone")
    return _run(logits, labels, temperature, check)
