"""Few-shot sampling and hybrid batch mixing."""

import collections
import json

import pytest

from heal.data import MixConfig, hybrid_mix, mix_files, sample_few_shot, split_by_source
from heal.data.io import read_parquet_rows, write_parquet_rows


def _rows(source, n, start=0):
    return [{"data_source": source, "prompt": [{"role": "user", "content": f"{source} {i}"}], "ability": "x",
             "reward_model": {"style": "rule", "ground_truth": "A"},
             "extra_info": {"index": i, "split": "train", "qid": f"{source}-{i}"}}
            for i in range(start, start + n)]


def _qid(row):
    return row["extra_info"]["qid"]


def test_sample_few_shot_is_seeded_distinct_and_validated():
    rows = list(range(100))
    a = sample_few_shot(rows, 32, seed=0)
    assert len(set(a)) == 32 and a == sample_few_shot(rows, 32, seed=0)
    assert a != sample_few_shot(rows, 32, seed=1)
    with pytest.raises(ValueError, match="k=101"):
        sample_few_shot(rows, 101)
    with pytest.raises(ValueError, match="k must be"):
        sample_few_shot(rows, 0)


def test_paper_setting_batches():
    """32 target + 96 general per 128-question batch; 384 general -> 4 steps, each target 4 times."""
    target, general = _rows("med", 32), _rows("csqa", 384)
    out = hybrid_mix(target, general, k=32, repeat=1, general_per_batch=96, seed=0)
    assert len(out) == 4 * 128
    for s in range(4):
        batch = out[s * 128 : (s + 1) * 128]
        roles = collections.Counter(r["extra_info"]["hybrid_role"] for r in batch)
        assert roles == {"target": 32, "general": 96}
        assert {r["extra_info"]["hybrid_step"] for r in batch} == {s}
        assert sorted(_qid(r) for r in batch if r["data_source"] == "med") == sorted(_qid(r) for r in target)
        assert all((r["data_source"] == "med") == (r["extra_info"]["hybrid_role"] == "target") for r in batch)
    general_seen = collections.Counter(_qid(r) for r in out if r["data_source"] == "csqa")
    assert len(general_seen) == 384 and set(general_seen.values()) == {1}  # each general question once
    # the inputs are not modified
    assert "hybrid_step" not in target[0]["extra_info"]


def test_repeat_fills_the_target_share():
    out = hybrid_mix(_rows("t", 8), _rows("g", 40), k=8, repeat=4, general_per_batch=16, steps=3, seed=1)
    assert len(out) == 3 * 48
    for s in range(3):
        batch = out[s * 48 : (s + 1) * 48]
        counts = collections.Counter(_qid(r) for r in batch if r["data_source"] == "t")
        assert len(counts) == 8 and set(counts.values()) == {4}
        assert sum(r["data_source"] == "g" for r in batch) == 16


def test_deterministic_for_a_seed():
    t, g = _rows("t", 50), _rows("g", 100)
    a = hybrid_mix(t, g, k=10, general_per_batch=30, steps=5, seed=7)
    b = hybrid_mix(t, g, k=10, general_per_batch=30, steps=5, seed=7)
    c = hybrid_mix(t, g, k=10, general_per_batch=30, steps=5, seed=8)
    assert a == b and [_qid(r) for r in a] != [_qid(r) for r in c]
    # more target rows than k: a seeded sample of k, the same one in every batch
    targets = [{_qid(r) for r in a[s * 40 : (s + 1) * 40] if r["data_source"] == "t"} for s in range(5)]
    assert len(targets[0]) == 10 and all(x == targets[0] for x in targets)


def test_general_epochs_wrap_without_duplicates_in_a_batch():
    out = hybrid_mix(_rows("t", 2), _rows("g", 10), k=2, general_per_batch=4, steps=10, seed=0)
    for s in range(10):
        batch = [_qid(r) for r in out[s * 6 : (s + 1) * 6] if r["data_source"] == "g"]
        assert len(batch) == len(set(batch)) == 4
    seen = collections.Counter(_qid(r) for r in out if r["data_source"] == "g")
    assert set(seen.values()) == {4}  # 40 draws over 10 questions: every epoch complete


def test_no_shuffle_keeps_targets_first_and_zero_general():
    out = hybrid_mix(_rows("t", 3), _rows("g", 5), k=3, repeat=2, general_per_batch=2, steps=2,
                     shuffle_within_batch=False)
    assert [r["data_source"] for r in out[:8]] == ["t"] * 6 + ["g"] * 2
    only = hybrid_mix(_rows("t", 3), [], k=3, general_per_batch=0)
    assert len(only) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be"),
        (dict(repeat=0), "repeat must be"),
        (dict(general_per_batch=-1), "general_per_batch must be"),
        (dict(steps=0), "steps must be"),
        (dict(k=9), "k=9 but only 5 target rows"),
        (dict(general_per_batch=11), "general_per_batch=11 is larger"),
    ],
)
def test_hybrid_mix_argument_errors(kwargs, match):
    args = dict(k=5, general_per_batch=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hybrid_mix(_rows("t", 5), _rows("g", 10), **args)


def test_split_by_source():
    t, g = split_by_source(_rows("med", 3) + _rows("csqa", 2) + _rows("med2", 1), ["csqa"])
    assert [r["data_source"] for r in t] == ["med"] * 3 + ["med2"]
    assert len(g) == 2
    with pytest.raises(ValueError, match=r"row 1 \(1-based\): missing field 'data_source'"):
        split_by_source([{"x": 1}], ["csqa"])


def test_mix_files_by_file_and_by_source(tmp_path):
    tp, gp, allp = tmp_path / "t.parquet", tmp_path / "g.parquet", tmp_path / "all.parquet"
    write_parquet_rows(_rows("med", 12), tp)
    # extra_info layouts differ between files: the output unifies them
    g = _rows("csqa", 30)
    for r in g:
        r["extra_info"]["choices"] = json.dumps({"A": "x", "B": "y"})
    write_parquet_rows(g, gp)
    write_parquet_rows(_rows("med", 12) + g, allp)
    cfg = MixConfig(target=[str(tp)], general=[str(gp)], output=str(tmp_path / "h1.parquet"), k=4,
                    general_per_batch=12, seed=0)
    s1 = mix_files(cfg)
    assert (s1["batch_size"], s1["steps"], s1["rows"]) == (16, 3, 48)
    assert s1["target_sources"] == ["med"] and s1["general_sources"] == ["csqa"]
    h1 = read_parquet_rows(tmp_path / "h1.parquet")
    assert len(h1) == 48 and h1[0]["extra_info"]["hybrid_step"] == 0
    cfg2 = MixConfig(target=[str(allp)], output=str(tmp_path / "h2.parquet"), k=4, general_per_batch=12,
                     seed=0, general_sources=["csqa"])
    mix_files(cfg2)
    h2 = read_parquet_rows(tmp_path / "h2.parquet")
    assert [_qid(r) for r in h2] == [_qid(r) for r in h1]
    with pytest.raises(ValueError, match="field 'general' is required"):
        mix_files(MixConfig(target=[str(tp)], output=str(tmp_path / "x.parquet"), k=4))
    with pytest.raises(ValueError, match="no row has a data_source in general_sources"):
        mix_files(MixConfig(target=[str(tp)], output=str(tmp_path / "x.parquet"), k=4, general_sources=["zz"]))
    with pytest.raises(FileNotFoundError):
        mix_files(MixConfig(target=[str(tmp_path / "nope.parquet")], general=[str(gp)],
                            output=str(tmp_path / "x.parquet")))


def test_mix_config_validate():
    with pytest.raises(ValueError, match="field 'k'"):
        MixConfig(k=0).validate()
    with pytest.raises(ValueError, match="field 'general_per_batch'"):
        MixConfig(general_per_batch=-2).validate()
    assert MixConfig(k=32, repeat=1, general_per_batch=96).batch_size == 128
