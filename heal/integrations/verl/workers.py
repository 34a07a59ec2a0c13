"""verl's actor/rollout/ref worker with heal's fused entropy op switched on in its process.

``heal_sync`` uses it in place of ``ActorRolloutRefWorker`` when ``heal.fused_entropy: true``: the
worker calls :func:`heal.integrations.verl.fused_entropy.use_fused_entropy` when it is constructed,
before ``init_model`` builds the training engine (which captures verl's entropy function). Nothing
else differs.
"""

from __future__ import annotations

from verl.workers.engine_workers import ActorRolloutRefWorker

__all__ = ["HealActorRolloutRefWorker"]


class HealActorRolloutRefWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` that routes entropy/log-probs to ``heal_kernels``."""

    def __init__(self, *args, **kwargs):
        from heal.integrations.verl.fused_entropy import use_fused_entropy

        use_fused_entropy()
        super().__init__(*args, **kwargs)
