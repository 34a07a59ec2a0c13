"""Drop-in: verl's ``use_fused_kernels`` path (entropy and log-probs from hidden states) on heal's op.

With ``actor_rollout_ref.model.use_fused_kernels=True`` verl patches the model's forward to return
hidden states and computes the log-probs and entropies of the head itself, through

* ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``fused_kernels_backend=torch``;
  chunks of 512 tokens, each with full-vocabulary float32 logits and several ``[512, V]``
  temporaries), imported by the model forwards of ``verl.models.transformers.*`` when they run, and
* ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (``fused_kernels_backend=triton``;
  the transformers forwards import it when they run, the Megatron forwards
  ``verl.models.mcore.model_forward_fused`` / ``model_forward_1f1b_overlap`` bind it at import and
  pass the tensor-parallel group).

:func:`use_fused_linear` replaces both by thin wrappers of
:func:`heal_kernels.linear_entropy_and_logprobs` (one ``[chunk_tokens x chunk_vocab]`` logits block
at a time, exact for any vocabulary size, vocabulary-parallel statistics combined over the group),
keeping verl's conventions:

* :class:`FusedLinearForPPO` -- ``FusedLinearForPPO(chunk_size=512, impl_backend="torch")(hidden_states,
  vocab_weights, input_ids, temperature=1.0) -> (log_probs, entropy)``: ``input_ids`` are the
  already-rolled labels, outputs have ``input_ids``' shape, log-probs float32 and the entropy in
  ``hidden_states``' dtype (as verl's torch backend returns it). ``chunk_size`` and ``impl_backend``
  are accepted and validated as verl does; heal's op picks its own blocks.
* :func:`linear_cross_entropy` -- ``linear_cross_entropy(hidden, weight, labels, temperature=1.0,
  reduction="none", dist_process_group=None) -> (logprobs, entropy)``: float32, flattened to
  ``[num_tokens]``; ``reduction="sum"`` / ``"mean"`` reduce the log-probs to a scalar as verl does;
  with ``dist_process_group`` the weight is this rank's vocabulary shard (rank ``r`` owns rows
  ``[r * V_local, (r + 1) * V_local)``), values are full-vocabulary on every rank and ``d_hidden`` is
  this rank's contribution (verl's kernel leaves it the same way; Megatron's sequence-parallel
  gather sums it over the group).

It is switched on together with heal's fused-entropy drop-in (:func:`heal.integrations.verl.
fused_entropy.use_fused_entropy`, i.e. ``heal.fused_entropy: true`` or ``HEAL_FUSED_ENTROPY=1``), or
by calling :func:`use_fused_linear` in the worker. Patching waits for verl's modules to be imported
(post-import hooks), so it is cheap and safe to call early; :func:`restore_verl_fused_linear` undoes
it.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Optional

import torch

__all__ = [
    "FusedLinearForPPO",
    "linear_cross_entropy",
    "use_fused_linear",
    "restore_verl_fused_linear",
    "fused_linear_enabled",
]

logger = logging.getLogger(__name__)

# module -> names to replace there
_TORCH_MODULE = "verl.utils.experimental.torch_functional"
_TRITON_MODULE = "verl.utils.kernel.linear_cross_entropy"
_MODULES = {
    _TORCH_MODULE: ("FusedLinearForPPO",),
    _TRITON_MODULE: ("linear_cross_entropy",),
    "verl.models.mcore.model_forward_fused": ("linear_cross_entropy",),
    "verl.models.mcore.model_forward_1f1b_overlap": ("linear_cross_entropy",),
}
_SOURCE = {"FusedLinearForPPO": _TORCH_MODULE, "linear_cross_entropy": _TRITON_MODULE}

_lock = threading.Lock()
_originals: dict = {}  # name -> verl's object
_enabled = False
_hooked = False


def _op():
    from heal_kernels import linear_entropy_and_logprobs

    return linear_entropy_and_logprobs


def _match(hidden: torch.Tensor, weight: torch.Tensor):
    """A sharded FSDP2 weight (DTensor) is gathered, as TRL's fused head does; under autocast both
    take autocast's dtype (the dtype ``hidden @ weight.T`` computes in there, as in verl's torch
    backend); otherwise hidden takes the weight's dtype when they differ."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if DTensor and isinstance(weight, DTensor):
        weight = weight.full_tensor()
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return hidden.to(dt), weight.to(dt)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return hidden, weight


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's ``FusedLinearForPPO`` on :func:`heal_kernels.linear_entropy_and_logprobs`."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ):
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2-D or 3-D, got shape {tuple(hidden_states.shape)}")
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                f"{tuple(hidden_states.shape[:-1])}"
            )
        out_dtype = hidden_states.dtype  # verl's torch backend returns the entropy in hidden's dtype
        hidden_states, vocab_weights = _match(hidden_states, vocab_weights)
        entropy, log_probs = _op()(hidden_states, vocab_weights, input_ids, float(temperature))
        return log_probs, entropy.to(out_dtype)


_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: Optional[float] = 1.0,
    reduction: Optional[str] = "none",
    dist_process_group=None,
):
    """Drop-in for verl's ``linear_cross_entropy`` (``LinearCrossEntropy.apply``): ``(logprobs,
    entropy)`` float32 over the flattened tokens; ``reduction`` "none" | "sum" | "mean" applies to the
    log-probs."""
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    hidden2, weight = _match(hidden.reshape(-1, hidden.shape[-1]), weight)
    labels1 = labels.reshape(-1)
    entropy, logprobs = _op()(hidden2, weight, labels1, float(temperature), process_group=dist_process_group)
    reduction = reduction.lower()
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


_REPLACEMENTS = {"FusedLinearForPPO": FusedLinearForPPO, "linear_cross_entropy": linear_cross_entropy}


def _patch(module) -> None:
    """Replace verl's objects in ``module`` (only where it still holds verl's own)."""
    with _lock:
        if not _enabled:
            return
        for name in _MODULES.get(module.__name__, ()):
            current = getattr(module, name, None)
            if current is None or current is _REPLACEMENTS[name]:
                continue
            if module.__name__ == _SOURCE[name]:
                _originals.setdefault(name, current)
            if current is _originals.get(name):
                setattr(module, name, _REPLACEMENTS[name])


def use_fused_linear() -> None:
    """Route verl's ``use_fused_kernels`` path (both backends, Megatron forwards included) to
    :func:`heal_kernels.linear_entropy_and_logprobs`. Idempotent; modules imported later are patched
    when they are imported."""
    global _enabled, _hooked
    _op()  # fail now, not in a training step, if heal_kernels is unusable
    from heal.integrations.verl._hooks import when_imported

    with _lock:
        _enabled = True
        first = not _hooked
        _hooked = True
    # the sources first, so that the originals are known before the modules that bound them
    for name in (_TORCH_MODULE, _TRITON_MODULE) + tuple(m for m in _MODULES if m not in _SOURCE.values()):
        mod = sys.modules.get(name)
        if mod is not None:
            _patch(mod)
        elif first:
            when_imported(name, _on_import)
    logger.info("heal: verl's use_fused_kernels path routed to heal_kernels.linear_entropy_and_logprobs")


def _on_import(module) -> None:
    if module.__name__ not in _SOURCE.values():
        # a module that bound verl's function at import: make sure the original is known
        src = sys.modules.get(_TRITON_MODULE)
        if src is not None:
            _patch(src)
    _patch(module)


def restore_verl_fused_linear() -> None:
    """Put verl's own ``FusedLinearForPPO`` / ``linear_cross_entropy`` back everywhere."""
    global _enabled
    with _lock:
        _enabled = False
        for mod_name, names in _MODULES.items():
            mod = sys.modules.get(mod_name)
            if mod is None:
                continue
            for name in names:
                if getattr(mod, name, None) is _REPLACEMENTS[name] and name in _originals:
                    setattr(mod, name, _originals[name])


def fused_linear_enabled() -> bool:
    """True while verl's ``use_fused_kernels`` path is routed to heal's op."""
    return _enabled
