"""The similarity functions between entropy dynamics: one registry (DESIGN.md section 3.2).

The maths lives in :mod:`heal_kernels` (fast ops) and :mod:`heal_kernels.reference` (the float64
spec); this module only names the choices, describes them and validates names, so that the reward,
the trainer integrations and the config layer agree on what ``metric`` and ``kl_direction`` accept.

=======  =========================================================================  =========
name     similarity s(scored, neighbour), larger = more similar                     aligned
=======  =========================================================================  =========
``kl``   ``-KL(softmax(a') || softmax(b'))`` (paper eq. 9; default)                 yes
``hti``  high-entropy tokens intersection: top-20% overlap, summed min (eq. 10)     yes
``pl``   Pearson linear: ``|cos(atan k_a - atan k_b) * r_a * r_b|`` (eq. 11)        no
=======  =========================================================================  =========

"Aligned" means the shorter sequence is first stretched to the longer one's length by
nearest-neighbour interpolation (``F.interpolate(mode="nearest")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = [
    "Metric",
    "METRICS",
    "DEFAULT_METRIC",
    "KL_DIRECTIONS",
    "DEFAULT_KL_DIRECTION",
    "metric_names",
    "get_metric",
    "check_kl_direction",
]

KL_DIRECTIONS: Tuple[str, ...] = ("scored_first", "short_first")
DEFAULT_KL_DIRECTION = "scored_first"
DEFAULT_METRIC = "kl"


@dataclass(frozen=True)
class Metric:
    """One similarity function of the registry.

    ``kl_directions`` lists the ``kl_direction`` values that change the result (empty for the
    symmetric metrics, which accept and ignore any valid ``kl_direction``).
    """

    name: str
    description: str
    needs_alignment: bool
    kl_directions: Tuple[str, ...] = ()

    @property
    def directional(self) -> bool:
        return bool(self.kl_directions)


METRICS: Dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "kl",
            "negative KL divergence between the softmaxes of the aligned entropy sequences "
            "(paper eq. 9; 'scored_first' = KL(scored || neighbour) as the reference code, "
            "'short_first' = KL(short || long) as the paper's appendix)",
            needs_alignment=True,
            kl_directions=KL_DIRECTIONS,
        ),
        Metric(
            "hti",
            "high-entropy tokens intersection: sum of min entropies over the positions in both "
            "sequences' top 20% after alignment (paper eq. 10)",
            needs_alignment=True,
        ),
        Metric(
            "pl",
            "Pearson linear: |cos(atan k_a - atan k_b) * r_a * r_b| of each sequence's least-squares "
            "line, no alignment (paper eq. 11)",
            needs_alignment=False,
        ),
    )
}


def metric_names() -> Tuple[str, ...]:
    return tuple(METRICS)


def get_metric(name: str) -> Metric:
    """The registered :class:`Metric` called ``name``; ``ValueError`` listing the choices otherwise."""
    metric = METRICS.get(name) if isinstance(name, str) else None
    if metric is None:
        choices = ", ".join(repr(n) for n in METRICS)
        raise ValueError(f"metric must be one of {choices}, got {name!r}")
    return metric


def check_kl_direction(kl_direction: str) -> str:
    """Return ``kl_direction`` if valid (for every metric); ``ValueError`` listing the choices otherwise."""
    if kl_direction not in KL_DIRECTIONS:
        choices = ", ".join(repr(d) for d in KL_DIRECTIONS)
        raise ValueError(f"kl_direction must be one of {choices}, got {kl_direction!r}")
    return kl_direction
