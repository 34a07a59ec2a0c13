"""All-pairs entropy-dynamics similarity between ragged sequences (DESIGN.md section 3.2).

Public ops (re-exported by :mod:`heal_kernels`):

* :func:`pairwise_similarity` -- the ``[B, B]`` matrix ``s(seq_i, seq_j)`` (row = scored trajectory).
* :func:`grouped_max_similarity` -- for every row the max similarity over the eligible columns of
  each group (the EDA hot path); never builds the ``[B, B]`` matrix.

Metrics: ``kl`` (``-KL`` of the softmaxes after nearest-neighbour alignment, the default), ``hti``
(high-entropy token intersection) and ``pl`` (Pearson-linear), exactly as
:mod:`heal_kernels.reference` defines them.

How ``kl`` is computed without materialising softmaxes. For a pair, let ``L`` (length ``n``) be
the longer sequence and ``S'`` the shorter one (length ``m``) stretched by ``src(t) = min(floor(f32(t)
* (f32(m) / f32(n))), m - 1)`` (the rule of ``F.interpolate(mode="nearest")`` on float32 entropies).
With ``e = exp(x - M_seq)`` precomputed once per element (``M_seq`` the sequence's max),
``Z_L = sum_t e_L(t)`` and ``Z_S' = sum_t e_S(src(t))``:

* ``P = softmax(L)``, ``Q = softmax(S')``:
  ``KL = sum_t e_L(t) (L_t - S'_t) / Z_L + (M_S - M_L) + log(Z_S' / Z_L)``
* ``P = softmax(S')``, ``Q = softmax(L)``:
  ``KL = sum_t e_S'(t) (S'_t - L_t) / Z_S' + (M_L - M_S) + log(Z_L / Z_S')``

The torch and Triton paths make one pass over the ``n`` aligned positions per pair (float32 ``e``,
float32 sums folded into float64). The C++ path (``csrc/pairwise.cpp``) uses the run-length form,
``O(min(m, n))`` per pair: ``src`` is non-decreasing, so each short position ``s`` covers a contiguous
segment ``[b_s, b_{s+1})`` of the long one, the boundaries ``b_s`` following the float32 rule exactly
(rounding included; computed in integers, checked against every position in the tests); with
per-sequence float64 prefix sums of ``e`` and ``x``, every sum above becomes a sum over the ``m``
segments (counts and prefix-sum differences), and one pass over them gives both directions of the
pair, so each unordered pair is evaluated once. It computes ``M_seq``, ``e`` and its tables itself, in
float64 from the float32 values: agreement with the float64 reference is the float32 output's
rounding, up to 65,536 tokens. Equal lengths use the direct form (two identical sequences give
exactly 0 on the C++ and Triton backends). Memory: ``O(total)`` precompute (the C++ path: 48 bytes
per token: ``e``, prefix and difference tables), ``O(B * max_len)`` padded rows (torch path) and a
bounded tile; nothing ``B x B x T``, and the grouped op never holds ``[B, B]``. Results are
deterministic: every pair is reduced in a fixed order and the group max is order-free; on the C++
path every row of the grouped op is bit-identical whatever the thread count and the ``rows`` range
asked for.

Non-finite values. Entropies are finite. ``check=True`` (the default) raises ``ValueError`` naming the
trajectory and position of the first NaN or infinity, on every device. ``check=False`` does not look
(no host sync on CUDA), and every backend gives the same output: a sequence holding a NaN or an
infinity makes every similarity it takes part in NaN (as the scored row and as the neighbour, every
metric); in the grouped op such a NaN is an eligible value and propagates (the group's max is NaN,
as ``torch.amax`` of the matrix's eligible entries would be), never dropped and never ``-inf``, which
means "no eligible neighbour" only. (The float64 reference would give a finite value for a ``-inf``
entropy, a zero softmax weight; the ops do not: an infinite entropy is an upstream bug to surface.)

Backends (:func:`heal_kernels._backend.resolve_backend`): ``triton`` (CUDA, or the Triton
interpreter), ``cpu`` (the C++/OpenMP extension in ``csrc/pairwise.cpp``, built on first use; the
torch path when it cannot be built) and ``torch`` (length-sorted, cache-sized tiles of pairs). The
``hti`` and ``pl`` metrics run the torch path on every backend (they are not the hot path), and so
does a Triton grouped op with more than 64 groups.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from heal_kernels._backend import cpu_threads, resolve_backend
from heal_kernels.ops.entropy import reading_syncs

__all__ = [
    "pairwise_similarity",
    "grouped_max_similarity",
    "METRICS",
    "KL_DIRECTIONS",
]

METRICS = ("kl", "hti", "pl")
KL_DIRECTIONS = ("scored_first", "short_first")
HTI_TOP_FRACTION = 0.2

# elements (pairs x aligned positions) handled per tile by the torch path: bounds its memory
_TORCH_TILE_ELEMENTS = 1 << 16
_PAD = 8  # zeros after the packed values: the C++ kernel's 8-wide loads, the torch path's sentinel


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_metric(metric: str, kl_direction: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")


def _validate_packed(values: torch.Tensor, cu_seqlens: torch.Tensor, check: bool = True):
    """Check a packed batch; return ``(values float32 contiguous, cu_seqlens int64 contiguous)``.

    Types, shapes and devices are always checked; the offsets with ``check`` or on the CPU (reading
    them back is a device-to-host sync on CUDA, :func:`reading_syncs`; the C++ kernel needs them
    right), finite values with ``check`` only (without: see "Non-finite values" in the module
    docstring)."""
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
    if not check and reading_syncs(values.device):
        return values.to(torch.float32).contiguous(), cu
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
    if not check:
        return vals, cu
    finite = torch.isfinite(vals)
    if vals.numel() and not bool(finite.all()):
        pos = int(torch.nonzero(~finite)[0, 0])
        traj = int(torch.searchsorted(cu_cpu, torch.tensor([pos]), right=True)[0]) - 1
        kind = "NaN" if math.isnan(float(vals[pos])) else "inf"
        raise ValueError(
            f"values contains {kind} entropies (trajectory {traj}, position {pos - int(cu_cpu[traj])})"
        )
    return vals, cu


def _validate_groups(groups, num_groups, prompt_ids, bsz: int, device: torch.device, check: bool = True):
    """``(groups int64, prompt ids int64 or None)`` on ``device``. The group ids' range is read (a
    device-to-host sync on CUDA) only with ``check`` or on the CPU; host ``prompt_ids`` (a list, an
    array) go to a CUDA device from pinned memory without waiting (``non_blocking``)."""
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
    if bsz and (check or not reading_syncs(device)) and (bool((g < 0).any()) or bool((g >= num_groups).any())):
        raise ValueError(f"groups must lie in [0, num_groups={num_groups}), got values in [{int(g.min())}, {int(g.max())}]")
    pids = None
    if prompt_ids is not None:
        if not isinstance(prompt_ids, torch.Tensor):
            prompt_ids = torch.as_tensor(prompt_ids)
            if device.type == "cuda":  # a pageable host-to-device copy would wait for the device
                prompt_ids = prompt_ids.pin_memory().to(device, non_blocking=True)
            else:
                prompt_ids = prompt_ids.to(device)
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


class SeqStats:
    """Per-sequence precompute, ``O(total)``; every tensor on the values' device.

    Only the offsets are computed up front; the rest on first use (and kept): the C++ path reads
    ``values``, ``starts`` and ``lengths`` only (it computes the max, ``e`` and its tables itself), so
    it never pays for the float64 tensors below (~0.6 s at 12.8M tokens on 2 cores)."""

    def __init__(self, values: torch.Tensor, cu: torch.Tensor):
        self.values = values.to(torch.float32).contiguous()  # float32 [total]
        self.cu = cu  # int64 [B + 1]
        self.total = self.values.numel()
        self.starts = cu[:-1].contiguous()  # int64 [B]
        self.lengths = (cu[1:] - cu[:-1]).contiguous()  # int64 [B]
        self._x = self._e = self._mx = self._seg = self._zsum = self._bad = None
        self._padded: Optional[tuple] = None
        self._max_len: Optional[int] = None

    @property
    def seg(self) -> torch.Tensor:
        """int64 [total], each position's sequence."""
        if self._seg is None:
            bsz = self.lengths.numel()
            self._seg = torch.repeat_interleave(torch.arange(bsz, device=self.values.device), self.lengths,
                                                output_size=self.total)
        return self._seg

    @property
    def mx(self) -> torch.Tensor:
        """float64 [B], each sequence's max (0 for empty)."""
        if self._mx is None:
            bsz = self.lengths.numel()
            mx = torch.full((bsz,), -math.inf, dtype=torch.float64, device=self.values.device)
            if self.total:
                mx = mx.scatter_reduce(0, self.seg, self.values.to(torch.float64), reduce="amax", include_self=True)
            self._mx = torch.where(self.lengths > 0, mx, torch.zeros_like(mx)).contiguous()
        return self._mx

    @property
    def bad(self) -> torch.Tensor:
        """bool [B], the sequence holds a NaN or an infinity."""
        if self._bad is None:
            bsz = self.lengths.numel()
            nf = (~torch.isfinite(self.values)).to(torch.int64)
            self._bad = torch.zeros(bsz, dtype=torch.int64, device=self.values.device).index_add_(0, self.seg, nf) > 0
        return self._bad

    @property
    def x(self) -> torch.Tensor:
        """float32 [total + 8], values then 8 zeros (sentinel / vector-load padding)."""
        if self._x is None:
            self._x = torch.cat([self.values, self.values.new_zeros(_PAD)])
        return self._x

    @property
    def e(self) -> torch.Tensor:
        """float32 [total + 8], exp(x - M_seq) (computed in float64, rounded) then 8 zeros."""
        if self._e is None:
            e = torch.exp(self.values.to(torch.float64) - self.mx[self.seg]).to(torch.float32)
            self._e = torch.cat([e, e.new_zeros(_PAD)])
        return self._e

    @property
    def zsum(self) -> torch.Tensor:
        """float64 [B], sum of e over each sequence."""
        if self._zsum is None:
            self._zsum = _segment_sum(_prefix(self.e[: self.total]), self.cu)
        return self._zsum

    @property
    def max_len(self) -> int:
        """Longest sequence (read back on first use: a device-to-host sync on CUDA; the Triton path never asks)."""
        if self._max_len is None:
            self._max_len = int(self.lengths.max()) if self.lengths.numel() else 0
        return self._max_len

    def padded(self):
        """``(x, e)`` as zero-padded ``[B, max_len + 1]`` float32 matrices (torch path; built once)."""
        if self._padded is None:
            bsz = self.lengths.numel()
            dev = self.x.device
            pos = torch.arange(self.max_len + 1, device=dev)
            mask = pos.unsqueeze(0) < self.lengths.unsqueeze(1)
            xp = torch.zeros(bsz, self.max_len + 1, dtype=torch.float32, device=dev)
            ep = torch.zeros_like(xp)
            xp[mask] = self.x[: self.total]
            ep[mask] = self.e[: self.total]
            self._padded = (xp, ep)
        return self._padded


def _segment_sum(prefix: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return prefix[cu[1:]] - prefix[cu[:-1]]


def _prefix(v: torch.Tensor) -> torch.Tensor:
    """Float64 prefix sums with a leading 0 (deterministic on every device, unlike index_add)."""
    out = torch.zeros(v.numel() + 1, dtype=torch.float64, device=v.device)
    if v.numel():
        torch.cumsum(v.to(torch.float64), 0, out=out[1:])
    return out


def seq_stats(values: torch.Tensor, cu: torch.Tensor) -> SeqStats:
    """The per-sequence statistics of a packed batch (``cu`` int64 ``[B + 1]``), computed lazily."""
    return SeqStats(values, cu)


# ---------------------------------------------------------------------------------------------
# torch path: length-sorted tiles of pairs
# ---------------------------------------------------------------------------------------------


def _kl_pairs_torch(st: SeqStats, pi: torch.Tensor, pj: torch.Tensor, short_first: bool) -> torch.Tensor:
    """``-KL`` for the pairs ``(pi[k], pj[k])`` (row scored), float32; NaN where a side is empty.

    The formula of the module docstring over a ``[pairs, max aligned length]`` tile, reading rows of
    the zero-padded ``[B, max_len + 1]`` matrices (positions past a pair's aligned length read zeros,
    so no masking pass is needed).
    """
    dev = pi.device
    mi, mj = st.lengths[pi], st.lengths[pj]
    p_is_row = (mi <= mj) if short_first else torch.ones_like(mi, dtype=torch.bool)
    m_p = torch.where(p_is_row, mi, mj)
    m_q = torch.where(p_is_row, mj, mi)
    case_long = m_p >= m_q  # P is the long (or equal-length) side: Q is the stretched one
    l_is_row = case_long == p_is_row
    l_idx = torch.where(l_is_row, pi, pj)
    s_idx = torch.where(l_is_row, pj, pi)
    nl, ms = st.lengths[l_idx], st.lengths[s_idx]
    empty = (mi == 0) | (mj == 0)
    total = st.total
    width = int(nl.max()) if nl.numel() else 0
    if total == 0 or width == 0:
        return torch.full(pi.shape, math.nan, dtype=torch.float32, device=dev)
    xp, ep = st.padded()  # [B, max_len + 1], zeros past each sequence's end
    t = torch.arange(width, device=dev)
    scale = ms.clamp(min=1).to(torch.float32) / nl.clamp(min=1).to(torch.float32)
    src = (t.to(torch.float32).unsqueeze(0) * scale.unsqueeze(1)).to(torch.int64)  # trunc == floor (>= 0)
    src = torch.minimum(src, (ms - 1).clamp(min=0).unsqueeze(1))
    valid = t.unsqueeze(0) < torch.where(empty, torch.zeros_like(nl), nl).unsqueeze(1)
    ms_max = int(ms.max())
    # positions past the aligned length read column ms_max of the short rows: zero for all of them
    src = torch.where(valid, src, torch.full((), ms_max, dtype=torch.int64, device=dev))
    es = torch.gather(ep[s_idx, : ms_max + 1], 1, src)
    xs = torch.gather(xp[s_idx, : ms_max + 1], 1, src)
    el = ep[l_idx, :width]  # zeros past each long sequence's end
    xl = xp[l_idx, :width]
    zs = es.sum(1).to(torch.float64)
    zl = el.sum(1).to(torch.float64)
    w = torch.where(case_long.unsqueeze(1), el, es)
    acc = (w * (xl - xs)).sum(1).to(torch.float64)  # = sum w (L - S')
    zs = torch.where(zs > 0, zs, torch.ones_like(zs))
    zl = torch.where(zl > 0, zl, torch.ones_like(zl))
    ml, msx = st.mx[l_idx], st.mx[s_idx]
    kl_long = acc / zl + (msx - ml) + torch.log(zs / zl)
    kl_short = -acc / zs + (ml - msx) + torch.log(zl / zs)
    kl = torch.where(case_long, kl_long, kl_short).to(torch.float32)
    return torch.where(empty, torch.full_like(kl, math.nan), -kl)


def _nearest_src(t: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    scale = m.to(torch.float32) / n.to(torch.float32)
    return torch.minimum(torch.floor(t.to(torch.float32) * scale).to(torch.int64), m - 1)


def _hti_pairs_torch(st: SeqStats, pi: torch.Tensor, pj: torch.Tensor) -> torch.Tensor:
    """HTI for the pairs ``(pi[k], pj[k])``, float64; NaN where a side is empty."""
    mi, mj = st.lengths[pi], st.lengths[pj]
    empty = (mi == 0) | (mj == 0)
    if st.total == 0:
        return torch.full(pi.shape, math.nan, dtype=torch.float64, device=pi.device)
    n = torch.maximum(mi, mj)
    width = int(n.max()) if n.numel() else 0
    t = torch.arange(width, device=pi.device, dtype=torch.int64).unsqueeze(0)
    valid = t < n.unsqueeze(1)
    k = torch.ceil(HTI_TOP_FRACTION * n.to(torch.float64)).to(torch.int64).clamp(min=1)
    last = max(st.total - 1, 0)

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
    dev = st.x.device
    seg = st.seg
    n = st.lengths.to(torch.float64)
    x64 = st.x[: st.total].to(torch.float64)
    mean_x = _segment_sum(_prefix(x64), cu) / n.clamp(min=1)
    t = (torch.arange(st.total, device=dev) - st.starts[seg]).to(torch.float64)
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


def _poison(st: SeqStats, rows: torch.Tensor, cols: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """NaN for every pair of the ``[rows, cols]`` tile with a side holding a NaN or an infinity."""
    bad = st.bad[rows].unsqueeze(1) | st.bad[cols].unsqueeze(0)
    return torch.where(bad, torch.full((), math.nan, dtype=sims.dtype, device=sims.device), sims)


class _TileSource:
    """Yields ``(rows, cols, sims [R, C])`` tiles covering every (row, column) pair, rows restricted
    to ``rows`` when given. Rows and columns are visited in length order so that a tile's pairs have
    similar aligned lengths (little padding); a tile holds at most ``_TORCH_TILE_ELEMENTS`` aligned
    positions (cache-sized: many small passes over big tiles are memory-bound).

    With ``rows`` given, the tiles are the full batch's, less those holding none of ``rows``: a row's
    sums are reduced over the same tile width as in the full call, so its values are the same bits
    (a tile may then also carry rows that were not asked for)."""

    def __init__(self, st: SeqStats, cu: torch.Tensor, metric: str, short_first: bool, rows=None):
        self.st, self.metric, self.short_first = st, metric, short_first
        if metric == "pl":
            self.pl = _pl_stats(st, cu)
        self.order = torch.argsort(st.lengths, stable=True)
        self.sorted_len = st.lengths[self.order].cpu()
        self.row_order, self.row_len, self.wanted = self.order, self.sorted_len, None
        if rows is not None:
            rows = rows.to(st.lengths.device)
            if metric == "pl":  # element-wise: any tiling gives the same bits
                self.row_order = rows[torch.argsort(st.lengths[rows], stable=True)]
                self.row_len = st.lengths[self.row_order].cpu()
            else:
                wanted = torch.zeros(st.lengths.numel(), dtype=torch.bool)
                wanted[rows.cpu()] = True
                self.wanted = wanted[self.order.cpu()]  # in length order

    def _col_block(self, c0: int, nrows: int, row_max: int) -> int:
        """Most columns from ``c0`` whose tile stays within ``_TORCH_TILE_ELEMENTS``."""
        slen, bsz = self.sorted_len, self.sorted_len.numel()

        def width(c1):
            col_max = int(slen[c1 - 1])
            return max(1, row_max, col_max)  # aligned length of the tile's longest pair

        cb = bsz - c0
        while cb > 1 and nrows * cb * width(c0 + cb) > _TORCH_TILE_ELEMENTS:
            cb = max(1, min(cb // 2, _TORCH_TILE_ELEMENTS // (nrows * width(c0 + cb))))
        return cb

    def tiles(self):
        st, order = self.st, self.order
        bsz = order.numel()
        if bsz == 0:
            return
        nrows = self.row_order.numel()
        if self.metric == "pl":
            step = max(1, _TORCH_TILE_ELEMENTS // max(bsz, 1))
            cols = torch.arange(bsz, device=order.device)
            for r0 in range(0, nrows, step):
                rows = self.row_order[r0 : r0 + step]
                yield rows, cols, _poison(st, rows, cols, _pl_block(*self.pl, rows, cols, st.lengths))
            return
        # blocks of 16 length-neighbouring rows (with a row subset: the blocks that hold one of them)
        rb = 16
        for r0 in range(0, nrows, rb):
            r1 = min(nrows, r0 + rb)
            if self.wanted is not None and not bool(self.wanted[r0:r1].any()):
                continue
            rows = self.row_order[r0:r1]
            row_max = int(self.row_len[r1 - 1])
            c0 = 0
            while c0 < bsz:
                cb = self._col_block(c0, r1 - r0, row_max)
                c1 = min(bsz, c0 + cb)
                cols = order[c0:c1]
                pi = rows.unsqueeze(1).expand(-1, c1 - c0).reshape(-1)
                pj = cols.unsqueeze(0).expand(r1 - r0, -1).reshape(-1)
                if self.metric == "kl":
                    sims = _kl_pairs_torch(st, pi, pj, self.short_first)
                else:
                    sims = _hti_pairs_torch(st, pi, pj)
                yield rows, cols, _poison(st, rows, cols, sims.reshape(r1 - r0, c1 - c0))
                c0 = c1


def _pairwise_torch(st, cu, metric, short_first) -> torch.Tensor:
    bsz = st.lengths.numel()
    out = torch.empty((bsz, bsz), dtype=torch.float32, device=st.x.device)
    for rows, cols, sims in _TileSource(st, cu, metric, short_first).tiles():
        out[rows.unsqueeze(1), cols.unsqueeze(0)] = sims.to(torch.float32)
    return out


def _grouped_torch(st, cu, metric, short_first, groups, num_groups, exclude_self, pids, rows=None) -> torch.Tensor:
    """The grouped max on the torch path; ``rows`` (optional) restricts the scored rows: the result
    is then ``[B, num_groups]`` in which those rows are filled (other rows may be too: callers read
    only the rows they asked for)."""
    bsz = st.lengths.numel()
    dev = st.x.device
    out = torch.full((bsz, num_groups), -math.inf, dtype=torch.float32, device=dev)
    nonempty = st.lengths > 0
    for rows, cols, sims in _TileSource(st, cu, metric, short_first, rows).tiles():
        ok = nonempty[rows].unsqueeze(1) & nonempty[cols].unsqueeze(0)  # NaN of a non-finite side stays
        if exclude_self:
            ok &= rows.unsqueeze(1) != cols.unsqueeze(0)
        if pids is not None:
            ok &= pids[rows].unsqueeze(1) != pids[cols].unsqueeze(0)
        vals = torch.where(ok, sims.to(torch.float32), torch.full((), -math.inf, device=dev))
        idx = groups[cols].unsqueeze(0).expand(rows.numel(), -1)
        part = torch.full((rows.numel(), num_groups), -math.inf, dtype=torch.float32, device=dev)
        part = part.scatter_reduce(1, idx, vals, reduce="amax", include_self=True)
        # NaN propagates (explicitly: scatter_reduce's amax is not documented to on every device)
        nan = torch.zeros_like(part).scatter_reduce(1, idx, torch.isnan(vals).to(part.dtype), reduce="amax")
        part = torch.where(nan > 0, torch.full((), math.nan, device=dev), part)
        out[rows] = torch.maximum(out[rows], part)  # propagates NaN
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


def _run_cpu_ext(ext, st: SeqStats, short_first: bool, grouped, threads=None, rows=None, share=None) -> torch.Tensor:
    """Call the C++ kernels (they take raw pointers: every tensor here is contiguous, on the CPU).

    The kernels read the float32 values, starts and lengths and compute everything else themselves.
    ``threads``: the OpenMP thread count (``None``: :func:`heal_kernels._backend.cpu_threads`'s
    default). ``rows``: ``None`` or ``(begin, end)``: the grouped op scores only rows
    ``begin .. end - 1`` (every column stays a candidate neighbour) and returns ``[end - begin, G]``,
    each row bit-identical to the full call's whatever ``threads`` and ``rows``. ``share``: ``None`` or
    ``(index, count)``: that share of the unordered pairs, partial maxima ``[B, G]``."""
    bsz = st.lengths.numel()
    ptrs = [t.data_ptr() for t in (st.values, st.starts, st.lengths)]
    threads = cpu_threads(threads)
    if not grouped:
        out = torch.empty((bsz, bsz), dtype=torch.float32)
        ext.pairwise(*ptrs, bsz, short_first, out.data_ptr(), threads)
        return out
    groups, num_groups, exclude_self, pids = grouped
    begin, end = (0, bsz) if rows is None else (int(rows[0]), int(rows[1]))
    index, count = (0, 1) if share is None else (int(share[0]), int(share[1]))
    out = torch.empty((end - begin, num_groups), dtype=torch.float32)  # written entirely by the kernel
    pid_ptr = pids.data_ptr() if pids is not None else 0
    ext.grouped(*ptrs, bsz, short_first, groups.data_ptr(), num_groups, exclude_self, pid_ptr, out.data_ptr(), threads,
                begin, end, index, count)
    return out


def share_rows(bsz: int, index: int, count: int) -> Tuple[int, int]:
    """Share ``index``'s contiguous ``(begin, end)`` of ``bsz`` rows split into ``count`` shares (sizes
    differ by at most one; every row belongs to exactly one share)."""
    base, extra = divmod(bsz, count)
    begin = index * base + min(index, extra)
    return begin, begin + base + (1 if index < extra else 0)


def _int_pair(value, name: str, what: str):
    """``value`` as a pair of ints (not bools), or ``ValueError`` naming ``name``."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise ValueError(f"{name} must be None or {what} pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_share(share, rows):
    """``share`` of the grouped op: ``None`` or ``(index, count)`` with ``0 <= index < count``."""
    if share is None:
        return None
    index, count = _int_pair(share, "share", "an (index, count)")
    if not 0 <= index < count:
        raise ValueError(f"share=({index}, {count}) must satisfy 0 <= index < count")
    if rows is not None:
        raise ValueError("share and rows cannot be combined: a share scores every row")
    return index, count


def _check_rows(rows, bsz: int):
    """``rows`` of the grouped op: ``None`` (every row) or ``(begin, end)`` with ``0 <= begin <= end <= B``."""
    if rows is None:
        return None
    begin, end = _int_pair(rows, "rows", "a (begin, end)")
    if not 0 <= begin <= end <= bsz:
        raise ValueError(f"rows=({begin}, {end}) must satisfy 0 <= begin <= end <= B={bsz}")
    return begin, end


def _run(values, cu_seqlens, metric, kl_direction, backend, grouped_args=None, check=True, num_threads=None,
         rows=None, share=None):
    _check_metric(metric, kl_direction)
    threads = cpu_threads(num_threads)
    vals, cu = _validate_packed(values, cu_seqlens, check)
    bsz = cu.numel() - 1
    if grouped_args is not None:
        groups, num_groups, exclude_self, prompt_ids = grouped_args
        groups, pids = _validate_groups(groups, num_groups, prompt_ids, bsz, vals.device, check)
        share = _check_share(share, rows)
        rows = _check_rows(rows, bsz)
        if rows is not None and rows == (0, bsz):
            rows = None
        if share is not None and share[1] == 1:
            share = None
        if rows is not None and rows[0] == rows[1]:
            return torch.full((0, num_groups), -math.inf, dtype=torch.float32, device=vals.device)
    name = resolve_backend(vals.device, backend)
    short_first = kl_direction == "short_first"
    if share is not None and not (metric == "kl" and bsz > 0 and name == "cpu" and _cpu_ext() is not None):
        # every other path computes each row on its own: the share is a block of whole rows
        begin, end = share_rows(bsz, *share)
        out = torch.full((bsz, num_groups), -math.inf, dtype=torch.float32, device=vals.device)
        if end > begin:
            out[begin:end] = _run(vals, cu, metric, kl_direction, name, grouped_args, check=False,
                                  num_threads=num_threads, rows=(begin, end))
        return out
    if metric == "kl" and bsz > 0 and name == "triton":
        from heal_kernels.triton import pairwise as tri

        # the Triton path computes the per-sequence statistics itself (one packing kernel)
        if grouped_args is None:
            return tri.pairwise_kl(vals, cu, short_first)
        return tri.grouped_max_kl(vals, cu, short_first, groups, num_groups, exclude_self, pids, rows=rows)
    st = seq_stats(vals, cu)
    if metric == "kl" and bsz > 0 and name == "cpu":
        ext = _cpu_ext()
        if ext is not None:
            return _run_cpu_ext(ext, st, short_first, grouped_args is not None and (groups, num_groups, exclude_self, pids),
                                threads, rows, share)
    if grouped_args is None:
        return _pairwise_torch(st, cu, metric, short_first)
    if rows is None:
        return _grouped_torch(st, cu, metric, short_first, groups, num_groups, exclude_self, pids)
    sel = torch.arange(rows[0], rows[1], device=vals.device)
    return _grouped_torch(st, cu, metric, short_first, groups, num_groups, exclude_self, pids, sel)[rows[0]:rows[1]]


def pairwise_similarity(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    metric: str = "kl",
    kl_direction: str = "scored_first",
    backend: Optional[str] = None,
    check: bool = True,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """Float32 ``[B, B]`` matrix ``out[i, j] = s(seq_i, seq_j)``: row ``i`` scored, column ``j`` neighbour.

    ``values`` float ``[total]`` + ``cu_seqlens`` int32/int64 ``[B + 1]`` (packed ragged batch).
    ``metric``: ``"kl"`` (``-KL`` after nearest-neighbour alignment; ``kl_direction`` ``"scored_first"``
    = ``KL(P_i || P_j)``, ``"short_first"`` = ``KL(short || long)``), ``"hti"`` or ``"pl"``.
    A pair involving an empty sequence is NaN. ``backend`` overrides ``HEAL_KERNELS_BACKEND``
    (``auto``/``triton``/``cpu``/``torch``). ``num_threads``: threads of the C++ kernel (default: the
    CPUs this process may run on, :func:`heal_kernels.available_cpus`; torch's global setting is
    not used). Raises ``ValueError`` naming the bad argument (and the trajectory for NaN/inf entropies).

    ``check=False`` skips the checks that read tensor contents, so that the Triton path
    (``metric="kl"``) never synchronises with the host: the ``cu_seqlens`` offsets on CUDA (wrong
    offsets then give wrong numbers instead of an error; on the CPU they are always checked) and
    finite values on every device (a sequence holding a NaN or an infinity then gives NaN in its row
    and column, on every backend; see the module docstring).
    """
    return _run(values, cu_seqlens, metric, kl_direction, backend, check=bool(check), num_threads=num_threads)


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
    check: bool = True,
    num_threads: Optional[int] = None,
    rows: Optional[Tuple[int, int]] = None,
    share: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Float32 ``[B, num_groups]``: for each row ``i`` the max of ``s(seq_i, seq_j)`` over the columns
    ``j`` with ``groups[j] == g``, skipping ``j == i`` (``exclude_self``), ``prompt_ids[j] ==
    prompt_ids[i]`` (when given) and empty sequences; ``-inf`` where no column is eligible and for
    empty rows. Never builds the ``[B, B]`` matrix; deterministic. Other arguments as in
    :func:`pairwise_similarity`.

    ``check=False`` skips the checks that read tensor contents, so that the Triton path
    (``metric="kl"``) never synchronises with the host (``prompt_ids`` given as a host list go over
    from pinned memory): ``cu_seqlens`` offsets and group ids in range on CUDA (wrong contents then
    give wrong numbers instead of an error; on the CPU they are always checked) and finite values on
    every device: a sequence holding a NaN or an infinity makes its similarities NaN, and a group
    with such an eligible neighbour gets NaN (never ``-inf``, which means no eligible neighbour), on
    every backend.

    ``rows=(begin, end)`` computes only scored rows ``begin .. end - 1`` (every row stays a possible
    neighbour) and returns ``[end - begin, num_groups]``, bit for bit the same rows as the full call:
    shards of rows can be computed on different workers and concatenated. ``num_threads`` as in
    :func:`pairwise_similarity`.

    ``share=(index, count)`` computes one of ``count`` shares of the work and returns partial maxima
    ``[B, num_groups]`` (``-inf`` where the share saw no eligible column); the element-wise
    ``torch.maximum`` of the ``count`` shares is the full result, bit for bit. The C++ kernel splits
    the unordered pairs (each pair is computed once, in both directions, by one share, the shares
    cut at equal estimated cost); the other paths compute each row on its own anyway, and a share is
    a block of whole rows (:func:`share_rows`). Not combined with ``rows``.
    """
    return _run(values, cu_seqlens, metric, kl_direction, backend, (groups, num_groups, bool(exclude_self), prompt_ids),
                check=bool(check), num_threads=num_threads, rows=rows, share=share)
