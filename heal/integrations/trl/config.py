"""``HEALGRPOConfig``: TRL's ``GRPOConfig`` plus the ``heal_*`` options of the EDA reward.

Every HEAL option is a ``heal_``-prefixed field so that it never collides with a TRL option and
parses from the command line with ``transformers.HfArgumentParser`` like any other field
(``--heal_general_sources commonsense_qa --heal_weight 1.0``). Wrong values fail when the config
is built, with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from trl import GRPOConfig

__all__ = ["HEALGRPOConfig"]

_HEAL_TO_EDA = {
    "heal_general_sources": "general_sources",
    "heal_weight": "weight",
    "heal_min_length": "min_length",
    "heal_metric": "metric",
    "heal_kl_direction": "kl_direction",
    "heal_general_reward": "general_reward",
    "heal_exclude_same_prompt": "exclude_same_prompt",
}


@dataclass
class HEALGRPOConfig(GRPOConfig):
    r"""``trl.GRPOConfig`` with the options of HEAL's entropy-dynamics-alignment (EDA) reward.

    The trainer adds ``heal_weight * r_EDA`` to the reward of every completion before TRL computes
    the group-normalised advantages (``multi_objective_aggregation="sum_then_normalize"``, TRL's
    default, gives the paper's ``r = r_acc + w * r_EDA``).

    80/20 (seed 003, only the top-rho high-entropy tokens carry the policy gradient) is TRL's own
    ``top_entropy_quantile`` option (set ``0.2``); it composes with HEAL unchanged.

    HEAL parameters:
        heal_general_sources (`list[str]`):
            Values of the dataset's ``heal_data_source_key`` column that mark a prompt as
            general-domain (e.g. ``["commonsense_qa"]``); every other value is target-domain.
            Required (no default: it depends on your data). Each name must occur in the training
            dataset: :class:`HEALGRPOTrainer` refuses to start otherwise, listing the sources there.
        heal_weight (`float`, defaults to ``1.0``):
            ``w`` in ``r = r_acc + w * r_EDA``. ``0.0`` computes and logs the EDA metrics without
            shaping the reward.
        heal_min_length (`int`, defaults to ``50``):
            Completions with at most this many tokens get ``r_EDA = 0`` (they still serve as
            neighbours).
        heal_metric (`str`, defaults to ``"kl"``):
            Similarity of two entropy sequences: ``"kl"``, ``"hti"`` or ``"pl"``.
        heal_kl_direction (`str`, defaults to ``"scored_first"``):
            ``"scored_first"`` (reference implementation) or ``"short_first"`` (paper appendix).
        heal_general_reward (`str`, defaults to ``"mirror"``):
            ``"mirror"`` rewards general completions with the mirrored rule; ``"none"`` gives them 0.
        heal_exclude_same_prompt (`bool`, defaults to ``False``):
            Skip neighbours from the same GRPO group (same prompt) in the max-similarity search.
        heal_data_source_key (`str`, defaults to ``"data_source"``):
            Dataset column holding each prompt's data source (the trainer refuses to start when the
            train or an eval dataset lacks it).
        heal_entropy_batch_size (`int`, *optional*):
            Rows per chunk of the no-grad forward that computes the completion entropies when they
            are neither captured during generation nor taken from TRL's old-log-prob pass (each chunk
            materialises ``[rows, completion_len, vocab]`` logits, unless the model has a plain linear
            head). Defaults to ``per_device_train_batch_size``.
        heal_capture_entropies (`bool`, defaults to ``True``):
            With transformers ``generate`` (no vLLM), capture the completion entropies while TRL
            samples (a logits processor running ``heal_kernels.token_entropy`` on each step's raw
            logits at ``temperature``) instead of one extra no-grad forward per batch. Same numbers;
            ``False`` forces the forward. The trainer logs the source as ``eda/entropy_source``
            (0 extra forward, 1 TRL's old-log-prob pass, 2 captured during generation).
        heal_high_entropy_scope (`str`, defaults to ``"batch"``):
            Where TRL's 80/20 rule (``top_entropy_quantile < 1``) takes its quantile: ``"batch"``
            (the paper's rule: one threshold over the whole generation batch, all processes, from the
            entropies HEAL computes at scoring time; needs an on-policy update, ``num_iterations=1``
            and ``steps_per_generation <= gradient_accumulation_steps``, else the trainer refuses to
            start) or ``"micro_batch"`` (TRL's own rule: the quantile of each loss call's tokens).
            No effect with ``top_entropy_quantile=1``.
        heal_rollout_dump (`str`, *optional*):
            Path of a JSONL rollout dump: after each training EDA step the main process appends one
            line per completion of the gathered batch: ``step`` (``state.global_step + 1``, the step
            under which TRL logs the batch's ``eda/*`` metrics), ``data_source``, ``uid``,
            ``entropy`` over the completion's model tokens, ``acc`` (the weighted sum of the other
            reward functions), ``eda_reward``, ``s_target``, ``s_general``. The input of
            ``heal plot heatmap`` / ``heal plot dynamics``. Default: off.
    """

    heal_general_sources: list[str] = field(
        default_factory=list,
        metadata={"help": "Data sources that are general-domain (e.g. commonsense_qa); all others are target."},
    )
    heal_weight: float = field(default=1.0, metadata={"help": "w in r = r_acc + w * r_EDA (0 logs EDA only)."})
    heal_min_length: int = field(
        default=50, metadata={"help": "Completions with at most this many tokens get r_EDA = 0."}
    )
    heal_metric: str = field(default="kl", metadata={"help": "Entropy-dynamics similarity: kl, hti or pl."})
    heal_kl_direction: str = field(
        default="scored_first", metadata={"help": "KL direction: scored_first or short_first."}
    )
    heal_general_reward: str = field(
        default="mirror", metadata={"help": "Reward for general completions: mirror or none."}
    )
    heal_exclude_same_prompt: bool = field(
        default=False, metadata={"help": "Skip neighbours from the same prompt group."}
    )
    heal_data_source_key: str = field(
        default="data_source", metadata={"help": "Dataset column with each prompt's data source."}
    )
    heal_entropy_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Rows per chunk of the entropy forward (default: per-device batch size)."}
    )
    heal_capture_entropies: bool = field(
        default=True,
        metadata={"help": "Capture the completion entropies while transformers generate samples (no extra "
                          "forward); False: one extra no-grad forward per batch."},
    )

    heal_eda_threads: Optional[int] = field(
        default=None,
        metadata={"help": "Threads of the CPU EDA kernel when the entropies are on the CPU (default: the CPUs "
                          "this process may run on, from its affinity; torch's thread setting is not used)."},
    )

    heal_high_entropy_scope: str = field(
        default="batch",
        metadata={"help": "With top_entropy_quantile < 1: batch (one threshold over the generation batch, the "
                          "80/20 paper's rule; needs an on-policy update) or micro_batch (TRL's per-loss-call rule)."},
    )
    heal_rollout_dump: Optional[str] = field(
        default=None,
        metadata={"help": "JSONL file to append each step's completions (entropies, rewards) to, for heal plot."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.heal_general_sources, str):
            self.heal_general_sources = [s for s in self.heal_general_sources.split(",") if s]
        if not self.heal_data_source_key:
            raise ValueError("heal_data_source_key must be a non-empty column name")
        if self.heal_entropy_batch_size is not None and self.heal_entropy_batch_size < 1:
            raise ValueError(f"heal_entropy_batch_size must be a positive integer, got {self.heal_entropy_batch_size}")
        if self.heal_eda_threads is not None and (
            isinstance(self.heal_eda_threads, bool) or not isinstance(self.heal_eda_threads, int) or self.heal_eda_threads < 1
        ):
            raise ValueError(f"heal_eda_threads must be a positive integer or None, got {self.heal_eda_threads!r}")
        if self.heal_high_entropy_scope not in ("batch", "micro_batch"):
            raise ValueError(
                f"heal_high_entropy_scope must be 'batch' or 'micro_batch', got {self.heal_high_entropy_scope!r}"
            )
        if self.heal_rollout_dump is not None:
            if not isinstance(self.heal_rollout_dump, str) or not self.heal_rollout_dump:
                raise ValueError(f"heal_rollout_dump must be a file path or None, got {self.heal_rollout_dump!r}")
            if os.path.isdir(self.heal_rollout_dump):
                raise ValueError(
                    f"heal_rollout_dump={self.heal_rollout_dump!r} is a directory; give a file path, "
                    f"e.g. {os.path.join(self.heal_rollout_dump, 'rollouts.jsonl')}"
                )
        self.heal_eda_config()  # validates

    def heal_eda_config(self):
        """The :class:`heal.reward.EDAConfig` these ``heal_*`` fields describe (validated)."""
        from heal.reward import EDAConfig

        if not self.heal_general_sources:
            raise ValueError(
                "heal_general_sources must name at least one general-domain data source (e.g. ['commonsense_qa'])"
            )
        kwargs = {eda_key: getattr(self, key) for key, eda_key in _HEAL_TO_EDA.items()}
        kwargs["general_sources"] = tuple(kwargs["general_sources"])
        try:
            cfg = EDAConfig(**kwargs)
            cfg.validate()
        except ValueError as exc:  # EDAConfig names its own key; say which field that is here
            raise ValueError(f"invalid HEAL option (HEALGRPOConfig field heal_<key>): {exc}") from exc
        return cfg
