"""Plain-torch float64 definitions of every heal op: the executable spec.

Nothing here is fast. Every kernel (Triton, C++, chunked torch) is tested against these
functions on fresh random inputs. They follow ``DESIGN.md`` section 3 literally:

* :func:`entropy_and_logprobs` -- token entropy and label log-probabilities from logits.
* :func:`linear_entropy_and_logprobs` -- the same from hidden states and a linear head
  (``logits = hidden @ weight.T + bias``), literally materialising the logits.
* :func:`nearest_indices` -- the nearest-neighbour index rule of ``F.interpolate(mode="nearest")``.
* :func:`kl_similarity`, :func:`hti_similarity`, :func:`pl_similarity` -- one pair, literally as the
  reference EDA implementation / the paper's appendix A.2 (eqs. 9-11) compute it.
* :func:`pairwise_similarity`, :func:`grouped_max_similarity` -- the per-pair Python loop over a batch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "entropy_and_logprobs",
    "token_entropy",
    "linear_entropy_and_logprobs",
    "nearest_indices",
    "stretch",
    "kl_similarity",
    "hti_similarity",
    "pl_similarity",
    "pair_similarity",
    "pairwise_similarity",
    "grouped_max_similarity",
    "split_ragged",
    "HTI_TOP_FRACTION",
]

HTI_TOP_FRACTION = 0.2

# ---------------------------------------------------------------------------------------------
# 3.1 token entropy / log-probabilities
# ---------------------------------------------------------------------------------------------


def entropy_and_logprobs(
    logits: torch.Tensor, labels: Optional[torch.Tensor] = None, temperature: float = 1.0
):
    """Float64 entropy (and label log-probabilities) of ``softmax(logits / temperature)``.

    ``entropy = logsumexp(x) - sum(p * x)``, ``logprob = x[label] - logsumexp(x)`` with
    ``x = logits / temperature``. ``-inf`` logits have ``p = 0`` and contribute nothing to the
    entropy (``0 * -inf`` is taken as 0). Returns ``(entropy, logprobs)``; ``logprobs`` is ``None``
    when ``labels`` is ``None``. Differentiable (autograd in float64) for gradient tests.
    """
    x = logits.to(torch.float64) / temperature
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse.unsqueeze(-1))
    finite = torch.isfinite(x)
    px = torch.where(finite, p * torch.where(finite, x, torch.zeros_like(x)), torch.zeros_like(x))
    entropy = lse - px.sum(dim=-1)
    # NaN anywhere in a row poisons that row (the `where` above would hide it).
    entropy = torch.where(torch.isnan(x).any(dim=-1), torch.full_like(entropy, math.nan), entropy)
    if labels is None:
        return entropy, None
    picked = x.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return entropy, picked - lse


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return entropy_and_logprobs(logits, None, temperature)[0]


def linear_entropy_and_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
):
    """Float64 :func:`entropy_and_logprobs` of ``logits = hidden @ weight.T (+ bias)``.

    ``hidden[..., D]``, ``weight[V, D]``, ``bias[V]``; the matmul is done in float64 on float64
    copies of the inputs, so the result is the exact value for the given (possibly bf16/fp16)
    input values. Differentiable w.r.t. all three (autograd in float64).
    """
    logits = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    return entropy_and_logprobs(logits, labels, temperature)


# ---------------------------------------------------------------------------------------------
# 3.2 entropy-dynamics similarity, one pair at a time
# ---------------------------------------------------------------------------------------------


def nearest_indices(m: int, n: int) -> torch.Tensor:
    """Source index in a length-``m`` sequence for each of ``n`` output positions.

    ``src(t) = min(floor(float32(t) * (float32(m) / float32(n))), m - 1)``: the rule of
    ``F.interpolate(mode="nearest")`` (float32 scale, not exact integer division).
    """
    if m <= 0 or n <= 0:
        raise ValueError(f"lengths must be positive, got m={m}, n={n}")
    scale = torch.tensor(m, dtype=torch.float32) / torch.tensor(n, dtype=torch.float32)
    t = torch.arange(n, dtype=torch.float32)
    return torch.clamp(torch.floor(t * scale).to(torch.int64), max=m - 1)


def stretch(seq: torch.Tensor, n: int) -> torch.Tensor:
    """Nearest-neighbour stretch of a 1-D sequence to length ``n`` with ``F.interpolate``.

    The source positions are interpolated as float32, so the index rule is float32's (that of the
    entropies' own dtype) even when ``seq`` is float64: ``F.interpolate`` on a float64 input computes
    its scale in float64, which picks different neighbours at a few positions for lengths in the
    thousands. The values themselves are gathered at full precision.
    """
    seq = seq.reshape(-1)
    pos = torch.arange(seq.numel(), dtype=torch.float32, device=seq.device)
    src = F.interpolate(pos.reshape(1, 1, -1), size=n, mode="nearest").reshape(-1).to(torch.int64)
    return seq[src]


def _align(a: torch.Tensor, b: torch.Tensor):
    """Stretch the shorter of ``a``, ``b`` to the longer one's length (the other is unchanged)."""
    if a.numel() < b.numel():
        a = stretch(a, b.numel())
    elif b.numel() < a.numel():
        b = stretch(b, a.numel())
    return a, b


def kl_similarity(a: torch.Tensor, b: torch.Tensor, kl_direction: str = "scored_first") -> float:
    """``-KL`` between the softmaxes of two aligned entropy sequences (paper eq. 9).

    ``a`` is the scored trajectory, ``b`` the neighbour. ``kl_direction="scored_first"`` computes
    ``KL(softmax(a') || softmax(b'))`` (the reference implementation); ``"short_first"`` computes
    ``KL(short || long)`` as the paper's appendix writes it (equal lengths: scored first).
    Follows the reference loop: ``F.interpolate``, ``softmax``, ``F.kl_div(reduction="sum")``.
    """
    if kl_direction not in ("scored_first", "short_first"):
        raise ValueError(f"kl_direction must be 'scored_first' or 'short_first', got {kl_direction!r}")
    a = a.to(torch.float64).reshape(-1)
    b = b.to(torch.float64).reshape(-1)
    swap = kl_direction == "short_first" and b.numel() < a.numel()
    a2, b2 = _align(a, b)
    p, q = (b2, a2) if swap else (a2, b2)
    # F.kl_div(input=log q, target=p) = sum p * (log p - log q) = KL(p || q)
    kl = F.kl_div(F.log_softmax(q, dim=0), F.softmax(p, dim=0), reduction="sum")
    return -float(kl)


def hti_similarity(a: torch.Tensor, b: torch.Tensor, top_fraction: float = HTI_TOP_FRACTION) -> float:
    """High-entropy Tokens Intersection (paper eq. 10).

    After aligning both sequences to a common length ``N``, keep the top ``k`` positions of each
    (``k = max(1, ceil(top_fraction * N))``, ties broken toward the lower index), and sum
    ``min(a_t [t in top(a)], b_t [t in top(b)])`` over ``t``.
    """
    a2, b2 = _align(a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1))
    n = a2.numel()
    k = max(1, math.ceil(top_fraction * n))

    def masked(x):
        # stable sort descending: equal values keep index order, so ties go to the lower index
        order = torch.sort(-x, stable=True).indices[:k]
        m = torch.zeros_like(x)
        m[order] = 1.0
        return x * m

    return float(torch.minimum(masked(a2), masked(b2)).sum())


def _linear_fit(x: torch.Tensor):
    """Slope of the least-squares line through ``(t, x_t)`` and the Pearson r of ``t`` and ``x``.

    Degenerate cases (length 1, constant sequence) have slope 0 and r 0.
    """
    x = x.to(torch.float64).reshape(-1)
    n = x.numel()
    if n < 2:
        return 0.0, 0.0
    t = torch.arange(n, dtype=torch.float64)
    tc = t - t.mean()
    xc = x - x.mean()
    stt = float((tc * tc).sum())
    sxx = float((xc * xc).sum())
    stx = float((tc * xc).sum())
    slope = stx / stt
    r = stx / math.sqrt(stt * sxx) if sxx > 0 else 0.0
    return slope, r


def pl_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson Linear similarity (paper eq. 11): ``|cos(atan k_a - atan k_b) * r_a * r_b|``.

    No alignment: each sequence is fitted against its own index ``0..len-1``.
    """
    ka, ra = _linear_fit(a)
    kb, rb = _linear_fit(b)
    return abs(math.cos(math.atan(ka) - math.atan(kb)) * ra * rb)


def pair_similarity(a, b, metric: str = "kl", kl_direction: str = "scored_first") -> float:
    if metric == "kl":
        return kl_similarity(a, b, kl_direction)
    if metric == "hti":
        return hti_similarity(a, b)
    if metric == "pl":
        return pl_similarity(a, b)
    raise ValueError(f"metric must be one of 'kl', 'hti', 'pl', got {metric!r}")


# ---------------------------------------------------------------------------------------------
# batches: the per-pair loop
# ---------------------------------------------------------------------------------------------


def split_ragged(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list:
    """The list of 1-D sequences of a packed batch ``(values, cu_seqlens)``."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    return [values[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]


def pairwise_similarity(values, cu_seqlens, *, metric="kl", kl_direction="scored_first") -> torch.Tensor:
    """Float64 ``[B, B]`` matrix, ``out[i, j] = s(seq_i, seq_j)`` (row = scored).

    A pair involving an empty sequence is ``nan`` (there is nothing to compare).
    """
    seqs = split_ragged(values, cu_seqlens)
    bsz = len(seqs)
    out = torch.full((bsz, bsz), math.nan, dtype=torch.float64)
    for i in range(bsz):
        for j in range(bsz):
            if seqs[i].numel() and seqs[j].numel():
                out[i, j] = pair_similarity(seqs[i], seqs[j], metric, kl_direction)
    return out


def grouped_max_similarity(
    values,
    cu_seqlens,
    groups,
    num_groups: int,
    *,
    exclude_self: bool = True,
    prompt_ids: Optional[Sequence] = None,
    metric: str = "kl",
    kl_direction: str = "scored_first",
) -> torch.Tensor:
    """Float64 ``[B, num_groups]``: for row ``i`` the max of ``s(seq_i, seq_j)`` over the columns
    ``j`` of each group, skipping ``j == i`` (``exclude_self``), columns with the same prompt id
    (when ``prompt_ids`` is given) and empty sequences; ``-inf`` where no column is eligible
    (and for an empty row).
    """
    seqs = split_ragged(values, cu_seqlens)
    groups = [int(g) for g in torch.as_tensor(groups).tolist()]
    pids = None if prompt_ids is None else [int(p) for p in torch.as_tensor(prompt_ids).tolist()]
    bsz = len(seqs)
    out = torch.full((bsz, num_groups), -math.inf, dtype=torch.float64)
    for i in range(bsz):
        if seqs[i].numel() == 0:
            continue
        for j in range(bsz):
            if exclude_self and j == i:
                continue
            if pids is not None and pids[i] == pids[j]:
                continue
            if seqs[j].numel() == 0:
                continue
            s = pair_similarity(seqs[i], seqs[j], metric, kl_direction)
            g = groups[j]
            if s > out[i, g]:
                out[i, g] = s
    return out
