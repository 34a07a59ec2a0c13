"""The one place every Triton kernel of heal is launched from.

Each launcher builds ``(kernel, grid, args, kwargs)`` with a ``*_launch_spec`` function and hands it
to :func:`launch`. :mod:`heal_kernels.triton.aot` calls the same spec functions (with CPU tensors
standing in for CUDA ones) to list every specialisation for the compile gate and the static
performance model, and the tests record real launches through :data:`RECORDERS` to check that the
list stays in step with the launchers.

FP contraction is always passed explicitly (``enable_fp_fusion``): Triton's default changes between
versions (3.10 turns it off), and the kernels' comments state which products are fused.
"""

from __future__ import annotations

from typing import Callable, List

# callables (kernel, args, kwargs) run before every launch (tests record launches with them)
RECORDERS: List[Callable] = []


def launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    for record in RECORDERS:
        record(kernel, args, kwargs)
    kernel[grid](*args, **kwargs)
