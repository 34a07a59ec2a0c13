"""Which implementation runs an op: one rule for every op family.

``HEAL_KERNELS_BACKEND`` (environment; unset or empty means ``auto``) or an explicit ``backend=``
argument of the internal entry points selects it:

* ``auto`` (default): CUDA tensors -> ``triton``; CPU tensors -> ``cpu`` (the C++ extension when it
  builds, else the chunked pure-torch path).
* ``triton``: the Triton kernels on any device. On CPU tensors this needs ``TRITON_INTERPRET=1``
  set before triton is imported (the Triton interpreter; slow, for tests).
* ``cpu``: the CPU implementation (C++ extension, falling back to chunked torch).
* ``torch``: the pure-torch implementation (memory-bounded, no compiled code).

CPU threads (:func:`cpu_threads`): the C++ kernels take their thread count from an explicit
``num_threads=`` argument, else from the CPUs this process may run on (its affinity mask), never from
torch's global setting. Ray starts its actors with ``OMP_NUM_THREADS=1``, so inside a verl trainer
process ``torch.get_num_threads()`` is 1 whatever the node has; the affinity mask is what the
operating system actually lets the process use.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")
ENV_VAR = "HEAL_KERNELS_BACKEND"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_threads(num_threads: Optional[int] = None) -> int:
    """The thread count a CPU kernel uses: ``num_threads`` when given (an int >= 1), else
    :func:`available_cpus`. torch's global thread setting is neither read nor changed."""
    if num_threads is None:
        return available_cpus()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1 or None (the CPUs this process may use), got {num_threads!r}")
    return num_threads


def requested_backend(explicit: Optional[str] = None) -> str:
    """The backend asked for: ``explicit`` when given, else ``$HEAL_KERNELS_BACKEND`` (unset, empty or
    blank: ``auto``). ``ValueError`` listing the valid names for anything else."""
    if explicit is not None:
        name, where = explicit, "backend"
    else:
        name, where = os.environ.get(ENV_VAR, ""), f"${ENV_VAR}"
        if not name.strip():  # HEAL_KERNELS_BACKEND= (empty) is the same as unset
            return "auto"
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(
            f"{where}={name!r} is not a backend; valid values: {', '.join(BACKENDS)}"
            + (" (or leave it unset: auto)" if explicit is None else "")
        )
    return name.strip().lower()


def resolve_backend(device: torch.device, explicit: Optional[str] = None) -> str:
    """The concrete backend (``triton``, ``cpu`` or ``torch``) for tensors on ``device``."""
    name = requested_backend(explicit)
    if name == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
            "before triton is imported"
        )
    if name in ("cpu", "torch") and device.type == "cuda":
        raise ValueError(f"backend {name!r} cannot run CUDA tensors; move them to the CPU or use 'triton'")
    return name
