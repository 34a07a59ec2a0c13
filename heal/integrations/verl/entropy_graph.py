"""No entropy graph when the update pass needs the entropy's value only (``actor.entropy_coeff == 0``).

With ``actor.calculate_entropy=true`` (needed by heal's ``high_entropy_tokens`` / ``entropy_advantage``
losses) verl computes the per-token entropy in the update pass *with* autograd and adds
``entropy_coeff * entropy_loss`` to the loss even when the coefficient is 0. For verl's
``entropy_from_logits`` that keeps a float32 ``[N, V]`` softmax per micro-batch alive until the
backward pass -- for a term multiplied by 0. Two pieces remove it:

* :func:`heal.integrations.verl.losses.wrap_ppo_loss` (every engine): with ``entropy_coeff == 0`` the
  entropy reaches heal's losses detached, and verl's ``ppo_loss`` is called without it, so its
  ``0 * entropy_loss`` term is skipped and the loss holds no reference to the entropy's graph (the
  graph is freed when the engine's ``forward_step`` returns, before the backward pass);
  ``actor/entropy_loss`` is still logged, from the detached values.
* :func:`install_no_grad_entropy` (FSDP engine and the engines built on it: VeOmni, FSDP-turbo):
  verl's ``FSDPEngineWithLMHead.prepare_model_outputs`` runs the engine's entropy function
  (``compute_entropy_from_logits``) under ``torch.no_grad()`` when the loss function it is given is
  verl's ``ppo_loss`` with ``entropy_coeff == 0``, so the graph is never built: the entropy's
  intermediates are freed as soon as it is computed instead of living on through the log-prob
  computation and the loss. (The engine hands ``prepare_model_outputs`` the loss function as
  ``logits_processor_func``; the ``partial(ppo_loss, config=actor_config)`` built by verl's
  ``TrainingWorker`` carries the actor config.)

heal's plugin installs both when verl's modules are imported. With ``entropy_coeff != 0`` nothing
changes: the entropy bonus needs its gradient.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any, Optional

import torch

__all__ = ["install_no_grad_entropy", "loss_config_of", "value_only_entropy_active"]

logger = logging.getLogger(__name__)

_VALUE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("heal_entropy_value_only", default=False)


def value_only_entropy_active() -> bool:
    """True inside a ``prepare_model_outputs`` call whose entropy is computed without a graph."""
    return _VALUE_ONLY.get()


def loss_config_of(loss_function) -> Optional[Any]:
    """The actor config bound into verl's ``partial(ppo_loss, config=...)``, else ``None``.

    Only verl's ``ppo_loss`` (heal's wrapper of it included) is recognised: other loss functions
    (distillation, value losses) may use the entropy differently."""
    keywords = getattr(loss_function, "keywords", None)
    func = getattr(loss_function, "func", None)
    if not keywords or func is None or "config" not in keywords:
        return None
    raw = getattr(func, "__wrapped_ppo_loss__", func)
    if getattr(raw, "__name__", "") != "ppo_loss" or not str(getattr(raw, "__module__", "")).startswith("verl."):
        return None
    return keywords["config"]


def _no_grad_when_value_only(fn):
    if getattr(fn, "__heal_value_only__", False):
        return fn

    @functools.wraps(fn)
    def entropy_fn(*args, **kwargs):
        if _VALUE_ONLY.get():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    entropy_fn.__heal_value_only__ = True
    return entropy_fn


def _wrap_prepare_model_outputs(original):
    if getattr(original, "__heal_value_only__", False):
        return original

    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func, *args, **kwargs):
        from heal.integrations.verl.losses import entropy_is_value_only

        config = loss_config_of(logits_processor_func)
        if config is None or not torch.is_grad_enabled() or not entropy_is_value_only(config):
            return original(self, output, output_args, micro_batch, logits_processor_func, *args, **kwargs)
        fn = getattr(self, "compute_entropy_from_logits", None)
        if fn is not None and not getattr(fn, "__heal_value_only__", False):
            self.compute_entropy_from_logits = _no_grad_when_value_only(fn)
        token = _VALUE_ONLY.set(True)
        try:
            return original(self, output, output_args, micro_batch, logits_processor_func, *args, **kwargs)
        finally:
            _VALUE_ONLY.reset(token)

    prepare_model_outputs.__heal_value_only__ = True
    prepare_model_outputs.__heal_original__ = original
    return prepare_model_outputs


def install_no_grad_entropy(fsdp_module=None) -> None:
    """Wrap ``FSDPEngineWithLMHead.prepare_model_outputs`` (idempotent; see the module docstring)."""
    if fsdp_module is None:
        import verl.workers.engine.fsdp.transformer_impl as fsdp_module
    cls = getattr(fsdp_module, "FSDPEngineWithLMHead", None)
    if cls is None or "prepare_model_outputs" not in cls.__dict__:
        logger.warning("heal: verl's FSDPEngineWithLMHead.prepare_model_outputs not found; entropy graph not skipped")
        return
    cls.prepare_model_outputs = _wrap_prepare_model_outputs(cls.__dict__["prepare_model_outputs"])


def uninstall_no_grad_entropy(fsdp_module=None) -> None:
    """Undo :func:`install_no_grad_entropy` (tests)."""
    if fsdp_module is None:
        import verl.workers.engine.fsdp.transformer_impl as fsdp_module
    cls = fsdp_module.FSDPEngineWithLMHead
    current = cls.__dict__.get("prepare_model_outputs")
    original = getattr(current, "__heal_original__", None)
    if original is not None:
        cls.prepare_model_outputs = original
