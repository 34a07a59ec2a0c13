"""``heal select``: what it checks before loading a model, Ctrl-C, progress inside a batch, the
note on degenerate scores. The early checks run with a model loader that must not be called."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from heal import selection as S
from heal.rollout.testing import choice_pool_rows

N_ROWS = 8
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def work(tmp_path):
    import pandas as pd

    pd.DataFrame(choice_pool_rows(N_ROWS)).to_parquet(tmp_path / "pool.parquet")
    (tmp_path / "model").mkdir()  # an existing --model folder (the loader is replaced in these tests)
    return tmp_path


def _argv(work, *extra, k="2"):
    return ["select", "--input", str(work / "pool.parquet"), "--output", str(work / "top.parquet"),
            "--model", str(work / "model"), "--k", k, "--samples", "2", "--max-new-tokens", "4",
            "--temperature", "1.0", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture
def no_model(monkeypatch):
    import heal.demo

    def boom(*a, **k):
        raise AssertionError("load_model must not be called")

    monkeypatch.setattr(heal.demo, "load_model", boom)


@pytest.fixture
def tiny_loader(monkeypatch):
    import heal.demo
    from heal.rollout.testing import tiny_model, tiny_tokenizer

    calls = []

    def load(path=None, **kw):
        calls.append(path)
        tok = tiny_tokenizer()
        return tiny_model(len(tok), "qwen2", seed=4), tok

    monkeypatch.setattr(heal.demo, "load_model", load)
    return calls


def _fake_score(value=None):
    def score(data_source, solution_str, ground_truth, extra_info=None):
        if value is not None:
            return value
        return float(len(solution_str) % 2 == 0)
    return score


def _no_outputs(work):
    left = sorted(p.name for p in work.iterdir() if p.name not in ("pool.parquet", "model"))
    assert not (work / "top.parquet").exists()
    return left


def _run(argv, capsys):
    from heal.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ 1. pool schema before the model


def test_pool_without_prompt_column_is_reported_before_loading(work, no_model, capsys):
    import pandas as pd

    bad = work / "pool.parquet"
    pd.DataFrame({"question": ["q1", "q2"], "answer": ["A", "B"], "data_source": ["x", "x"]}).to_parquet(bad)
    rc, _, err = _run(_argv(work, k="1"), capsys)
    assert rc == 2
    assert str(bad) in err and "missing columns 'prompt', 'reward_model'" in err
    assert "columns present: question, answer, data_source" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _no_outputs(work) == []


def test_row_without_ground_truth_is_named(work, no_model, capsys):
    import pandas as pd

    rows = choice_pool_rows(3)
    rows[1]["reward_model"] = {"style": "rule", "answer": "B"}
    pd.DataFrame(rows).to_parquet(work / "pool.parquet")
    rc, _, err = _run(_argv(work, k="1"), capsys)
    assert rc == 2 and "row 1 (0-based)" in err and "ground_truth" in err
    assert _no_outputs(work) == []


def test_not_a_parquet_file(work, no_model, capsys):
    (work / "pool.parquet").write_text("question,answer\nq,A\n")
    rc, _, err = _run(_argv(work, k="1"), capsys)
    assert rc == 2 and "not a readable parquet file" in err and str(work / "pool.parquet") in err


# ------------------------------------------------------------------ 2. --device cuda without CUDA


def test_device_cuda_without_cuda_is_refused_before_loading(work, no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a if a != "cpu" else "cuda" for a in _argv(work)]
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert "--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu" in err
    assert _no_outputs(work) == []


# ------------------------------------------------------------------ 3. --model: local paths, hub ids


def test_missing_local_model_path_is_refused_before_loading(work, no_model, capsys):
    for missing in (str(work / "nowhere" / "model.gguf"), "./models/qwen", "gpt2"):
        argv = _argv(work)
        argv[argv.index("--model") + 1] = missing
        rc, _, err = _run(argv, capsys)
        assert rc == 2 and f"--model {missing}: no such file or folder" in err, err
    assert _no_outputs(work) == []


def _hub_online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)


def test_unreachable_hub_id_is_one_line_before_loading(work, no_model, monkeypatch, capsys):
    try:  # the HTTP client huggingface_hub uses (httpx, or its fork httpx2): its errors are not OSErrors
        from httpx2 import ConnectError
    except ImportError:
        try:
            from httpx import ConnectError
        except ImportError:
            ConnectError = ConnectionError
    _hub_online(monkeypatch)

    def unreachable(self, repo_id, **kw):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    argv = _argv(work)
    argv[argv.index("--model") + 1] = "nobody-zz/no-such-model"
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--model nobody-zz/no-such-model: not a local file or folder" in err
    assert "Hugging Face hub id" in err and "ConnectError" in err and "HF_HUB_OFFLINE=1" in err
    assert _no_outputs(work) == []


def test_hub_load_failure_is_one_line(work, monkeypatch, capsys):
    import heal.demo

    _hub_online(monkeypatch)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda self, repo_id, **kw: object())

    def cannot_connect(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheckout your internet "
                      "connection or see how to run the library in offline mode.")

    monkeypatch.setattr(heal.demo, "load_model", cannot_connect)
    argv = _argv(work)
    argv[argv.index("--model") + 1] = "some-org/some-model"
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--model some-org/some-model: loading it from the Hugging Face hub failed (OSError: We couldn't" in err
    assert "HF_HUB_OFFLINE=1" in err
    assert _no_outputs(work) == []


def _script(body: str) -> str:
    return textwrap.dedent(body)


def test_offline_uncached_hub_id_subprocess(work):
    """The real thing: a fresh process, HF_HUB_OFFLINE=1, an empty hub cache."""
    code = _script(f"""
        import sys
        import heal.demo
        def boom(*a, **k):
            raise AssertionError("load_model must not be called")
        heal.demo.load_model = boom
        from heal.cli import main
        sys.exit(main({_argv(work)!r}[:5] + ["--model", "nobody-zz/no-such-model"] + {_argv(work)!r}[7:]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf-home")}
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--model nobody-zz/no-such-model: not a local file or folder" in p.stderr
    assert "not in the hub cache" in p.stderr and "HF_HUB_OFFLINE" in p.stderr
    assert _no_outputs(work) == []


# ------------------------------------------------------------------ 4. nothing left to score: no model


def test_fully_cached_rerun_loads_no_model(work, tiny_loader, monkeypatch, capsys):
    import pandas as pd

    import heal.demo
    import heal.scoring

    monkeypatch.setattr(heal.scoring, "compute_score", _fake_score())
    rc, out, _ = _run(_argv(work), capsys)
    assert rc == 0 and len(tiny_loader) == 1 and (work / "top.parquet").exists()
    first = pd.read_parquet(work / "top.parquet")
    os.remove(work / "top.parquet")

    def boom(*a, **k):
        raise AssertionError("load_model must not be called")

    monkeypatch.setattr(heal.demo, "load_model", boom)
    rc, out, _ = _run(_argv(work), capsys)
    assert rc == 0, out
    assert f"all {N_ROWS} questions are scored in {work / 'top.parquet.cache.jsonl'} already; no model is loaded" in out
    assert first.equals(pd.read_parquet(work / "top.parquet"))
    # --limit 0 with questions left: nothing to generate, so no model either
    os.remove(work / "top.parquet.cache.jsonl")
    rc, out, _ = _run(_argv(work, "--limit", "0"), capsys)
    assert rc == 0 and f"scored 0/{N_ROWS}" in out


# ------------------------------------------------------------------ 5. --k larger than the pool


def test_k_larger_than_pool_is_an_error_like_mix(work, no_model, capsys):
    rc, out, err = _run(_argv(work, k="100"), capsys)
    assert rc == 2 and "kept" not in out
    assert f"--k 100 is larger than the {N_ROWS} questions in {work / 'pool.parquet'}; use --k {N_ROWS} or less" in err
    assert _no_outputs(work) == []
    with pytest.raises(ValueError, match="larger than the 8 questions"):
        S.run_selection(str(work / "pool.parquet"), str(work / "o.parquet"), k=9, backend=None, model_id="m")


# ------------------------------------------------------------------ 6. progress inside a batch


class _RecordingBar:
    events = []

    def __init__(self, iterable=None, *a, total=None, initial=0, desc="", disable=False, **kw):
        self.iterable, self.total, self.n, self.desc, self.disable = iterable, total, initial, desc, disable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, k=1):
        self.n += k
        if not self.disable:
            _RecordingBar.events.append((self.desc, k))

    def reset(self, total=None):
        self.n, self.total = 0, total

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def set_postfix_str(self, s="", refresh=True):
        if not self.disable:
            _RecordingBar.events.append((self.desc, "postfix", s))

    def close(self):
        pass

    @classmethod
    def set_lock(cls, lock):  # (modules that subclass tqdm at import time call these)
        pass

    @classmethod
    def get_lock(cls):
        return None


def test_progress_moves_per_decoding_step_within_a_batch(monkeypatch):
    import tqdm.auto

    from heal.rollout import TransformersBackend
    from heal.rollout.testing import tiny_model, tiny_tokenizer

    import huggingface_hub.utils.tqdm  # noqa: F401  (subclasses tqdm.auto.tqdm when first imported)

    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _RecordingBar.events = []
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), "qwen2", seed=4)
    backend = TransformersBackend(model, tok, prompts_per_batch=4, progress=False)
    S.score_questions(choice_pool_rows(4), backend, entropy_model=model, n=2, temperature=1.0, max_new_tokens=5,
                      compute_score=_fake_score(), questions_per_batch=4, progress=True)
    ev = _RecordingBar.events
    first_question = next(i for i, e in enumerate(ev) if e == ("select", 1))
    steps_before = [e for e in ev[:first_question] if "decoding" in e[0] and e[1] != "postfix"]
    assert len(steps_before) >= 2, ev  # the bar moved while the one batch of 4 questions was generating
    assert all(e[0] == "batch 1/1 decoding" for e in steps_before)
    assert any(e[1] == "postfix" and "batch 1/1: sampling 4 questions x 2" in e[2] for e in ev)
    assert sum(1 for e in ev if e == ("select", 1)) == 4
    # without progress: no bar records anything, and the model carries no leftover hook
    _RecordingBar.events = []
    S.score_questions(choice_pool_rows(2), backend, entropy_model=model, n=1, temperature=1.0, max_new_tokens=3,
                      compute_score=_fake_score(), progress=False)
    assert _RecordingBar.events == [] and not model._forward_pre_hooks


# ------------------------------------------------------------------ 7. Ctrl-C


def test_ctrl_c_subprocess_caches_and_exits_130(work, tiny_loader, monkeypatch, capsys):
    """A real SIGINT in a fresh process, while the third question is being checked."""
    code = _script(f"""
        import os, signal, sys
        import heal.demo, heal.scoring
        from heal.rollout.testing import tiny_model, tiny_tokenizer
        def load(path=None, **kw):
            tok = tiny_tokenizer()
            return tiny_model(len(tok), "qwen2", seed=4), tok
        heal.demo.load_model = load
        calls = [0]
        def score(data_source, solution_str, ground_truth, extra_info=None):
            calls[0] += 1
            if calls[0] == 2 * 2 + 1:  # first sample of the third question (--samples 2)
                os.kill(os.getpid(), signal.SIGINT)
            return 0.0
        heal.scoring.compute_score = score
        from heal.cli import main
        sys.exit(main({_argv(work)!r}))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    cache = work / "top.parquet.cache.jsonl"
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr
    assert (f"heal select: interrupted: 2/{N_ROWS} questions cached in {cache}; "
            "rerun the same command to resume") in p.stderr
    assert _no_outputs(work) == [cache.name]
    lines = cache.read_text().splitlines()
    assert len(lines) == 1 + 2 and all(json.loads(ln) for ln in lines)

    # the same command again resumes: the two cached questions are not redone
    import heal.scoring

    monkeypatch.setattr(heal.scoring, "compute_score", _fake_score(0.0))
    rc, out, _ = _run(_argv(work), capsys)
    assert rc == 0 and (work / "top.parquet").exists()
    lines = cache.read_text().splitlines()
    assert len(lines) == 1 + N_ROWS and lines[1:3] == cache.read_text().splitlines()[1:3]
    assert len({json.loads(ln)["key"] for ln in lines[1:]}) == N_ROWS


def test_ctrl_c_while_loading_the_model(work, monkeypatch, capsys):
    import heal.demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(heal.demo, "load_model", interrupted)
    try:
        rc, _, err = _run(_argv(work), capsys)
    except KeyboardInterrupt:  # (would stop the whole test session)
        pytest.fail("KeyboardInterrupt escaped heal select")
    assert rc == 130 and f"interrupted: 0/{N_ROWS} questions cached in {work / 'top.parquet.cache.jsonl'}" in err
    assert not (work / "top.parquet").exists()


def test_cache_line_cut_short_does_not_swallow_the_next_record(tmp_path):
    settings = S.cache_settings(model_id="m", temperature=1.0, n=1, max_new_tokens=2, seed=0)
    path = str(tmp_path / "c.jsonl")
    c = S.SelectionCache(path, settings)
    mk = lambda key, i: S.QuestionStats(key=key, index=i, acc=0.0, uncertainty=0.0, diversity=1.0, score=0.0,
                                        n=1, mean_tokens=1.0)
    c.add(mk("a", 0))
    with open(path, "a") as f:
        f.write('{"key": "b", "ind')  # killed in the middle of a write
    c = S.SelectionCache(path, settings)
    c.add(mk("c", 2))
    assert set(S.SelectionCache(path, settings).records) == {"a", "c"}
    assert set(S.SelectionCache.peek(path, settings)) == {"a", "c"}
    assert S.SelectionCache.peek(path, {**settings, "seed": 1}) == {}  # other settings: nothing reused


# ------------------------------------------------------------------ 8. degenerate scores explained


def test_all_acc_zero_is_explained_in_console_and_report(work, tiny_loader, monkeypatch, capsys):
    import heal.scoring

    monkeypatch.setattr(heal.scoring, "compute_score", _fake_score(0.0))
    rc, out, _ = _run(_argv(work), capsys)
    assert rc == 0
    note = (f"All {N_ROWS} questions scored c = 0 ({N_ROWS} with Acc 0: no sampled response was right), so "
            "Uncertainty x Diversity carries no signal: the 2 kept were picked by the tie-break alone (highest "
            "Diversity, then earliest row), i.e. by diversity, not by uncertainty.")
    assert f"heal select: note: {note}" in out
    assert f"**Note:** {note}" in (work / "top.report.md").read_text()


def _st(i, acc, div=1.0):
    return S.QuestionStats(key=str(i), index=i, acc=acc, uncertainty=S.uncertainty(acc), diversity=div,
                           score=S.selection_score(acc, div), n=4, mean_tokens=1.0)


def test_selection_note_cases():
    mixed = [_st(0, 0.5), _st(1, 0.0, 2.0), _st(2, 1.0, 3.0), _st(3, 0.0)]
    note = S.selection_note(mixed, S.select_top_k(mixed, 2))
    assert note.startswith("3 of 4 questions scored c = 0 (2 with Acc 0: no sampled response was right; "
                           "1 with Acc 1: every sampled response was right): only 1 of the 2 kept")
    assert "the other 1 were picked among the c = 0 questions by the tie-break alone" in note
    assert "every question was kept" in S.selection_note(mixed, S.select_top_k(mixed, 4))
    assert "the score ranked only 1 questions" in S.selection_note(mixed, S.select_top_k(mixed, 1))
    healthy = [_st(0, 0.5), _st(1, 0.25), _st(2, 0.75), _st(3, 0.0)]
    assert S.selection_note(healthy, S.select_top_k(healthy, 2)) is None


def test_bad_kernel_backend_is_refused_before_loading(work, no_model, monkeypatch, capsys):
    """A mistyped ``$HEAL_KERNELS_BACKEND`` ends ``heal select`` before the pool is read or a model loads."""
    from heal.cli import main

    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "gpu")
    assert main(_argv(work)) == 2
    err = capsys.readouterr().err
    assert "HEAL_KERNELS_BACKEND='gpu' is not a backend" in err and "auto, triton, cpu, torch" in err
    assert not (work / "top.parquet").exists()
