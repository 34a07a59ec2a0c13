"""Which implementation runs an op: one rule for every op family.

``HEAL_KERNELS_BACKEND`` (environment) or an explicit ``backend=`` argument of the internal entry
points selects it:

* ``auto`` (default): CUDA tensors -> ``triton``; CPU tensors -> ``cpu`` (the C++ extension when it
  builds, else the chunked pure-torch path).
* ``triton``: the Triton kernels on any device. On CPU tensors this needs ``TRITON_INTERPRET=1``
  set before triton is imported (the Triton interpreter; slow, for tests).
* ``cpu``: the CPU implementation (C++ extension, falling back to chunked torch).
* ``torch``: the pure-torch implementation (memory-bounded, no compiled code).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")
ENV_VAR = "HEAL_KERNELS_BACKEND"


def requested_backend(explicit: Optional[str] = None) -> str:
    name = explicit if explicit is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (from argument or ${ENV_VAR}), got {name!r}")
    return name


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
