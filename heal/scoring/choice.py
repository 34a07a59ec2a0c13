"""Multiple-choice answer checker (commonsense, medicine).

Extraction rules, in order (the first rule that finds anything decides):

1. ``\\boxed{...}`` / ``\\fbox{...}``: the **last** box in the response is the answer. Its content
   may be a letter (``C``, ``(C)``, ``\\text{C}``, ``C. Paris``) or, when the row's choices are
   known (``extra_info["choices"]``), the exact text of one option.
2. Answer cues: ``Answer: C``, ``Final answer: (C)``, ``the answer is C``, ``the correct option
   is (C)`` ... The **last** cue in the response wins (a model that corrects itself is scored
   on its final statement). Cue letters must be upper case unless written in parentheses.

A final statement that names several different letters (``\\boxed{A, C}``, ``Answer: A or B``)
is ambiguous and scores 0, as does a response with no recognisable answer or a letter outside
the row's options. Only the final box / final cue is read: earlier boxes or cues never count.

Nothing in a response makes :func:`check_choice` raise (an exception while reading it scores 0 with
the reason, see :mod:`heal.scoring.outcome`); a ground truth that is not one letter raises
:class:`heal.scoring.outcome.InvalidRowError`.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

from heal.scoring.outcome import InvalidRowError, judge

__all__ = ["extract_boxed", "extract_choice", "check_choice", "choice_ground_truth", "AMBIGUOUS"]

AMBIGUOUS = "<ambiguous>"
_DEFAULT_LETTERS = "ABCDEFGHIJ"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
_WRAPPERS_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}")


def extract_boxed(text: str, *, all_boxes: bool = False):
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.

    Returns ``None`` when no box is closed (boxes never closed are ignored). With
    ``all_boxes=True`` returns the list of every closed box's content, in order.
    """
    # one linear pass over the braces (a quadratic scan per box would let a response made of
    # thousands of unclosed "\\boxed{" stall the reward)
    content_starts = {m.end() for m in _BOX_RE.finditer(text)}
    if not content_starts:
        return [] if all_boxes else None
    found = []  # (content start, content end)
    stack = []  # (content start, brace depth) of the boxes still open
    depth = 0
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            depth += 1
            if m.end() in content_starts:
                stack.append((m.end(), depth))
        else:
            if stack and stack[-1][1] == depth:
                found.append((stack.pop()[0], m.start()))
            depth -= 1
    found = [text[a:b] for a, b in sorted(found)]
    if all_boxes:
        return found
    return found[-1] if found else None


def _unwrap_latex(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _WRAPPERS_RE.sub(r"\1", s)
    return s.replace("$", "").strip()


def _norm_text(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


# letter list after a cue: "C", "(C)", "C or D", "(A), (B) and (C)"
# (the pronoun "I" in "Answer: I think ..." is not option I)
_LETTER = r"(?:\(([A-Za-z])\)|\b((?!I\s+[a-z'])[A-Z])\b)"
_LIST_RE = re.compile(_LETTER + r"(?:\s*(?:,|/|&|\bor\b|\band\b)\s*" + _LETTER + r")*")
_CUE_RE = re.compile(
    r"(?:final\s+answer|correct\s+(?:answer|option|choice)|answer)"
    r"(?:\s+(?:is|would\s+be|should\s+be|must\s+be))?\s*(?:[:=]|is\b)?\s*(?:option\s+|choice\s+)?[*_]*\s*",
    re.IGNORECASE,
)


def _letters_in_span(span: str) -> list:
    m = _LIST_RE.match(span)
    if not m:
        return []
    pairs = re.findall(r"\(([A-Za-z])\)|\b([A-Z])\b", m.group(0))  # the letters of the matched list
    return [(a or b).upper() for a, b in pairs]


def _from_box(content: str, letters: str, choices: Optional[Mapping[str, str]]) -> Optional[str]:
    c = _unwrap_latex(content).strip().rstrip(".").strip()
    if not c:
        return None
    # a bare letter, "(C)", "C.", "C) text", "C: text"
    m = re.fullmatch(r"\(?([A-Za-z])\)?(?:\s*[.:)\-]\s*.*)?", c, flags=re.DOTALL)
    if m and (len(c) == 1 or c[0] == "(" or m.group(1).isupper()):
        return m.group(1).upper()
    # several letters: "A, C" / "A or C" / "(A) and (B)"
    several = re.fullmatch(r"\(?[A-Za-z]\)?(?:\s*(?:,|/|&|or|and)\s*\(?[A-Za-z]\)?)+", c)
    if several:
        found = {x.upper() for x in re.findall(r"[A-Za-z]", re.sub(r"\b(?:or|and)\b", " ", c))}
        return found.pop() if len(found) == 1 else AMBIGUOUS
    if choices:
        want = _norm_text(c)
        hits = [k for k, v in choices.items() if _norm_text(str(v)) == want]
        if len(hits) == 1:
            return str(hits[0]).upper()
    return None


def extract_choice(
    text: str, letters: Iterable[str] = _DEFAULT_LETTERS, choices: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """The chosen option letter, ``AMBIGUOUS`` when the final statement names several, else ``None``.

    ``letters``: the valid option letters (a letter outside them counts as no answer).
    ``choices``: optional ``{letter: option text}``, so that ``\\boxed{Paris}`` can be matched.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    letters = "".join(letters).upper()
    box = extract_boxed(text)
    if box is not None:
        got = _from_box(box, letters, choices)
        if got is None or got == AMBIGUOUS:
            return got
        return got if got in letters else None
    last = None
    for m in _CUE_RE.finditer(text):
        found = _letters_in_span(text[m.end() : m.end() + 80])
        if found:
            last = found
    if not last:
        return None
    if len(set(last)) > 1:
        return AMBIGUOUS
    return last[0] if last[0] in letters else None


def _choices_from_extra(extra_info) -> Optional[Mapping[str, str]]:
    if not extra_info:
        return None
    ch = extra_info.get("choices") if hasattr(extra_info, "get") else None
    if isinstance(ch, str):
        import json

        try:
            ch = json.loads(ch)
        except (ValueError, RecursionError):
            return None
    return ch if isinstance(ch, Mapping) else None


def check_choice(solution_str: str, ground_truth, extra_info=None) -> float:
    """1.0 when the response's final answer letter equals ``ground_truth`` (a letter), else 0.0.

    ``extra_info["choices"]`` (a ``{letter: text}`` dict or its JSON string, as written by
    :mod:`heal.data.convert`) restricts the valid letters and allows answering by option text.
    """
    gt = choice_ground_truth(ground_truth)
    choices = _choices_from_extra(extra_info)
    letters = "".join(str(k).upper() for k in choices) if choices else _DEFAULT_LETTERS
    return judge("choice", _score, solution_str, gt, letters, choices)


def choice_ground_truth(ground_truth) -> str:
    """The row's answer letter (``"(c)"`` -> ``"C"``); :class:`InvalidRowError` unless it is one letter."""
    gt = str(ground_truth).strip().strip("()").upper()
    if len(gt) != 1 or not gt.isalpha():
        raise InvalidRowError(f"ground_truth for a multiple-choice row must be one letter, got {ground_truth!r}")
    return gt


def _score(solution_str: str, gt: str, letters: str, choices) -> float:
    return 1.0 if extract_choice(solution_str, letters, choices) == gt else 0.0
