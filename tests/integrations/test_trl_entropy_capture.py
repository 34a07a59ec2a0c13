"""HEAL-GRPO in TRL: completion entropies captured while transformers ``generate`` samples.

One real on-policy training step of a tiny random Qwen2 on the CPU, twice from the same seed: with
the capture (default) and with ``heal_capture_entropies=False`` (one extra no-grad forward). Checks
that (a) the captured entropies equal a float64 teacher-forced reference of the same completions,
masked after EOS exactly like TRL's completion mask, (b) the step runs no no-grad forward over the
full prompt + completion besides generation and training, (c) rewards and advantages are those of
the extra-forward path, (d) ``eda/entropy_source`` is logged. Skipped when TRL is not installed.
"""

import os
import warnings

import pytest
import torch

pytest.importorskip("trl")

from heal_kernels import reference  # noqa: E402

from heal.integrations.trl import HEALGRPOConfig, HEALGRPOTrainer  # noqa: E402
from heal.integrations.trl.capture import EntropyCapture, logits_changed_before_capture  # noqa: E402
from heal.integrations.trl.toy import (  # noqa: E402
    GENERAL_SOURCE,
    char_tokenizer,
    exact_answer_reward,
    tiny_causal_lm,
    toy_dataset,
)
from heal.integrations.trl.trainer import ENTROPY_SOURCES  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NUM_GENERATIONS = 4
TEMPERATURE = 0.7
MAX_COMPLETION = 14


def _config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2 * NUM_GENERATIONS,  # 2 prompts: 1 target + 1 general
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        top_k=8,  # sampling truncates; the entropies stay full-vocabulary (as the forward's)
        top_p=0.9,
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
        heal_min_length=2,
    )
    kwargs.update(overrides)
    return HEALGRPOConfig(**kwargs)


def _run_step(tmp_path, capture: bool):
    """One training step; returns what the step produced plus every decoder forward it ran."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    trainer = HEALGRPOTrainer(
        model=model,
        reward_funcs=exact_answer_reward,
        args=_config(tmp_path, heal_capture_entropies=capture),
        train_dataset=toy_dataset(n=8, seed=0),
        processing_class=tokenizer,
    )
    forwards = []  # (grad enabled, sequence length) of every forward of the decoder the trainer ran
    counting = [True]

    def count(module, args, kwargs):
        if not counting[0]:
            return
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        forwards.append((torch.is_grad_enabled(), int(x.shape[1])))

    handle = trainer.model.model.register_forward_pre_hook(count, with_kwargs=True)
    record = {}
    original = trainer._generate_and_score_completions

    def spy(batch):
        out = original(batch)
        last = dict(trainer.heal_last_batch)
        counting[0] = False  # the test's own reference forward is not the trainer's
        with torch.no_grad():  # float64 teacher-forced reference, same weights as generation
            logits = trainer.model(
                input_ids=last["input_ids"], attention_mask=last["attention_mask"], use_cache=False
            ).logits
        counting[0] = True
        keep = last["logits_to_keep"]
        last["reference_entropy"] = reference.token_entropy(logits[:, -(keep + 1) : -1].double(), TEMPERATURE)
        last["trl_completion_mask"] = out["completion_mask"].detach().cpu().clone()
        last["advantages"] = out["advantages"].detach().cpu().clone()
        record.update(last)
        return out

    trainer._generate_and_score_completions = spy
    try:
        trainer.train()
    finally:
        handle.remove()
    record["forwards"] = forwards
    record["log_history"] = list(trainer.state.log_history)
    return record


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    return _run_step(tmp_path_factory.mktemp("capture"), capture=True)


@pytest.fixture(scope="module")
def extra_forward(tmp_path_factory):
    return _run_step(tmp_path_factory.mktemp("extra"), capture=False)


def test_captured_entropies_equal_teacher_forced(captured):
    rec = captured
    assert rec["entropy_pass"] == "generate"
    mask = rec["mask"].bool()
    # TRL's completion mask (through the first EOS) is the mask of the captured entropies
    assert torch.equal(mask, rec["trl_completion_mask"].bool())
    lengths = mask.sum(dim=1)
    assert (lengths < mask.size(1)).any(), "precondition: some completion must stop at EOS before the longest"
    got = rec["entropy"]
    assert got.dtype == torch.float32 and got.shape == mask.shape
    torch.testing.assert_close(got[mask].double(), rec["reference_entropy"][mask], rtol=1e-5, atol=2e-5)
    # nothing filed after EOS (generate keeps stepping finished rows)
    assert torch.count_nonzero(got[~mask]) == 0


def test_no_extra_no_grad_forward(captured, extra_forward):
    """Generation runs the decoder on the prompt, then one token at a time; training runs it with grad
    on prompt + completion. The extra forward would be a no-grad pass over prompt + completion."""
    for rec, extra in ((captured, 0), (extra_forward, 1)):
        full = rec["input_ids"].size(1)
        prompt = full - rec["logits_to_keep"]
        no_grad_full = [f for f in rec["forwards"] if not f[0] and f[1] == full]
        assert len(no_grad_full) == extra, (rec["entropy_pass"], rec["forwards"])
        # everything else is generation (prefill of the prompt, then single tokens) or training
        others = [f for f in rec["forwards"] if f not in no_grad_full]
        assert all((not g and n in (prompt, 1)) or (g and n == full) for g, n in others), rec["forwards"]
        assert sum(1 for g, _ in others if g) == 1  # one training forward (one micro-batch)


def test_reward_unchanged_vs_extra_forward(captured, extra_forward):
    assert extra_forward["entropy_pass"] == "extra_forward"
    # same seed, same completions (the capture leaves sampling alone)
    assert torch.equal(captured["input_ids"], extra_forward["input_ids"])
    assert torch.equal(captured["mask"], extra_forward["mask"])
    assert torch.equal(captured["rewards_per_func"], extra_forward["rewards_per_func"])
    assert torch.equal(captured["eda_reward"], extra_forward["eda_reward"])
    torch.testing.assert_close(captured["advantages"], extra_forward["advantages"], rtol=0, atol=0)
    # the similarities behind r_EDA, not only its 0/1 outcome
    compared = 0
    for key, value in extra_forward["metrics"].items():
        if key.startswith(("eda/s_", "eda/entropy_mean_", "eda/rate_")):
            assert captured["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            compared += 1
    assert compared >= 8
    mask = captured["mask"].bool()
    torch.testing.assert_close(captured["entropy"][mask], extra_forward["entropy"][mask], rtol=1e-5, atol=2e-5)


def test_entropy_source_is_logged(captured, extra_forward):
    for rec, source in ((captured, "generate"), (extra_forward, "extra_forward")):
        logged = [h for h in rec["log_history"] if "eda/entropy_source" in h]
        assert len(logged) == 1
        assert logged[0]["eda/entropy_source"] == ENTROPY_SOURCES[source]
        assert rec["metrics"]["eda/entropy_source"] == ENTROPY_SOURCES[source]
    cap = [h for h in captured["log_history"] if "eda/entropy_source" in h][0]
    assert cap["eda/capture_time_s"] > 0 and cap["eda/entropy_forward_time_s"] == 0
    ext = [h for h in extra_forward["log_history"] if "eda/entropy_source" in h][0]
    assert ext["eda/capture_time_s"] == 0 and ext["eda/entropy_forward_time_s"] > 0


def test_capture_blocked_by_logit_changing_generation_options(tmp_path):
    """repetition_penalty changes the logits before a user processor sees them: no capture (the
    captured distribution would not be softmax(z / T)); the trainer says so and uses the forward."""
    tokenizer = char_tokenizer()
    common = dict(model=tiny_causal_lm(tokenizer), reward_funcs=exact_answer_reward, train_dataset=toy_dataset(n=4),
                  processing_class=tokenizer)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        trainer = HEALGRPOTrainer(args=_config(tmp_path, repetition_penalty=1.1), **common)
    assert "repetition_penalty" in trainer.heal_capture_blocked
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert HEALGRPOTrainer(args=_config(tmp_path), **common).heal_capture_blocked is None
    off = HEALGRPOTrainer(args=_config(tmp_path, heal_capture_entropies=False), **common)
    assert off.heal_capture_blocked == "heal_capture_entropies=False"

    from transformers import GenerationConfig

    assert logits_changed_before_capture(GenerationConfig(temperature=0.7, top_k=5, top_p=0.9)) == []
    model_defaults = GenerationConfig(min_new_tokens=3)
    assert logits_changed_before_capture(GenerationConfig(), model_defaults) == ["min_new_tokens"]
    assert logits_changed_before_capture(GenerationConfig(suppress_tokens=[4], no_repeat_ngram_size=2)) == [
        "no_repeat_ngram_size",
        "suppress_tokens",
    ]


def test_entropy_capture_processor_with_generate():
    """The processor alone in ``generate``: float64 reference on the generated sequences, left-padded
    prompts, sampling untouched (same tokens as without it), wrong prompt width refused."""
    from transformers import GenerationConfig

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=3).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        am[i, width - len(p) :] = 1
    gc = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.5, top_k=4, pad_token_id=0,
                          eos_token_id=[tokenizer.eos_token_id])
    capture = EntropyCapture(0.5, width)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=am, generation_config=gc, logits_processor=[capture])
    torch.manual_seed(0)
    plain = model.generate(input_ids=ids, attention_mask=am, generation_config=gc)
    assert torch.equal(out, plain)
    got = capture.entropies()
    steps = out.size(1) - width
    assert got.shape == (len(prompts), steps) and capture.time_s > 0
    full_am = torch.cat([am, torch.ones(len(prompts), steps, dtype=am.dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full_am, use_cache=False).logits
    ref = reference.token_entropy(logits[:, width - 1 : -1].double(), 0.5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)

    with pytest.raises(RuntimeError, match="completion position"):
        model.generate(input_ids=ids, attention_mask=am, generation_config=gc,
                       logits_processor=[EntropyCapture(0.5, width + 1)])
    with pytest.raises(ValueError, match="temperature"):
        EntropyCapture(0.0, width)
