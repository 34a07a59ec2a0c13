"""The ``heal:`` block of a verl config: parsing and start-up validation (no verl import).

Keys (defaults in ``heal/integrations/verl/config/heal_trainer.yaml``)::

    heal:
      enable: true                  # false: heal_sync behaves exactly like verl's sync trainer
      general_sources: [commonsense_qa]   # data_source names of general-domain data (required)
      weight: 1.0                   # r = r_acc + weight * r_EDA
      min_length: 50                # trajectories with <= min_length response tokens get r_EDA = 0
      metric: kl                    # kl | hti | pl
      kl_direction: scored_first    # scored_first (reference code) | short_first (paper appendix)
      general_reward: mirror        # mirror (reference code) | none
      exclude_same_prompt: false    # do not compare trajectories of the same prompt (uid)
      entropy_source: actor         # actor (exact, old-log-prob pass) | rollout_topk (reproduction)
      rollout_topk_field: null      # rollout_topk only: TransferQueue field with [T, k] top-k log-probs
      fused_entropy: false          # actor workers compute entropy/log-probs with heal's fused op
      rollout_dump: null            # a path: append each step's trajectories (entropies, scores) as JSONL
      high_entropy_scope: batch     # 80/20 loss (high_entropy_tokens): batch (paper) | micro_batch (authors' code)
      entropy_temperature: rollout  # EDA entropies at the rollout temperature (rollout) or at T=1 (1.0)
      eda_placement: driver         # driver (trainer process) | workers (the work shared out over the actor workers)
      eda_threads: null             # CPU EDA kernel threads; null: the CPUs the process may run on (affinity)

Every error is a ``ValueError`` whose message starts with the full key, e.g. ``heal.weight``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from heal.reward import EDAConfig

__all__ = ["HealSettings", "INTEGRATION_KEYS", "EDA_PLACEMENTS", "ROLLOUT_TOPK_MISSING"]

INTEGRATION_KEYS = (
    "enable", "fused_entropy", "rollout_topk_field", "rollout_dump", "high_entropy_scope", "entropy_temperature",
    "eda_placement", "eda_threads",
)
EDA_PLACEMENTS = ("driver", "workers")
HIGH_ENTROPY_SCOPES = ("batch", "micro_batch")
HIGH_ENTROPY_TOKENS = "high_entropy_tokens"  # heal's 80/20 policy-loss mode (heal.integrations.verl.losses)

ROLLOUT_TOPK_MISSING = (
    "heal.entropy_source='rollout_topk' needs each response token's top-k log-probs from the rollout engine, "
    "and verl 0.9.1's rollout servers do not return them: vLLM's server sets SamplingParams(logprobs=0) and keeps "
    "only the sampled token's log-prob (verl/workers/rollout/vllm_rollout/vllm_async_server.py; SGLang's server "
    "likewise returns the sampled token only), and TokenOutput / AgentLoopOutput have no top-k field. To reproduce "
    "the reference implementation, run a custom agent loop whose server requests logprobs=20 and stores a "
    "[response_len, 20] tensor of log-probs per trajectory in TransferQueue, then set heal.rollout_topk_field to "
    "that field's name. Otherwise use heal.entropy_source=actor (exact entropies, no extra cost)."
)


def _to_plain(block: Any) -> Any:
    try:  # OmegaConf DictConfig / ListConfig
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(block, (DictConfig, ListConfig)):
            return OmegaConf.to_container(block, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return block


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


@dataclass
class HealSettings:
    """The parsed ``heal:`` block: the EDA settings plus the verl-integration switches."""

    eda: Optional[EDAConfig]
    enable: bool = True
    fused_entropy: bool = False
    rollout_topk_field: Optional[str] = None
    rollout_dump: Optional[str] = None
    high_entropy_scope: str = "batch"
    entropy_temperature: Optional[float] = None  # None = the rollout temperature
    eda_placement: str = "driver"
    eda_threads: Optional[int] = None  # None = the CPUs the computing process may run on

    @property
    def entropy_temperature_label(self) -> str:
        """``"rollout"`` or the fixed temperature, as written in the config (``"1.0"``)."""
        return "rollout" if self.entropy_temperature is None else repr(float(self.entropy_temperature))

    @classmethod
    def from_block(cls, block: Any, *, prefix: str = "heal") -> "HealSettings":
        """Parse and validate a ``heal:`` mapping (dict or OmegaConf). ``None`` is an error
        (``heal.general_sources`` is required) unless the block sets ``enable: false``."""
        block = _to_plain(block)
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise ValueError(f"{prefix} must be a mapping of settings, got {type(block).__name__}")
        block = dict(block)
        enable = _bool(block.pop("enable", True), f"{prefix}.enable")
        fused = _bool(block.pop("fused_entropy", False), f"{prefix}.fused_entropy")
        topk_field = block.pop("rollout_topk_field", None)
        if topk_field is not None and (not isinstance(topk_field, str) or not topk_field):
            raise ValueError(f"{prefix}.rollout_topk_field must be a non-empty string or null, got {topk_field!r}")
        dump = block.pop("rollout_dump", None)
        if dump is not None:
            if not isinstance(dump, str) or not dump:
                raise ValueError(f"{prefix}.rollout_dump must be a file path (JSONL) or null, got {dump!r}")
            if os.path.isdir(dump):
                raise ValueError(f"{prefix}.rollout_dump={dump!r} is a directory; give a file path, e.g. {dump}/rollouts.jsonl")

        scope = block.pop("high_entropy_scope", "batch")
        if scope not in HIGH_ENTROPY_SCOPES:
            raise ValueError(f"{prefix}.high_entropy_scope must be one of {list(HIGH_ENTROPY_SCOPES)}, got {scope!r}")
        temp = block.pop("entropy_temperature", "rollout")
        if temp == "rollout" or temp is None:
            temp = None
        elif isinstance(temp, bool) or not isinstance(temp, (int, float, str)):
            raise ValueError(f"{prefix}.entropy_temperature must be 'rollout' or 1.0, got {temp!r}")
        else:
            try:
                value = float(temp)
            except ValueError:
                raise ValueError(f"{prefix}.entropy_temperature must be 'rollout' or 1.0, got {temp!r}") from None
            if value != 1.0:
                raise ValueError(
                    f"{prefix}.entropy_temperature must be 'rollout' (the rollout temperature) or 1.0, got {temp!r}"
                )
            temp = 1.0

        placement = block.pop("eda_placement", "driver")
        if placement not in EDA_PLACEMENTS:
            raise ValueError(f"{prefix}.eda_placement must be one of {list(EDA_PLACEMENTS)}, got {placement!r}")
        threads = block.pop("eda_threads", None)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(
                f"{prefix}.eda_threads must be an integer >= 1 or null (the CPUs the process may run on), got {threads!r}"
            )

        known = [f.name for f in dataclasses.fields(EDAConfig)]
        unknown = [k for k in block if k not in known]
        if unknown:
            raise ValueError(
                f"{prefix}: unknown key(s) {unknown}; known keys: {known + list(INTEGRATION_KEYS)}"
            )
        eda = None
        if enable or block:
            if "general_sources" not in block or block["general_sources"] in (None, [], ()):
                if enable:
                    raise ValueError(
                        f"{prefix}.general_sources is required: the data_source names of the general-domain data, "
                        f"e.g. {prefix}.general_sources=[commonsense_qa]"
                    )
            else:
                try:
                    eda = EDAConfig.from_dict(block)
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{prefix}.{err}") from None
        if eda is not None and eda.entropy_source == "rollout_topk" and topk_field is None and enable:
            raise ValueError(ROLLOUT_TOPK_MISSING)
        if temp is not None and eda is not None and eda.entropy_source == "rollout_topk" and enable:
            raise ValueError(
                f"{prefix}.entropy_temperature=1.0 applies to the actor's entropies (entropy_source=actor); the "
                "rollout_topk reproduction uses the log-probs the rollout engine stored"
            )
        return cls(eda=eda, enable=enable, fused_entropy=fused, rollout_topk_field=topk_field, rollout_dump=dump,
                   high_entropy_scope=scope, entropy_temperature=temp, eda_placement=placement, eda_threads=threads)

    @classmethod
    def from_config(cls, config: Any) -> "HealSettings":
        """Parse ``config.heal`` of a full verl trainer config and check it against the rest of it."""
        block = config.get("heal", None) if hasattr(config, "get") else None
        settings = cls.from_block(block)
        settings.check_trainer_config(config)
        return settings

    def batch_high_entropy_mask(self, config: Any) -> bool:
        """True when the driver computes the 80/20 mask over the whole batch: the actor's policy loss is
        ``high_entropy_tokens`` and ``heal.high_entropy_scope`` is ``batch``."""
        return self.high_entropy_scope == "batch" and config_value(config, "actor_rollout_ref.actor.policy_loss.loss_mode") == HIGH_ENTROPY_TOKENS

    def check_trainer_config(self, config: Any) -> None:
        """Cross-checks with verl's own settings (errors name the offending key)."""
        bypass = bool(config_value(config, "algorithm.rollout_correction.bypass_mode", False))
        if self.batch_high_entropy_mask(config):
            check_on_policy(config)
            if bypass:
                raise ValueError(
                    "algorithm.rollout_correction.bypass_mode=true skips the old-log-prob pass, so there are no "
                    "entropies for heal.high_entropy_scope=batch: set bypass_mode=false or high_entropy_scope=micro_batch"
                )
        if not self.enable or self.eda is None:
            return
        if bypass:
            if self.eda.entropy_source == "actor":
                raise ValueError(
                    "algorithm.rollout_correction.bypass_mode=true skips the old-log-prob pass, so there are no actor "
                    "entropies for heal.entropy_source=actor: set bypass_mode=false"
                )


def config_value(config: Any, path: str, default: Any = None) -> Any:
    """``config``'s value at the dotted ``path`` (mappings, OmegaConf nodes or attributes), or
    ``default`` where a part is missing or the value is None."""
    node = config
    for part in path.split("."):
        if node is None:
            return default
        node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def check_on_policy(config: Any) -> None:
    """``heal.high_entropy_scope: batch`` takes the 80/20 threshold from the old-log-prob pass's entropies,
    which are the update's entropies only when the update is on-policy: one mini-batch (= the whole batch)
    and one epoch. Raise a ``ValueError`` naming the keys otherwise."""
    batch = config_value(config, "data.train_batch_size")
    mini = config_value(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    epochs = config_value(config, "actor_rollout_ref.actor.ppo_epochs", 1)
    problems = []
    if batch is not None and mini is not None and int(mini) < int(batch):
        problems.append(f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} < data.train_batch_size={batch}")
    if int(epochs) > 1:
        problems.append(f"actor_rollout_ref.actor.ppo_epochs={epochs} > 1")
    if problems:
        raise ValueError(
            "heal.high_entropy_scope=batch takes the 80/20 threshold over the whole batch from the old-log-prob "
            "pass's entropies, which equal the update's entropies only when the update is on-policy (one "
            f"mini-batch = the batch, one epoch); here {' and '.join(problems)}. Set ppo_mini_batch_size to "
            "data.train_batch_size and ppo_epochs=1, or heal.high_entropy_scope=micro_batch (the 80/20 authors' "
            "per-micro-batch rule)"
        )
