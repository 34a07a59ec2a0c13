"""Token entropy and label log-probabilities straight from hidden states and a linear head, without
ever holding ``[tokens x vocab]`` logits.

Public API::

    linear_entropy_and_logprobs(hidden, weight, labels, temperature=1.0, *, bias=None,
                                chunk_tokens=None, chunk_vocab=None, process_group=None,
                                check=False) -> (entropy, logprobs)
    linear_token_entropy(hidden, weight, temperature=1.0, *, bias=None, chunk_tokens=None,
                         chunk_vocab=None, process_group=None) -> entropy

Meaning: exactly ``heal_kernels.entropy_and_logprobs(hidden @ weight.T (+ bias), labels,
temperature)`` (float32 outputs of shape ``hidden.shape[:-1]``, differentiable w.r.t. ``hidden``,
``weight`` and ``bias`` through both outputs, any mix of upstream gradients), computed one block of
logits ``[chunk_tokens x chunk_vocab]`` at a time:

* forward, per vocabulary block (outer loop; the weight is read once) and token chunk (inner):
  ``z = hidden_chunk @ weight_block.T (+ bias_block)`` by torch (cuBLAS / the CPU BLAS) into one
  reused buffer, then heal's kernel merges the block's per-row softmax statistics
  ``(max, sum exp, sum exp * x)`` of ``x = z / T`` into a running float32 state per row (the triple
  merges associatively across blocks) and picks up the label's logit. At the end
  ``lse = m + log s``, ``entropy = log s - t / s``, ``logprob = x[label] - lse``. Saved for the
  backward: the inputs and two floats per row (``lse``, ``mean = sum p x``).
* backward, same loops: the block is recomputed by the same matmul, heal's kernel turns it into
  its gradient in place, ``dz = (-p (g_H (x - mean) + g_lp) + g_lp onehot(label)) / T`` with
  ``p = exp(x - lse)``, then ``d_hidden_chunk += dz @ W_block`` and ``d_W_block += dz.T @ hidden_chunk``
  (and ``d_bias_block += dz.sum(0)``), accumulated in float32.

Memory beyond inputs, outputs and gradients: one logits block in the inputs' dtype, the matmul
results of one chunk (``[chunk_tokens, D]``, ``[chunk_vocab, D]``), float32 accumulators for
``d_hidden`` / ``d_W_block`` when the inputs are 16-bit, and O(N) per-row floats. Never a function of
``N x V``.

Backends (:func:`heal_kernels._backend.resolve_backend`): CUDA tensors run the Triton kernels of
:mod:`heal_kernels.triton.linear`; CPU tensors run the C++/OpenMP kernels of ``csrc/linear.cpp``
(float32 / bfloat16 blocks; built on first use), else chunked torch (``torch`` backend, float16, or
no compiler).

Vocabulary parallel (``process_group``): ``weight`` (and ``bias``) hold this rank's contiguous
shard of the vocabulary, rank ``r`` of the group owning rows ``[r * V_local, (r + 1) * V_local)`` of
the full head (equal shards, as Megatron's vocab-parallel layers); ``hidden`` and ``labels``
(global token ids) are the same on every rank. The per-row statistics are all-reduced (max, then
the rescaled sums and the label's logit: two small collectives of ``N`` and ``3N`` floats), so every
rank returns the full-vocabulary entropy and log-probs. Gradients stay local: ``d_weight`` is this
shard's, and ``d_hidden`` is this shard's contribution (sum it over the group, as the reduction in
Megatron's input-gradient region of a column-parallel head does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from heal_kernels._backend import resolve_backend
from heal_kernels.ops.entropy import _check_temperature, _flatten_labels, reading_syncs

__all__ = ["linear_entropy_and_logprobs", "linear_token_entropy", "default_chunks"]

_FLT_MAX = torch.finfo(torch.float32).max
# rows of a block handled at once by the chunked-torch kernels: an eighth of the block, at most
# 8 MB of float32 per temporary, so that their few temporaries stay under one block
_TORCH_SUBBLOCK_BYTES = 8 << 20


def _subblock_rows(r: int, c: int) -> int:
    return max(1, min(max(1, r // 8), _TORCH_SUBBLOCK_BYTES // (4 * max(c, 1))))


def default_chunks(device: torch.device) -> Tuple[int, int]:
    """``(chunk_tokens, chunk_vocab)`` used when not given: 4096 x 4096 on the CPU (a 64 MiB float32
    block, large enough for full BLAS speed), 8192 x 8192 on CUDA."""
    return (8192, 8192) if device.type == "cuda" else (4096, 4096)


# ---------------------------------------------------------------------------------------------
# per-block kernels: torch fallback, C++ and Triton behind one interface
# ---------------------------------------------------------------------------------------------


def _merge_into(state: torch.Tensor, mb: torch.Tensor, sb: torch.Tensor, tb: torch.Tensor) -> None:
    """Merge per-row block statistics ``(mb, sb, tb)`` into ``state[:, :3] = (m, s, t)`` in place."""
    m, s, t = state[:, 0], state[:, 1], state[:, 2]
    mm = torch.maximum(m, mb)
    mm_safe = torch.where(mm == -torch.inf, 0.0, mm)
    old, new = m != -torch.inf, mb != -torch.inf
    d0 = torch.where(old, m - mm_safe, 0.0)
    d1 = torch.where(new, mb - mm_safe, 0.0)
    a0 = torch.where(old, d0.exp(), 0.0)
    a1 = torch.where(new, d1.exp(), 0.0)
    t_new = a0 * (t + s * d0) + a1 * (tb + sb * d1)
    s_new = a0 * s + a1 * sb
    bad = torch.isnan(m) | torch.isnan(sb)
    state[:, 0] = torch.where(bad, torch.nan, mm)
    state[:, 1] = torch.where(bad, torch.nan, s_new)
    state[:, 2] = torch.where(bad, torch.nan, t_new)


def _torch_block_stats(z, labels, state, inv_t):
    r, c = z.shape
    rows = _subblock_rows(r, c)
    for i in range(0, r, rows):
        x = z[i : i + rows].to(torch.float32) * inv_t
        mb = x.amax(dim=1)
        mb_safe = torch.where(mb == -torch.inf, 0.0, mb)
        u = x.sub_(mb_safe.unsqueeze(1))
        e = u.exp()
        sb = e.sum(dim=1)
        tb = torch.linalg.vecdot(e, u.clamp_(min=-_FLT_MAX))  # -inf entries: 0 * (-FLT_MAX) = 0
        sb = torch.where(torch.isnan(mb), torch.nan, sb)
        _merge_into(state[i : i + rows], mb, sb, tb)
        if labels is not None:
            lab = labels[i : i + rows]
            inside = (lab >= 0) & (lab < c)
            picked = z[i : i + rows].gather(1, lab.clamp(0, c - 1).unsqueeze(1)).squeeze(1).to(torch.float32) * inv_t
            state[i : i + rows, 3] = torch.where(inside, picked, state[i : i + rows, 3])


def _torch_block_grad(z, labels, coef, inv_t):
    r, c = z.shape
    rows = _subblock_rows(r, c)
    for i in range(0, r, rows):
        zc = z[i : i + rows]
        cf = coef[i : i + rows]
        x = zc.to(torch.float32) * inv_t
        p = (x - cf[:, 0:1]).exp_()
        centred = x.sub_(cf[:, 1:2]).clamp_(min=-_FLT_MAX)
        d = centred.mul_(cf[:, 2:3]).add_(cf[:, 3:4]).mul_(p).mul_(-inv_t)
        d = torch.where(p > 0, d, 0.0)
        if labels is not None:
            lab = labels[i : i + rows]
            inside = ((lab >= 0) & (lab < c)).unsqueeze(1)
            add = torch.where(inside, cf[:, 3:4] * inv_t, 0.0)
            d.scatter_add_(1, lab.clamp(0, c - 1).unsqueeze(1), add)
        bad = ~(torch.isfinite(cf[:, 0:1]) & torch.isfinite(cf[:, 1:2]))
        d = torch.where(bad, torch.nan, d)
        zc.copy_(d)


_CPP_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _cpp_ext(z: torch.Tensor):
    if z.device.type != "cpu" or z.dtype not in _CPP_DTYPES or z.stride(1) != 1:
        return None
    from heal_kernels.cpu import EXTENSIONS, load_extension

    return load_extension("heal_linear", EXTENSIONS["heal_linear"])


_TORCH_STEPS = {"block_stats": _torch_block_stats, "block_grad": _torch_block_grad}


def _block_step(step, backend, z, labels, rowwise, temperature):
    """One per-block kernel on ``backend``: ``step`` is ``"block_stats"`` (merge ``z``'s statistics
    into ``rowwise`` = the state) or ``"block_grad"`` (``z`` into its gradient from ``rowwise`` = the
    coefficients). Triton, the C++ extension (CPU float32 / bfloat16), else chunked torch.
    ``temperature``: :func:`_launch_temperature`'s, prepared once per op call (a float, or for
    Triton a device temperature tensor's launch constants, read by the kernels from device memory)."""
    if backend == "triton":
        from heal_kernels.triton import linear as tri

        return getattr(tri, step)(z, labels, rowwise, temperature)
    temperature = float(temperature)
    if backend == "cpu":
        ext = _cpp_ext(z)
        if ext is not None:
            r, c = z.shape
            getattr(ext, step)(z.data_ptr(), _CPP_DTYPES[z.dtype], r, c, z.stride(0), temperature,
                               labels.data_ptr() if labels is not None else 0, rowwise.data_ptr(),
                               torch.get_num_threads())
            return None
    return _TORCH_STEPS[step](z, labels, rowwise, 1.0 / temperature)


def _launch_temperature(temperature, backend):
    """The temperature as every block launch of one op call (its forward and backward) takes it,
    prepared once: a float as it is; a one-element device tensor, for Triton, as its launch constants
    (:func:`heal_kernels.triton.linear.prepare_temperature`: a few small device ops, not one set per
    block), for the other backends read back once (a float)."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    if backend == "triton":
        from heal_kernels.triton import linear as tri

        return tri.prepare_temperature(temperature)
    return float(temperature)


# ---------------------------------------------------------------------------------------------
# the blocked loops
# ---------------------------------------------------------------------------------------------


def _logits_block(buf, h, w, b):
    """``h @ w.T (+ b)`` into the leading ``[len(h), len(w)]`` part of ``buf`` (contiguous rows)."""
    out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is not None:
        return torch.addmm(b, h, w.T, out=out)
    return torch.mm(h, w.T, out=out)


def _forward(h, w, b, labels, temperature, ct, cv, backend, vocab_start):
    """Per-row float32 state ``[N, 4] = (m, s, t, x_label)`` over this weight's vocabulary."""
    n = h.shape[0]
    v = w.shape[0]
    state = torch.zeros((n, 4), dtype=torch.float32, device=h.device)
    state[:, 0] = -torch.inf
    if n == 0:
        return state
    buf = torch.empty(min(ct, n) * min(cv, v), dtype=h.dtype, device=h.device)
    for v0 in range(0, v, cv):
        v1 = min(v, v0 + cv)
        wb = w[v0:v1]
        bb = None if b is None else b[v0:v1]
        for t0 in range(0, n, ct):
            t1 = min(n, t0 + ct)
            z = _logits_block(buf, h[t0:t1], wb, bb)
            lab = None if labels is None else labels[t0:t1] - (vocab_start + v0)
            _block_step("block_stats", backend, z, lab, state[t0:t1], temperature)
    return state


def _all_reduce_state(state: torch.Tensor, group) -> None:
    """Combine per-row ``(m, s, t, x_label)`` of every rank's vocabulary shard, in place."""
    import torch.distributed as dist

    m = state[:, 0].clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(m == -torch.inf, 0.0, m)
    old = state[:, 0] != -torch.inf
    d = torch.where(old, state[:, 0] - m_safe, 0.0)
    a = torch.where(old, d.exp(), 0.0)
    sums = torch.stack([a * state[:, 1], a * (state[:, 2] + state[:, 1] * d), state[:, 3]], dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    state[:, 0] = m
    state[:, 1:] = sums


def _backward(h, w, b, labels, coef, temperature, ct, cv, backend, vocab_start, need_h, need_w, need_b):
    n, dim = h.shape
    v = w.shape[0]
    f32 = torch.float32
    d_h = torch.zeros((n, dim), dtype=f32, device=h.device) if need_h else None
    d_w = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if need_w else None
    d_b = torch.zeros((v,), dtype=f32, device=w.device) if need_b else None
    if n == 0:
        return d_h, d_w, d_b
    buf = torch.empty(min(ct, n) * min(cv, v), dtype=h.dtype, device=h.device)
    acc_w = None
    if need_w and w.dtype != f32:
        acc_w = torch.empty((min(cv, v), dim), dtype=f32, device=w.device)
    for v0 in range(0, v, cv):
        v1 = min(v, v0 + cv)
        wb = w[v0:v1]
        bb = None if b is None else b[v0:v1]
        if acc_w is not None:
            acc_w[: v1 - v0].zero_()
        for t0 in range(0, n, ct):
            t1 = min(n, t0 + ct)
            hc = h[t0:t1]
            z = _logits_block(buf, hc, wb, bb)
            lab = None if labels is None else labels[t0:t1] - (vocab_start + v0)
            _block_step("block_grad", backend, z, lab, coef[t0:t1], temperature)
            if need_h:
                if z.dtype == f32:
                    d_h[t0:t1].addmm_(z, wb)
                else:
                    d_h[t0:t1] += torch.mm(z, wb)
            if need_w:
                if acc_w is None:
                    d_w[v0:v1].addmm_(z.T, hc)
                else:
                    acc_w[: v1 - v0] += torch.mm(z.T, hc)
            if need_b:
                d_b[v0:v1] += z.sum(dim=0, dtype=f32)
        if acc_w is not None:
            d_w[v0:v1].copy_(acc_w[: v1 - v0])
    return d_h, d_w, d_b


class _LinearEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, labels, temperature, ct, cv, backend, group, vocab_start, v_unchecked):
        temperature = _launch_temperature(temperature, backend)  # once per call, kept for the backward
        state = _forward(h, w, b, labels, temperature, ct, cv, backend, vocab_start)
        if group is not None:
            _all_reduce_state(state, group)
        m, s, t = state[:, 0], state[:, 1], state[:, 2]
        log_s = s.log()
        entropy = log_s - t / s
        lse = m + log_s
        mean = m + t / s  # sum p x
        logprob = state[:, 3] - lse if labels is not None else entropy.new_empty(0)
        if labels is not None and v_unchecked:
            # labels not range-checked (CUDA, check=False): no block picked an out-of-range label's
            # logit up, so state[:, 3] holds 0 there; make its log-prob NaN (as the logits op), on the
            # device
            logprob = torch.where((labels >= 0) & (labels < v_unchecked), logprob, torch.nan)
        ctx.save_for_backward(h, w, b, labels, torch.stack([lse, mean], dim=1))
        ctx.cfg = (temperature, ct, cv, backend, vocab_start)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*([] if labels is not None else [logprob]))
        return entropy, logprob

    @staticmethod
    def backward(ctx, g_entropy, g_logprob):
        h, w, b, labels, lm = ctx.saved_tensors
        temperature, ct, cv, backend, vocab_start = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if labels is None:
            g_logprob = None
        if g_entropy is None and g_logprob is None:
            return (None,) * 11
        n = h.shape[0]
        coef = torch.zeros((n, 4), dtype=torch.float32, device=h.device)
        coef[:, :2] = lm
        if g_entropy is not None:
            coef[:, 2] = g_entropy.to(torch.float32)
        if g_logprob is not None:
            coef[:, 3] = g_logprob.to(torch.float32)
        d_h, d_w, d_b = _backward(
            h, w, b, labels if g_logprob is not None else None, coef, temperature, ct, cv, backend, vocab_start,
            need_h, need_w, need_b and b is not None,
        )
        if d_h is not None:
            d_h = d_h.to(h.dtype)
        if d_b is not None:
            d_b = d_b.to(b.dtype)
        return d_h, d_w, d_b, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def _check_chunk(value, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _prepare(hidden, weight, labels, bias, chunk_tokens, chunk_vocab, process_group, check=False):
    """Validate and flatten the inputs. The last value returned is ``V_total`` when the labels were not
    range-checked (CUDA with ``check=False``: reading them back would be a host sync), else 0."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be a floating-point tensor (float32/bfloat16/float16), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have a feature (last) dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden_size], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [vocab, {hidden.shape[-1]}] to match hidden's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have a non-empty vocabulary (first) dimension")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; put them on one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (weight's vocabulary), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    dflt_t, dflt_v = default_chunks(hidden.device)
    ct = _check_chunk(chunk_tokens, "chunk_tokens", dflt_t)
    cv = _check_chunk(chunk_vocab, "chunk_vocab", dflt_v)

    lead = tuple(hidden.shape[:-1])
    h = hidden.reshape(-1, hidden.shape[-1])
    v_local = weight.shape[0]
    vocab_start, v_total = 0, v_local
    if process_group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        vocab_start, v_total = rank * v_local, world * v_local

    lab = None
    unchecked = 0
    if labels is not None:
        what = "the vocabulary size" if process_group is None else "the vocabulary size over the process group"
        lab = _flatten_labels(labels, hidden, lead, v_total, check=check, ref_name="hidden", vocab_what=what)
        if not check and reading_syncs(lab.device):
            unchecked = v_total
    backend = resolve_backend(h.device)
    return h, lab, lead, ct, cv, backend, vocab_start, unchecked


@torch.compiler.disable
def linear_entropy_and_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
    process_group=None,
    check: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entropy of ``softmax((hidden @ weight.T + bias) / temperature)`` and the log-probability of
    ``labels``, never materialising more than one ``[chunk_tokens, chunk_vocab]`` block of logits.

    Args:
        hidden: ``[..., D]`` float32 / bfloat16 / float16 (any leading shape, may be strided).
        weight: ``[V, D]`` in hidden's dtype (a vocabulary shard with ``process_group``).
        labels: integer tensor of shape ``hidden.shape[:-1]``, values in ``[0, V)`` (global ids in
            ``[0, V * world_size)`` with ``process_group``). No ignore index: replace HF / TRL's
            ``-100`` by any valid id (``labels.masked_fill(labels == -100, 0)``) and mask those positions.
        temperature: finite number > 0 (logits are divided by it).
        bias: optional ``[V]`` in hidden's dtype; ``-inf`` entries mask tokens out.
        chunk_tokens, chunk_vocab: block shape (defaults: :func:`default_chunks`).
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (module docstring); None for a full head.
        check: when True, also check on CUDA that the labels lie in their range (reading their
            ``min`` / ``max`` back is a device-to-host sync). With False (the default) the CUDA path
            never synchronises with the host: an out-of-range label then gives a NaN log-prob
            instead of an error (CPU labels are always checked). A tensor ``temperature`` on CUDA is
            read by the kernels from device memory: no sync (its value is then not checked).

    Returns:
        ``(entropy, logprobs)``, float32 of shape ``hidden.shape[:-1]``, differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias``. A row whose logits hold a NaN or only ``-inf`` gives NaN.

    Raises:
        TypeError: non-tensor or non-floating inputs, mismatched dtypes, non-integer labels.
        ValueError: mismatched shapes or devices, labels out of range (CUDA: only with
            ``check=True``), bad temperature or chunk.
    """
    if labels is None:
        raise TypeError(
            "labels must be an integer tensor; use linear_token_entropy(hidden, weight) for the entropy alone"
        )
    t = _check_temperature(temperature)
    h, lab, lead, ct, cv, backend, vs, unchecked = _prepare(hidden, weight, labels, bias, chunk_tokens, chunk_vocab,
                                                          process_group, check=bool(check))
    entropy, logprob = _LinearEntropy.apply(h, weight, bias, lab, t, ct, cv, backend, process_group, vs, unchecked)
    return entropy.reshape(lead), logprob.reshape(lead)


@torch.compiler.disable
def linear_token_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
    process_group=None,
) -> torch.Tensor:
    """Entropy of ``softmax((hidden @ weight.T + bias) / temperature)``, float32 of shape
    ``hidden.shape[:-1]``; arguments as :func:`linear_entropy_and_logprobs` (without labels)."""
    t = _check_temperature(temperature)
    h, _, lead, ct, cv, backend, vs, _ = _prepare(hidden, weight, None, bias, chunk_tokens, chunk_vocab, process_group)
    entropy, _ = _LinearEntropy.apply(h, weight, bias, None, t, ct, cv, backend, process_group, vs, 0)
    return entropy.reshape(lead)
