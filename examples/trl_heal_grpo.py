"""HEAL-GRPO with TRL, end to end on the CPU: a tiny random Qwen2, a character tokenizer, a mixed
target (toy arithmetic) / general (next letter) dataset tagged by a ``data_source`` column, an
exact-answer reward, and HEAL's EDA reward added before GRPO's advantages.

    python examples/trl_heal_grpo.py --steps 4 --output-dir /tmp/heal-trl

Everything is built in code (no model hub, no network). With a real model, swap ``model`` and
``tokenizer`` for ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``toy_dataset`` for your data
(keep a ``data_source`` column and list the general sources in ``heal_general_sources``).
Add ``--top-entropy-quantile 0.2`` to combine HEAL with TRL's 80/20 high-entropy-token rule.
Several processes: ``torchrun --standalone --nproc_per_node 2 examples/trl_heal_grpo.py`` (EDA
then compares trajectories across the whole gathered batch).

Each step's completions (entropies, rewards) go to ``<output-dir>/rollouts.jsonl`` and the metrics
to ``<output-dir>/checkpoint-<steps>/trainer_state.json``; the run ends by printing the two
``heal plot`` commands that draw them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (default: 4)")
    p.add_argument("--output-dir", default="heal-trl-output", help="TRL output directory (default: heal-trl-output)")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt, G (default: 4)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step (default: 4)")
    p.add_argument("--max-completion-length", type=int, default=24, help="max new tokens (default: 24)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    p.add_argument("--heal-weight", type=float, default=1.0, help="w in r = r_acc + w * r_EDA (default: 1.0)")
    p.add_argument("--heal-min-length", type=int, default=8, help="EDA min completion length (default: 8)")
    p.add_argument(
        "--top-entropy-quantile",
        type=float,
        default=1.0,
        help="TRL's 80/20 rule: keep the top-rho entropy tokens in the loss (0.2 = 80/20; default 1.0 = off)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from heal.integrations.trl import HEALGRPOConfig, HEALGRPOTrainer
    from heal.integrations.trl.toy import GENERAL_SOURCE, char_tokenizer, exact_answer_reward, tiny_causal_lm, toy_dataset

    torch.manual_seed(args.seed)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=args.seed)
    dataset = toy_dataset(n=max(16, 2 * args.steps * args.prompts_per_step), seed=args.seed)

    config = HEALGRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        learning_rate=1e-3,
        beta=0.0,
        top_entropy_quantile=args.top_entropy_quantile,
        shuffle_dataset=False,  # the toy dataset alternates target/general: every batch holds both
        logging_steps=1,
        save_strategy="steps",  # one checkpoint at the end: its trainer_state.json feeds heal plot curves
        save_steps=args.steps,
        save_only_model=True,
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=False,
        # HEAL
        heal_general_sources=[GENERAL_SOURCE],
        heal_weight=args.heal_weight,
        heal_min_length=args.heal_min_length,
        heal_rollout_dump=os.path.join(args.output_dir, "rollouts.jsonl"),
    )
    trainer = HEALGRPOTrainer(
        model=model,
        reward_funcs=exact_answer_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()

    keys = [
        "reward",
        "rewards/exact_answer_reward/mean",
        "rewards/eda/mean",
        "eda/rate_target",
        "eda/rate_general",
        "eda/entropy_mean_target",
        "eda/entropy_mean_general",
        "eda/s_intra_mean",
        "eda/s_inter_mean",
        "eda/time_s",
        "eda/entropy_forward_time_s",
        "entropy",
    ]
    rows = [h for h in trainer.state.log_history if "eda/rate_target" in h]
    if not trainer.is_world_process_zero():  # under torchrun, only rank 0 prints
        return 0 if rows else 1
    print("\nHEAL-GRPO metrics per step")
    print(f"{'metric':34s}" + "".join(f"{'step ' + str(h.get('step', i + 1)):>12s}" for i, h in enumerate(rows)))
    for k in keys:
        cells = "".join(f" {h.get(k, math.nan):11.4g}" for h in rows)
        print(f"{k:34s}{cells}")
    state = os.path.join(args.output_dir, f"checkpoint-{trainer.state.global_step}", "trainer_state.json")
    print("\nPlots:")
    print(f"  heal plot curves {state}")
    print(f"  heal plot heatmap {config.heal_rollout_dump}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
