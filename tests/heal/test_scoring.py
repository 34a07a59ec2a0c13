"""Answer checkers: multiple choice, math, physics, and compute_score's routing."""

import threading

import pytest

from heal import scoring
from heal.scoring import compute_score, resolve_checker
from heal.scoring.choice import AMBIGUOUS, check_choice, extract_boxed, extract_choice
from heal.scoring.math_answer import HAS_MATH_VERIFY, check_math, check_physics, leading_number, math_equal

# unboxed answers are found by math-verify only (the fallback needs a \boxed{})
needs_mv = pytest.mark.skipif(not HAS_MATH_VERIFY, reason="needs math-verify")


# ---------------------------------------------------------------- multiple choice
@pytest.mark.parametrize(
    "text, want",
    [
        ("Reasoning... so the answer is \\boxed{C}.", "C"),
        ("\\boxed{(D)}", "D"),
        ("\\boxed{\\text{B}}", "B"),
        ("\\boxed{B. a river bank}", "B"),
        ("Answer: C", "C"),
        ("The answer is (E).", "E"),
        ("The correct option is (a)", "A"),
        ("Final answer: **B**", "B"),
        ("Answer: A is right because ...", "A"),
        # last statement wins (self-correction)
        ("Answer: A. Wait, that is wrong. Final answer: D", "D"),
        ("\\boxed{A} hmm, no: \\boxed{B}", "B"),
        # a box beats an earlier textual cue and vice versa the last box is final
        ("The answer is C ... \\boxed{A}", "A"),
    ],
)
def test_extract_choice_forms(text, want):
    assert extract_choice(text) == want


@pytest.mark.parametrize(
    "text",
    ["\\boxed{A, C}", "Answer: A or B", "The answer is (B) and (C).", "\\boxed{A or B}"],
)
def test_several_letters_in_the_final_statement_are_ambiguous(text):
    assert extract_choice(text) == AMBIGUOUS
    assert check_choice(text, "A") == 0.0
    assert check_choice(text, "B") == 0.0


@pytest.mark.parametrize(
    "text",
    ["", "I do not know.", "the answer is a banana", "Answer: I think it depends", "\\boxed{}", "\\boxed{C"],
)
def test_no_answer_scores_zero(text):
    assert extract_choice(text) in (None,)
    for gt in "ABCDE":
        assert check_choice(text, gt) == 0.0


def test_letter_outside_the_options_scores_zero():
    extra = {"choices": {"A": "yes", "B": "no"}}
    assert check_choice("\\boxed{C}", "C", extra) == 0.0  # C is not one of the options
    assert extract_choice("\\boxed{C}", "AB") is None
    assert check_choice("Answer: B", "B", extra) == 1.0


def test_answer_by_option_text_and_json_choices():
    extra = {"choices": '{"A": "London", "B": "Paris", "C": "Rome"}'}
    assert check_choice("The capital is \\boxed{Paris}", "B", extra) == 1.0
    assert check_choice("The capital is \\boxed{Paris}", "A", extra) == 0.0
    assert check_choice("\\boxed{Madrid}", "B", extra) == 0.0


def test_check_choice_ground_truth_validation():
    assert check_choice("Answer: C", "(c)") == 1.0
    with pytest.raises(ValueError, match="ground_truth"):
        check_choice("Answer: C", "Paris")
    with pytest.raises(TypeError, match="text"):
        extract_choice(None)


def test_extract_boxed_balanced_and_last():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert extract_boxed("\\boxed{1} \\boxed{2", all_boxes=True) == ["1"]
    assert extract_boxed("nothing") is None
    assert extract_boxed("\\fbox{7}") == "7"


# ---------------------------------------------------------------- math
@pytest.mark.parametrize(
    "solution, gt, want",
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{41}", "42", 0.0),
        pytest.param("The answer is 42.", "42", 1.0, marks=needs_mv),  # no box: math-verify reads the final expression
        ("I give up.", "42", 0.0),
        ("\\boxed{3 \\text{ or } 4}", "3", 0.0),  # several answers
        ("\\boxed{1} then finally \\boxed{2}", "2", 1.0),  # last box wins
        ("\\boxed{1} then finally \\boxed{2}", "1", 0.0),
        ("\\boxed{42}", "\\boxed{42}", 1.0),  # boxed ground truth
    ],
)
def test_check_math(solution, gt, want):
    assert check_math(solution, gt) == want


def test_math_huge_and_garbage_outputs_are_bounded():
    assert check_math("9" * 200_000, "42") == 0.0
    assert check_math("\\boxed{" + "(" * 5000 + "}", "1") == 0.0
    assert check_math("\\boxed{" + "1+" * 1000 + "1}", "1001") == 0.0  # longer than MAX_ANSWER_CHARS


def test_math_in_a_worker_thread():
    # verl calls reward functions from a thread pool; math-verify's signal timeout must be off there
    out = []
    t = threading.Thread(target=lambda: out.append(check_math("\\boxed{\\frac{2}{4}}", "1/2")))
    t.start()
    t.join()
    assert out == [1.0]


def test_math_fallback_without_math_verify(monkeypatch):
    from heal.scoring import math_answer

    monkeypatch.setattr(math_answer, "HAS_MATH_VERIFY", False)
    assert math_answer.check_math("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_answer.check_math("\\boxed{2 \\cdot 3}", "6") == 1.0
    assert math_answer.check_math("\\boxed{7}", "6") == 0.0
    assert math_answer.check_math("\\boxed{(x+1)^2}", "x^2+2x+1") == 1.0
    assert math_answer.check_math("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0
    assert math_answer.check_math("6", "6") == 0.0  # no box, no math-verify: no answer


def test_math_equal_rejects_empty():
    assert not math_equal("", "1")
    assert not math_equal("1", "  ")


# ---------------------------------------------------------------- physics
@pytest.mark.parametrize(
    "solution, gt, want",
    [
        ("\\boxed{3.0 \\times 10^{8}\\,\\text{m/s}}", "2.998e8 m/s", 1.0),
        ("\\boxed{9.81\\ \\mathrm{m/s^2}}", "9.8 m/s^2", 1.0),
        ("\\boxed{12 N}", "15 N", 0.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        pytest.param("no box 9.8", "9.8", 1.0, marks=needs_mv),  # math-verify finds the final number
        ("nothing", "9.8", 0.0),
    ],
)
def test_check_physics(solution, gt, want):
    assert check_physics(solution, gt) == want


def test_physics_tolerance_from_extra_info():
    assert check_physics("\\boxed{10.4}", "10", {"rel_tol": 0.05}) == 1.0
    assert check_physics("\\boxed{10.4}", "10", {"rel_tol": 0.01}) == 0.0


def test_leading_number():
    assert leading_number("3.0 \\times 10^{8}") == pytest.approx(3e8)
    assert leading_number("-1,200.5 kg") == pytest.approx(-1200.5)
    assert leading_number("1.6e-19 C") == pytest.approx(1.6e-19)
    assert leading_number("no digits") is None


# ---------------------------------------------------------------- routing
def test_compute_score_routes_by_data_source_and_extra_info():
    assert compute_score("commonsense_qa", "Answer: B", "B") == 1.0
    assert compute_score("my_med_exam", "Answer: B", "B", {"checker": "choice"}) == 1.0
    assert compute_score("openai/gsm8k", "\\boxed{18}", "18") == 1.0
    assert compute_score("webinstruct_physics", "\\boxed{9.81}", "9.8") == 1.0
    assert resolve_checker("codecontests") == "code"
    assert resolve_checker("MedQA-USMLE") == "choice"
    with pytest.raises(ValueError, match="no answer checker for data_source 'mystery'"):
        compute_score("mystery", "x", "y")
    with pytest.raises(ValueError, match="extra_info\\['checker'\\]"):
        compute_score("mystery", "x", "y", {"checker": "nope"})


def test_compute_score_ignores_verl_kwargs():
    assert compute_score("commonsense_qa", "Answer: B", "B", None, reward_router_address=None) == 1.0


def test_register_checker_and_data_source(monkeypatch):
    monkeypatch.setattr(scoring, "CHECKERS", dict(scoring.CHECKERS))
    monkeypatch.setattr(scoring, "DATA_SOURCES", dict(scoring.DATA_SOURCES))
    scoring.register_checker("exact", lambda s, gt, extra=None: float(s.strip() == gt))
    scoring.register_data_source("my/exact", "exact")
    assert compute_score("my/exact", " hi ", "hi") == 1.0
    with pytest.raises(ValueError, match="checker"):
        scoring.register_data_source("x", "unknown")
    with pytest.raises(TypeError, match="fn"):
        scoring.register_checker("bad", 3)


# ---------------------------------------------------------------- pathological responses
PATHOLOGICAL = [
    "\\boxed{" * 20000,  # thousands of unclosed boxes (was quadratic)
    "{" * 200000 + "}" * 10,
    "```" * 100000,
    "```python\n" * 50000,
    "Answer: A or " * 20000,
    "1 " * 200000,
    "x" * 1_000_000,
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", PATHOLOGICAL, ids=lambda t: repr(t[:12]))
def test_pathological_responses_are_handled_quickly(text):
    # each call is linear in the response length; a regression to quadratic scans would hit the timeout
    for source, gt in [("commonsense_qa", "B"), ("deepscaler", "7"), ("webinstruct_physics", "7")]:
        assert compute_score(source, text, gt) == 0.0
    assert extract_boxed(text) is None


@needs_mv
def test_unboxed_alternatives_on_the_last_line_score_zero():
    assert check_math("It could be 3, 4, 5 or 42", "42") == 0.0
    assert check_math("So x = 42", "42") == 1.0


def test_verl_loads_compute_score_by_package_path():
    import_utils = pytest.importorskip("verl.utils.import_utils")
    fn = import_utils.load_extern_object("pkg://heal.scoring", "compute_score")
    assert fn is compute_score
    assert import_utils.load_extern_object("pkg://heal.scoring", "compute_score_with_info") is \
        scoring.compute_score_with_info


def test_fallback_never_evaluates_code_or_power_towers(monkeypatch):
    from heal.scoring import math_answer

    monkeypatch.setattr(math_answer, "HAS_MATH_VERIFY", False)
    for bad in ["\\boxed{__import__('os').system('echo pwned')}", "\\boxed{x.real}", "\\boxed{9^{9^{9^{9}}}}",
                "\\boxed{" + "9" * 50 + "}"]:
        assert math_answer.check_math(bad, "1") == 0.0
    assert not math_answer._safe_for_sympy("foo(1)")
    assert math_answer._safe_for_sympy("x**2+y**2")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("answer", ["9^{9^{9^{9}}}", "10^{10^{10}}", "(10^{100})!", "9!!!!", "2^{1000000000}"])
def test_answers_that_would_stall_bigint_arithmetic_score_zero_in_threads(answer):
    # exact evaluation of these holds the GIL for minutes; they must be refused before parsing
    from heal.scoring.math_answer import too_costly

    assert too_costly(answer)
    out = []
    t = threading.Thread(target=lambda: out.append(check_math(f"\\boxed{{{answer}}}", "1")))
    t.start()
    t.join()
    assert out == [0.0]
    assert check_math(f"\\boxed{{{answer}}}", answer) == 1.0  # the same string still matches
    assert not too_costly("10^{100}") and not too_costly("x^2+2x+1") and not too_costly("5!")


# ---------------------------------------------------------------- never raises on a response
def test_a_raising_checker_scores_zero_with_a_reason_and_the_batch_goes_on(monkeypatch):
    from heal.scoring import outcome

    monkeypatch.setattr(scoring, "CHECKERS", dict(scoring.CHECKERS))
    monkeypatch.setattr(scoring, "DATA_SOURCES", dict(scoring.DATA_SOURCES))

    def fragile(solution_str, ground_truth, extra_info=None):
        if "boom" in solution_str:
            raise RecursionError("too deep")
        return float(solution_str.strip() == ground_truth)

    scoring.register_checker("fragile", fragile)
    scoring.register_data_source("my/fragile", "fragile")
    outcome.pop_error_metrics()
    batch = [("my/fragile", "boom", "x"), ("my/fragile", "x", "x"), ("commonsense_qa", "Answer: B", "B"),
             ("my/fragile", "boom!", "x")]
    assert [compute_score(*row) for row in batch] == [0.0, 1.0, 1.0, 0.0]
    assert outcome.pop_error_metrics() == {"scoring/errors/fragile/RecursionError": 2.0}
    assert outcome.pop_error_metrics() == {}
    info = [scoring.compute_score_with_info(*row) for row in batch]
    assert [sorted(i) for i in info] == [["acc", "score", "scoring_error"]] * 4  # the same keys for verl
    assert [i["scoring_error"] for i in info] == ["fragile/RecursionError", "", "", "fragile/RecursionError"]
    assert scoring.error_metrics(i["scoring_error"] for i in info) == {"scoring/errors/fragile/RecursionError": 2.0}
    assert scoring.compute_score_batch(*zip(*batch)) == info  # verl's batch reward manager
    with pytest.raises(ValueError, match="same length"):
        scoring.compute_score_batch(["my/fragile"], ["x", "y"], ["x"])
    s = scoring.score_response("my/fragile", "boom", "x")
    assert s == 0.0 and s.error == "fragile/RecursionError" and "too deep" in s.detail
    import pickle

    assert pickle.loads(pickle.dumps(s)).error == s.error


@pytest.mark.parametrize("text", ["Answer: \ud800 B", "\\boxed{\ud800}", "\\boxed{" + "[" * 5000 + "}",
                                  "\\boxed{" + "9" * 5000 + "}", "\\boxed{1e999999}", "\udcff\udcfe"])
def test_builtin_checkers_never_raise_on_a_response(text):
    for source, gt in [("commonsense_qa", "B"), ("deepscaler", "7"), ("webinstruct_physics", "7")]:
        got = compute_score(source, text, gt)
        assert got in (0.0, 1.0)
    assert check_choice(None, "B") == 0.0 and check_math(None, "1") == 0.0 and check_physics(None, "1") == 0.0


def test_row_faults_raise_named_errors():
    from heal.scoring import InvalidRowError, validate_row

    with pytest.raises(InvalidRowError, match="one letter"):
        compute_score("commonsense_qa", "Answer: B", "Paris")
    with pytest.raises(InvalidRowError, match="missing"):
        check_math("\\boxed{1}", None)
    for bad in ["0.05", float("nan"), -0.1, True]:
        with pytest.raises(InvalidRowError, match="rel_tol"):
            check_physics("\\boxed{10.4}", "10", {"rel_tol": bad})
        with pytest.raises(InvalidRowError, match="rel_tol"):
            validate_row({"data_source": "webinstruct_physics", "reward_model": {"ground_truth": "1"},
                          "extra_info": {"rel_tol": bad}})
    # a row cannot loosen the physics tolerance past MAX_REL_TOL (0.1)
    assert check_physics("\\boxed{19}", "10", {"rel_tol": 1e9}) == 0.0
    assert check_physics("\\boxed{10.9}", "10", {"rel_tol": 1e9}) == 1.0
    with pytest.raises(InvalidRowError, match="one letter"):
        validate_row({"data_source": "medqa", "reward_model": {"ground_truth": "AB"}, "extra_info": {}})
    validate_row({"data_source": "somewhere/unknown", "reward_model": {"ground_truth": "?"}})  # not routed: not checked
    validate_row({"data_source": "medqa", "reward_model": {"ground_truth": "(b)"}, "extra_info": None})
