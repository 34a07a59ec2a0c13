"""The Entropy Dynamics Alignment (EDA) reward (DESIGN.md section 4) and its trainer step.

* :func:`eda_reward` -- the binary EDA reward of a packed batch, from one call to
  :func:`heal_kernels.grouped_max_similarity` (the two per-row maxima, never the ``[B, B]`` matrix).
* :func:`combine_rewards` -- ``r = r_acc + weight * r_EDA``.
* :class:`EDAConfig` and :func:`eda_step` -- the trainer-agnostic reward step that the verl and TRL
  integrations call: padded entropies + response mask + data sources + prompt uids -> reward, metrics.
* :func:`add_to_last_token` -- place a per-trajectory bonus on each row's last valid token, the way
  outcome rewards sit in a token-level score tensor.

The rules, for trajectory ``i`` with similarity ``s`` (larger = more similar, see :mod:`heal.similarity`):

* ``s_target[i]`` = max of ``s(tau_i, tau_j)`` over the *other* target trajectories ``j``,
  ``s_general[i]`` = max over the *other* general trajectories (for a target: ``S_intra`` and
  ``S_inter``). ``-inf`` where there is no eligible neighbour. With ``prompt_ids``, trajectories of
  the same prompt are not neighbours either.
* target ``i``: reward 1 iff ``S_inter > S_intra`` (strict; a tie gives 0). So a target with no
  other target but a general neighbour gets 1; with no general neighbour (e.g. no general
  trajectory in the batch) it gets 0.
* general ``i``, ``general_reward="mirror"`` (the reference implementation): reward 1 iff
  ``s_target >= s_general`` (a tie gives 1) and it has at least one target neighbour (no target in
  the batch: 0). ``general_reward="none"``: generals get 0.
* a trajectory with at most ``min_length`` tokens (so every empty one) gets 0, but still serves
  as a neighbour of the others. An empty trajectory has no similarity to anything: it is nobody's
  neighbour and its own ``s_target`` / ``s_general`` are ``-inf``.

This module imports torch lazily so that ``import heal`` stays cheap for the command line.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from heal.similarity import DEFAULT_KL_DIRECTION, DEFAULT_METRIC, check_kl_direction, get_metric

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "EDAResult",
    "eda_reward",
    "combine_rewards",
    "add_to_last_token",
    "EDAConfig",
    "eda_step",
    "GENERAL_REWARD_MODES",
    "ENTROPY_SOURCES",
]

GENERAL_REWARD_MODES = ("mirror", "none")
ENTROPY_SOURCES = ("actor", "rollout_topk")

TARGET, GENERAL = 0, 1  # group ids passed to grouped_max_similarity
# eda_step packs CUDA entropies into a [B * T] buffer without a host sync up to this many entries
# (far below 2^31: the int32 offsets and the Triton kernel's packed size stay in range); beyond, it
# packs to the exact length (one sync for the size)
_NO_SYNC_PACK_LIMIT = 1 << 30


class EDAResult(NamedTuple):
    """Per-trajectory EDA outputs, all of length ``B`` on the input's device.

    ``reward``: float32, 0 or 1. ``s_target`` / ``s_general``: float32, max similarity to the other
    target / general trajectories (``-inf`` where none is eligible). ``is_general``: bool.
    """

    reward: "torch.Tensor"
    s_target: "torch.Tensor"
    s_general: "torch.Tensor"
    is_general: "torch.Tensor"


def _grouped_max_similarity(*args, **kwargs):
    """``heal_kernels.grouped_max_similarity`` (the fused C++ / Triton / torch op), imported lazily."""
    from heal_kernels import grouped_max_similarity

    return grouped_max_similarity(*args, **kwargs)


def _to_device(t: "torch.Tensor", device) -> "torch.Tensor":
    """``t`` on ``device``. Host data goes to a CUDA device from pinned memory without waiting: a
    copy from pageable memory would synchronise with the device."""
    import torch

    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _per_row(x, name: str, bsz: int, device, kind: str):
    """``(tensor on device, pending)``: ``x`` checked and converted (``kind`` ``"bool"`` or ``"int"``).

    Reading a CUDA tensor's contents is a host sync, so the 0/1 check of a non-bool CUDA tensor is
    left ``pending``: ``(flag, raise_if)``, ``flag`` an int64 ``[1]`` on the device and ``raise_if``
    called with its host value (None when nothing is pending)."""
    import torch

    from heal_kernels.ops.entropy import reading_syncs

    if x is None:
        raise ValueError(f"{name} is required")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() != 1 or t.numel() != bsz:
        raise ValueError(f"{name} must have shape [B]=[{bsz}], got {tuple(t.shape)}")
    pending = None
    if kind == "bool":
        if t.dtype != torch.bool:
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"{name} must be bool (or 0/1 integers), got {t.dtype}")
            orig = t

            def raise_if(bad):
                if bad:
                    raise ValueError(f"{name} must be bool or 0/1, got values {sorted(set(orig.tolist()))[:5]}")

            bad = ((t != 0) & (t != 1)).any()
            if reading_syncs(t.device):
                pending = (bad.reshape(1).to(torch.int64), raise_if)
            else:
                raise_if(bool(bad))
            t = t != 0
    else:  # integer ids
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got {t.dtype}")
        t = t.to(torch.int64)
    return _to_device(t, device), pending


def _read_pending(pending, device) -> None:
    """Read every pending content check back in one device-to-host copy and raise the first error,
    in the order of ``pending`` (a list of ``(flags [k] int64, raise_if)``)."""
    import torch

    if not pending:
        return
    host = torch.cat([flags.to(device) for flags, _ in pending]).tolist()
    at = 0
    for flags, raise_if in pending:
        k = flags.numel()
        raise_if(host[at] if k == 1 else host[at : at + k])
        at += k


def _check_options(metric, kl_direction, general_reward, min_length) -> None:
    get_metric(metric)
    check_kl_direction(kl_direction)
    if general_reward not in GENERAL_REWARD_MODES:
        raise ValueError(f"general_reward must be one of {GENERAL_REWARD_MODES}, got {general_reward!r}")
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
        raise ValueError(f"min_length must be an integer >= 0, got {min_length!r}")


def eda_reward(
    values,
    cu_seqlens,
    is_general,
    *,
    prompt_ids=None,
    min_length: int = 50,
    general_reward: str = "mirror",
    metric: str = DEFAULT_METRIC,
    kl_direction: str = DEFAULT_KL_DIRECTION,
    num_threads: Optional[int] = None,
    grouped_max: Optional[Callable[..., "torch.Tensor"]] = None,
) -> EDAResult:
    """Binary EDA reward of a packed batch (the rules are in this module's docstring).

    Args:
        values: ``float32[total]`` per-token entropies, packed (see :mod:`heal.dynamics`).
        cu_seqlens: ``int32[B + 1]`` offsets of the trajectories in ``values``.
        is_general: ``bool[B]`` (or 0/1), True for general-domain trajectories.
        prompt_ids: optional ``int[B]``; trajectories sharing a prompt id are not compared
            (the exclude-same-prompt option). ``None`` compares every pair.
        min_length: trajectories with ``<= min_length`` tokens get reward 0 (they stay neighbours).
        general_reward: ``"mirror"`` (reward generals by the mirrored rule) or ``"none"`` (0).
        metric: ``"kl"`` (default), ``"hti"`` or ``"pl"`` (:mod:`heal.similarity`).
        kl_direction: ``"scored_first"`` (default) or ``"short_first"``; only ``kl`` uses it.
        num_threads: threads of the C++ kernel on CPU tensors (default: the CPUs this process may
            run on, :func:`heal_kernels.available_cpus`; torch's global setting is not used).
        grouped_max: the function that computes the two per-row maxima, with the signature of
            :func:`heal_kernels.grouped_max_similarity` (default: that op). The verl integration
            passes one that shards the rows over its actor workers
            (``heal.eda_placement: workers``); it must return what the op returns.

    Returns:
        :class:`EDAResult` on ``values``' device.

    On CUDA tensors it synchronises with the host once (with the default ``grouped_max``): the
    contents checks (offsets, finite entropies, 0/1 ``is_general``) are read back in one copy,
    before the kernels run; host ``is_general`` / ``prompt_ids`` go to the device from pinned memory.
    """
    from heal.dynamics import _check_packed_form, _packed_flags, _raise_packed_contents

    _check_options(metric, kl_direction, general_reward, min_length)
    bsz = _check_packed_form(values, cu_seqlens)
    device = values.device
    pending = [(_packed_flags(values, cu_seqlens), lambda flags: _raise_packed_contents(values, cu_seqlens, flags))]
    try:
        is_general, check_general = _per_row(is_general, "is_general", bsz, device, "bool")
        if check_general is not None:
            pending.append(check_general)
        if prompt_ids is not None:
            prompt_ids, _ = _per_row(prompt_ids, "prompt_ids", bsz, device, "int")
    except (TypeError, ValueError):
        _read_pending(pending, device)  # an error in the contents checked before this one comes first
        raise
    _read_pending(pending, device)  # the one read: every contents check at once
    return _eda_core(values, cu_seqlens, is_general, prompt_ids, bsz, min_length, general_reward, metric,
                     kl_direction, num_threads, grouped_max)


def _eda_core(values, cu_seqlens, is_general, prompt_ids, bsz, min_length, general_reward, metric, kl_direction,
              num_threads, grouped_max) -> EDAResult:
    """:func:`eda_reward` on checked inputs (``is_general`` bool and ``prompt_ids`` int64 on the values'
    device): reads nothing back to the host (with the default ``grouped_max``)."""
    import torch

    from heal.dynamics import lengths

    device = values.device
    sims = (grouped_max or _grouped_max_similarity)(
        values,
        cu_seqlens,
        is_general.to(torch.int32),
        2,
        exclude_self=True,
        prompt_ids=prompt_ids,
        metric=metric,
        kl_direction=kl_direction,
        check=False,  # the caller checked the contents; groups are 0/1 by construction
        num_threads=num_threads,
    )
    if tuple(sims.shape) != (bsz, 2):
        raise RuntimeError(f"grouped_max returned shape {tuple(sims.shape)}, expected [B, 2]=[{bsz}, 2]")
    s_target = sims[:, TARGET].to(torch.float32)
    s_general = sims[:, GENERAL].to(torch.float32)

    target_wins = s_general > s_target  # strict; -inf > -inf is False
    if general_reward == "mirror":
        general_wins = (s_target >= s_general) & (s_target > -math.inf)
    else:
        general_wins = torch.zeros_like(target_wins)
    reward = torch.where(is_general, general_wins, target_wins)
    reward &= lengths(cu_seqlens).to(device) > min_length
    return EDAResult(reward.to(torch.float32), s_target, s_general, is_general)


def combine_rewards(acc, eda, weight: float = 1.0) -> "torch.Tensor":
    """``acc + weight * eda``: the accuracy reward plus the weighted EDA reward (DESIGN.md section 4).

    ``acc``: per-trajectory rewards ``[B]`` (tensor, array or list). ``eda``: an :class:`EDAResult`
    or a ``[B]`` tensor of EDA rewards. The result is floating (float32 unless ``acc`` is a wider
    float) on ``acc``'s device.
    """
    import torch

    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    if isinstance(eda, EDAResult):
        eda = eda.reward
    acc_t = acc if isinstance(acc, torch.Tensor) else torch.as_tensor(acc)
    eda_t = eda if isinstance(eda, torch.Tensor) else torch.as_tensor(eda)
    if acc_t.shape != eda_t.shape:
        raise ValueError(f"acc has shape {tuple(acc_t.shape)} but eda has shape {tuple(eda_t.shape)}")
    if not acc_t.is_floating_point():
        acc_t = acc_t.to(torch.float32)
    return acc_t + weight * eda_t.to(device=acc_t.device, dtype=acc_t.dtype)


def add_to_last_token(token_scores, bonus, response_mask) -> "torch.Tensor":
    """A copy of ``token_scores[B, T]`` with ``bonus[i]`` added at row i's last masked position.

    This is where outcome rewards live in verl's ``token_level_scores``. Rows with an empty mask
    are left unchanged (their EDA reward is 0 anyway).
    """
    import torch

    if token_scores.dim() != 2:
        raise ValueError(f"token_scores must be 2-D [B, T], got shape {tuple(token_scores.shape)}")
    if response_mask.shape != token_scores.shape:
        raise ValueError(
            f"response_mask must have the shape of token_scores {tuple(token_scores.shape)}, "
            f"got {tuple(response_mask.shape)}"
        )
    bsz, width = token_scores.shape
    if isinstance(bonus, EDAResult):
        bonus = bonus.reward
    bonus = torch.as_tensor(bonus, device=token_scores.device)
    if bonus.shape != (bsz,):
        raise ValueError(f"bonus must have shape [B]=[{bsz}], got {tuple(bonus.shape)}")
    mask = response_mask.to(device=token_scores.device) != 0
    pos = torch.arange(1, width + 1, device=token_scores.device, dtype=torch.int32)
    last = (mask * pos).amax(dim=1).to(torch.int64) - 1  # -1 for an empty row
    out = token_scores.clone()
    if width == 0:
        return out
    # no data-dependent shapes (no host sync on CUDA): every row writes its last position (column 0
    # for an empty row), the old value where the row is empty
    col = last.clamp(min=0).unsqueeze(1)
    old = out.gather(1, col)
    new = torch.where((last >= 0).unsqueeze(1), old + bonus.to(out.dtype).unsqueeze(1), old)
    return out.scatter_(1, col, new)


# ---------------------------------------------------------------------------------------------
# the trainer's reward step
# ---------------------------------------------------------------------------------------------


@dataclass
class EDAConfig:
    """Settings of the EDA reward (the ``heal:`` block of a trainer config).

    Attributes:
        general_sources: the ``data_source`` names of general-domain data, e.g.
            ``("commonsense_qa",)``. Required and non-empty; every other source is target-domain.
        weight: ``w`` in ``r = r_acc + w * r_EDA``.
        min_length: trajectories with at most this many response tokens get no EDA reward.
        metric: ``kl``, ``hti`` or ``pl`` (:mod:`heal.similarity`).
        kl_direction: ``scored_first`` (reference code) or ``short_first`` (paper appendix).
        general_reward: ``mirror`` (reward generals too, as the reference code) or ``none``.
        exclude_same_prompt: do not compare trajectories of the same prompt (same ``uid``).
        entropy_source: ``actor`` (exact entropies from the old-log-prob pass) or ``rollout_topk``
            (the reference implementation's truncated top-20 sum, for reproduction). The
            integrations read it to pick the entropy tensor they pass to :func:`eda_step`.

    Construction validates (``ValueError`` naming the key); :meth:`from_dict` also rejects unknown keys.
    """

    general_sources: Tuple[str, ...]
    weight: float = 1.0
    min_length: int = 50
    metric: str = DEFAULT_METRIC
    kl_direction: str = DEFAULT_KL_DIRECTION
    general_reward: str = "mirror"
    exclude_same_prompt: bool = False
    entropy_source: str = "actor"

    def __post_init__(self):
        gs = self.general_sources
        if isinstance(gs, str):
            gs = (gs,)
        elif gs is not None and not isinstance(gs, (bytes, Mapping)) and hasattr(gs, "__iter__"):
            gs = tuple(gs)
        self.general_sources = gs
        self.validate()

    def validate(self) -> "EDAConfig":
        """Raise ``ValueError`` naming the first bad key; return ``self`` when all are valid."""
        gs = self.general_sources
        if not isinstance(gs, (tuple, list)) or not gs:
            raise ValueError(
                f"general_sources must be a non-empty list of data_source names (e.g. ['commonsense_qa']), got {gs!r}"
            )
        for s in gs:
            if not isinstance(s, str) or not s:
                raise ValueError(f"general_sources must hold non-empty strings, got {s!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight must be a finite number, got {w!r}")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or self.min_length < 0:
            raise ValueError(f"min_length must be an integer >= 0, got {self.min_length!r}")
        get_metric(self.metric)  # "metric must be one of ..."
        check_kl_direction(self.kl_direction)  # "kl_direction must be one of ..."
        if self.general_reward not in GENERAL_REWARD_MODES:
            raise ValueError(f"general_reward must be one of {GENERAL_REWARD_MODES}, got {self.general_reward!r}")
        if not isinstance(self.exclude_same_prompt, bool):
            raise ValueError(f"exclude_same_prompt must be true or false, got {self.exclude_same_prompt!r}")
        if self.entropy_source not in ENTROPY_SOURCES:
            raise ValueError(f"entropy_source must be one of {ENTROPY_SOURCES}, got {self.entropy_source!r}")
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EDAConfig":
        """Build from a mapping (e.g. an OmegaConf block turned into a dict); unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise TypeError(f"EDA config must be a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown EDA config key(s) {unknown}; known keys: {known}")
        if "general_sources" not in d:
            raise ValueError("general_sources is required (the data_source names of general-domain data)")
        return cls(**dict(d))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["general_sources"] = list(self.general_sources)
        return d


def _prompt_index(uids: Sequence) -> "torch.Tensor":
    import torch

    index: Dict[Any, int] = {}
    return torch.tensor([index.setdefault(u, len(index)) for u in uids], dtype=torch.int64)


def _stats(prefix: str, x: "torch.Tensor", metrics: Dict[str, float]) -> None:
    import torch

    finite = x[torch.isfinite(x)]
    if finite.numel():
        metrics[f"{prefix}_mean"] = float(finite.double().mean())
        metrics[f"{prefix}_min"] = float(finite.min())
        metrics[f"{prefix}_max"] = float(finite.max())
    else:
        metrics[f"{prefix}_mean"] = metrics[f"{prefix}_min"] = metrics[f"{prefix}_max"] = math.nan


def eda_step(
    entropy,
    response_mask,
    data_sources: Sequence[str],
    uids: Optional[Sequence],
    config: EDAConfig,
    *,
    num_threads: Optional[int] = None,
    grouped_max: Optional[Callable[..., "torch.Tensor"]] = None,
) -> Tuple[EDAResult, Dict[str, float]]:
    """The trainer's EDA reward step: padded entropies in, rewards and metrics out.

    Args:
        entropy: ``[B, T]`` per-token entropies of the responses (padding may hold anything).
        response_mask: ``[B, T]`` bool / 0-1 mask of the valid response tokens (any pattern).
        data_sources: ``B`` data_source names; those in ``config.general_sources`` are general.
        uids: ``B`` prompt ids (any hashable, e.g. verl's ``uid`` strings); used only when
            ``config.exclude_same_prompt`` (then required), to skip same-prompt pairs.
        config: an :class:`EDAConfig`.
        num_threads, grouped_max: as in :func:`eda_reward`.

    Returns:
        ``(EDAResult, metrics)``. ``metrics`` (floats; ``nan`` where a group is empty):
        ``eda/rate_target`` and ``eda/rate_general`` (fraction of trajectories of the domain with
        reward 1), ``eda/entropy_mean_target`` / ``eda/entropy_mean_general`` (token-level mean
        entropy of the domain), ``eda/s_intra_{mean,min,max}`` and ``eda/s_inter_{mean,min,max}``
        (over target trajectories where the value is finite), ``eda/num_target``,
        ``eda/num_general``, ``eda/num_short`` (trajectories with ``<= min_length`` tokens),
        ``eda/threads`` (threads of the C++ kernel when the entropies are on the CPU and no
        ``grouped_max`` is given, else 0) and ``eda/time_s`` (wall time of this call). The reward
        itself is not weighted: use :func:`combine_rewards` / :func:`add_to_last_token` with
        ``config.weight``.

    On CUDA tensors (``metric="kl"``, the default ``grouped_max``) it synchronises with the host
    exactly once: one device-to-host copy, at the end, of the per-trajectory results the metrics
    are computed from and of the input checks (mask values, finite entropies), which raise only
    then. The entropies are packed into a buffer of ``B * T`` entries (the packed length is known
    only on the device) and the uids' prompt indices go to the device from pinned memory. Other
    metrics and a custom ``grouped_max`` pack to the exact length first (a few more syncs).
    """
    import torch

    from heal.dynamics import _pack_padded_no_sync, lengths, pack_padded, validate_packed
    from heal_kernels.ops.entropy import reading_syncs

    t0 = time.perf_counter()
    if not isinstance(config, EDAConfig):
        raise TypeError(f"config must be an EDAConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(entropy, torch.Tensor) or entropy.dim() != 2:
        raise ValueError(f"entropy must be a 2-D [B, T] tensor, got {getattr(entropy, 'shape', type(entropy))}")
    bsz = entropy.shape[0]
    data_sources = list(data_sources)
    if len(data_sources) != bsz:
        raise ValueError(f"data_sources has {len(data_sources)} entries but entropy has B={bsz} rows")
    prompt_ids = None
    if config.exclude_same_prompt:
        if uids is None:
            raise ValueError("uids are required when exclude_same_prompt is true")
        uids = list(uids)
        if len(uids) != bsz:
            raise ValueError(f"uids has {len(uids)} entries but entropy has B={bsz} rows")
        prompt_ids = _to_device(_prompt_index(uids), entropy.device)

    from heal_kernels._backend import cpu_threads

    threads = cpu_threads(num_threads)
    general = set(config.general_sources)
    general_rows = [str(s) in general for s in data_sources]
    is_general = torch.tensor(general_rows, dtype=torch.bool)
    if bsz and not any(general_rows):
        warnings.warn(
            f"EDA: no trajectory in this batch comes from general_sources={list(config.general_sources)} "
            f"(data sources seen: {sorted(set(map(str, data_sources)))[:10]}); every EDA reward is 0",
            stacklevel=2,
        )
    late_checks = None
    if (grouped_max is None and config.metric == "kl" and reading_syncs(entropy.device)
            and entropy.numel() < _NO_SYNC_PACK_LIMIT):
        # nothing read back before the kernels: the packed batch is valid by construction, and its
        # two content checks travel with the results (the Triton path reads only inside the offsets)
        values, cu_seqlens, mask_bad = _pack_padded_no_sync(entropy.detach(), response_mask)
        nonfinite = ~torch.isfinite(values.sum())  # the zeros after the packed values add nothing
        late_checks = torch.stack([mask_bad, nonfinite])
        result = _eda_core(values, cu_seqlens, _to_device(is_general, values.device), prompt_ids, bsz,
                           config.min_length, config.general_reward, config.metric, config.kl_direction,
                           threads, None)
    else:
        values, cu_seqlens = pack_padded(entropy.detach(), response_mask)
        result = eda_reward(
            values,
            cu_seqlens,
            _to_device(is_general, values.device),
            prompt_ids=prompt_ids,
            min_length=config.min_length,
            general_reward=config.general_reward,
            metric=config.metric,
            kl_direction=config.kl_direction,
            # a custom grouped_max (e.g. on other processes) resolves its own default thread count
            num_threads=threads if grouped_max is None else num_threads,
            grouped_max=grouped_max,
        )

    # metrics, on the CPU (B numbers each), from one copy of the per-trajectory results
    csum = torch.zeros(values.numel() + 1, dtype=torch.float64, device=values.device)
    torch.cumsum(values.to(torch.float64), dim=0, out=csum[1:])
    cu = cu_seqlens.to(torch.int64)
    row_sums = csum[cu[1:]] - csum[cu[:-1]]
    f64 = torch.float64
    table = torch.stack([result.reward.to(f64), result.s_target.to(f64), result.s_general.to(f64),
                         result.is_general.to(f64), row_sums, lengths(cu_seqlens).to(f64)])
    parts = [table.reshape(-1)] + ([late_checks.to(f64)] if late_checks is not None else [])
    host = torch.cat(parts).cpu()  # the one device-to-host copy
    if late_checks is not None:
        mask_bad, nonfinite = host[6 * bsz :].tolist()
        if mask_bad:
            pack_padded(entropy, response_mask)  # raises pack_padded's error for the mask
        if nonfinite:
            validate_packed(*pack_padded(entropy.detach(), response_mask))  # raises for a NaN / inf entropy
    table = host[: 6 * bsz].reshape(6, bsz)
    reward = table[0].to(torch.float32)
    gen = table[3] != 0
    tgt = ~gen
    lens = table[5].to(torch.int64)
    row_sums = table[4]

    def rate(sel):
        return float(reward[sel].double().mean()) if bool(sel.any()) else math.nan

    def entropy_mean(sel):
        n = int(lens[sel].sum())
        return float(row_sums[sel].sum()) / n if n else math.nan

    metrics: Dict[str, float] = {
        "eda/rate_target": rate(tgt),
        "eda/rate_general": rate(gen),
        "eda/entropy_mean_target": entropy_mean(tgt),
        "eda/entropy_mean_general": entropy_mean(gen),
    }
    _stats("eda/s_intra", table[1].to(torch.float32)[tgt], metrics)
    _stats("eda/s_inter", table[2].to(torch.float32)[tgt], metrics)
    metrics["eda/num_target"] = float(tgt.sum())
    metrics["eda/num_general"] = float(gen.sum())
    metrics["eda/num_short"] = float((lens <= config.min_length).sum())
    metrics["eda/threads"] = float(threads if values.device.type == "cpu" and grouped_max is None else 0)
    metrics["eda/time_s"] = time.perf_counter() - t0
    return result, metrics
