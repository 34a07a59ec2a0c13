"""Synthetic question sets: layout, determinism, uniqueness, correct ground truths, scoring round-trip."""

import json
import os
import random
import re

import pytest

from heal.data.io import read_parquet_rows, write_parquet_rows
from heal.data.synthetic import CATEGORIES, arithmetic_rows, choice_rows
from heal.scoring import compute_score

BUILTIN = os.path.join(os.path.dirname(__file__), "..", "..", "heal", "data", "builtin")
GENERATORS = [arithmetic_rows, choice_rows]


def _builtin_row(name):
    with open(os.path.join(BUILTIN, name), encoding="utf-8") as f:
        return json.loads(f.readline())


def _score(row, response):
    return compute_score(row["data_source"], response, row["reward_model"]["ground_truth"], row["extra_info"])


def _sample(rows, k=300):
    return random.Random(1).sample(rows, k)


def test_row_layout_matches_the_builtin_sets():
    for rows, name, checker, ability in [(arithmetic_rows(5), "demo_math.jsonl", "math", "math"),
                                         (choice_rows(5), "demo_commonsense.jsonl", "choice", "commonsense")]:
        ref = _builtin_row(name)
        for i, row in enumerate(rows):
            assert set(row) == set(ref)
            assert set(row["extra_info"]) == set(ref["extra_info"])
            assert row["reward_model"]["style"] == "rule" and isinstance(row["reward_model"]["ground_truth"], str)
            assert row["ability"] == ability and row["extra_info"]["checker"] == checker
            assert row["extra_info"]["index"] == i
            [msg] = row["prompt"]
            assert msg["role"] == "user" and row["extra_info"]["question"] in msg["content"]
            assert "\\boxed{" in msg["content"]
    assert arithmetic_rows(3)[0]["data_source"] == "synthetic_arithmetic"
    assert choice_rows(3, data_source="my_mcq")[0]["data_source"] == "my_mcq"


@pytest.mark.parametrize("gen", GENERATORS)
def test_counts_and_determinism(gen):
    for n in (1, 7, 250):
        assert len(gen(n, seed=3)) == n
    assert gen(50, seed=3) == gen(50, seed=3)
    assert gen(50, seed=3) != gen(50, seed=4)
    assert gen(20, seed=3) == gen(50, seed=3)[:20]  # a longer set extends a shorter one


def test_arithmetic_questions_are_unique_then_repeat():
    rows = arithmetic_rows(4452, seed=0)
    questions = [r["extra_info"]["question"] for r in rows]
    assert len(set(questions[:4451])) == 4451
    assert questions[4451] == questions[0]
    assert {q.split()[3] for q in questions[:30]} == {"+", "-", "*"}  # a small set mixes all three


def test_choice_questions_are_unique_and_varied():
    rows = choice_rows(3000, seed=0)
    keys = {(r["extra_info"]["question"], tuple(r["extra_info"]["choices"].values())) for r in rows}
    assert len(keys) == 3000
    assert {r["reward_model"]["ground_truth"] for r in rows[:200]} == set("ABCDE")
    asked = {r["extra_info"]["question"] for r in rows}
    assert "Which of these numbers is the largest?" in asked and "Which of these numbers is the smallest?" in asked
    assert {f"Which of these is {c}?" for c in CATEGORIES} <= asked


def test_choice_rows_skip_a_repeated_question(monkeypatch):
    from heal.data import synthetic

    drawn = iter([("Q1?", list("vwxyz"), 0), ("Q1?", list("vwxyz"), 0), ("Q1?", list("wvxyz"), 1),
                  ("Q2?", list("vwxyz"), 2)])
    monkeypatch.setattr(synthetic, "_choice_question", lambda rng: next(drawn))
    rows = synthetic.choice_rows(3)
    assert [(r["extra_info"]["question"], r["reward_model"]["ground_truth"]) for r in rows] == [
        ("Q1?", "A"), ("Q1?", "B"), ("Q2?", "C")]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2]


def test_arithmetic_ground_truth_is_the_exact_result():
    for row in arithmetic_rows(4451, seed=5):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["extra_info"]["question"]).groups()
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["reward_model"]["ground_truth"] == str(want) and want >= 0


def test_categories_are_disjoint():
    words = [w.lower() for members in CATEGORIES.values() for w in members]
    assert len(words) == len(set(words))


def test_choice_ground_truth_is_the_one_right_option():
    for row in choice_rows(1000, seed=5):
        info, gt = row["extra_info"], row["reward_model"]["ground_truth"]
        choices = info["choices"]
        assert list(choices) == list("ABCDE") and len(set(choices.values())) == 5
        assert f"{gt}. {choices[gt]}" in row["prompt"][0]["content"]
        m = re.fullmatch(r"Which of these numbers is the (largest|smallest)\?", info["question"])
        if m:
            pick = max if m.group(1) == "largest" else min
            assert choices[gt] == str(pick(int(v) for v in choices.values()))
            continue
        kind = re.fullmatch(r"Which of these is (.+)\?", info["question"]).group(1)
        assert [k for k, v in choices.items() if v in CATEGORIES[kind]] == [gt]


def test_every_sampled_arithmetic_row_scores_right_and_wrong_answers():
    for row in _sample(arithmetic_rows(2000, seed=2)):
        gt = int(row["reward_model"]["ground_truth"])
        assert _score(row, f"The answer is \\boxed{{{gt}}}.") == 1.0
        assert _score(row, f"\\boxed{{{gt + 1}}}") == 0.0
        assert _score(row, f"\\boxed{{{gt}}} ... no, \\boxed{{{gt - 1}}}") == 0.0


def test_every_sampled_choice_row_scores_right_and_wrong_answers():
    for row in _sample(choice_rows(2000, seed=2)):
        gt = row["reward_model"]["ground_truth"]
        wrong = "ABCDE"[("ABCDE".index(gt) + 1) % 5]
        assert _score(row, f"\\boxed{{{gt}}}") == 1.0
        assert _score(row, f"The answer is \\boxed{{{row['extra_info']['choices'][gt]}}}.") == 1.0
        assert _score(row, f"\\boxed{{{wrong}}}") == 0.0
        assert _score(row, "\\boxed{F}") == 0.0


def test_rows_score_after_a_parquet_round_trip(tmp_path):
    rows = arithmetic_rows(10) + choice_rows(10)
    back = read_parquet_rows(write_parquet_rows(rows, str(tmp_path / "synthetic.parquet")))
    for row in back:
        gt = row["reward_model"]["ground_truth"]
        assert _score(row, f"\\boxed{{{gt}}}") == 1.0


@pytest.mark.parametrize("gen", GENERATORS)
@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"n": -3}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"), ({"n": "5"}, "n"),
    ({"n": 5, "seed": None}, "seed"), ({"n": 5, "seed": "1"}, "seed"),
    ({"n": 5, "data_source": ""}, "data_source"), ({"n": 5, "data_source": 3}, "data_source"),
])
def test_bad_arguments_raise(gen, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        gen(**kwargs)


def test_data_source_registered_for_another_checker_is_refused():
    with pytest.raises(ValueError, match="data_source 'commonsense_qa'"):
        arithmetic_rows(5, data_source="commonsense_qa")
    with pytest.raises(ValueError, match="data_source 'deepscaler'"):
        choice_rows(5, data_source="deepscaler")
