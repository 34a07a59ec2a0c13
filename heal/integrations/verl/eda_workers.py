"""The EDA's per-row maxima computed in shards of rows on several processes (verl's actor workers).

No verl import here: :mod:`heal.integrations.verl.workers` registers :func:`grouped_max_shard` as a
worker method, and the driver side is :func:`workers_grouped_max`.

Every worker receives the whole packed batch, computes the two grouped maxima of its contiguous
shard of rows (:func:`shard_rows` by rank) with :func:`heal_kernels.grouped_max_similarity`
(``rows=``), which returns the same bits for a row whatever other rows are computed with it; the
driver concatenates the blocks in row order. On the same kind of device the result is therefore
bit for bit the single-process one.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["shard_rows", "grouped_max_shard", "workers_grouped_max"]


def shard_rows(bsz: int, rank: int, world: int) -> Tuple[int, int]:
    """Rank ``rank``'s contiguous ``(begin, end)`` of ``bsz`` rows split over ``world`` ranks (sizes
    differ by at most one; every row belongs to exactly one rank)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(bsz, world)
    begin = rank * base + min(rank, extra)
    return begin, begin + base + (1 if rank < extra else 0)


def grouped_max_shard(payload: Dict[str, Any], rank: int, world: int, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """One worker's part: the grouped maxima of its shard of rows, computed on ``device`` (default:
    this process's GPU when it has one, else the CPU) and returned on the CPU with the shard's
    bounds, the thread count (CPU) and the time taken."""
    from heal_kernels import grouped_max_similarity
    from heal_kernels._backend import cpu_threads

    t0 = time.perf_counter()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    values, cu = payload["values"], payload["cu_seqlens"]
    bsz = cu.numel() - 1
    begin, end = shard_rows(bsz, rank, world)
    kwargs = dict(payload["kwargs"])
    threads = cpu_threads(kwargs.pop("num_threads", None)) if device.type == "cpu" else 0
    pids = payload.get("prompt_ids")
    sims = grouped_max_similarity(
        values.to(device),
        cu.to(device),
        payload["groups"].to(device),
        payload["num_groups"],
        prompt_ids=None if pids is None else pids.to(device),
        rows=(begin, end),
        num_threads=threads or None,
        **kwargs,
    )
    return {
        "rows": (begin, end),
        "sims": sims.cpu(),
        "device": str(device),
        "threads": threads,
        "time_s": time.perf_counter() - t0,
    }


def _combine(outputs: List[Dict[str, Any]], bsz: int, num_groups: int) -> torch.Tensor:
    """Concatenate the workers' blocks in row order, checking that they tile ``[0, bsz)`` exactly."""
    blocks = sorted(outputs, key=lambda o: o["rows"][0])
    at = 0
    for o in blocks:
        begin, end = o["rows"]
        if begin != at or tuple(o["sims"].shape) != (end - begin, num_groups):
            raise RuntimeError(f"heal: the workers' EDA blocks do not tile the batch: {[b['rows'] for b in blocks]} for B={bsz}")
        at = end
    if at != bsz:
        raise RuntimeError(f"heal: the workers' EDA blocks cover rows [0, {at}) of B={bsz}")
    if not blocks:
        return torch.full((0, num_groups), float("-inf"))
    return torch.cat([o["sims"] for o in blocks], dim=0)


def workers_grouped_max(call: Callable[[Any], List[Dict[str, Any]]], put: Callable[[Any], Any] = lambda x: x,
                        report: Optional[Dict[str, float]] = None) -> Callable[..., torch.Tensor]:
    """A ``grouped_max`` for :func:`heal.reward.eda_step` that runs on the workers.

    ``call(payload)`` runs :data:`WORKER_METHOD` on every worker and returns their outputs (the
    worker group's method); ``put`` stores the payload once (``ray.put``) so that each worker fetches it
    instead of the driver sending one copy per worker. ``report`` (a dict) receives
    ``eda/workers``, ``eda/threads`` (per worker, CPU workers; 0 on GPUs) and ``eda/worker_time_s_max``.
    """

    def grouped_max(values, cu_seqlens, groups, num_groups, *, prompt_ids=None, **kwargs):
        payload = {
            "values": values.detach().cpu(),
            "cu_seqlens": cu_seqlens.cpu(),
            "groups": groups.cpu(),
            "num_groups": int(num_groups),
            "prompt_ids": None if prompt_ids is None else prompt_ids.cpu(),
            "kwargs": kwargs,
        }
        outputs = call(put(payload))
        bsz = cu_seqlens.numel() - 1
        sims = _combine(list(outputs), bsz, int(num_groups))
        if report is not None:
            report["eda/workers"] = float(len(outputs))
            report["eda/threads"] = float(max((o["threads"] for o in outputs), default=0))
            report["eda/worker_time_s_max"] = float(max((o["time_s"] for o in outputs), default=0.0))
        return sims.to(values.device)

    return grouped_max
