"""Drop-in: make verl's actor compute token entropy and log-probs with heal's fused op.

verl's FSDP engine (``verl.workers.engine.fsdp.transformer_impl``; the automodel, VeOmni and
torchtitan engines share the path) computes, from the temperature-scaled logits of a micro-batch,

* the entropy with ``verl.utils.torch_functional.entropy_from_logits`` (softmax + logsumexp: it
  materialises ``[N, V]`` probabilities; or ``entropy_from_logits_with_chunking``), captured in
  the engine's ``compute_entropy_from_logits`` when the engine is built, and
* the label log-probs with ``logprobs_from_logits`` (flash-attn's cross-entropy when installed,
  else a row loop), bound into the engine module at import.

:func:`use_fused_entropy` swaps both for thin functions on heal's fused ops --
:func:`heal_kernels.token_entropy` for the entropy, :func:`heal_kernels.entropy_and_logprobs` for
the log-probs (one streaming pass over each row, float32 statistics, analytic backward, no ``[N, V]``
intermediate): in ``verl.utils.torch_functional`` and in every engine module that imported the
names. It must run before the engine is built (the engine keeps its own reference to the entropy
function); in a verl job use the config switch ``heal.fused_entropy: true`` of the ``heal_sync``
trainer mode (each actor worker applies it when it starts) or the environment variable
``HEAL_FUSED_ENTROPY=1`` (heal's plugin applies it in every process that imports verl; forward it to
the Ray workers with ``+ray_kwargs.ray_init.runtime_env.env_vars.HEAL_FUSED_ENTROPY='1'``).

Limits: verl asks for the entropy and the log-probs in two separate calls, so they are two passes
over the logits (each fused and single-pass; verl's own path makes more). verl's
``use_fused_kernels`` path (entropy/log-probs from hidden states inside the model's forward) does not
go through these functions: :func:`use_fused_entropy` also routes it to heal's op
(:mod:`heal.integrations.verl.fused_linear`), Megatron's fused forwards included. The Megatron /
MindSpeed engines without ``use_fused_kernels`` (vocab-parallel logits) do not go through these
functions and are unchanged; :func:`uncovered_path_notice` names them, and ``heal_sync`` logs that
notice once at start-up when ``heal.fused_entropy`` is on.
The replacements are excluded from ``torch.compile`` (``engine.use_torch_compile``) so that
dynamo never traces into the kernel launcher.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Optional

import torch

__all__ = [
    "use_fused_entropy",
    "restore_verl_entropy",
    "fused_entropy_enabled",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "logprobs_from_logits",
    "ENV_VAR",
    "uncovered_path_notice",
    "warn_uncovered_paths",
]

logger = logging.getLogger(__name__)

ENV_VAR = "HEAL_FUSED_ENTROPY"

# Modules that bind verl's functions by name (``from verl.utils.torch_functional import ...``).
_ENGINE_MODULES = (
    "verl.utils.torch_functional",
    "verl.workers.engine.fsdp.transformer_impl",
    "verl.workers.engine.automodel.transformer_impl",
    "verl.workers.engine.veomni.transformer_impl",
    "verl.workers.engine.torchtitan.transformer_impl",
    "verl.trainer.ppo.prefix_grouper_utils",
)
_NAMES = ("entropy_from_logits", "entropy_from_logits_with_chunking", "logprobs_from_logits")

_lock = threading.Lock()
_originals: dict = {}  # name -> verl's function
_enabled = False


def _op():
    """``heal_kernels.entropy_and_logprobs`` (imported on first use)."""
    from heal_kernels import entropy_and_logprobs

    return entropy_and_logprobs


def _entropy_op():
    """``heal_kernels.token_entropy`` (imported on first use)."""
    from heal_kernels import token_entropy

    return token_entropy


#: calls of the drop-ins in this process, by function name (the CPU smoke run checks them)
calls: dict = {name: 0 for name in _NAMES}


def _count(name: str, logits: torch.Tensor) -> None:
    """Count a call; the first one of each function in a process prints a line (verl's logging hides
    INFO), so a job's log shows that heal's op ran in the worker, not only that it was switched on."""
    calls[name] += 1
    if calls[name] == 1:
        print(f"heal: fused op in use: verl {name} -> heal_kernels (pid {os.getpid()}, first call: "
              f"{tuple(logits.shape)} {str(logits.dtype).replace('torch.', '')} logits on {logits.device.type})",
              flush=True)


def _flat(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


@torch.compiler.disable
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Drop-in for verl's ``entropy_from_logits(logits[..., V]) -> [...]`` (float32)."""
    _count("entropy_from_logits", logits)
    return _entropy_op()(_flat(logits)).reshape(logits.shape[:-1])


@torch.compiler.disable
def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """Drop-in for verl's chunked variant; the fused op never materialises ``[N, V]``, so
    ``chunk_size`` is accepted and ignored."""
    _count("entropy_from_logits_with_chunking", logits)
    return _entropy_op()(_flat(logits)).reshape(logits.shape[:-1])


@torch.compiler.disable
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """Drop-in for verl's ``logprobs_from_logits(logits[..., V], labels[...]) -> [...]`` (float32).

    ``inplace_backward`` is accepted for signature compatibility (the fused backward never keeps
    a ``[N, V]`` buffer, so there is nothing to do in place)."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    _count("logprobs_from_logits", logits)
    _, logprobs = _op()(_flat(logits), labels.reshape(-1))
    return logprobs.reshape(labels.shape)


_REPLACEMENTS = {
    "entropy_from_logits": entropy_from_logits,
    "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
    "logprobs_from_logits": logprobs_from_logits,
}


def _patch_module(module) -> None:
    for name in _NAMES:
        current = getattr(module, name, None)
        if current is None or current is _REPLACEMENTS[name]:
            continue
        if current is _originals.get(name):
            setattr(module, name, _REPLACEMENTS[name])


def use_fused_entropy() -> None:
    """Route verl's entropy / log-prob functions to :func:`heal_kernels.entropy_and_logprobs`.

    Idempotent. Patches ``verl.utils.torch_functional`` and the engine modules already imported;
    engine modules imported later bind the replacements on their own (they import the names from
    ``verl.utils.torch_functional``), and heal's plugin patches them after import as well. Call it
    before verl builds its training engine. :func:`restore_verl_entropy` undoes it.
    """
    global _enabled
    import verl.utils.torch_functional as verl_F

    _op(), _entropy_op()  # fail here, not in the middle of a training step, if heal_kernels is unusable
    with _lock:
        for name in _NAMES:
            _originals.setdefault(name, getattr(verl_F, name))
        _enabled = True
        for mod_name in _ENGINE_MODULES:
            mod = sys.modules.get(mod_name)
            if mod is not None:
                _patch_module(mod)
    if not _hooked_engines[0]:
        from heal.integrations.verl._hooks import when_imported

        for mod_name in _ENGINE_MODULES[1:]:
            when_imported(mod_name, _on_engine_import)
        _hooked_engines[0] = True
    logger.info("heal: verl entropy/log-prob path routed to heal_kernels.entropy_and_logprobs")
    from heal.integrations.verl.fused_linear import use_fused_linear

    use_fused_linear()  # and verl's use_fused_kernels path (from hidden states): heal.integrations.verl.fused_linear


_hooked_engines = [False]


def _on_engine_import(module) -> None:
    with _lock:
        if _enabled:
            _patch_module(module)


def restore_verl_entropy() -> None:
    """Put verl's own functions back everywhere :func:`use_fused_entropy` replaced them."""
    global _enabled
    from heal.integrations.verl.fused_linear import restore_verl_fused_linear

    restore_verl_fused_linear()
    with _lock:
        _enabled = False
        for mod_name in _ENGINE_MODULES:
            mod = sys.modules.get(mod_name)
            if mod is None:
                continue
            for name in _NAMES:
                if getattr(mod, name, None) is _REPLACEMENTS[name] and name in _originals:
                    setattr(mod, name, _originals[name])


# Engines / paths that compute entropy and log-probs without the functions patched above (unless
# use_fused_kernels routes them to the fused linear drop-in, see uncovered_path_notice).
_UNCOVERED_STRATEGIES = {
    "megatron": "the Megatron engine (vocab-parallel logits, its own entropy/log-prob kernels)",
    "mindspeed": "the MindSpeed engine (built on Megatron's vocab-parallel path)",
}


def uncovered_path_notice(config) -> Optional[str]:
    """The start-up notice for a verl config whose actor would not use heal's fused op, else ``None``.

    Names the engine (``actor_rollout_ref.actor.strategy``) that runs verl's own code instead; with
    ``actor_rollout_ref.model.use_fused_kernels`` every engine is covered (by the fused linear drop-in)."""
    from heal.integrations.verl.settings import config_value

    reasons = []
    strategy = str(config_value(config, "actor_rollout_ref.actor.strategy", "fsdp"))
    # use_fused_kernels=true runs verl's fused forwards, which heal routes to its fused linear op
    # (heal.integrations.verl.fused_linear), the Megatron ones included
    fused_kernels = bool(config_value(config, "actor_rollout_ref.model.use_fused_kernels", False))
    if strategy in _UNCOVERED_STRATEGIES and not fused_kernels:
        reasons.append(f"actor_rollout_ref.actor.strategy={strategy}: {_UNCOVERED_STRATEGIES[strategy]}")
    if not reasons:
        return None
    return (
        "heal: fused entropy requested, but " + "; ".join(reasons)
        + " -- heal_kernels' op is not used there; verl's own code computes the entropy and log-probs"
    )


_noticed: set = set()


def warn_uncovered_paths(config) -> Optional[str]:
    """Log :func:`uncovered_path_notice` once per distinct notice (``logging.WARNING``); return it."""
    notice = uncovered_path_notice(config)
    if notice is not None and notice not in _noticed:
        _noticed.add(notice)
        logger.warning(notice)
    return notice


def fused_entropy_enabled() -> bool:
    """True while verl's functions are routed to heal's op."""
    return _enabled


def env_requests_fused_entropy(environ: Optional[dict] = None) -> bool:
    """True when ``HEAL_FUSED_ENTROPY`` is set to 1/true/yes/on (case-insensitive)."""
    value = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    value = value.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_VAR} must be 1/true/yes/on or 0/false/no/off, got {value!r}")
