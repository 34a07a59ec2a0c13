"""HEAL in verl (>= 0.9, v1 trainer): plugin, ``heal_sync`` trainer mode, entropy losses, fused entropy.

Installing heal registers the ``verl.plugins`` entry point ``heal``; verl then loads
:mod:`heal.integrations.verl.plugin` in every process that imports verl, which registers

* trainer mode ``heal_sync`` (:class:`heal.integrations.verl.trainer.HealPPOTrainerSync`),
* policy-loss modes ``high_entropy_tokens`` and ``entropy_advantage`` (:mod:`.losses`),

and, with ``HEAL_FUSED_ENTROPY=1``, routes verl's entropy/log-prob path to heal's fused op
(:func:`use_fused_entropy`, also available as a direct call). Recipes: ``recipes/verl/``.

Importing this package does not import verl.
"""

from __future__ import annotations

__all__ = ["use_fused_entropy", "restore_verl_entropy", "register"]


def use_fused_entropy() -> None:
    """Make verl's actor use heal's fused entropy/log-prob op (see :mod:`.fused_entropy`)."""
    from heal.integrations.verl.fused_entropy import use_fused_entropy as _use

    _use()


def restore_verl_entropy() -> None:
    """Undo :func:`use_fused_entropy`."""
    from heal.integrations.verl.fused_entropy import restore_verl_entropy as _restore

    _restore()


def register() -> None:
    """Eagerly register heal's trainer mode and losses in verl's registries (imports verl)."""
    from heal.integrations.verl.plugin import register as _register

    _register()
