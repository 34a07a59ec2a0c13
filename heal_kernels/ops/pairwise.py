"""All-pairs entropy-dynamics similarity between ragged sequences (DESIGN.md section 3.2).

Public ops (re-exported by :mod:`heal_kernels`):

* :func:`pairwise_similarity` -- the ``[B, B]`` matrix ``s(seq_i, seq_j)`` (row = scored trajectory).
* :func:`grouped_max_similarity` -- for every row the max similarity over the eligible columns of
  each group (the EDA hot path); never builds the ``[B, B]`` matrix.

Metrics: ``kl`` (``-KL`` of the softmaxes after nearest-neighbour alignment, the default), ``hti``
(high-entropy token intersection) and ``pl`` (Pearson-linear), exactly as
:mod:`heal_kernels.reference` defines them.

How ``kl`` is computed without aligning anything. For a pair, let ``L`` (length ``n``) be the longer
sequence and ``S`` (length ``m <= n``) the shorter one, stretched by ``src(t) = min(floor(f32(t) *
(f32(m) / f32(n))), m - 1)`` (the rule of ``F.interpolate(mode="nearest")``). The positions mapped to
short index ``s`` form a contiguous segment ``[b_s, b_{s+1})`` of the long sequence, so with
per-sequence precomputed ``M`` (max), ``e = exp(x - M)``, ``Z = sum e`` and float64 prefix sums
``GX`` of ``x`` and ``GE`` of ``e`` (over the whole packed buffer):

* ``P = softmax(L)``, ``Q = softmax(S')``:
  ``KL = E_P[L] - sum_s S_s (GE[b_{s+1}] - GE[b_s]) / Z_L + (M_S - M_L) + log(Z'_S / Z_L)``
* ``P = softmax(S')``, ``Q = softmax(L)``:
  ``KL = sum_s e_s (c_s S_s - (GX[b_{s+1}] - GX[b_s])) / Z'_S + (M_L - M_S) + log(Z_L / Z'_S)``

with ``c_s = b_{s+1} - b_s`` and ``Z'_S = sum_s c_s e_s``. Each pair costs ``O(min(m, n))`` and no
``exp``. The boundaries ``b_s`` (first ``t`` with ``src(t) >= s``) are computed exactly for the
float32 rule: candidate ``ceil(s n / m)``, then one step of correction either way
(:func:`segment_boundaries`).

Backends (:func:`heal_kernels._backend.resolve_backend`): ``triton`` (CUDA, or the Triton
interpreter), ``cpu`` (the C++/OpenMP extension in ``csrc/pairwise.cpp``, built on first use; the
torch path when it cannot be built) and ``torch`` (tiles of pairs, float64, memory-bounded). The
``hti`` and ``pl`` metrics run the torch path on every backend (they are not the hot path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from heal_kernels._backend import resolve_backend

__all__ = [
    "pairwise_similarity",
    "grouped_max_similarity",
    "segment_boundaries",
    "METRICS",
    "KL_DIRECTIONS",
]

METRICS = ("kl", "hti", "pl")
KL_DIRECTIONS = ("scored_first", "short_first")
HTI_TOP_FRACTION = 0.2

# elements (pairs x aligned positions) handled per tile by the torch path: bounds its memory
_TORCH_TILE_ELEMENTS = 1 << 21


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_metric(metric: str, kl_direction: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")


def _validate_packed(values: torch.Tensor, cu_seqlens: torch.Tensor):
    """Check a packed batch; return ``(values float32 contiguous, cu_seqlens int64 contiguous)``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(
            f"values must be a 1-D floating-point tensor, got shape {tuple(values.shape)} dtype {values.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor, got shape {tuple(cu_seqlens.shape)} "
            f"dtype {cu_seqlens.dtype}"
        )
    if cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but values is on {values.device}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have at least one entry (B + 1 offsets)")
    cu = cu_seqlens.to(torch.int64).contiguous()
    cu_cpu = cu.cpu()
    if int(cu_cpu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_cpu[0])}")
    if cu_cpu.numel() > 1 and bool((cu_cpu[1:] < cu_cpu[:-1]).any()):
        bad = int(torch.nonzero(cu_cpu[1:] < cu_cpu[:-1])[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing; cu_seqlens[{bad + 1}]={int(cu_cpu[bad + 1])} < "
            f"cu_seqlens[{bad}]={int(cu_cpu[bad])}"
        )
    if int(cu_cpu[-1]) != values.numel():
        raise ValueError(f"cu_seqlens must end at len(values)={values.numel()}, got {int(cu_cpu[-1])}")
    vals = values.to(torch.float32).contiguous()
    finite = torch.isfinite(vals)
    if vals.numel() and not bool(finite.all()):
        pos = int(torch.nonzero(~finite)[0, 0])
        traj = int(torch.searchsorted(cu_cpu, torch.tensor([pos]), right=True)[0]) - 1
        kind = "NaN" if math.isnan(float(vals[pos])) else "inf"
        raise ValueError(
            f"values contains {kind} entropies (trajectory {traj}, position {pos - int(cu_cpu[traj])})"
        )
    return vals, cu


def _validate_groups(groups, num_groups, prompt_ids, bsz: int, device: torch.device):
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor, got {type(groups).__name__}")
    if groups.device != device:
        raise ValueError(f"groups is on {groups.device} but values is on {device}")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.dtype.is_complex:
        raise ValueError(f"groups must be an integer tensor, got dtype {groups.dtype}")
    if tuple(groups.shape) != (bsz,):
        raise ValueError(f"groups must have shape [B]=[{bsz}], got {tuple(groups.shape)}")
    g = groups.to(torch.int64).contiguous()
    if bsz and (bool((g < 0).any()) or bool((g >= num_groups).any())):
        raise ValueError(f"groups must lie in [0, num_groups={num_groups}), got values in [{int(g.min())}, {int(g.max())}]")
    pids = None
    if prompt_ids is not None:
        if not isinstance(prompt_ids, torch.Tensor):
            prompt_ids = torch.as_tensor(prompt_ids, device=device)
        if prompt_ids.device != device:
            raise ValueError(f"prompt_ids is on {prompt_ids.device} but values is on {device}")
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex:
            raise ValueError(f"prompt_ids must be an integer tensor, got dtype {prompt_ids.dtype}")
        if tuple(prompt_ids.shape) != (bsz,):
            raise ValueError(f"prompt_ids must have shape [B]=[{bsz}], got {tuple(prompt_ids.shape)}")
        pids = prompt_ids.to(torch.int64).contiguous()
    return g, pids


# ---------------------------------------------------------------------------------------------
# per-sequence statistics (shared by every backend)
# ---------------------------------------------------------------------------------------------


@dataclass
class SeqStats:
    """Per-sequence precompute, ``O(total)``; every tensor on the values' device."""

    x: torch.Tensor  # float32 [total]
    e: torch.Tensor  # float32 [total], exp(x - M_seq)
    gx: torch.Tensor  # float64 [total + 1], global prefix sums of x
    ge: torch.Tensor  # float64 [total + 1], global prefix sums of e
    starts: torch.Tensor  # int64 [B]
    lengths: torch.Tensor  # int64 [B]
    mx: torch.Tensor  # float64 [B], max (0 for empty)
    z: torch.Tensor  # float64 [B], sum e (0 for empty)
    mean_p: torch.Tensor  # float64 [B], E_softmax[x] (0 for empty)
    max_len: int


def _segment_sum(prefix: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return prefix[cu[1:]] - prefix[cu[:-1]]


def _prefix(v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(v.numel() + 1, dtype=torch.float64, device=v.device)
    if v.numel():
        torch.cumsum(v, 0, out=out[1:])
    return out


def seq_stats(values: torch.Tensor, cu: torch.Tensor) -> SeqStats:
    bsz = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(bsz, device=values.device), lengths)
    x64 = values.to(torch.float64)
    mx = torch.full((bsz,), -math.inf, dtype=torch.float64, device=values.device)
    if values.numel():
        mx = mx.scatter_reduce(0, seg, x64, reduce="amax", include_self=True)
    mx = torch.where(lengths > 0, mx, torch.zeros_like(mx))
    e64 = torch.exp(x64 - mx[seg])
    gx = _prefix(x64)
    ge = _prefix(e64)
    gxe = _prefix(e64 * x64)
    z = _segment_sum(ge, cu)
    xe = _segment_sum(gxe, cu)
    mean_p = torch.where(lengths > 0, xe / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(z))
    return SeqStats(
        x=values,
        e=e64.to(torch.float32),
        gx=gx,
        ge=ge,
        starts=cu[:-1].contiguous(),
        lengths=lengths.contiguous(),
        mx=mx.contiguous(),
        z=z.contiguous(),
        mean_p=mean_p.contiguous(),
        max_len=int(lengths.max()) if bsz else 0,
    )


def segment_boundaries(s: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """First long index ``t`` with ``src(t) >= s`` for the float32 nearest rule (``m <= n``).

    ``s``, ``m``, ``n`` broadcast (int64). Returns int64 in ``[0, n]``; ``s >= m`` gives ``n``.
    """
    m = m.clamp(min=1)
    scale = m.to(torch.float32) / n.to(torch.float32)

    def f(t):
        return torch.floor(t.to(torch.float32) * scale).to(torch.int64)

    cand = torch.div(s * n + m - 1, m, rounding_mode="floor")
    prev = (cand - 1).clamp(min=0)
    cand = torch.where((cand > 0) & (f(prev) >= s), cand - 1, cand)
    cand = torch.where(f(cand) < s, cand + 1, cand)
    return torch.where(s >= m, n, torch.minimum(cand, n))


# ---------------------------------------------------------------------------------------------
# torch path: tiles of pairs, float64
# ---------------------------------------------------------------------------------------------


def _kl_pairs_torch(st: SeqStats, pi: torch.Tensor, pj: torch.Tensor, short_first: bool) -> torch.Tensor:
    """``-KL`` for the pairs ``(pi[k], pj[k])`` (row scored), float64; NaN where a side is empty."""
    mi, mj = st.lengths[pi], st.lengths[pj]
    p_is_row = (mi <= mj) if short_first else torch.ones_like(mi, dtype=torch.bool)
    p_idx = torch.where(p_is_row, pi, pj)
    q_idx = torch.where(p_is_row, pj, pi)
    mp, mq = st.lengths[p_idx], st.lengths[q_idx]
    case_long = mp >= mq  # P is the long (or equal-length) side: Q is the stretched one
    l_idx = torch.where(case_long, p_idx, q_idx)
    s_idx = torch.where(case_long, q_idx, p_idx)
    nl, ms = st.lengths[l_idx], st.lengths[s_idx]
    empty = (mi == 0) | (mj == 0)
    ms_c = ms.clamp(min=1)
    nl_c = nl.clamp(min=1)
    width = int(ms.max()) if ms.numel() else 0
    s = torch.arange(width + 1, device=pi.device, dtype=torch.int64).unsqueeze(0)
    b = segment_boundaries(s, ms_c.unsqueeze(1), nl_c.unsqueeze(1))  # [P, width+1]
    valid = s[:, :width] < ms.unsqueeze(1)
    cnt = (b[:, 1:] - b[:, :-1]).to(torch.float64)
    cnt = torch.where(valid, cnt, torch.zeros_like(cnt))
    sidx = (st.starts[s_idx].unsqueeze(1) + s[:, :width]).clamp(max=max(st.x.numel() - 1, 0))
    if st.x.numel() == 0:
        return torch.full(pi.shape, math.nan, dtype=torch.float64, device=pi.device)
    sv = torch.where(valid, st.x[sidx].to(torch.float64), torch.zeros((), dtype=torch.float64, device=pi.device))
    ev = torch.where(valid, st.e[sidx].to(torch.float64), torch.zeros((), dtype=torch.float64, device=pi.device))
    zs = (cnt * ev).sum(1)
    lb = st.starts[l_idx].unsqueeze(1) + b
    ge = st.ge[lb]
    gx = st.gx[lb]
    seg_e = ge[:, 1:] - ge[:, :-1]
    seg_x = gx[:, 1:] - gx[:, :-1]
    zl, ml, msx = st.z[l_idx], st.mx[l_idx], st.mx[s_idx]
    zs_safe = torch.where(zs > 0, zs, torch.ones_like(zs))
    zl_safe = torch.where(zl > 0, zl, torch.ones_like(zl))
    a_long = (sv * seg_e).sum(1)
    kl_long = st.mean_p[l_idx] - a_long / zl_safe + (msx - ml) + torch.log(zs_safe / zl_safe)
    a_short = (ev * (cnt * sv - torch.where(valid, seg_x, torch.zeros_like(seg_x)))).sum(1)
    kl_short = a_short / zs_safe + (ml - msx) + torch.log(zl_safe / zs_safe)
    kl = torch.where(case_long, kl_long, kl_short)
    return torch.where(empty, torch.full_like(kl, math.nan), -kl)


def _nearest_src(t: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    scale = m.to(torch.float32) / n.to(torch.float32)
    return torch.minimum(torch.floor(t.to(torch.float32) * scale).to(torch.int64), m - 1)


def _hti_pairs_torch(st: SeqStats, pi: torch.Tensor, pj: torch.Tensor) -> torch.Tensor:
    """HTI for the pairs ``(pi[k], pj[k])``, float64; NaN where a side is empty."""
    mi, mj = st.lengths[pi], st.lengths[pj]
    empty = (mi == 0) | (mj == 0)
    if st.x.numel() == 0:
        return torch.full(pi.shape, math.nan, dtype=torch.float64, device=pi.device)
    n = torch.maximum(mi, mj)
    width = int(n.max()) if n.numel() else 0
    t = torch.arange(width, device=pi.device, dtype=torch.int64).unsqueeze(0)
    valid = t < n.unsqueeze(1)
    k = torch.ceil(HTI_TOP_FRACTION * n.to(torch.float64)).to(torch.int64).clamp(min=1)
    last = max(st.x.numel() - 1, 0)

    def aligned_topk(m):
        src = torch.where(
            (m < n).unsqueeze(1), _nearest_src(t, m.clamp(min=1).unsqueeze(1), n.clamp(min=1).unsqueeze(1)), t
        )
        idx = (st.starts[pi if m is mi else pj].unsqueeze(1) + src).clamp(max=last)
        v = st.x[idx].to(torch.float64)
        # padded positions sort after every real value; stable sort keeps ties in index order
        key = torch.where(valid, -v, torch.full_like(v, math.inf))
        order = torch.sort(key, dim=1, stable=True).indices
        rank_ok = (t < k.unsqueeze(1)).to(torch.float64).expand_as(order)
        sel = torch.zeros_like(v).scatter_(1, order, rank_ok) > 0
        return torch.where(sel & valid, v, torch.zeros_like(v))

    va = aligned_topk(mi)
    vb = aligned_topk(mj)
    out = torch.where(valid, torch.minimum(va, vb), torch.zeros_like(va)).sum(1)
    return torch.where(empty, torch.full_like(out, math.nan), out)


def _pl_stats(st: SeqStats, cu: torch.Tensor):
    """Per sequence ``(atan(slope), r)`` of the least-squares line through ``(t, x_t)``, float64."""
    bsz = st.lengths.numel()
    dev = st.x.device
    seg = torch.repeat_interleave(torch.arange(bsz, device=dev), st.lengths)
    n = st.lengths.to(torch.float64)
    x64 = st.x.to(torch.float64)
    mean_x = _segment_sum(st.gx, cu) / n.clamp(min=1)
    t = (torch.arange(st.x.numel(), device=dev) - st.starts[seg]).to(torch.float64)
    tc = t - ((n - 1) / 2)[seg]
    xc = x64 - mean_x[seg]
    stt = _segment_sum(_prefix(tc * tc), cu)
    sxx = _segment_sum(_prefix(xc * xc), cu)
    stx = _segment_sum(_prefix(tc * xc), cu)
    ok = st.lengths >= 2
    slope = torch.where(ok, stx / torch.where(ok, stt, torch.ones_like(stt)), torch.zeros_like(stt))
    r_ok = ok & (sxx > 0)
    r = torch.where(r_ok, stx / torch.sqrt(torch.where(r_ok, stt * sxx, torch.ones_like(sxx))), torch.zeros_like(sxx))
    return torch.atan(slope), r


def _pl_block(angle, r, rows: torch.Tensor, cols: torch.Tensor, lengths) -> torch.Tensor:
    out = torch.abs(torch.cos(angle[rows].unsqueeze(1) - angle[cols].unsqueeze(0)) * r[rows].unsqueeze(1) * r[cols].unsqueeze(0))
    empty = (lengths[rows] == 0).unsqueeze(1) | (lengths[cols] == 0).unsqueeze(0)
    return torch.where(empty, torch.full_like(out, math.nan), out)


class _TileSource:
    """Yields ``(rows, cols, sims float64 [R, C])`` tiles covering all pairs (or only ``rows`` given)."""

    def __init__(self, st: SeqStats, cu: torch.Tensor, metric: str, short_first: bool):
        self.st, self.metric, self.short_first = st, metric, short_first
        if metric == "pl":
            self.pl = _pl_stats(st, cu)
        dev = st.x.device
        # sort by length so a tile's pairs have similar aligned widths (little padding)
        self.order = torch.argsort(st.lengths, stable=True)
        self.sorted_len = st.lengths[self.order].cpu()

    def _col_block(self, c0: int, nrows: int, row_max: int) -> int:
        """Most columns from ``c0`` whose tile stays within ``_TORCH_TILE_ELEMENTS``."""
        slen, bsz = self.sorted_len, self.sorted_len.numel()

        def width(c1):
            col_max = int(slen[c1 - 1])
            return max(1, min(row_max, col_max) if self.metric == "kl" else max(row_max, col_max))

        cb = bsz - c0
        while cb > 1 and nrows * cb * width(c0 + cb) > _TORCH_TILE_ELEMENTS:
            cb = max(1, min(cb // 2, _TORCH_TILE_ELEMENTS // (nrows * width(c0 + cb))))
        return cb

    def tiles(self):
        st, order = self.st, self.order
        bsz = order.numel()
        if bsz == 0:
            return
        if self.metric == "pl":
            step = max(1, _TORCH_TILE_ELEMENTS // max(bsz, 1))
            cols = torch.arange(bsz, device=order.device)
            for r0 in range(0, bsz, step):
                rows = torch.arange(r0, min(bsz, r0 + step), device=order.device)
                yield rows, cols, _pl_block(*self.pl, rows, cols, st.lengths)
            return
        slen = self.sorted_len
        rb = 16
        for r0 in range(0, bsz, rb):
            r1 = min(bsz, r0 + rb)
            rows = order[r0:r1]
            row_max = int(slen[r1 - 1])
            c0 = 0
            while c0 < bsz:
                # width of a tile: min(row_max, col_max) (kl) or max(row_max, col_max) (hti)
                cb = self._col_block(c0, r1 - r0, row_max)
                c1 = min(bsz, c0 + cb)
                cols = order[c0:c1]
                pi = rows.unsqueeze(1).expand(-1, c1 - c0).reshape(-1)
                pj = cols.unsqueeze(0).expand(r1 - r0, -1).reshape(-1)
                if self.metric == "kl":
                    sims = _kl_pairs_torch(st, pi, pj, self.short_first)
                else:
                    sims = _hti_pairs_torch(st, pi, pj)
                yield rows, cols, sims.reshape(r1 - r0, c1 - c0)
                c0 = c1


def _pairwise_torch(st, cu, metric, short_first) -> torch.Tensor:
    bsz = st.lengths.numel()
    out = torch.empty((bsz, bsz), dtype=torch.float32, device=st.x.device)
    for rows, cols, sims in _TileSource(st, cu, metric, short_first).tiles():
        out[rows.unsqueeze(1), cols.unsqueeze(0)] = sims.to(torch.float32)
    return out


def _grouped_torch(st, cu, metric, short_first, groups, num_groups, exclude_self, pids) -> torch.Tensor:
    bsz = st.lengths.numel()
    dev = st.x.device
    out = torch.full((bsz, num_groups), -math.inf, dtype=torch.float32, device=dev)
    for rows, cols, sims in _TileSource(st, cu, metric, short_first).tiles():
        ok = ~torch.isnan(sims)
        if exclude_self:
            ok &= rows.unsqueeze(1) != cols.unsqueeze(0)
        if pids is not None:
            ok &= pids[rows].unsqueeze(1) != pids[cols].unsqueeze(0)
        vals = torch.where(ok, sims.to(torch.float32), torch.full((), -math.inf, device=dev))
        idx = groups[cols].unsqueeze(0).expand(rows.numel(), -1)
        part = torch.full((rows.numel(), num_groups), -math.inf, dtype=torch.float32, device=dev)
        part = part.scatter_reduce(1, idx, vals, reduce="amax", include_self=True)
        out[rows] = torch.maximum(out[rows], part)
    return out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _cpu_ext():
    """The compiled C++ extension, or ``None`` (no compiler / build failed: torch path)."""
    try:
        from heal_kernels.cpu import load_pairwise
    except ImportError:
        return None
    return load_pairwise()


def _run_cpu_ext(ext, st: SeqStats, short_first: bool, grouped) -> torch.Tensor:
    """Call the C++ kernels (they take raw pointers: every tensor here is contiguous, on the CPU)."""
    bsz = st.lengths.numel()
    # the kernel reads up to 7 floats past a sequence's end (then discards them): pad by 8
    pad = lambda t: torch.cat([t, t.new_zeros(8)])  # noqa: E731
    keep = (pad(st.x), pad(st.e), st.starts, st.lengths, st.mx)
    ptrs = [t.data_ptr() for t in keep]
    threads = torch.get_num_threads()
    if not grouped:
        out = torch.empty((bsz, bsz), dtype=torch.float32)
        ext.pairwise(*ptrs, bsz, short_first, out.data_ptr(), threads)
        return out
    groups, num_groups, exclude_self, pids = grouped
    out = torch.full((bsz, num_groups), -math.inf, dtype=torch.float32)
    pid_ptr = pids.data_ptr() if pids is not None else 0
    ext.grouped(*ptrs, bsz, short_first, groups.data_ptr(), num_groups, exclude_self, pid_ptr, out.data_ptr(), threads)
    return out


def _run(values, cu_seqlens, metric, kl_direction, backend, grouped_args=None):
    _check_metric(metric, kl_direction)
    vals, cu = _validate_packed(values, cu_seqlens)
    bsz = cu.numel() - 1
    if grouped_args is not None:
        groups, num_groups, exclude_self, prompt_ids = grouped_args
        groups, pids = _validate_groups(groups, num_groups, prompt_ids, bsz, vals.device)
    name = resolve_backend(vals.device, backend)
    st = seq_stats(vals, cu)
    short_first = kl_direction == "short_first"
    if metric == "kl" and bsz > 0:
        if name == "cpu":
            ext = _cpu_ext()
            if ext is not None:
                return _run_cpu_ext(ext, st, short_first, grouped_args is not None and (groups, num_groups, exclude_self, pids))
        elif name == "triton":
            from heal_kernels.triton import pairwise as tri

            if grouped_args is None:
                return tri.pairwise_kl(st, short_first)
            return tri.grouped_max_kl(st, short_first, groups, num_groups, exclude_self, pids)
    if grouped_args is None:
        return _pairwise_torch(st, cu, metric, short_first)
    return _grouped_torch(st, cu, metric, short_first, groups, num_groups, exclude_self, pids)


def pairwise_similarity(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    metric: str = "kl",
    kl_direction: str = "scored_first",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Float32 ``[B, B]`` matrix ``out[i, j] = s(seq_i, seq_j)``: row ``i`` scored, column ``j`` neighbour.

    ``values`` float ``[total]`` + ``cu_seqlens`` int32/int64 ``[B + 1]`` (packed ragged batch).
    ``metric``: ``"kl"`` (``-KL`` after nearest-neighbour alignment; ``kl_direction`` ``"scored_first"``
    = ``KL(P_i || P_j)``, ``"short_first"`` = ``KL(short || long)``), ``"hti"`` or ``"pl"``.
    A pair involving an empty sequence is NaN. ``backend`` overrides ``HEAL_KERNELS_BACKEND``
    (``auto``/``triton``/``cpu``/``torch``). Raises ``ValueError`` naming the bad argument (and the
    trajectory for NaN/inf entropies).
    """
    return _run(values, cu_seqlens, metric, kl_direction, backend)


def grouped_max_similarity(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    *,
    exclude_self: bool = True,
    prompt_ids: Optional[torch.Tensor] = None,
    metric: str = "kl",
    kl_direction: str = "scored_first",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Float32 ``[B, num_groups]``: for each row ``i`` the max of ``s(seq_i, seq_j)`` over the columns
    ``j`` with ``groups[j] == g``, skipping ``j == i`` (``exclude_self``), ``prompt_ids[j] ==
    prompt_ids[i]`` (when given) and empty sequences; ``-inf`` where no column is eligible and for
    empty rows. Never builds the ``[B, B]`` matrix; deterministic. Other arguments as in
    :func:`pairwise_similarity`.
    """
    return _run(values, cu_seqlens, metric, kl_direction, backend, (groups, num_groups, bool(exclude_self), prompt_ids))
