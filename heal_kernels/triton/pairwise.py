"""Triton kernels for the all-pairs ``-KL`` entropy-dynamics similarity (CUDA; interpreter on CPU).

One program per scored row ``i``. It walks the columns in length order (so a tile's pairs have
similar aligned lengths) in tiles of ``BLOCK_J`` columns x ``BLOCK_T`` aligned positions. For each
pair, with ``L`` the longer sequence, ``S'`` the shorter one stretched by ``src(t) = min(floor(f32(t)
* (f32(m) / f32(n))), m - 1)`` and ``e = exp(x - M_seq)`` precomputed once per element:

* ``P = L``:  ``KL = sum_t e_L (L - S') / Z_L + (M_S - M_L) + log(Z_S' / Z_L)``
* ``P = S'``: ``KL = sum_t e_S' (S' - L) / Z_S' + (M_L - M_S) + log(Z_L / Z_S')``

(``Z_L = sum_t e_L``, ``Z_S' = sum_t e_S'(t)``): no ``exp`` in the pair loop, float32 accumulation
with tree reductions, so results are deterministic. The grouped variant keeps a running max per
group in registers and writes ``[num_groups]`` once per row: no ``[B, B]`` buffer, no atomics.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _kl_rows_kernel(
    x_ptr,  # float32 [total + pad]
    e_ptr,  # float32 [total + pad], exp(x - M_seq)
    starts_ptr,  # int64 [B]
    lens_ptr,  # int32 [B]
    mx_ptr,  # float32 [B]
    order_ptr,  # int64 [B], columns sorted by length
    groups_ptr,  # int32 [B]
    pid_ptr,  # int64 [B] (unused unless HAS_PID)
    out_ptr,  # float32 [B, B] (FULL) or [B, G]
    B,
    G,
    SHORT_FIRST: tl.constexpr,
    FULL: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    HAS_PID: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    m_i = tl.load(lens_ptr + i)
    start_i = tl.load(starts_ptr + i)
    mx_i = tl.load(mx_ptr + i)
    if HAS_PID:
        pid_i = tl.load(pid_ptr + i)
    offs_j = tl.arange(0, BLOCK_J)
    offs_t = tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    running = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for j0 in range(0, B, BLOCK_J):
        jmask = (j0 + offs_j) < B
        j = tl.load(order_ptr + j0 + offs_j, mask=jmask, other=0)
        m_j = tl.load(lens_ptr + j, mask=jmask, other=0)
        start_j = tl.load(starts_ptr + j, mask=jmask, other=0)
        mx_j = tl.load(mx_ptr + j, mask=jmask, other=0.0)
        # P = the side whose softmax weights the KL; L = the longer side (P on ties)
        if SHORT_FIRST:
            p_is_row = m_i <= m_j
        else:
            p_is_row = m_j >= 0  # all true
        m_p = tl.where(p_is_row, m_i, m_j)
        m_q = tl.where(p_is_row, m_j, m_i)
        case_long = m_p >= m_q
        l_is_row = case_long == p_is_row
        nl = tl.where(l_is_row, m_i, m_j)
        ms = tl.where(l_is_row, m_j, m_i)
        start_l = tl.where(l_is_row, start_i, start_j)
        start_s = tl.where(l_is_row, start_j, start_i)
        mx_l = tl.where(l_is_row, mx_i, mx_j)
        mx_s = tl.where(l_is_row, mx_j, mx_i)
        nl_c = tl.maximum(nl, 1)
        ms_c = tl.maximum(ms, 1)
        scale = ms_c.to(tl.float32) / nl_c.to(tl.float32)
        # both sides non-empty (masked lanes loaded 0): one comparison of a block, so the mask is a
        # plain block of int1 (``jmask & (scalar > 0)`` becomes an int32 mask in Triton 3.9's
        # interpreter, which tl.load rejects)
        ok = tl.minimum(m_j, m_i) > 0
        n_max = tl.max(tl.where(ok, nl, 0), axis=0)
        acc = tl.zeros([BLOCK_J, BLOCK_T], tl.float32)
        zs = tl.zeros([BLOCK_J, BLOCK_T], tl.float32)
        zl = tl.zeros([BLOCK_J, BLOCK_T], tl.float32)
        for t0 in range(0, n_max, BLOCK_T):
            t = t0 + offs_t
            valid = (t[None, :] < nl[:, None]) & ok[:, None]
            src = tl.floor(t[None, :].to(tl.float32) * scale[:, None]).to(tl.int32)
            src = tl.minimum(src, ms_c[:, None] - 1)
            s_idx = start_s[:, None] + src
            l_idx = start_l[:, None] + t[None, :]
            es = tl.load(e_ptr + s_idx, mask=valid, other=0.0)
            xs = tl.load(x_ptr + s_idx, mask=valid, other=0.0)
            el = tl.load(e_ptr + l_idx, mask=valid, other=0.0)
            xl = tl.load(x_ptr + l_idx, mask=valid, other=0.0)
            zs += es
            zl += el
            w = tl.where(case_long[:, None], el, es)
            d = tl.where(case_long[:, None], xl - xs, xs - xl)
            acc += w * d
        a = tl.sum(acc, axis=1)
        z_s = tl.sum(zs, axis=1)
        z_l = tl.sum(zl, axis=1)
        z_s = tl.where(ok, z_s, 1.0)
        z_l = tl.where(ok, z_l, 1.0)
        kl_long = a / z_l + (mx_s - mx_l) + tl.log(z_s / z_l)
        kl_short = a / z_s + (mx_l - mx_s) + tl.log(z_l / z_s)
        sim = -tl.where(case_long, kl_long, kl_short)
        if FULL:
            sim = tl.where(ok, sim, float("nan"))
            tl.store(out_ptr + i * B + j, sim, mask=jmask)
        else:
            elig = ok
            if EXCLUDE_SELF:
                elig = elig & (j != i)
            if HAS_PID:
                pid_j = tl.load(pid_ptr + j, mask=jmask, other=0)
                elig = elig & (pid_j != pid_i)
            g = tl.load(groups_ptr + j, mask=jmask, other=0)
            hit = elig[:, None] & (g[:, None] == offs_g[None, :])
            vals = tl.where(hit, sim[:, None], float("-inf"))
            running = tl.maximum(running, tl.max(vals, axis=0))
    if not FULL:
        tl.store(out_ptr + i * G + offs_g, running, mask=offs_g < G)


def _blocks(device: torch.device, num_groups: int = 1):
    if device.type != "cuda":  # interpreter: small tiles keep it quick
        return 4, 16, triton.next_power_of_2(max(1, num_groups))
    return 16, 128, triton.next_power_of_2(max(1, num_groups))


def _prepare(st):
    dev = st.x.device
    lens32 = st.lengths.to(torch.int32)
    order = torch.argsort(st.lengths, stable=True)
    return dict(
        x=st.x,
        e=st.e,
        starts=st.starts,
        lens=lens32,
        mx=st.mx.to(torch.float32),
        order=order,
        dev=dev,
    )


def _launch(st, short_first, full, groups=None, num_groups=1, exclude_self=True, pids=None):
    p = _prepare(st)
    bsz = st.lengths.numel()
    dev = p["dev"]
    bj, bt, bg = _blocks(dev, num_groups)
    if full:
        out = torch.empty((bsz, bsz), dtype=torch.float32, device=dev)
        groups32 = torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        out = torch.empty((bsz, num_groups), dtype=torch.float32, device=dev)
        groups32 = groups.to(torch.int32)
    pid_t = pids if pids is not None else torch.zeros(1, dtype=torch.int64, device=dev)
    x, e = p["x"], p["e"]  # padded: never empty
    _kl_rows_kernel[(bsz,)](
        x,
        e,
        p["starts"],
        p["lens"],
        p["mx"],
        p["order"],
        groups32,
        pid_t,
        out,
        bsz,
        num_groups,
        SHORT_FIRST=bool(short_first),
        FULL=bool(full),
        EXCLUDE_SELF=bool(exclude_self),
        HAS_PID=pids is not None,
        BLOCK_J=bj,
        BLOCK_T=bt,
        BLOCK_G=bg,
    )
    return out


def pairwise_kl(st, short_first: bool) -> torch.Tensor:
    """Float32 ``[B, B]`` of ``-KL`` (row scored), NaN where a side is empty."""
    return _launch(st, short_first, True)


def grouped_max_kl(st, short_first: bool, groups, num_groups: int, exclude_self: bool, pids) -> torch.Tensor:
    """Float32 ``[B, num_groups]``: per-row max of ``-KL`` over each group's eligible columns."""
    return _launch(st, short_first, False, groups, num_groups, exclude_self, pids)
