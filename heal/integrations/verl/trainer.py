"""``heal_sync``: verl's synchronous v1 PPO trainer with HEAL's EDA reward.

Select it with ``trainer.v1.trainer_mode=heal_sync`` (verl's default ``trainer.use_v1=true``). It is
:class:`verl.trainer.ppo.v1.trainer_sync.PPOTrainerSync` with one step added and nothing else changed:

1. verl's old-log-prob pass already asks the actor for token entropies (``calculate_entropy=True``
   in ``PPOTrainer._compute_old_log_prob``, at the rollout temperature) and stores them in the
   TransferQueue as ``entropy`` next to ``old_log_probs``. (In ``rollout_correction.bypass_mode``
   that pass is skipped; start-up then fails with a message naming the key.)
2. At the start of ``_compute_advantage`` -- after the old-log-prob, reference and value passes,
   before ``token_level_scores = rm_scores`` and the advantage estimator -- the trainer reads
   ``entropy``, ``response_mask``, ``rm_scores``, ``data_source`` and ``uid`` of the batch,
   calls :func:`heal.reward.eda_step`, writes the plain accuracy scores to ``acc_scores``, adds
   ``heal.weight * r_EDA`` to ``rm_scores`` at each trajectory's last valid response token, and
   stores ``eda_reward`` (one float per trajectory). verl's padding rows (``is_padding`` tag) are
   left out of the EDA comparison and keep their scores.
3. Metrics: everything :func:`heal.reward.eda_step` reports (``eda/rate_target``,
   ``eda/rate_general``, ``eda/entropy_mean_*``, ``eda/s_intra_*``, ``eda/s_inter_*``, counts,
   ``eda/threads``, ``eda/time_s``; with ``heal.eda_placement: workers`` also ``eda/workers`` and
   ``eda/worker_time_s_max``) plus ``heal/acc_score_{target,general}_mean``, ``heal/eda_bonus_mean`` and
   ``heal/time_s`` (the whole step including TransferQueue traffic); verl logs ``timing_s/heal_eda``.
   ``critic/score/*`` (computed by verl from ``rm_scores``) is then the shaped score.
   ``scoring/errors/<reason>``: how many of the step's responses the reward function could not judge,
   by reason (:func:`scoring_error_metrics`; with ``heal.scoring.compute_score_with_info``, the
   presets' reward function; also with ``heal.enable: false``).
4. With ``heal.rollout_dump=PATH`` the driver appends every step's trajectories to the JSONL rollout
   dump at ``PATH`` (:func:`heal.analysis.logs.append_rollout_dump`): ``step`` (verl's global step),
   ``data_source``, ``uid``, ``entropy`` (the valid response tokens), ``acc`` (accuracy score),
   ``eda_reward``, ``s_target``, ``s_general`` -- the input of ``heal plot heatmap|dynamics``.

5. Multi-turn conversations: verl stores every output of a conversation (keys ``{uid}_{session}_{index}``)
   and its GRPO scores only the final one; heal likewise compares and rewards final outputs only
   (:func:`final_output_rows`); earlier outputs keep their scores and get ``eda_reward = 0``.
6. ``heal.entropy_temperature: 1.0`` with a rollout temperature other than 1: after the old-log-prob
   pass the actor runs one more forward pass at T=1 (no loss, no update) whose entropies go to
   ``heal_eda_entropy``; the EDA uses them, the update keeps the rollout-temperature ``entropy``.
   ``heal/entropy_temperature`` is logged and the rollout dump records it.
7. ``heal.high_entropy_scope: batch`` with policy loss ``high_entropy_tokens`` (also with
   ``heal.enable: false``): the top-``rho`` entropy tokens of the whole batch (old-log-prob entropies)
   are shipped per token through the TransferQueue (``heal_high_entropy_mask`` and the batch's count
   ``heal_high_entropy_total``), which the loss uses; start-up refuses an off-policy update.

8. Where the EDA runs. ``heal.eda_placement: driver`` (default): in this trainer process, on the CPU
   tensors read from the TransferQueue, with ``heal.eda_threads`` threads (default: the CPUs this
   process may run on; Ray starts the trainer with ``OMP_NUM_THREADS=1``, which heal does not follow).
   ``heal.eda_placement: workers``: the actor workers compute it on their own devices, each for its
   share of the work (:mod:`heal.integrations.verl.eda_workers`); the driver receives ``[B, 2]`` partial
   maxima from each and combines them with a max.

The trainer reports its ``trainer_mode`` as ``"sync"`` to verl's base class, so every code path verl
reserves for the sync trainer (replay buffer, checkpointing, prompt submission) stays the same.

The ``heal:`` block is validated when the trainer is built (:class:`HealSettings`), before any
worker starts. ``heal.fused_entropy: true`` makes every actor worker use heal's fused
entropy/log-prob op (:mod:`heal.integrations.verl.fused_entropy`); where the configured engine or
path cannot use it, start-up logs that once, naming it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from verl.protocol import DataProto
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer

from heal.integrations.verl.settings import HealSettings
from heal.reward import add_to_last_token, eda_step

__all__ = ["HealPPOTrainerSync", "TRAINER_MODE", "shape_scores", "scoring_error_metrics", "ACC_SCORES_KEY",
           "EDA_REWARD_KEY", "SCORING_ERROR_KEY"]

logger = logging.getLogger(__name__)

TRAINER_MODE = "heal_sync"
ACC_SCORES_KEY = "acc_scores"
EDA_REWARD_KEY = "eda_reward"
ENTROPY_KEYS = ("entropy", "entropys")  # v1 TransferQueue name, legacy DataProto name
EDA_ENTROPY_KEY = "heal_eda_entropy"  # TransferQueue field: response-aligned entropies at T=1 (entropy_temperature=1.0)
SCORING_ERROR_KEY = "scoring_error"  # heal.scoring.compute_score_with_info: the reason, "" when judged


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if hasattr(x, "tolist"):
        out = x.tolist()
        return out if isinstance(out, list) else [out]
    return list(x)


def final_output_rows(keys: Sequence[str]) -> np.ndarray:
    """Which rows are the final output of their multi-turn conversation.

    verl's agent loop stores every output of a conversation under the key ``{uid}_{session_id}_{index}``
    and its GRPO (``compute_advantage_for_multi_trajectories``) scores only the output with the largest
    ``index`` of each ``{uid}_{session_id}``, broadcasting the advantage to the others. heal follows it:
    only final outputs enter the EDA comparison and get ``r_EDA``. A key not of that form is a
    conversation of its own (final)."""
    final: Dict[str, tuple] = {}
    session_of = []
    for i, key in enumerate(keys):
        parts = str(key).rsplit("_", 2)
        if len(parts) == 3 and parts[2].isdigit():
            session, index = f"{parts[0]}_{parts[1]}", int(parts[2])
        else:
            session, index = f"\0{i}", 0
        session_of.append(session)
        if session not in final or final[session][0] < index:
            final[session] = (index, i)
    out = np.zeros(len(keys), dtype=bool)
    for _, row in final.values():
        out[row] = True
    return out


def scoring_error_metrics(columns, row_mask: Optional[Sequence[bool]] = None) -> Dict[str, float]:
    """``scoring/errors/<reason>`` counts (:func:`heal.scoring.error_metrics`) of a batch's scoring errors.

    ``columns`` maps field names to one value per row: the TensorDict read from verl's TransferQueue, or
    a DataProto's ``non_tensor_batch``. The reasons are the reward function's ``scoring_error`` key,
    which verl 0.9 keeps in one of two places: its own column when the trainer computes the reward
    (``_compute_reward_colocate``: a reward model without its own resource pool), else
    ``extra_fields[i]["reward_extra_info"]`` (the reward loop scores each output during the rollout,
    verl's default). Rows where ``row_mask`` is False are not counted. Neither present: ``{}``."""
    from heal.scoring.outcome import error_metrics

    names = set(columns.keys())
    if SCORING_ERROR_KEY in names:
        reasons = _as_list(columns[SCORING_ERROR_KEY])
    elif "extra_fields" in names:
        reasons = []
        for extra in _as_list(columns["extra_fields"]):
            info = extra.get("reward_extra_info") if isinstance(extra, dict) else None
            reasons.append(info.get(SCORING_ERROR_KEY) if isinstance(info, dict) else None)
    else:
        return {}
    if row_mask is not None:
        if len(row_mask) != len(reasons):
            raise ValueError(f"heal: {len(reasons)} scoring_error entries for {len(row_mask)} rows")
        reasons = [r for r, keep in zip(reasons, row_mask) if keep]
    return error_metrics(reasons)


def _pick_entropy(data: DataProto, settings: HealSettings) -> torch.Tensor:
    if EDA_ENTROPY_KEY in data.batch.keys():
        return data.batch[EDA_ENTROPY_KEY]
    if settings.eda.entropy_source == "rollout_topk":
        from heal.integrations.verl.rollout_topk import truncated_topk_entropy

        key = settings.rollout_topk_field
        if key not in data.batch.keys():
            raise KeyError(f"heal.rollout_topk_field={key!r}: no such field in the batch")
        return truncated_topk_entropy(data.batch[key])
    for key in ENTROPY_KEYS:
        if key in data.batch.keys():
            return data.batch[key]
    raise KeyError(
        "heal: the batch has no per-token entropy ('entropy' / 'entropys'); verl's old-log-prob pass must "
        "run with calculate_entropy=True (the v1 trainer does unless rollout_correction.bypass_mode is set)"
    )


def shape_scores(
    data: DataProto,
    settings: HealSettings,
    *,
    score_key: str = "rm_scores",
    row_mask: Optional[Sequence[bool]] = None,
    step: int = 0,
    entropy_temperature: Optional[float] = None,
    grouped_max=None,
) -> Dict[str, float]:
    """Add ``settings.eda.weight * r_EDA`` to ``data.batch[score_key]`` in place; return metrics.

    ``data`` is a padded :class:`verl.DataProto` with ``batch`` keys ``score_key`` (``[B, T]``
    token-level scores, outcome at the last valid token: ``rm_scores`` in verl's v1 trainer,
    ``token_level_scores`` in older ones), ``response_mask`` (``[B, T]``) and ``entropy`` (or
    ``entropys``; ``[B, T]``), and ``non_tensor_batch`` keys ``data_source`` and ``uid``. Rows where
    ``row_mask`` is False (verl's padding rows) are left out of the EDA comparison and unchanged.

    Writes ``acc_scores`` (copy of the unshaped scores), the shaped ``score_key`` and
    ``eda_reward`` (``float32[B]``, 0/1, 0 for rows left out). With ``settings.rollout_dump`` set,
    appends the compared rows to that rollout dump under ``step`` (see the module docstring), with
    ``entropy_temperature`` (the temperature the entropies were taken at) as a column when given.
    ``grouped_max`` (optional) computes the EDA's per-row maxima elsewhere (``heal.eda_placement:
    workers``); the CPU kernel's threads follow ``settings.eda_threads``.
    """
    eda_cfg = settings.eda
    if eda_cfg is None:
        raise ValueError("heal: no EDA settings (heal.general_sources is required when heal.enable is true)")
    t0 = time.perf_counter()
    for key in (score_key, "response_mask"):
        if key not in data.batch.keys():
            raise KeyError(f"heal: the batch has no {key!r}")
    scores = data.batch[score_key]
    mask = data.batch["response_mask"]
    if scores.shape != mask.shape:
        raise ValueError(f"heal: {score_key} has shape {tuple(scores.shape)} but response_mask has {tuple(mask.shape)}")
    entropy = _pick_entropy(data, settings)
    if entropy.shape != mask.shape:
        raise ValueError(f"heal: entropy has shape {tuple(entropy.shape)} but response_mask has {tuple(mask.shape)}")
    bsz = scores.shape[0]
    if "data_source" not in data.non_tensor_batch:
        raise KeyError("heal: trajectories carry no 'data_source' (the dataset's data_source column is required)")
    sources = [str(s) for s in _as_list(data.non_tensor_batch["data_source"])]
    uids = _as_list(data.non_tensor_batch.get("uid", None)) or None
    if len(sources) != bsz:
        raise ValueError(f"heal: {len(sources)} data_source entries for {bsz} trajectories")

    rows = np.ones(bsz, dtype=bool) if row_mask is None else np.asarray(row_mask, dtype=bool)
    if rows.shape != (bsz,):
        raise ValueError(f"heal: row_mask must have {bsz} entries, got shape {rows.shape}")
    idx = np.nonzero(rows)[0]
    reward = torch.zeros(bsz, dtype=torch.float32)
    metrics: Dict[str, float] = {}
    if idx.size:
        ent_rows, mask_rows = entropy.detach().float(), mask
        if idx.size != bsz:  # leave verl's padding rows out (copies only in that case)
            sel = torch.as_tensor(idx, dtype=torch.long, device=entropy.device)
            ent_rows, mask_rows = ent_rows[sel], mask_rows[sel.to(mask.device)]
        result, metrics = eda_step(
            ent_rows,
            mask_rows,
            [sources[i] for i in idx],
            [uids[i] for i in idx] if uids is not None else None,
            eda_cfg,
            num_threads=settings.eda_threads,
            grouped_max=grouped_max,
        )
        reward[torch.as_tensor(idx, dtype=torch.long)] = result.reward.to(torch.float32).cpu()

    acc = scores.clone()
    bonus = (eda_cfg.weight * reward).to(device=scores.device)
    data.batch[ACC_SCORES_KEY] = acc
    data.batch[score_key] = add_to_last_token(scores, bonus, mask)
    data.batch[EDA_REWARD_KEY] = reward.to(scores.device)

    seq_acc = acc.float().sum(dim=-1).cpu()
    general = set(eda_cfg.general_sources)
    is_gen = torch.tensor([s in general for s in sources], dtype=torch.bool) & torch.as_tensor(rows)
    is_tgt = ~torch.tensor([s in general for s in sources], dtype=torch.bool) & torch.as_tensor(rows)
    nan = float("nan")
    metrics["heal/acc_score_target_mean"] = float(seq_acc[is_tgt].mean()) if bool(is_tgt.any()) else nan
    metrics["heal/acc_score_general_mean"] = float(seq_acc[is_gen].mean()) if bool(is_gen.any()) else nan
    metrics["heal/eda_bonus_mean"] = float(bonus.float().cpu()[torch.as_tensor(rows)].mean()) if idx.size else nan
    if settings.rollout_dump and idx.size:
        _dump_rollouts(settings.rollout_dump, step, ent_rows, mask_rows, idx, sources, uids, seq_acc, reward, result,
                       entropy_temperature)
    metrics["heal/shaping_time_s"] = time.perf_counter() - t0
    return metrics


def _dump_rollouts(path, step, ent_rows, mask_rows, idx, sources, uids, seq_acc, reward, result,
                   entropy_temperature=None) -> None:
    """Append the compared rows (``ent_rows`` / ``mask_rows`` hold rows ``idx`` of the batch)."""
    from heal.analysis.logs import append_rollout_dump

    ent_cpu = ent_rows.detach().float().cpu()
    valid = mask_rows.detach().cpu().bool()
    sel = torch.as_tensor(idx, dtype=torch.long)
    columns = {
        "uid": [str(uids[i]) for i in idx] if uids is not None else [str(i) for i in idx],
        "acc": seq_acc[sel],
        "eda_reward": reward[sel],
        "s_target": result.s_target.detach().float().cpu(),
        "s_general": result.s_general.detach().float().cpu(),
    }
    if entropy_temperature is not None:
        columns["entropy_temperature"] = [float(entropy_temperature)] * len(idx)
    append_rollout_dump(
        path, int(step), [ent_cpu[j][valid[j]] for j in range(len(idx))], [sources[i] for i in idx], **columns
    )


class HealPPOTrainerSync(PPOTrainerSync):
    """verl's sync v1 PPO trainer plus the EDA reward step (see the module docstring)."""

    def __init__(self, config):
        # validate the heal block before anything else is built (fails fast, naming the key)
        self.heal_settings = HealSettings.from_config(config)
        self._heal_batch_mask = self.heal_settings.batch_high_entropy_mask(config)
        if self._heal_batch_mask:
            _tell_the_loss_batch_scope(config)
        if self.heal_settings.fused_entropy:
            from heal.integrations.verl.fused_entropy import warn_uncovered_paths

            warn_uncovered_paths(config)
        super().__init__(config)

    # verl's base class branches on ``trainer_mode == "sync"``; report "sync" so that this trainer
    # takes exactly the sync trainer's paths (config section trainer.v1.sync included).
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        self.configured_trainer_mode = value

    def _eda_on_workers(self) -> bool:
        s = self.heal_settings
        return s.enable and s.eda is not None and s.eda_placement == "workers"

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if self.heal_settings.fused_entropy or self._eda_on_workers():
            import ray

            from heal.integrations.verl.workers import HealActorRolloutRefWorker, HealEDAWorker
            from verl.trainer.ppo.utils import Role

            # verl maps these roles to ActorRolloutRefWorker; use heal's subclass: HealEDAWorker adds the
            # EDA's worker method, HealActorRolloutRefWorker also turns the fused entropy/log-prob op on in
            # each worker process before its engine is built
            cls = HealActorRolloutRefWorker if self.heal_settings.fused_entropy else HealEDAWorker
            for role in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor, Role.RefPolicy):
                if role in self.role_worker_mapping:
                    self.role_worker_mapping[role] = ray.remote(cls)

    def _workers_grouped_max(self, report: Dict[str, float]):
        """``heal.eda_placement: workers``: the EDA's grouped maxima computed by the actor worker group."""
        import ray

        from heal.integrations.verl.eda_workers import workers_grouped_max
        from heal.integrations.verl.workers import WORKER_METHOD

        return workers_grouped_max(getattr(self.actor_rollout_wg, WORKER_METHOD), put=ray.put, report=report)

    @property
    def _rollout_temperature(self) -> float:
        return float(self.config.actor_rollout_ref.rollout.temperature)

    @property
    def heal_entropy_temperature(self) -> float:
        """The temperature of the entropies the EDA compares (``heal.entropy_temperature``)."""
        t = self.heal_settings.entropy_temperature
        return self._rollout_temperature if t is None else float(t)

    def _eda_needs_extra_pass(self) -> bool:
        s = self.heal_settings
        return (
            s.enable and s.eda is not None and s.eda.entropy_source == "actor"
            and s.entropy_temperature is not None and float(s.entropy_temperature) != self._rollout_temperature
        )

    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        if self._eda_needs_extra_pass():
            timing = getattr(self, "timing_raw", None)
            with marked_timer("heal_entropy_t1", timing if timing is not None else {}, color="purple"):
                self._compute_eda_entropy_at(batch, float(self.heal_settings.entropy_temperature))
        return batch

    def _compute_eda_entropy_at(self, batch, temperature: float) -> None:
        """One more forward pass of the actor (no loss, no update) at ``temperature``: its entropies go to
        :data:`EDA_ENTROPY_KEY`; the old-log-prob pass's ``entropy`` (rollout temperature, the update's
        temperature) is put back, since the worker's output overwrites it."""
        import transfer_queue as tq

        from verl.workers.utils.padding import response_from_nested

        kept = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy"])
        saved_info = dict(batch.extra_info)
        batch.extra_info.update({"calculate_entropy": True, "compute_loss": False, "temperature": temperature})
        try:
            output = self.actor_rollout_wg.compute_log_prob(batch)
            assert len(output) == len(batch)
        finally:
            batch.extra_info.clear()
            batch.extra_info.update(saved_info)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy", "response_mask"])
        data[EDA_ENTROPY_KEY] = response_from_nested(data.pop("entropy"), data["response_mask"])
        data["entropy"] = kept["entropy"]
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data.select(EDA_ENTROPY_KEY, "entropy"))

    def _compute_advantage(self, batch, metrics: dict):
        timing = getattr(self, "timing_raw", None)
        if timing is None:
            timing = {}
        metrics.update(self._scoring_error_metrics(batch))
        if self._heal_batch_mask:
            with marked_timer("heal_high_entropy_mask", timing, color="purple"):
                self._apply_high_entropy_mask(batch, metrics)
        if self.heal_settings.enable and self.heal_settings.eda is not None:
            with marked_timer("heal_eda", timing, color="purple"):
                batch = self._apply_heal_reward(batch, metrics)
        return super()._compute_advantage(batch, metrics)

    def _scoring_error_metrics(self, batch) -> Dict[str, float]:
        """:func:`scoring_error_metrics` of the batch, counting each conversation's final output once (verl
        copies its reward info to the earlier outputs) and leaving verl's padding rows (copies of a real
        row) out."""
        import transfer_queue as tq

        # TransferQueue leaves out the fields it does not hold
        td = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                             select_fields=[SCORING_ERROR_KEY, "extra_fields"])
        final = final_output_rows(batch.keys)
        rows = [bool(final[i]) and not tag.get("is_padding", False) for i, tag in enumerate(batch.tags)]
        return scoring_error_metrics(td, rows)

    def _apply_high_entropy_mask(self, batch, metrics: dict) -> None:
        """``heal.high_entropy_scope: batch``: the top-``rho`` entropy tokens over the whole batch's response
        tokens (old-log-prob entropies, rollout temperature = the update's entropies on-policy), shipped
        per token as :data:`~heal.integrations.verl.losses.HIGH_ENTROPY_MASK_KEY` with the batch's count."""
        import transfer_queue as tq
        from tensordict import TensorDict

        from heal.integrations.verl.losses import (
            DEFAULT_HIGH_ENTROPY_RATIO,
            HIGH_ENTROPY_MASK_KEY,
            HIGH_ENTROPY_TOTAL_KEY,
            top_entropy_mask,
        )
        from verl.workers.utils.padding import response_to_nested

        rho = float(self.config.actor_rollout_ref.actor.policy_loss.get("high_entropy_ratio", DEFAULT_HIGH_ENTROPY_RATIO))
        td = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy", "response_mask"])
        response_mask = td["response_mask"]
        padded = td.to_padded_tensor()
        valid = padded["response_mask"].bool()
        rows = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags], dtype=torch.bool)
        valid = valid & rows.to(valid.device)[:, None]
        he_mask, threshold = top_entropy_mask(padded["entropy"], valid, rho)
        total = int(he_mask.sum())
        out = {
            HIGH_ENTROPY_MASK_KEY: response_to_nested(he_mask.to(torch.float32), response_mask),
            HIGH_ENTROPY_TOTAL_KEY: torch.full((len(batch),), float(total), dtype=torch.float32),
        }
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(out, batch_size=len(batch)))
        n_valid = int(valid.sum())
        metrics["heal/high_entropy_threshold"] = threshold
        metrics["heal/high_entropy_selected"] = float(total)
        metrics["heal/high_entropy_frac"] = total / n_valid if n_valid else 0.0

    def _apply_heal_reward(self, batch, metrics: dict):
        """Read the batch from the TransferQueue, :func:`shape_scores` it, write the scores back."""
        import transfer_queue as tq
        from tensordict import TensorDict

        from verl.workers.utils.padding import response_to_nested

        t0 = time.perf_counter()
        fields = ["response_mask", "rm_scores", "data_source", "uid"]
        if self._eda_needs_extra_pass():
            fields.append(EDA_ENTROPY_KEY)
        else:
            fields.append("entropy" if self.heal_settings.eda.entropy_source == "actor" else self.heal_settings.rollout_topk_field)
        td = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = td["response_mask"]
        non_tensor = {
            "uid": np.array(_as_list(td.pop("uid")), dtype=object),
            "data_source": np.array(_as_list(td.pop("data_source")), dtype=object),
        }
        data = DataProto(batch=td.to_padded_tensor(), non_tensor_batch=non_tensor)
        # verl's padding rows are left out; so are the non-final outputs of multi-turn conversations
        # (verl's GRPO scores only each conversation's final output)
        final = final_output_rows(batch.keys)
        row_mask = [bool(final[i]) and not tag.get("is_padding", False) for i, tag in enumerate(batch.tags)]
        temperature = self.heal_entropy_temperature if self.heal_settings.eda.entropy_source == "actor" else None
        placement: Dict[str, float] = {}
        grouped_max = self._workers_grouped_max(placement) if self._eda_on_workers() else None
        step_metrics = shape_scores(
            data, self.heal_settings, score_key="rm_scores", row_mask=row_mask,
            step=int(getattr(self, "global_steps", 0)), entropy_temperature=temperature, grouped_max=grouped_max,
        )
        step_metrics.update(placement)

        out = {
            "rm_scores": response_to_nested(data.batch["rm_scores"], response_mask),
            ACC_SCORES_KEY: response_to_nested(data.batch[ACC_SCORES_KEY], response_mask),
            EDA_REWARD_KEY: data.batch[EDA_REWARD_KEY],
        }
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(out, batch_size=len(batch)))
        step_metrics["heal/time_s"] = time.perf_counter() - t0
        step_metrics["heal/eda_rows"] = float(sum(row_mask))
        step_metrics["heal/non_final_rows"] = float(int((~final).sum()))
        if temperature is not None:
            step_metrics["heal/entropy_temperature"] = float(temperature)
        metrics.update(step_metrics)
        return batch


def _tell_the_loss_batch_scope(config) -> None:
    """Set ``actor_rollout_ref.actor.policy_loss.high_entropy_scope=batch`` (heal's policy-loss config) so
    that the loss fails loudly if the driver's mask ever does not reach it."""
    from omegaconf import open_dict

    pl = config.actor_rollout_ref.actor.policy_loss
    if str(pl.get("_target_", "")) != "heal.integrations.verl.losses.HealPolicyLossConfig":
        return  # verl's own PolicyLossConfig has no such key; the loss still uses the shipped mask
    with open_dict(pl):
        pl.high_entropy_scope = "batch"


def register() -> None:
    """Register :class:`HealPPOTrainerSync` as trainer mode ``heal_sync`` (idempotent)."""
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    if TRAINER_REGISTRY.get(TRAINER_MODE) is not HealPPOTrainerSync:
        register_trainer(TRAINER_MODE)(HealPPOTrainerSync)


register()
