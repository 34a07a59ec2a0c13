"""heal's verl plugin: registers heal in every process that imports verl.

verl 0.9 discovers plugins at the end of ``import verl`` (``verl/__init__.py``): for every entry point
of the ``verl.plugins`` group it calls ``entry_point.load()`` -- which imports the module and looks the
attribute up, but does not call it -- and swallows any exception at DEBUG log level
(``VERL_USE_EXTERNAL_PLUGINS=none`` turns discovery off, ``=heal,...`` loads only the named ones).
So the work happens when this module is imported; :func:`register` exists for the entry point's
``:register`` attribute and for explicit, eager use.

Importing this module (cheap: it imports nothing heavy from verl or heal) arranges, through
post-import hooks (:mod:`heal.integrations.verl._hooks`), that

* when ``verl.trainer.ppo.core_algos`` is imported, the policy-loss modes ``high_entropy_tokens`` and
  ``entropy_advantage`` are registered in its ``POLICY_LOSS_REGISTRY``;
* when ``verl.trainer.ppo.v1.trainer_sync`` is imported, the trainer mode ``heal_sync`` is registered
  in ``verl.trainer.ppo.v1.trainer_base.TRAINER_REGISTRY``;
* when ``verl.workers.utils.losses`` is imported, its ``ppo_loss`` is wrapped so that heal's entropy
  losses see the update pass's entropy (detached) and, with ``actor.entropy_coeff == 0``, verl's
  ``0 * entropy_loss`` term is skipped (:mod:`heal.integrations.verl.entropy_graph`);
* when ``verl.workers.engine.fsdp.transformer_impl`` is imported, the FSDP engine computes that
  entropy under ``no_grad`` when ``entropy_coeff == 0`` (no entropy graph is built);
* if ``HEAL_FUSED_ENTROPY=1`` is set in the process environment, verl's entropy/log-prob functions
  are routed to heal's fused op (:mod:`heal.integrations.verl.fused_entropy`), and every v1 trainer
  (``verl.trainer.ppo.v1.trainer_base.PPOTrainer``) logs once at construction when its engine or
  path cannot use it (:func:`~heal.integrations.verl.fused_entropy.uncovered_path_notice`);
* if ``VERL_PLATFORM=cpu`` is set, verl gets a ``cpu`` platform and the patches a run without an
  accelerator needs (:mod:`heal.integrations.verl.cpu`).

Any registry lookup has to import the module that holds the registry first, so heal's entries are
there whenever verl looks. Failures are logged at WARNING level (verl would hide them at DEBUG).
"""

from __future__ import annotations

import logging
import sys

from heal.integrations.verl._hooks import when_imported

__all__ = ["register", "install"]

logger = logging.getLogger(__name__)

_installed = False


def _on_core_algos(module) -> None:
    from heal.integrations.verl.losses import register_policy_losses

    register_policy_losses(module)


def _on_trainer_sync(module) -> None:
    mod = sys.modules.get("heal.integrations.verl.trainer")
    if mod is not None and not hasattr(mod, "register"):
        return  # heal's trainer module is being imported right now and registers itself at its end
    from heal.integrations.verl import trainer

    trainer.register()


def _on_losses(module) -> None:
    from heal.integrations.verl.losses import install_ppo_loss_wrapper

    install_ppo_loss_wrapper(module)


def _on_trainer_base(module) -> None:
    """With ``HEAL_FUSED_ENTROPY=1`` (the recipes forward it to every Ray process, the task runner
    included), every v1 trainer logs the uncovered-path notice once when it is built."""
    import functools

    from heal.integrations.verl.fused_entropy import env_requests_fused_entropy, warn_uncovered_paths

    cls = module.PPOTrainer
    original = cls.__init__
    if getattr(original, "__heal_notice__", False):
        return

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        try:
            if env_requests_fused_entropy():
                warn_uncovered_paths(config)
        except Exception:
            logger.warning("heal: could not check the fused-entropy coverage", exc_info=True)
        original(self, config, *args, **kwargs)

    __init__.__heal_notice__ = True
    cls.__init__ = __init__


def _on_fsdp_engine(module) -> None:
    from heal.integrations.verl.entropy_graph import install_no_grad_entropy

    install_no_grad_entropy(module)


def install() -> None:
    """Arrange the registrations listed in the module docstring (idempotent, cheap)."""
    global _installed
    if _installed:
        return
    _installed = True
    when_imported("verl.trainer.ppo.core_algos", _on_core_algos)
    when_imported("verl.trainer.ppo.v1.trainer_sync", _on_trainer_sync)
    when_imported("verl.workers.utils.losses", _on_losses)
    when_imported("verl.workers.engine.fsdp.transformer_impl", _on_fsdp_engine)
    when_imported("verl.trainer.ppo.v1.trainer_base", _on_trainer_base)
    try:
        from heal.integrations.verl.cpu import install as install_cpu

        install_cpu()  # VERL_PLATFORM=cpu only: verl's cpu platform and the patches a CPU run needs
    except Exception:
        logger.warning("heal: could not set verl up for the CPU (VERL_PLATFORM=cpu)", exc_info=True)
    try:
        from heal.integrations.verl.fused_entropy import env_requests_fused_entropy, use_fused_entropy

        if env_requests_fused_entropy():
            when_imported("verl.utils.torch_functional", lambda _m: use_fused_entropy())
    except Exception:
        logger.warning("heal: could not apply HEAL_FUSED_ENTROPY", exc_info=True)


def register() -> None:
    """Register everything now: imports verl's policy-loss registry and v1 trainer (slow: seconds).

    Not needed in a verl job (importing verl loads this plugin, see the module docstring); useful
    in scripts and tests that want the registries filled without importing those modules themselves.
    """
    install()
    import verl.trainer.ppo.core_algos  # noqa: F401  (hook registers the losses)
    import verl.trainer.ppo.v1  # noqa: F401  (hook registers heal_sync)
    import verl.workers.utils.losses  # noqa: F401  (hook wraps ppo_loss)


install()
