"""``HEALGRPOTrainer``: TRL's ``GRPOTrainer`` with HEAL's entropy-dynamics-alignment reward.

What it changes in TRL's step (``_generate_and_score_completions``), and nothing else:

1. The completion entropies: exact full-vocabulary token entropies of the policy at the
   sampling temperature (``args.temperature``), through heal's fused ops. A forward that computes
   them runs on the same padded ``prompt + completion`` tensors TRL's own log-prob pass uses, row
   chunk by row chunk (only ``[B, T]`` float32 entropies are kept). When the model's head is a
   plain linear layer (the rule of :func:`heal.rollout.entropy.linear_head_split`: a transformers
   model whose logits are ``lm_head(last_hidden_state)``, no soft-capping or scaling) they come
   straight from the hidden states of the completion positions
   (:func:`heal_kernels.linear_entropy_and_logprobs`): no ``[tokens x vocab]`` logits exist; other
   models go through their logits
   (:func:`heal_kernels.entropy_and_logprobs`). TRL's own training pass already scores completions
   with its fused LM head (``fused_lm_head=True``), which does not materialise full logits either.

   Where they come from (metric ``eda/entropy_source``, codes in :data:`ENTROPY_SOURCES`), the first
   that applies:

   * ``1`` TRL's old-log-prob pass: when TRL runs its no-grad old-log-prob pass (generation and
     optimisation misaligned, e.g. ``num_iterations > 1`` or ``steps_per_generation`` not dividing
     ``gradient_accumulation_steps``, or vLLM importance sampling, TRL's default with vLLM), that
     single forward computes both TRL's old log-probs and HEAL's entropies
     (:func:`heal_kernels.entropy_and_logprobs`): no extra forward.
   * ``2`` captured during generation: with transformers ``generate`` (TRL's default, no vLLM) a
     logits processor (:class:`heal.integrations.trl.capture.EntropyCapture`, passed to ``generate``)
     takes :func:`heal_kernels.token_entropy` of every step's raw logits at ``args.temperature``, the
     same full-vocabulary definition as the forward (no top-k / top-p truncation), filed per row and
     position and masked after EOS like TRL's completion mask: no extra forward. Needs
     ``heal_capture_entropies=True`` (default), text-only prompts without tools, and no generation
     option that changes the logits before a user logits processor (``repetition_penalty != 1``,
     ``min_new_tokens``, suppressed or forced tokens, ...;
     :func:`heal.integrations.trl.capture.logits_changed_before_capture`).
   * ``0`` one extra no-grad forward, :func:`heal_kernels.token_entropy`, batched by
     ``heal_entropy_batch_size`` rows: everywhere else (vLLM without importance sampling, continuous
     batching, tool calling, capture disabled or blocked). TRL 1.16 builds its colocated vLLM engine
     itself (``VLLMGeneration``: ``vllm.LLM(...)`` with a fixed argument list, no ``logits_processors``),
     and vLLM v1 takes logits processors only when an engine is built (``LLM(logits_processors=...)``
     or the ``vllm.logits_processors`` entry points of every installed package), so heal's vLLM
     processor (:mod:`heal.rollout.vllm_entropy`) cannot be attached there; nor could it file the
     entropies per request, since TRL sends one ``SamplingParams`` for all prompts of a call (the
     processor's per-request ``extra_args`` tag). TRL's server mode samples in another process.
2. The rewards of all reward functions are computed as usual (TRL gathers them across
   processes); the entropies, completion masks and data sources are gathered the same way, and
   :func:`heal.reward.eda_step` computes ``r_EDA`` over the whole generation batch, trajectories
   tagged target/general by the dataset's ``data_source`` column and grouped by GRPO group
   (``uid`` = prompt group index).
3. ``r_EDA`` fills an extra reward column named ``eda`` whose weight is ``heal_weight``, so TRL's
   own advantage computation sees ``r = sum_k w_k r_k + heal_weight * r_EDA``. TRL logs
   ``rewards/eda/mean`` next to the accuracy reward; the EDA metrics (``eda/rate_target``,
   ``eda/rate_general``, ``eda/entropy_mean_*``, ``eda/s_*``, ``eda/time_s``, plus
   ``eda/entropy_source`` (the code above), ``eda/entropy_forward_time_s``, the time of the forward
   that produced the entropies (0 when captured), ``eda/capture_time_s``, the time the capture took
   inside ``generate`` (0 otherwise), and ``eda/entropy_shared_pass``, 1 when it was TRL's
   old-log-prob pass) go through TRL's metrics, averaged per logging step.
4. With ``heal_rollout_dump=PATH`` the main process appends every training EDA step's completions
   to that JSONL rollout dump (:func:`heal.analysis.logs.append_rollout_dump`), for ``heal plot
   heatmap|dynamics``. ``step`` = ``state.global_step + 1``: the first optimizer step the batch
   trains, which is also the ``step`` under which TRL logs this batch's ``eda/*`` metrics in
   ``log_history`` (so dumps and ``heal plot curves`` share one step axis, as with verl).

80/20 (update only the top-20% high-entropy tokens, "Beyond the 80/20 rule"): TRL has it
natively, ``GRPOConfig(top_entropy_quantile=0.2)``, with the quantile taken per loss call (TRL's
rule). With ``heal_high_entropy_scope="batch"`` (the default; the paper's rule) the trainer takes
that quantile once over the whole generation batch (all processes) from the entropies it computes
for the EDA step, and each loss call uses that mask (``get_high_entropy_mask``); this needs an
on-policy update (``num_iterations=1``, ``steps_per_generation <= gradient_accumulation_steps``) and
the trainer refuses to start otherwise. ``"micro_batch"`` keeps TRL's rule.

Text-only models and prompts (no images); tool-calling masks are honoured.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import torch
import trl
from accelerate.utils import gather_object
from packaging.version import Version
from transformers import LogitsProcessorList
from trl import GRPOConfig, GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad

from heal.integrations.trl.capture import EntropyCapture, logits_changed_before_capture
from heal.integrations.trl.config import HEALGRPOConfig

__all__ = ["HEALGRPOTrainer", "completion_entropies", "check_heal_dataset", "EDA_REWARD_NAME", "ENTROPY_SOURCES"]

EDA_REWARD_NAME = "eda"

# The values of the metric eda/entropy_source: where a batch's completion entropies came from.
ENTROPY_SOURCES = {
    "extra_forward": 0,  # one extra no-grad forward over prompt + completion
    "old_logp_pass": 1,  # TRL's own old-log-prob pass, shared
    "generate": 2,  # captured by a logits processor while transformers generate sampled
}

# The trainer overrides private GRPOTrainer methods (_generate, _generate_single_turn, _calculate_rewards,
# _generate_and_score_completions, _get_per_token_logps_and_entropies) as TRL 1.16 defines them.
TESTED_TRL = "1.16"
if not Version("1.16") <= Version(trl.__version__) < Version("2.0"):
    warnings.warn(
        f"heal.integrations.trl was written against trl {TESTED_TRL}.x; trl {trl.__version__} may differ in the "
        "private GRPOTrainer methods it overrides (run tests/integrations/test_trl.py)",
        stacklevel=2,
    )


def _token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    import heal_kernels

    return heal_kernels.token_entropy(logits, temperature=temperature)


def _entropy_and_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    import heal_kernels

    return heal_kernels.entropy_and_logprobs(logits, labels, temperature=temperature)


def _linear_head(model: torch.nn.Module):
    """``(decoder, lm_head)`` of ``model`` (DDP-unwrapped) when its logits are a plain linear head of
    the decoder's last hidden state, else None (:func:`heal.rollout.entropy.linear_head_split`)."""
    from heal.rollout.entropy import linear_head_split

    return linear_head_split(getattr(model, "module", model))


@torch.no_grad()
def completion_entropies(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    batch_size: Optional[int] = None,
    *,
    with_logprobs: bool = False,
):
    """Float32 ``[B, logits_to_keep]`` entropies of the next-token distributions of the last
    ``logits_to_keep`` tokens of ``input_ids`` (the completion), at ``temperature``.

    One no-grad forward of ``model`` per chunk of ``batch_size`` rows. With a plain linear head the
    decoder's hidden states of the completion positions go to
    :func:`heal_kernels.linear_entropy_and_logprobs` (no logits tensor); otherwise each chunk's
    logits ``[rows, logits_to_keep, V]`` go into :func:`heal_kernels.token_entropy` (or
    :func:`heal_kernels.entropy_and_logprobs` with ``with_logprobs``) and are freed.
    Position ``t`` holds the entropy of the distribution the completion's token ``t`` was sampled
    from (the logits at input position ``L - logits_to_keep + t - 1``).

    With ``with_logprobs=True`` returns ``(entropy, logprobs)``: ``logprobs[b, t]`` is the
    temperature-scaled log-probability of ``input_ids[b, L - logits_to_keep + t]``, 0 where the
    attention mask is 0 (the convention of TRL's log-prob pass).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must be [B, L] of the same shape, got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if not 1 <= logits_to_keep < input_ids.size(1):
        raise ValueError(f"logits_to_keep must be in [1, {input_ids.size(1) - 1}], got {logits_to_keep}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bsz = input_ids.size(0)
    batch_size = max(int(batch_size), 1) if batch_size else max(bsz, 1)
    entropies, logprobs = [], []
    split = _linear_head(model)
    for start in range(0, bsz, batch_size):
        ids = input_ids[start : start + batch_size]
        am = attention_mask[start : start + batch_size]
        if split is not None:
            import heal_kernels

            decoder, head = split
            hidden = decoder(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
            hidden = hidden[:, -(logits_to_keep + 1) : -1].to(head.weight.dtype)
            ent, lp = heal_kernels.linear_entropy_and_logprobs(
                hidden, head.weight, ids[:, -logits_to_keep:], temperature, bias=head.bias
            )
            if with_logprobs:
                logprobs.append(lp.masked_fill(am[:, -logits_to_keep:] == 0, 0.0))
            entropies.append(ent)
            del hidden
            continue
        # the original (unfused) forward: TRL's fused LM head only runs with fused_lm_head=True
        logits = model(input_ids=ids, attention_mask=am, logits_to_keep=logits_to_keep + 1, use_cache=False).logits
        logits = logits[:, -(logits_to_keep + 1) : -1]
        if with_logprobs:
            ent, lp = _entropy_and_logprobs(logits, ids[:, -logits_to_keep:], temperature)
            logprobs.append(lp.float().masked_fill(am[:, -logits_to_keep:] == 0, 0.0))
        else:
            ent = _token_entropy(logits, temperature)
        entropies.append(ent.float())
        del logits
    if not entropies:
        empty = torch.zeros(0, logits_to_keep, dtype=torch.float32, device=input_ids.device)
        return (empty, empty.clone()) if with_logprobs else empty
    entropy = torch.cat(entropies, dim=0)
    return (entropy, torch.cat(logprobs, dim=0)) if with_logprobs else entropy


def check_heal_dataset(dataset, key: str, general_sources, *, name: str = "train_dataset",
                       check_sources: bool = True) -> None:
    """Fail early, when the trainer is built, on a dataset the EDA reward cannot use.

    ``ValueError`` naming the problem when ``dataset`` (a ``datasets.Dataset``, an
    ``IterableDataset`` whose columns are known, or a dict / ``DatasetDict`` of them) has no ``key``
    column (``heal_data_source_key``), listing the columns it has; and, with ``check_sources``, when
    a name in ``general_sources`` matches no row of that column (a typo would otherwise leave every
    EDA reward at 0, with one warning per step), listing the data sources the dataset has. Streaming
    datasets whose columns are unknown are not read: the per-batch check of the trainer still applies.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict) or (hasattr(dataset, "items") and not hasattr(dataset, "column_names")):
        for split, part in dataset.items():
            check_heal_dataset(part, key, general_sources, name=f"{name}[{split!r}]", check_sources=check_sources)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset without known features
        return
    if key not in columns:
        raise ValueError(
            f"HEALGRPOTrainer: {name} has no {key!r} column (heal_data_source_key), which tags each prompt as "
            f"target or general domain for the EDA reward; its columns are {list(columns)}. Add the column, or "
            "set heal_data_source_key to the column that holds each row's data source"
        )
    if not check_sources or not hasattr(dataset, "unique"):
        return
    present = sorted({str(v) for v in dataset.unique(key)})
    unknown = [s for s in general_sources if str(s) not in present]
    if unknown:
        shown = present if len(present) <= 20 else present[:20] + [f"... ({len(present)} in all)"]
        raise ValueError(
            f"HEALGRPOTrainer: heal_general_sources {unknown} match no row of {name}'s {key!r} column, whose data "
            f"sources are {shown}. Every name must be a data source of the training data (check the spelling); "
            "with no general row in a batch every EDA reward is 0"
        )


def _eda_placeholder(prompts, completions, **kwargs):
    """Stand-in reward function for the ``eda`` column; the trainer overwrites the column with
    the EDA reward after all reward functions ran (EDA needs the whole gathered batch)."""
    return [None] * len(prompts)


_eda_placeholder.__name__ = EDA_REWARD_NAME


class HEALGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` that adds ``heal_weight * r_EDA`` to the rewards before advantages.

    Use it exactly like ``GRPOTrainer`` with a :class:`HEALGRPOConfig` (or a plain
    ``GRPOConfig`` plus ``heal_config=heal.reward.EDAConfig(...)``) and a dataset with a
    ``data_source`` column (name: ``heal_data_source_key``); building the trainer fails with a
    ``ValueError`` when a dataset lacks that column or a general source matches no training row
    (:func:`check_heal_dataset`)::

        trainer = HEALGRPOTrainer(
            model=model, reward_funcs=accuracy_reward, train_dataset=dataset,
            args=HEALGRPOConfig(output_dir="out", heal_general_sources=["commonsense_qa"]),
        )
        trainer.train()

    After each scored batch, :attr:`heal_last_batch` holds (detached, on the CPU) what the EDA step
    used: ``entropy`` and ``mask`` ``[B, T]`` (this process's rows), ``entropy_pass`` (a key of
    :data:`ENTROPY_SOURCES`), ``input_ids`` / ``attention_mask`` / ``logits_to_keep`` of the
    prompt + completion batch (what an entropy forward runs on), and the gathered ``data_sources``,
    ``uids``, ``eda_reward``, ``metrics``. :attr:`heal_capture_blocked` says why completions are not
    captured during generation in this setting (None when they are).
    """

    def __init__(self, model, reward_funcs=None, args: Optional[GRPOConfig] = None, *rest, heal_config=None, **kwargs):
        if heal_config is not None:
            heal_config.validate()
            eda_config = heal_config
        elif isinstance(args, HEALGRPOConfig):
            eda_config = args.heal_eda_config()
        else:
            raise ValueError(
                "HEALGRPOTrainer needs the HEAL options: pass args=HEALGRPOConfig(..., heal_general_sources=[...]) "
                "or heal_config=heal.reward.EDAConfig(...)"
            )
        if eda_config.entropy_source != "actor":
            raise ValueError(
                f"entropy_source={eda_config.entropy_source!r} is not available with TRL (its generation returns no "
                "top-k log-probs); use 'actor' (exact entropies from the policy's forward)"
            )
        # the datasets are known now: a missing data_source column or a misspelt general source is an
        # error here, before the model is prepared, not at the first training step
        key = getattr(args, "heal_data_source_key", "data_source")
        train_dataset = rest[0] if len(rest) > 0 else kwargs.get("train_dataset")
        eval_dataset = rest[1] if len(rest) > 1 else kwargs.get("eval_dataset")
        check_heal_dataset(train_dataset, key, eda_config.general_sources, name="train_dataset")
        check_heal_dataset(eval_dataset, key, eda_config.general_sources, name="eval_dataset", check_sources=False)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.heal_config = eda_config
        self.heal_data_source_key = getattr(self.args, "heal_data_source_key", "data_source")
        self.heal_entropy_batch_size = getattr(self.args, "heal_entropy_batch_size", None)
        # One more reward column, filled after the gather (the way TRL adds environment rewards).
        self.reward_funcs.append(_eda_placeholder)
        self.reward_func_names.append(EDA_REWARD_NAME)
        self.reward_processing_classes.append(None)
        self.reward_weights = torch.cat(
            [self.reward_weights, torch.tensor([float(eda_config.weight)], dtype=self.reward_weights.dtype)]
        )
        self._heal_reward_index = len(self.reward_funcs) - 1
        if getattr(self.args, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
            warnings.warn(
                "HEALGRPOTrainer: multi_objective_aggregation="
                f"{self.args.multi_objective_aggregation!r} normalises r_EDA separately from the accuracy reward; "
                "the paper's r = r_acc + w * r_EDA is multi_objective_aggregation='sum_then_normalize'",
                stacklevel=2,
            )
        self.heal_high_entropy_scope = getattr(self.args, "heal_high_entropy_scope", "batch")
        self._heal_batch_he = self.top_entropy_quantile < 1.0 and self.heal_high_entropy_scope == "batch"
        if self._heal_batch_he and (
            self.num_iterations != 1 or self.args.steps_per_generation > self.args.gradient_accumulation_steps
        ):
            raise ValueError(
                "heal_high_entropy_scope='batch' takes the top_entropy_quantile threshold over the whole generation "
                "batch from the entropies computed when it is scored, which equal the loss's entropies only when "
                f"the update is on-policy; here num_iterations={self.num_iterations}, steps_per_generation="
                f"{self.args.steps_per_generation}, gradient_accumulation_steps={self.args.gradient_accumulation_steps} "
                "(need num_iterations=1 and steps_per_generation <= gradient_accumulation_steps). Set "
                "heal_high_entropy_scope='micro_batch' for TRL's per-loss-call rule"
            )
        self._heal_he_mask = None  # this process's batch-level 80/20 mask of the batch being scored
        self._heal_loss_he_mask = None  # ... and of the loss call in progress
        self._heal_rollout = None
        self._heal_share_old_logp_pass = False
        self._heal_shared = None
        self._heal_captured = None  # (entropy [B, T] masked after EOS, lengths, capture seconds)
        self.heal_capture_blocked = self._heal_capture_blocked_reason()
        if self.heal_capture_blocked and getattr(self.args, "heal_capture_entropies", True) and not self.use_vllm:
            warnings.warn(
                "HEALGRPOTrainer: completion entropies are not captured during generation "
                f"({self.heal_capture_blocked}); they take one extra no-grad forward per batch instead "
                "(eda/entropy_source=0)",
                stacklevel=2,
            )
        self.heal_last_batch: dict[str, Any] = {}

    def _heal_capture_blocked_reason(self) -> Optional[str]:
        """Why this trainer cannot capture entropies inside transformers ``generate`` (None: it can)."""
        if not getattr(self.args, "heal_capture_entropies", True):
            return "heal_capture_entropies=False"
        if self.use_vllm:
            return "vLLM generation (TRL builds the engine without logits processors)"
        if getattr(self, "use_transformers_continuous_batching", False):
            return "use_transformers_continuous_batching (generate_batch takes no logits processor)"
        if getattr(self, "rollout_func", None) is not None:
            return "a custom rollout_func generates"
        if getattr(self, "tools", None):
            return "tool calling (multi-turn generation)"
        if getattr(self, "_is_vlm", False):
            return "a vision-language model"
        model = self.accelerator.unwrap_model(self.model)
        changed = logits_changed_before_capture(self.generation_config, getattr(model, "generation_config", None))
        if changed:
            return (
                f"generation options {changed} change the logits before a user logits processor sees them, so the "
                "captured distribution would not be the policy's softmax(z / T)"
            )
        return None

    # -- capture what generation produced (token ids, tool masks) ---------------------------------
    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        prompt_ids, completion_ids, tool_mask = out[0], out[1], out[2]
        self._heal_rollout = (prompt_ids, completion_ids, tool_mask)
        return out

    # -- capture the entropies while transformers generate samples -----------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self._heal_captured = None
        if (
            self.heal_capture_blocked is not None
            or self._heal_share_old_logp_pass  # TRL's old-log-prob pass will give them at no cost
            or images is not None
            or multimodal_fields
        ):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        # TRL 1.16's regular (transformers generate) text-only path, plus the logits processor.
        device = self.accelerator.device
        prompt_tensors = [torch.tensor(ids) for ids in prompt_ids]
        padded_ids = pad(
            prompt_tensors,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        attention_mask = pad(
            [torch.ones_like(t) for t in prompt_tensors],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        generate_inputs = {"input_ids": padded_ids, "attention_mask": attention_mask}
        generate_inputs = super(GRPOTrainer, self)._prepare_inputs(generate_inputs)  # as TRL's super()._prepare_inputs
        prompt_length = generate_inputs["input_ids"].size(1)
        capture = EntropyCapture(self.temperature, prompt_length)
        with (
            profiling_context(self, "transformers.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            prompt_completion_ids = unwrapped_model.generate(
                **generate_inputs,
                generation_config=self.generation_config,
                logits_processor=LogitsProcessorList([capture]),
            )
        completion_ids = prompt_completion_ids[:, prompt_length:]

        # Mask everything after the first EOS token (TRL's completion mask)
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=device))
        eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
        eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
        sequence_indices = torch.arange(is_eos.size(1), device=device).expand(is_eos.size(0), -1)
        completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
        entropy = capture.entropies()
        if entropy is not None and entropy.shape == completion_ids.shape:
            entropy = entropy.to(device).masked_fill(completion_mask == 0, 0.0)
            self._heal_captured = (entropy, completion_mask.sum(dim=1).tolist(), capture.time_s)
        completion_ids = [
            c[m].tolist() for c, m in zip(completion_ids.cpu(), completion_mask.bool().cpu(), strict=True)
        ]
        return completion_ids, None

    # -- share TRL's old-log-prob pass when it runs ---------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        # TRL runs a no-grad old-log-prob pass of the policy when generation and optimisation are
        # misaligned or vLLM importance sampling is on; HEAL then computes TRL's old log-probs and its
        # own entropies from that one forward (heal_kernels.entropy_and_logprobs) instead of two.
        generate_every = self.args.steps_per_generation * self.num_iterations
        self._heal_share_old_logp_pass = (
            self.args.gradient_accumulation_steps % generate_every != 0
            or (self.use_vllm and self.vllm_importance_sampling_correction)
        ) and not self.mask_truncated_completions
        self._heal_shared = None
        self._heal_captured = None
        self._heal_he_mask = None
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._heal_he_mask is not None:  # ride along with the batch's tensors into each loss call
                he = self._heal_he_mask
                width = output["completion_ids"].size(1)
                if he.size(1) < width:
                    he = torch.nn.functional.pad(he, (0, width - he.size(1)))
                output["heal_high_entropy_mask"] = he[:, :width].to(output["completion_ids"].device)
            return output
        finally:
            self._heal_share_old_logp_pass = False
            self._heal_shared = None
            self._heal_captured = None
            self._heal_he_mask = None

    # -- 80/20 over the whole batch (heal_high_entropy_scope="batch") ---------------------------------
    def _compute_loss(self, model, inputs):
        self._heal_loss_he_mask = inputs.get("heal_high_entropy_mask") if self._heal_batch_he else None
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._heal_loss_he_mask = None

    def get_high_entropy_mask(self, entropies, mask, threshold):
        if self._heal_loss_he_mask is not None:
            return self._heal_loss_he_mask.bool() & mask.bool()
        return super().get_high_entropy_mask(entropies, mask, threshold)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **kwargs
    ):
        if (
            self._heal_share_old_logp_pass
            and self._heal_captured is None
            and model is self.model
            and not torch.is_grad_enabled()
            and not compute_entropy
            and not compute_aux_loss
            and all(v is None for v in kwargs.values())  # text-only
        ):
            self._heal_share_old_logp_pass = False  # the first such call is the old-log-prob pass
            t0 = time.perf_counter()
            with self.accelerator.autocast():
                entropy, logps = completion_entropies(
                    model, input_ids, attention_mask, logits_to_keep, self.temperature, batch_size,
                    with_logprobs=True,
                )
            self._heal_shared = (input_ids, attention_mask, logits_to_keep, entropy, time.perf_counter() - t0)
            return logps, None, None
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss, **kwargs
        )

    def _heal_local_entropies(self, completion_ids_list):
        """This process's ``[n, T]`` completion entropies and masks (T = longest completion)."""
        if self._heal_rollout is None:
            raise RuntimeError("HEALGRPOTrainer: no generation captured before the reward step")
        prompt_ids_list, captured_completions, tool_mask_list = self._heal_rollout
        if len(captured_completions) != len(completion_ids_list):
            raise RuntimeError("HEALGRPOTrainer: captured completions do not match the scored batch")
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompt_ids = pad(
            [torch.as_tensor(ids, dtype=torch.long) for ids in prompt_ids_list],
            padding_value=pad_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        prompt_mask = pad(
            [torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids_list],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        # a completion of length 0 still needs one column so the forward has a position to score
        completion_ids = pad(
            [torch.as_tensor(list(ids) or [pad_id], dtype=torch.long) for ids in completion_ids_list],
            padding_value=pad_id,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        # attention over every generated token (as TRL's log-prob pass); EDA only over model tokens
        lengths = torch.tensor([len(ids) for ids in completion_ids_list], device=device)
        positions = torch.arange(completion_ids.size(1), device=device)
        completion_mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()
        eda_mask = completion_mask
        if tool_mask_list is not None:
            tool_mask = pad(
                [torch.as_tensor(m, dtype=torch.long) for m in tool_mask_list] or [torch.ones(1, dtype=torch.long)],
                padding_value=1,
                padding_side="right",
                pad_to_multiple_of=self.pad_to_multiple_of,
            ).to(device)
            width = min(tool_mask.size(1), completion_mask.size(1))
            eda_mask = completion_mask.clone()
            eda_mask[:, :width] *= tool_mask[:, :width]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        captured, self._heal_captured = self._heal_captured, None
        if captured is not None:
            if captured[1] == lengths.tolist():
                entropy = torch.zeros(completion_ids.shape, dtype=torch.float32, device=device)
                width = min(logits_to_keep, captured[0].size(1))
                entropy[:, :width] = captured[0][:, :width].to(device)
                return entropy, eda_mask, input_ids, attention_mask, logits_to_keep, "generate", captured[2]
            warnings.warn(
                "HEALGRPOTrainer: the entropies captured during generation do not match the scored completions' "
                "lengths; computing them with an extra forward instead",
                stacklevel=2,
            )
        shared = self._heal_shared
        if (
            shared is not None
            and shared[2] == logits_to_keep
            and torch.equal(shared[0], input_ids)
            and torch.equal(shared[1].to(attention_mask.dtype), attention_mask)
        ):
            return shared[3], eda_mask, input_ids, attention_mask, logits_to_keep, "old_logp_pass", shared[4]
        mode = "train" if self.model.training else "eval"
        batch_size = self.heal_entropy_batch_size or (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        t0 = time.perf_counter()
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with self.accelerator.autocast():
                entropy = completion_entropies(
                    self.model, input_ids, attention_mask, logits_to_keep, self.temperature, batch_size
                )
        return entropy, eda_mask, input_ids, attention_mask, logits_to_keep, "extra_forward", time.perf_counter() - t0

    # -- the reward step ----------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from heal.reward import eda_step
        from heal.scoring import pop_error_metrics

        mode = "train" if self.model.training else "eval"
        key = self.heal_data_source_key
        missing = [i for i, x in enumerate(inputs) if key not in x]
        if missing:
            raise ValueError(
                f"HEALGRPOTrainer: the dataset needs a {key!r} column (heal_data_source_key) tagging each prompt's "
                f"data source; row {missing[0]} of the batch has none"
            )
        if "image" in inputs[0] or "images" in inputs[0]:
            raise ValueError("HEALGRPOTrainer supports text-only prompts (the batch has an image column)")

        entropy, mask, input_ids, attention_mask, logits_to_keep, entropy_pass, t_forward = self._heal_local_entropies(
            completion_ids_list
        )

        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # responses heal.scoring.compute_score could not judge (scored 0, reason counted in this process)
        scoring_errors = pop_error_metrics()

        # EDA looks for neighbours across the whole batch: gather like TRL gathers the rewards
        ent_all = self.accelerator.gather(self.accelerator.pad_across_processes(entropy, dim=1, pad_index=0.0))
        mask_all = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1, pad_index=0))
        data_sources = [str(s) for s in gather_object([x[key] for x in inputs])]
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        # rows of a GRPO group are contiguous in the gathered batch (TRL's advantages use view(-1, G))
        uids = [str(i // num_generations) for i in range(len(data_sources))]
        if rewards_per_func.size(0) != len(data_sources) or ent_all.size(0) != len(data_sources):
            raise RuntimeError("HEALGRPOTrainer: gathered rewards, entropies and data sources disagree in size")

        result, metrics = eda_step(ent_all.float(), mask_all, data_sources, uids, self.heal_config,
                                   num_threads=getattr(self.args, "heal_eda_threads", None))
        if self._heal_batch_he and mode == "train":
            # TRL's quantile rule, over every completion token of the generation batch (all processes)
            valid_all = ent_all[mask_all.bool()].float()
            if valid_all.numel():
                threshold = torch.quantile(valid_all, 1 - self.top_entropy_quantile)
                self._heal_he_mask = (entropy.float() >= threshold.to(entropy.device)) & mask.bool()
                metrics["heal/high_entropy_threshold"] = float(threshold)
            else:
                self._heal_he_mask = torch.zeros_like(mask, dtype=torch.bool)
        eda_reward = torch.as_tensor(result.reward, dtype=rewards_per_func.dtype).to(rewards_per_func.device)
        rewards_per_func[:, self._heal_reward_index] = eda_reward

        metrics = dict(metrics)
        metrics.update(scoring_errors)
        metrics["eda/entropy_source"] = float(ENTROPY_SOURCES[entropy_pass])
        metrics["eda/entropy_forward_time_s"] = 0.0 if entropy_pass == "generate" else t_forward
        metrics["eda/capture_time_s"] = t_forward if entropy_pass == "generate" else 0.0
        metrics["eda/entropy_shared_pass"] = 1.0 if entropy_pass == "old_logp_pass" else 0.0
        for name, value in metrics.items():
            self._metrics[mode][name].append(float(value))
        dump = getattr(self.args, "heal_rollout_dump", None)
        if dump and mode == "train" and self.accelerator.is_main_process:
            self._heal_dump_rollouts(dump, ent_all, mask_all, data_sources, uids, rewards_per_func, eda_reward, result)
        self.heal_last_batch = {
            "entropy": entropy.detach().cpu(),
            "mask": mask.detach().cpu(),
            "input_ids": input_ids.detach().cpu(),
            "attention_mask": attention_mask.detach().cpu(),
            "logits_to_keep": logits_to_keep,
            "entropy_pass": entropy_pass,
            "data_sources": data_sources,
            "uids": uids,
            "eda_reward": eda_reward.detach().cpu(),
            "rewards_per_func": rewards_per_func.detach().cpu().clone(),
            "metrics": metrics,
        }
        return rewards_per_func

    def _heal_dump_rollouts(self, path, entropy, mask, data_sources, uids, rewards_per_func, eda_reward, result):
        """Append the gathered batch to the rollout dump ``path`` (main process only)."""
        from heal.analysis.logs import append_rollout_dump

        others = [i for i in range(rewards_per_func.size(1)) if i != self._heal_reward_index]
        weights = self.reward_weights[others].to(rewards_per_func.device, rewards_per_func.dtype)
        acc = (rewards_per_func[:, others] * weights).nansum(dim=1).detach().float().cpu()
        ent = entropy.detach().float().cpu()
        valid = mask.detach().cpu().bool()
        append_rollout_dump(
            path,
            int(self.state.global_step) + 1,  # generation runs before the step's optimizer update
            [ent[i][valid[i]] for i in range(ent.size(0))],
            data_sources,
            uid=uids,
            acc=acc,
            eda_reward=eda_reward.detach().float().cpu(),
            s_target=torch.as_tensor(result.s_target).detach().float().cpu(),
            s_general=torch.as_tensor(result.s_general).detach().float().cpu(),
        )
