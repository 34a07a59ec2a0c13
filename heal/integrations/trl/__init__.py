"""HEAL for TRL: :class:`HEALGRPOTrainer` (a ``trl.GRPOTrainer`` that adds the EDA reward before
advantages) and :class:`HEALGRPOConfig` (``trl.GRPOConfig`` plus the ``heal_*`` options).

TRL is imported on first attribute access, so ``import heal.integrations.trl`` works without it::

    from heal.integrations.trl import HEALGRPOConfig, HEALGRPOTrainer
"""

__all__ = ["HEALGRPOConfig", "HEALGRPOTrainer", "completion_entropies", "check_heal_dataset", "EDA_REWARD_NAME",
           "ENTROPY_SOURCES"]


def __getattr__(name):
    if name == "HEALGRPOConfig":
        from heal.integrations.trl.config import HEALGRPOConfig

        return HEALGRPOConfig
    if name in ("HEALGRPOTrainer", "completion_entropies", "check_heal_dataset", "EDA_REWARD_NAME", "ENTROPY_SOURCES"):
        from heal.integrations.trl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
