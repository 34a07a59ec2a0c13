"""verl's actor/rollout/ref worker with heal's additions, and the EDA on the workers.

``heal_sync`` swaps verl's ``ActorRolloutRefWorker`` for one of these subclasses only when the ``heal:``
block asks for what they add; otherwise verl's worker runs unchanged.

* :class:`HealEDAWorker` (``heal.eda_placement: workers``) adds one registered method,
  ``heal_eda_grouped_max`` (verl's ``Dispatch.ONE_TO_ALL``): every worker receives the whole packed
  batch of entropies (one Ray object, put once by the driver), computes the EDA's two per-row maxima
  for its contiguous shard of rows (by global rank; :mod:`heal.integrations.verl.eda_workers`) on its
  own device -- the Triton kernel on a GPU, the C++ kernel on a CPU -- and returns only that
  ``[rows, 2]`` block, which the driver concatenates in row order. Every row is computed by the same
  kernel over the same columns as on the driver, so on the same kind of device the rewards are bit
  for bit those of ``heal.eda_placement: driver``.
* :class:`HealActorRolloutRefWorker` (``heal.fused_entropy: true``) also switches heal's fused
  entropy op on when it is constructed, before ``init_model`` builds the training engine (which
  captures verl's entropy function).
"""

from __future__ import annotations

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from heal.integrations.verl.eda_workers import grouped_max_shard

__all__ = ["HealEDAWorker", "HealActorRolloutRefWorker", "WORKER_METHOD"]

WORKER_METHOD = "heal_eda_grouped_max"


class HealEDAWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` plus :data:`WORKER_METHOD` (the EDA's grouped maxima for this rank's rows)."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def heal_eda_grouped_max(self, payload):
        return grouped_max_shard(payload, int(self.rank), int(self.world_size))


class HealActorRolloutRefWorker(HealEDAWorker):
    """:class:`HealEDAWorker` that routes entropy/log-probs to ``heal_kernels``."""

    def __init__(self, *args, **kwargs):
        from heal.integrations.verl.fused_entropy import use_fused_entropy

        use_fused_entropy()
        super().__init__(*args, **kwargs)
