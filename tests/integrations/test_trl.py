"""HEAL-GRPO in TRL: two real training steps of a tiny random Qwen2 on the CPU.

Checks that (a) the EDA reward reached TRL's advantages, (b) the weights changed, (c) the
entropies HEAL used equal a float64 reference computed from the model's own logits; plus the
config / input validation. Skipped when TRL is not installed.
"""

import os

import pytest
import torch

pytest.importorskip("trl")

from heal_kernels import reference  # noqa: E402

from heal.integrations.trl import HEALGRPOConfig, HEALGRPOTrainer, completion_entropies  # noqa: E402
from heal.integrations.trl.toy import (  # noqa: E402
    GENERAL_SOURCE,
    TARGET_SOURCE,
    char_tokenizer,
    exact_answer_reward,
    tiny_causal_lm,
    toy_dataset,
)
from heal.reward import EDAConfig  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NUM_GENERATIONS = 4
TEMPERATURE = 0.7
HEAL_WEIGHT = 1.5


def _config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4 * NUM_GENERATIONS,  # 4 prompts: 2 target + 2 general
        num_generations=NUM_GENERATIONS,
        max_completion_length=16,
        temperature=TEMPERATURE,
        learning_rate=1e-2,
        beta=0.0,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        heal_general_sources=[GENERAL_SOURCE],
        heal_weight=HEAL_WEIGHT,
        heal_min_length=3,
    )
    kwargs.update(overrides)
    return HEALGRPOConfig(**kwargs)


def _reference_entropies(model, input_ids, attention_mask, logits_to_keep):
    """Float64 entropies of the completion positions from the full (unsliced) logits."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, -(logits_to_keep + 1) : -1]
    return reference.token_entropy(logits.double(), TEMPERATURE)


def _grpo_advantages(rewards, group):
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    std = grouped.std(dim=1).repeat_interleave(group)
    return (rewards - mean) / (std + 1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real HEAL-GRPO steps; records every scored batch and the weights before/after."""
    tmp_path = tmp_path_factory.mktemp("trl")
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    trainer = HEALGRPOTrainer(
        model=model,
        reward_funcs=exact_answer_reward,
        args=_config(tmp_path, heal_rollout_dump=str(tmp_path / "dump" / "rollouts.jsonl")),
        train_dataset=toy_dataset(n=16, seed=0),
        processing_class=tokenizer,
    )
    records = []
    original = trainer._generate_and_score_completions

    def spy(batch):
        out = original(batch)
        last = dict(trainer.heal_last_batch)
        # the weights that produced these entropies: no optimizer step has run since
        last["reference_entropy"] = _reference_entropies(
            trainer.model, last["input_ids"], last["attention_mask"], last["logits_to_keep"]
        )
        last["advantages"] = out["advantages"].detach().cpu().clone()
        last["global_step"] = trainer.state.global_step
        records.append(last)
        return out

    trainer._generate_and_score_completions = spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, records, before, after


def test_two_steps_ran_and_logged_eda_metrics(trained):
    trainer, records, _, _ = trained
    assert trainer.state.global_step == 2
    assert len(records) == 2
    logged = [h for h in trainer.state.log_history if "eda/rate_target" in h]
    assert len(logged) == 2
    for h in logged:
        for key in ("eda/rate_general", "eda/entropy_forward_time_s", "eda/time_s", "rewards/eda/mean"):
            assert key in h
        assert 0.0 <= h["eda/rate_target"] <= 1.0


def test_eda_reward_reached_the_advantages(trained):
    trainer, records, _, _ = trained
    assert trainer.reward_func_names == ["exact_answer_reward", "eda"]
    assert trainer.reward_weights.tolist() == [1.0, HEAL_WEIGHT]
    saw_nonzero_eda = False
    for rec in records:
        rpf = rec["rewards_per_func"]
        eda = rec["eda_reward"]
        assert set(rec["data_sources"]) == {TARGET_SOURCE, GENERAL_SOURCE}
        assert torch.equal(rpf[:, 1], eda)
        assert set(eda.tolist()) <= {0.0, 1.0}
        shaped = rpf[:, 0] + HEAL_WEIGHT * eda
        expected = _grpo_advantages(shaped, NUM_GENERATIONS)
        torch.testing.assert_close(rec["advantages"], expected, rtol=1e-5, atol=1e-5)
        # EDA varies inside some group: accuracy alone would give different advantages there
        varies = eda.view(-1, NUM_GENERATIONS).std(dim=1) > 0
        if varies.any():
            saw_nonzero_eda = True
            acc_only = _grpo_advantages(rpf[:, 0].clone(), NUM_GENERATIONS)
            assert not torch.allclose(rec["advantages"], acc_only, atol=1e-3)
    assert saw_nonzero_eda, "precondition: the seeded batches must give EDA rewards that differ within a group"


def test_rollout_dump_per_step(trained):
    """heal_rollout_dump: one line per completion per step, entropies = the masked EDA input."""
    from heal.analysis.logs import load_rollout_dump

    trainer, records, _, _ = trained
    dump = load_rollout_dump(trainer.args.heal_rollout_dump)
    n = len(records[0]["data_sources"])
    assert len(dump) == sum(len(r["data_sources"]) for r in records) == 2 * n
    for k, rec in enumerate(records):
        rows = dump[k * n : (k + 1) * n]
        assert {r["step"] for r in rows} == {rec["global_step"] + 1}  # generated before that optimizer step
        assert [r["data_source"] for r in rows] == rec["data_sources"]
        assert [r["uid"] for r in rows] == rec["uids"]
        mask = rec["mask"].bool()
        for i, r in enumerate(rows):
            torch.testing.assert_close(torch.tensor(r["entropy"]), rec["entropy"][i][mask[i]], rtol=0, atol=1e-6)
            assert r["eda_reward"] == float(rec["eda_reward"][i])
            assert r["acc"] == pytest.approx(float(rec["rewards_per_func"][i, 0]), abs=1e-6)
    assert [r["step"] for r in dump[::n]] == [1, 2]
    # the same step axis as the eda/* metrics TRL logs (heal plot curves on trainer_state.json)
    logged = sorted(h["step"] for h in trainer.state.log_history if "eda/rate_target" in h)
    assert logged == [1, 2]


def test_weights_changed(trained):
    _, _, before, after = trained
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "no parameter moved after two optimizer steps"


def test_entropies_match_float64_reference(trained):
    _, records, _, _ = trained
    for rec in records:
        # TRL's default on-policy step has no old-logp pass: the entropies are captured while generate samples
        # (tests/integrations/test_trl_entropy_capture.py compares them with the extra-forward path)
        assert rec["entropy_pass"] == "generate"
        mask = rec["mask"].bool()
        assert mask.any()
        got = rec["entropy"]
        assert got.dtype == torch.float32
        ref = rec["reference_entropy"]
        torch.testing.assert_close(got[mask].double(), ref[mask], rtol=1e-5, atol=2e-5)
        # the entropy forward and TRL's batch agree on which tokens are completions
        assert got.shape == mask.shape == ref.shape


def test_shared_old_logp_pass(tmp_path):
    """With num_iterations=2 TRL runs its old-log-prob pass; HEAL computes TRL's old log-probs and
    its entropies in that one forward. Both must equal TRL's own fused-LM-head numbers."""
    from trl import GRPOTrainer

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    trainer = HEALGRPOTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        reward_funcs=exact_answer_reward,
        args=_config(
            tmp_path, num_iterations=2, max_steps=1, per_device_train_batch_size=2 * NUM_GENERATIONS,
            top_entropy_quantile=0.2,  # TRL's 80/20 rule composes with HEAL
            heal_high_entropy_scope="micro_batch",  # num_iterations=2 is off-policy: the batch rule refuses it
        ),
        train_dataset=toy_dataset(n=8, seed=0),
        processing_class=tokenizer,
    )
    records = []
    original = trainer._generate_and_score_completions
    extra_forward = []
    original_forward = trainer._heal_local_entropies

    def count_forward(*a, **k):
        out = original_forward(*a, **k)
        extra_forward.append(out[5])
        return out

    def spy(batch):
        out = original(batch)
        last = dict(trainer.heal_last_batch)
        with torch.no_grad():  # TRL's own fused-LM-head pass on the same tensors
            trl_logps, trl_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, trainer.model, last["input_ids"], last["attention_mask"], last["logits_to_keep"],
                compute_entropy=True,
            )
        last.update(old=out["old_per_token_logps"].detach().clone(), trl_logps=trl_logps, trl_entropy=trl_entropy)
        last["reference_entropy"] = _reference_entropies(
            trainer.model, last["input_ids"], last["attention_mask"], last["logits_to_keep"]
        )
        records.append(last)
        return out

    trainer._heal_local_entropies = count_forward
    trainer._generate_and_score_completions = spy
    trainer.train()
    assert len(records) == 1 and extra_forward == ["old_logp_pass"]
    rec = records[0]
    assert rec["entropy_pass"] == "old_logp_pass"
    assert rec["metrics"]["eda/entropy_shared_pass"] == 1.0
    mask = rec["mask"].bool()
    torch.testing.assert_close(rec["old"], rec["trl_logps"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rec["entropy"][mask], rec["trl_entropy"][mask], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rec["entropy"][mask].double(), rec["reference_entropy"][mask], rtol=1e-5, atol=2e-5)


def test_completion_entropies_left_padded_prompts():
    torch.manual_seed(1)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=1).eval()
    pad_id = tokenizer.pad_token_id
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 12, 13], [14, 15]]
    width_p = max(map(len, prompts))
    width_c = max(map(len, completions))
    ids = torch.full((2, width_p + width_c), pad_id)
    am = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(c)] = torch.tensor(c)
        am[i, width_p - len(p) : width_p + len(c)] = 1
    got = completion_entropies(model, ids, am, width_c, temperature=0.5, batch_size=1)
    ref = _reference_entropies_at(model, ids, am, width_c, 0.5)
    assert got.shape == (2, width_c)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        completion_entropies(model, ids, am, ids.size(1))
    with pytest.raises(ValueError, match="temperature"):
        completion_entropies(model, ids, am, 2, temperature=0.0)


def _reference_entropies_at(model, ids, am, keep, temperature):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    return reference.token_entropy(logits[:, -(keep + 1) : -1].double(), temperature)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="heal_general_sources"):
        _config(tmp_path, heal_general_sources=[])
    with pytest.raises(ValueError, match="metric"):
        _config(tmp_path, heal_metric="cosine")
    with pytest.raises(ValueError, match="heal_entropy_batch_size"):
        _config(tmp_path, heal_entropy_batch_size=0)
    with pytest.raises(ValueError, match="heal_rollout_dump"):
        _config(tmp_path, heal_rollout_dump="")
    with pytest.raises(ValueError, match="heal_rollout_dump"):
        _config(tmp_path, heal_rollout_dump=str(tmp_path))
    cfg = _config(tmp_path, heal_general_sources="a,b").heal_eda_config()
    assert cfg.general_sources == ("a", "b") and cfg.weight == HEAL_WEIGHT and cfg.min_length == 3


def test_trainer_needs_heal_options(tmp_path):
    from trl import GRPOConfig

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer)
    plain = GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, num_generations=2,
                       per_device_train_batch_size=2)
    common = dict(model=model, reward_funcs=exact_answer_reward, train_dataset=toy_dataset(4),
                  processing_class=tokenizer)
    with pytest.raises(ValueError, match="HEALGRPOConfig"):
        HEALGRPOTrainer(args=plain, **common)
    with pytest.raises(ValueError, match="entropy_source"):
        HEALGRPOTrainer(args=plain, heal_config=EDAConfig(general_sources=("x",), entropy_source="rollout_topk"),
                        **common)
    trainer = HEALGRPOTrainer(args=plain, heal_config=EDAConfig(general_sources=(GENERAL_SOURCE,), weight=0.5),
                              **common)
    assert trainer.reward_weights.tolist() == [1.0, 0.5]


def test_missing_data_source_column(tmp_path):
    """Found when the trainer is built (the dataset is known then), not at the first training step."""
    tokenizer = char_tokenizer()
    common = dict(model=tiny_causal_lm(tokenizer), reward_funcs=exact_answer_reward,
                  args=_config(tmp_path, max_steps=1, per_device_train_batch_size=NUM_GENERATIONS,
                               max_completion_length=4), processing_class=tokenizer)
    with pytest.raises(ValueError) as err:
        HEALGRPOTrainer(train_dataset=toy_dataset(n=4).remove_columns("data_source"), **common)
    assert str(err.value) == (
        "HEALGRPOTrainer: train_dataset has no 'data_source' column (heal_data_source_key), which tags each prompt "
        "as target or general domain for the EDA reward; its columns are ['prompt', 'answer']. Add the column, or "
        "set heal_data_source_key to the column that holds each row's data source")
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\] has no 'data_source' column"):
        HEALGRPOTrainer(train_dataset=toy_dataset(n=4),
                        eval_dataset={"held_out": toy_dataset(n=4).remove_columns("data_source")}, **common)
    # a renamed column, named by heal_data_source_key, is fine
    renamed = toy_dataset(n=4).rename_column("data_source", "domain")
    HEALGRPOTrainer(train_dataset=renamed, **{**common, "args": _config(
        tmp_path, max_steps=1, per_device_train_batch_size=NUM_GENERATIONS, heal_data_source_key="domain")})


def test_unknown_general_source_fails_when_the_trainer_is_built(tmp_path):
    """A misspelt heal_general_sources entry would leave every EDA reward at 0 (one warning per step)."""
    tokenizer = char_tokenizer()
    common = dict(model=tiny_causal_lm(tokenizer), reward_funcs=exact_answer_reward, train_dataset=toy_dataset(n=8),
                  processing_class=tokenizer)
    typo = "toy_leters"
    with pytest.raises(ValueError) as err:
        HEALGRPOTrainer(args=_config(tmp_path, heal_general_sources=[typo]), **common)
    msg = str(err.value)
    assert f"heal_general_sources ['{typo}'] match no row of train_dataset's 'data_source' column" in msg
    assert f"['{GENERAL_SOURCE}', '{TARGET_SOURCE}']" in msg
    with pytest.raises(ValueError, match=r"heal_general_sources \['nope'\]"):  # one good name does not hide a bad one
        HEALGRPOTrainer(args=_config(tmp_path, heal_general_sources=[GENERAL_SOURCE, "nope"]), **common)
    with pytest.raises(ValueError, match="match no row"):  # the heal_config= route too
        from trl import GRPOConfig

        plain = GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, num_generations=2,
                           per_device_train_batch_size=2)
        HEALGRPOTrainer(args=plain, heal_config=EDAConfig(general_sources=(typo,)), **common)


def test_scoring_errors_are_logged(tmp_path):
    """A response heal.scoring could not judge scores 0 and its reason reaches the trainer's metrics."""
    from heal import scoring

    def always_raises(solution_str, ground_truth, extra_info=None):
        raise RecursionError("a response nested too deep")

    scoring.register_checker("test_raises", always_raises)
    scoring.register_data_source("test_raises_source", "test_raises")

    def scored(prompts, completions, answer, **kwargs):
        return [scoring.compute_score("test_raises_source", str(c), str(a)) for c, a in zip(completions, answer)]

    tokenizer = char_tokenizer()
    trainer = HEALGRPOTrainer(
        model=tiny_causal_lm(tokenizer),
        reward_funcs=[exact_answer_reward, scored],
        args=_config(tmp_path, max_steps=1, per_device_train_batch_size=NUM_GENERATIONS, max_completion_length=4),
        train_dataset=toy_dataset(n=4),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "scoring/errors/test_raises/RecursionError" in h]
    assert logged and logged[0]["scoring/errors/test_raises/RecursionError"] == NUM_GENERATIONS


_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
import torch
from heal.integrations.trl import HEALGRPOConfig, HEALGRPOTrainer
from heal.integrations.trl.toy import GENERAL_SOURCE, char_tokenizer, exact_answer_reward, tiny_causal_lm, toy_dataset

out_dir = sys.argv[1]
tokenizer = char_tokenizer()
config = HEALGRPOConfig(
    output_dir=out_dir, max_steps=1, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
    temperature=0.7, beta=0.0, shuffle_dataset=False, save_strategy="no", report_to="none", bf16=False,
    use_cpu=True, seed=0, disable_tqdm=True, heal_general_sources=[GENERAL_SOURCE], heal_min_length=2,
)
trainer = HEALGRPOTrainer(model=tiny_causal_lm(tokenizer), reward_funcs=exact_answer_reward, args=config,
                          train_dataset=toy_dataset(n=16), processing_class=tokenizer)
trainer.train()
b = trainer.heal_last_batch
rank = trainer.accelerator.process_index
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"num_processes": trainer.accelerator.num_processes, "local_rows": int(b["entropy"].shape[0]),
               "data_sources": b["data_sources"], "eda_reward": b["eda_reward"].tolist(),
               "rewards_per_func": b["rewards_per_func"].tolist()}, f)
"""


def test_two_processes_gather_the_whole_batch(tmp_path):
    """Under torchrun (2 CPU processes, gloo) EDA sees the gathered batch and every rank agrees."""
    import json
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    script = tmp_path / "two_proc.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["num_processes"] == 2
        assert r["local_rows"] == 8
        assert len(r["data_sources"]) == 16  # both processes' completions
        assert set(r["data_sources"]) == {TARGET_SOURCE, GENERAL_SOURCE}
        assert [row[1] for row in r["rewards_per_func"]] == r["eda_reward"]
    assert ranks[0]["eda_reward"] == ranks[1]["eda_reward"]
    assert ranks[0]["data_sources"] == ranks[1]["data_sources"]


def test_completion_entropies_from_hidden_states_match_logits_path(monkeypatch):
    """A plain linear head: entropies and log-probs come from the hidden states through
    heal_kernels.linear_entropy_and_logprobs, equal to the logits path's (and to the reference)."""
    import heal_kernels
    from heal.integrations.trl import trainer as trainer_mod

    torch.manual_seed(2)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=2).eval()
    assert trainer_mod._linear_head(model) is not None
    ids = torch.randint(3, 20, (3, 9))
    am = torch.ones_like(ids)
    am[0, :2] = 0
    calls = []
    real = heal_kernels.linear_entropy_and_logprobs

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(heal_kernels, "linear_entropy_and_logprobs", spy)
    ent, lp = completion_entropies(model, ids, am, 4, temperature=0.7, batch_size=2, with_logprobs=True)
    assert calls and calls[0][1] == 4, calls
    monkeypatch.setattr(trainer_mod, "_linear_head", lambda m: None)
    ent_l, lp_l = completion_entropies(model, ids, am, 4, temperature=0.7, batch_size=2, with_logprobs=True)
    torch.testing.assert_close(ent, ent_l, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lp, lp_l, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), _reference_entropies_at(model, ids, am, 4, 0.7), rtol=1e-5, atol=2e-5)


def test_batch_level_high_entropy_mask(tmp_path):
    """top_entropy_quantile=0.2 with heal_high_entropy_scope='batch' (default): every loss call uses one
    threshold, the 80% quantile of the whole generation batch's completion-token entropies."""
    from trl import GRPOTrainer

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    trainer = HEALGRPOTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        reward_funcs=exact_answer_reward,
        args=_config(tmp_path, max_steps=1, per_device_train_batch_size=2 * NUM_GENERATIONS,
                     gradient_accumulation_steps=2, top_entropy_quantile=0.2),
        train_dataset=toy_dataset(n=8, seed=0),
        processing_class=tokenizer,
    )
    assert trainer._heal_batch_he
    calls = []
    original = trainer.get_high_entropy_mask

    def spy(entropies, mask, threshold):
        got = original(entropies, mask, threshold)
        micro = GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, threshold)
        calls.append((entropies.detach().clone(), mask.clone(), got.clone(), micro.clone()))
        return got

    trainer.get_high_entropy_mask = spy
    trainer.train()
    last = trainer.heal_last_batch
    thr = last["metrics"]["heal/high_entropy_threshold"]
    valid = last["entropy"][last["mask"].bool()]
    assert thr == pytest.approx(float(torch.quantile(valid.float(), 0.8)), rel=1e-6)
    assert len(calls) == 2  # two loss calls over the one generation batch
    total = 0
    for ent, mask, got, micro in calls:
        want = (ent >= thr) & mask.bool()
        near = (ent - thr).abs() < 1e-4  # loss-time entropies are recomputed: ties at the threshold may flip
        assert torch.equal(got[~near], want[~near])
        total += int(got.sum())
    assert total == pytest.approx(int((valid >= thr).sum()), abs=2)
    print(f"TRL probe: batch rule {[int(c[2].sum()) for c in calls]}, micro-batch rule {[int(c[3].sum()) for c in calls]} "
          f"of {[int(c[1].sum()) for c in calls]} tokens")


def test_batch_level_high_entropy_mask_refuses_off_policy(tmp_path):
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="heal_high_entropy_scope='micro_batch'"):
        HEALGRPOTrainer(
            model=tiny_causal_lm(tokenizer, seed=0), reward_funcs=exact_answer_reward,
            args=_config(tmp_path, num_iterations=2, top_entropy_quantile=0.2),
            train_dataset=toy_dataset(n=8, seed=0), processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="heal_high_entropy_scope"):
        _config(tmp_path, heal_high_entropy_scope="global")
