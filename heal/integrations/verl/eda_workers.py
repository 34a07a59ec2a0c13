"""The EDA's per-row maxima computed in shares on several processes (verl's actor workers).

No verl import here: :mod:`heal.integrations.verl.workers` registers :func:`grouped_max_shard` as a
worker method, and the driver side is :func:`workers_grouped_max`.

Every worker receives the whole packed batch and computes its share ``(rank, world)`` of the work
with :func:`heal_kernels.grouped_max_similarity` (``share=``): partial maxima ``[B, G]``, which the
driver combines with an element-wise max. On a CPU worker the C++ kernel splits the unordered pairs
(each pair computed once, in both directions, by one worker, the shares cut at equal estimated
cost), so ``world`` workers do the arithmetic of one process; on a GPU the Triton kernel computes
each row on its own and a share is a block of rows. A max does not depend on the order or grouping
of its operands, so on the same kind of device the result is bit for bit the single-process one.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["grouped_max_shard", "workers_grouped_max"]


def grouped_max_shard(payload: Dict[str, Any], rank: int, world: int, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """One worker's part: its share ``(rank, world)`` of the grouped maxima (partial maxima
    ``[B, G]``), computed on ``device`` (default: this process's GPU when it has one, else the CPU)
    and returned on the CPU with the share, the thread count (CPU) and the time taken."""
    from heal_kernels import grouped_max_similarity
    from heal_kernels._backend import cpu_threads

    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    t0 = time.perf_counter()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    values, cu = payload["values"], payload["cu_seqlens"]
    kwargs = dict(payload["kwargs"])
    threads = cpu_threads(kwargs.pop("num_threads", None)) if device.type == "cpu" else 0
    pids = payload.get("prompt_ids")
    sims = grouped_max_similarity(
        values.to(device),
        cu.to(device),
        payload["groups"].to(device),
        payload["num_groups"],
        prompt_ids=None if pids is None else pids.to(device),
        share=(rank, world),
        num_threads=threads or None,
        **kwargs,
    )
    return {
        "share": (rank, world),
        "sims": sims.cpu(),
        "device": str(device),
        "threads": threads,
        "time_s": time.perf_counter() - t0,
    }


def combine_shares(outputs: List[Dict[str, Any]], bsz: int, num_groups: int) -> torch.Tensor:
    """The element-wise max of the workers' partial maxima, checking that they are the shares
    ``0 .. world - 1`` of one world, each ``[bsz, num_groups]``."""
    shares = sorted(tuple(o["share"]) for o in outputs)
    world = len(outputs)
    if shares != [(k, world) for k in range(world)]:
        raise RuntimeError(f"heal: the workers' EDA shares are not 0 .. {world - 1} of {world}: {shares}")
    out = torch.full((bsz, num_groups), float("-inf"))
    for o in outputs:
        if tuple(o["sims"].shape) != (bsz, num_groups):
            raise RuntimeError(f"heal: a worker's EDA share has shape {tuple(o['sims'].shape)}, not ({bsz}, {num_groups})")
        out = torch.maximum(out, o["sims"])
    return out


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
        sims = combine_shares(list(outputs), bsz, int(num_groups))
        if report is not None:
            report["eda/workers"] = float(len(outputs))
            report["eda/threads"] = float(max((o["threads"] for o in outputs), default=0))
            report["eda/worker_time_s_max"] = float(max((o["time_s"] for o in outputs), default=0.0))
        return sims.to(values.device)

    return grouped_max
