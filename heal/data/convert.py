"""Convert local dataset files into verl's RL parquet layout, one domain at a time.

Every output row has the columns verl's ``RLHFDataset`` and reward managers read::

    data_source   str    e.g. "commonsense_qa"; selects the answer checker (heal.scoring)
    prompt        list   [{"role": "user", "content": ...}] (a "system" turn first if asked)
    ability       str    the domain: commonsense | medicine | physics | math | code
    reward_model  dict   {"style": "rule", "ground_truth": str}
    extra_info    dict   {"index", "split", "domain", "checker", "question", "source_id", ...}

``ground_truth`` is always a string: the option letter (multiple choice), the final answer
(math, physics) or the JSON of the test cases (code: ``{"inputs", "outputs"[, "fn_name"]}``).

Domains and the input fields they look for (the first one present wins; override with
``field_map={"question": "my_column", ...}``):

========== ============== ===================================================================
domain     field          looked-up names
========== ============== ===================================================================
choice     question       question (str, or CommonsenseQA's {"stem", "choices"}), stem, prompt
(common-   choices        choices ({"label": [...], "text": [...]} or [{"label", "text"}] or a
sense,                    list of texts), options ({"A": text} or a list), else columns
medicine)                 opa/opb/... or A/B/C/...
           answer         answerKey, answer_idx, answer, label, correct_answer, cop
                          (a letter, the text of an option, or a 0-based index)
physics,   question       question, problem, prompt, query
math       answer         answer, final_answer, ground_truth, gt_answer, then solution
                          (its last \\boxed{}; GSM8K's "#### 42" also understood)
code       question       question_content, question, problem, prompt, description
           tests          input_output, tests, test_cases, public_test_cases (+ private_test_cases)
           starter_code   starter_code (optional; shown in the prompt)
           fn_name        fn_name, or metadata.func_name (functional tests)
           id             (every domain, optional) id, question_id, qid, task_id, problem_id
========== ============== ===================================================================

A row that lacks a required field raises ``ValueError`` naming the row (1-based, and its line for
JSONL / CSV files: ``data.jsonl: row 3 (1-based), line 5: missing field 'answer' ...``) and the
field (or is skipped and counted with ``skip_invalid=True``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import string
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from heal.data.io import (_canonical_encoding, check_training_rows, read_records_with_lines, row_label,
                          write_parquet_rows)

__all__ = ["DOMAINS", "Domain", "convert_records", "prepare_file", "ConversionStats", "PROMPTS", "PrepareConfig"]

# ------------------------------------------------------------------ prompt templates
# placeholders: {question}; {options} (multiple choice); {starter_code} (code)
PROMPTS: Dict[str, str] = {
    "choice": (
        "{question}\n\n{options}\n\n"
        "Think step by step, then give the letter of the correct option in \\boxed{{}}, "
        "e.g. \\boxed{{A}}."
    ),
    "math": "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "physics": (
        "{question}\n\nPlease reason step by step, and put your final answer (with its units, if any) "
        "within \\boxed{{}}."
    ),
    "code": (
        "{question}\n\n{starter_code}"
        "Write a Python 3 program that reads the input from standard input and writes the answer to "
        "standard output. Give the complete program in a single ```python code block at the end of "
        "your response."
    ),
    "code_functional": (
        "{question}\n\n{starter_code}"
        "Complete the function (do not read input or print the answer; return it). Give the complete "
        "code in a single ```python code block at the end of your response."
    ),
}


@dataclasses.dataclass(frozen=True)
class Domain:
    """One domain: its ability name, default data_source, checker and field look-up lists."""

    name: str
    kind: str  # "choice" | "math" | "physics" | "code": the converter and the checker used
    data_source: str
    fields: Mapping[str, Sequence[str]]


_ID_FIELDS = ("id", "question_id", "qid", "task_id", "problem_id")
_CHOICE_FIELDS = {
    "question": ("question", "stem", "prompt"),
    "choices": ("choices", "options"),
    "answer": ("answerKey", "answer_idx", "answer", "label", "correct_answer", "cop"),
    "id": _ID_FIELDS,
}
_QA_FIELDS = {
    "question": ("question", "problem", "prompt", "query"),
    "answer": ("answer", "final_answer", "ground_truth", "gt_answer", "solution"),
    "id": _ID_FIELDS,
}

DOMAINS: Dict[str, Domain] = {
    "commonsense": Domain("commonsense", "choice", "commonsense_qa", _CHOICE_FIELDS),
    "medicine": Domain("medicine", "choice", "medqa", _CHOICE_FIELDS),
    "physics": Domain("physics", "physics", "webinstruct_physics", _QA_FIELDS),
    "math": Domain("math", "math", "deepscaler", _QA_FIELDS),
    "code": Domain(
        "code", "code", "livecodebench",
        {
            "question": ("question_content", "question", "problem", "prompt", "description"),
            "tests": ("input_output", "tests", "test_cases", "public_test_cases"),
            "starter_code": ("starter_code",),
            "fn_name": ("fn_name",),
            "id": _ID_FIELDS,
        },
    ),
}


@dataclasses.dataclass
class ConversionStats:
    """What :func:`convert_records` did: rows read, written, skipped (with the first reasons)."""

    read: int = 0
    written: int = 0
    skipped: int = 0
    reasons: List[str] = dataclasses.field(default_factory=list)


class _RowError(ValueError):
    pass


def _maybe_json(value):
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _lookup(row: Mapping, canonical: str, candidates: Sequence[str], field_map: Mapping[str, str],
            required: bool = True):
    if canonical in field_map:
        name = field_map[canonical]
        if name not in row or row[name] is None or row[name] == "":
            if required:
                raise _RowError(f"missing field '{name}' (mapped from '{canonical}')")
            return None, name
        return row[name], name
    for name in candidates:
        if name in row and row[name] is not None and row[name] != "":
            return row[name], name
    if required:
        raise _RowError(
            f"missing field '{canonical}' (looked for {', '.join(repr(c) for c in candidates)}; "
            f"map it with field_map / --field-map {canonical}=COLUMN)"
        )
    return None, None


# ------------------------------------------------------------------ multiple choice
_LETTERS = string.ascii_uppercase


def _normalise_choices(raw) -> Dict[str, str]:
    raw = _maybe_json(raw)
    if isinstance(raw, Mapping):
        if "label" in raw and "text" in raw:  # CommonsenseQA (HF): {"label": [...], "text": [...]}
            labels, texts = list(raw["label"]), list(raw["text"])
            if len(labels) != len(texts):
                raise _RowError("choices 'label' and 'text' have different lengths")
            return {str(l).strip().upper(): str(t) for l, t in zip(labels, texts)}
        return {str(k).strip().upper(): str(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        if all(isinstance(c, Mapping) and "text" in c for c in raw):  # [{"label": "A", "text": ...}]
            return {str(c.get("label", _LETTERS[i])).strip().upper(): str(c["text"]) for i, c in enumerate(raw)}
        if len(raw) > len(_LETTERS):
            raise _RowError(f"too many choices ({len(raw)})")
        return {_LETTERS[i]: str(c) for i, c in enumerate(raw)}
    raise _RowError(f"choices must be a dict or a list, got {type(raw).__name__}")


def _choices_from_columns(row: Mapping) -> Optional[Dict[str, str]]:
    for keys in (["op" + c for c in "abcdefghij"], list("ABCDEFGHIJ"), ["option_" + c for c in "abcdefghij"]):
        present = [k for k in keys if row.get(k) not in (None, "")]
        if len(present) >= 2 and present == keys[: len(present)]:
            return {_LETTERS[i]: str(row[k]) for i, k in enumerate(present)}
    return None


def _answer_letter(raw, choices: Dict[str, str]) -> str:
    if isinstance(raw, bool):
        raise _RowError(f"answer must be a letter, option text or index, got {raw!r}")
    if isinstance(raw, int):
        letters = list(choices)
        if not 0 <= raw < len(letters):
            raise _RowError(f"answer index {raw} is out of range for {len(letters)} choices (0-based)")
        return letters[raw]
    text = str(raw).strip()
    up = text.strip("()").strip().rstrip(".").upper()
    if up in choices:
        return up
    hits = [k for k, v in choices.items() if v.strip().lower() == text.lower()]
    if len(hits) == 1:
        return hits[0]
    if text.isdigit() and 0 <= int(text) < len(choices):
        return list(choices)[int(text)]
    raise _RowError(f"answer {raw!r} is neither one of the option letters {''.join(choices)} nor an option's text")


def _convert_choice(row, fm, dom) -> Dict[str, Any]:
    q, _ = _lookup(row, "question", dom.fields["question"], fm)
    q = _maybe_json(q)
    nested_choices = None
    if isinstance(q, Mapping):  # original CommonsenseQA jsonl: {"stem": ..., "choices": [...]}
        nested_choices = q.get("choices")
        if "stem" not in q:
            raise _RowError("field 'question' is an object without 'stem'")
        q = q["stem"]
    raw_choices, _ = _lookup(row, "choices", dom.fields["choices"], fm, required=False)
    if raw_choices is not None:
        choices = _normalise_choices(raw_choices)
    elif nested_choices is not None:
        choices = _normalise_choices(nested_choices)
    else:
        choices = _choices_from_columns(row)
        if choices is None:
            raise _RowError("missing field 'choices' (looked for 'choices', 'options', columns opa/opb/... "
                            "or A/B/...; map it with --field-map choices=COLUMN)")
    if len(choices) < 2:
        raise _RowError(f"field 'choices' has {len(choices)} option(s); need at least 2")
    ans, ans_name = _lookup(row, "answer", dom.fields["answer"], fm)
    try:
        letter = _answer_letter(ans, choices)
    except _RowError as exc:
        raise _RowError(f"field '{ans_name}': {exc}") from None
    options = "\n".join(f"{k}. {v}" for k, v in choices.items())
    return {"question": str(q), "ground_truth": letter, "vars": {"question": str(q), "options": options},
            "template": "choice", "extra": {"choices": json.dumps(choices, ensure_ascii=False)}}


# ------------------------------------------------------------------ math / physics
def _final_answer_from_solution(sol: str) -> Optional[str]:
    from heal.scoring.choice import extract_boxed

    box = extract_boxed(sol)
    if box is not None:
        return box.strip()
    m = re.search(r"####\s*(.+?)\s*$", sol.strip())
    if m:
        return m.group(1).replace(",", "").strip()
    return None


def _convert_qa(row, fm, dom) -> Dict[str, Any]:
    q, _ = _lookup(row, "question", dom.fields["question"], fm)
    ans, name = _lookup(row, "answer", dom.fields["answer"], fm)
    ans = str(ans).strip()
    if name in ("solution", "answer") and ("\\boxed" in ans or "####" in ans):
        got = _final_answer_from_solution(ans)
        if got is None:
            raise _RowError(f"field '{name}': no final answer (\\boxed{{}} or '#### x') in the solution")
        ans = got
    elif name == "solution":
        raise _RowError("field 'solution' has no \\boxed{} final answer; give an answer column "
                        "(--field-map answer=COLUMN)")
    if not ans:
        raise _RowError(f"field '{name}' is empty")
    return {"question": str(q), "ground_truth": ans, "vars": {"question": str(q)},
            "template": dom.kind, "extra": {}}


# ------------------------------------------------------------------ code
def _decode_tests(raw, name: str):
    raw = _maybe_json(raw) if isinstance(raw, str) else raw
    if isinstance(raw, str):
        # LiveCodeBench ships private tests as base64(zlib(pickle(json))): we refuse to unpickle
        try:
            base64.b64decode(raw[:64], validate=True)
            kind = "base64 (LiveCodeBench's compressed pickle?)"
        except ValueError:
            kind = "text"
        raise _RowError(f"field '{name}' is {kind}, not JSON test cases")
    return raw


def _tests_to_gt(raw, name: str) -> Dict[str, Any]:
    t = _decode_tests(raw, name)
    if isinstance(t, Mapping) and "inputs" in t and "outputs" in t:
        ins, outs = list(t["inputs"]), list(t["outputs"])
        fn = t.get("fn_name")
        return {"inputs": ins, "outputs": outs, **({"fn_name": fn} if fn else {})}
    if isinstance(t, (list, tuple)) and all(isinstance(c, Mapping) and "input" in c and "output" in c for c in t):
        functional = any(c.get("testtype") == "functional" for c in t)
        return {"inputs": [c["input"] for c in t], "outputs": [c["output"] for c in t],
                "_functional": functional}
    raise _RowError(f"field '{name}' must be {{'inputs': [...], 'outputs': [...]}} or a list of "
                    "{'input', 'output'} cases")


def _convert_code(row, fm, dom) -> Dict[str, Any]:
    from heal.scoring.code import parse_tests

    q, _ = _lookup(row, "question", dom.fields["question"], fm)
    raw, name = _lookup(row, "tests", dom.fields["tests"], fm)
    gt = _tests_to_gt(raw, name)
    # LiveCodeBench: public + private tests (private only when stored as plain JSON)
    if name == "public_test_cases" and row.get("private_test_cases") not in (None, ""):
        try:
            more = _tests_to_gt(row["private_test_cases"], "private_test_cases")
            gt["inputs"] += more["inputs"]
            gt["outputs"] += more["outputs"]
        except _RowError as exc:
            warnings.warn(f"{exc}; using the public tests only", stacklevel=3)
    functional = gt.pop("_functional", False)
    fn_name, _ = _lookup(row, "fn_name", dom.fields["fn_name"], fm, required=False)
    fn_name = fn_name or gt.get("fn_name")
    metadata = _maybe_json(row.get("metadata"))
    if not fn_name and functional and isinstance(metadata, Mapping):
        fn_name = metadata.get("func_name")
    if functional and not fn_name:
        raise _RowError("functional test cases need a function name: field 'fn_name' or metadata.func_name")
    if fn_name:
        gt["fn_name"] = str(fn_name)
    if not gt["inputs"]:
        raise _RowError(f"field '{name}' has no test cases")
    gt_json = json.dumps(gt, ensure_ascii=False)
    try:
        parse_tests(gt_json)
    except ValueError as exc:
        raise _RowError(f"field '{name}': {exc}") from None
    starter, _ = _lookup(row, "starter_code", dom.fields["starter_code"], fm, required=False)
    starter_txt = f"Starter code:\n```python\n{str(starter).rstrip()}\n```\n\n" if starter else ""
    return {"question": str(q), "ground_truth": gt_json,
            "vars": {"question": str(q), "starter_code": starter_txt},
            "template": "code_functional" if "fn_name" in gt else "code",
            "extra": {"num_tests": len(gt["inputs"])}}


_CONVERTERS: Dict[str, Callable] = {"choice": _convert_choice, "math": _convert_qa, "physics": _convert_qa,
                                    "code": _convert_code}


def convert_records(
    records: Sequence[Mapping[str, Any]],
    domain: str,
    *,
    data_source: Optional[str] = None,
    split: str = "train",
    field_map: Optional[Mapping[str, str]] = None,
    prompt_template: Optional[str] = None,
    system_prompt: Optional[str] = None,
    skip_invalid: bool = False,
    stats: Optional[ConversionStats] = None,
    where: Optional[str] = None,
    lines: Optional[Sequence[int]] = None,
) -> List[Dict[str, Any]]:
    """verl rows (see the module docstring) from raw records of one domain.

    ``domain``: one of :data:`DOMAINS`. ``data_source``: the rows' data_source (default: the
    domain's, e.g. ``commonsense_qa``). ``field_map``: canonical field -> column name.
    ``prompt_template``: replaces the domain's template (placeholders ``{question}``, and
    ``{options}`` / ``{starter_code}`` where they apply). ``system_prompt``: adds a system turn.
    ``skip_invalid``: skip rows that cannot be converted instead of raising (counted in ``stats``).
    ``where``: the file the records came from, named in errors; ``lines``: the (1-based) line each
    record starts on (:func:`heal.data.io.read_records_with_lines`), named next to the row.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    dom = DOMAINS[domain]
    fm = dict(field_map or {})
    unknown = sorted(set(fm) - set(dom.fields))
    if unknown:
        raise ValueError(f"field_map key '{unknown[0]}' is not a field of domain {domain!r} "
                         f"(fields: {', '.join(sorted(dom.fields))})")
    stats = stats if stats is not None else ConversionStats()
    source = data_source or dom.data_source
    convert = _CONVERTERS[dom.kind]
    out = []
    for i, row in enumerate(records):
        stats.read += 1
        try:
            if not isinstance(row, Mapping):
                raise _RowError(f"is a {type(row).__name__}, not a record")
            item = convert(row, fm, dom)
            template = prompt_template or PROMPTS[item["template"]]
            try:
                content = template.format(**{"options": "", "starter_code": "", **item["vars"]})
            except (KeyError, IndexError) as exc:
                raise ValueError(f"prompt_template has an unknown placeholder {exc}") from None
        except _RowError as exc:
            if skip_invalid:
                stats.skipped += 1
                if len(stats.reasons) < 5:
                    stats.reasons.append(f"{row_label(i, lines)}: {exc}")
                continue
            raise ValueError(f"{where + ': ' if where else ''}{row_label(i, lines)}: {exc}") from None
        sid, _ = _lookup(row, "id", dom.fields["id"], fm, required=False)
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        prompt.append({"role": "user", "content": content})
        out.append({
            "data_source": source,
            "prompt": prompt,
            "ability": dom.name,
            "reward_model": {"style": "rule", "ground_truth": item["ground_truth"]},
            "extra_info": {
                "index": len(out),
                "split": split,
                "domain": dom.name,
                "checker": dom.kind,
                "question": item["question"],
                "source_id": "" if sid is None else str(sid),
                **item["extra"],
            },
        })
        stats.written += 1
    return out


def prepare_file(
    input_path,
    output_path,
    domain: str,
    *,
    fmt: Optional[str] = None,
    sample: Optional[int] = None,
    seed: int = 0,
    encoding: str = "utf-8",
    **kwargs,
) -> ConversionStats:
    """Convert one local file (format from its extension, or ``fmt``) into a verl parquet file.

    ``sample``: keep a seeded random ``sample`` of the converted rows (few-shot sets; see
    :func:`heal.data.mix.sample_few_shot`). ``encoding``: of a text input (default UTF-8).
    Other keyword arguments go to :func:`convert_records`. Errors name the file and the row
    (1-based; and its line for JSONL / CSV). ``output_path`` is written only when every step
    succeeded (never a partial file; see :func:`heal.data.io.write_parquet_rows`).
    """
    from heal.data.mix import sample_few_shot

    records, lines = read_records_with_lines(input_path, fmt, encoding)
    if not records:
        raise ValueError(f"{input_path}: no records")
    stats = ConversionStats()
    rows = convert_records(records, domain, stats=stats, where=str(input_path), lines=lines, **kwargs)
    if not rows:
        raise ValueError(f"{input_path}: no row could be converted ({'; '.join(stats.reasons)})")
    if sample is not None:
        rows = sample_few_shot(rows, sample, seed)
        for i, r in enumerate(rows):
            r["extra_info"]["index"] = i
        stats.written = len(rows)
    check_training_rows(rows, str(output_path))
    write_parquet_rows(rows, output_path, metadata={"heal.prepare": json.dumps(
        {"domain": domain, "input": str(input_path), "sample": sample, "seed": seed})})
    return stats


@dataclasses.dataclass
class PrepareConfig:
    """Options of ``heal prepare`` (also the schema of its ``--config`` YAML file)."""

    domain: str = ""
    input: str = ""
    output: str = ""
    data_source: Optional[str] = None
    split: str = "train"
    format: Optional[str] = None  # json | jsonl | parquet | csv | tsv (default: from the extension)
    encoding: str = "utf-8"  # of a text input file (json, jsonl, csv, tsv)
    field_map: Dict[str, str] = dataclasses.field(default_factory=dict)
    prompt_template: Optional[str] = None
    system_prompt: Optional[str] = None
    sample: Optional[int] = None
    seed: int = 0
    skip_invalid: bool = False

    def validate(self) -> "PrepareConfig":
        if self.domain and self.domain not in DOMAINS:
            raise ValueError(f"field 'domain' must be one of {sorted(DOMAINS)}, got {self.domain!r}")
        try:
            _canonical_encoding(self.encoding)
        except ValueError as exc:
            raise ValueError(f"field 'encoding': {exc}") from None
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"field 'sample' must be >= 1, got {self.sample}")
        if self.domain:
            bad = sorted(set(self.field_map) - set(DOMAINS[self.domain].fields))
            if bad:
                raise ValueError(f"field 'field_map': '{bad[0]}' is not a field of domain {self.domain!r} "
                                 f"(fields: {', '.join(sorted(DOMAINS[self.domain].fields))})")
        return self

    def run(self) -> ConversionStats:
        """Convert ``input`` into ``output`` (see :func:`prepare_file`)."""
        for name in ("domain", "input", "output"):
            if not getattr(self, name):
                raise ValueError(f"field '{name}' is required")
        self.validate()
        return prepare_file(
            self.input, self.output, self.domain, fmt=self.format, sample=self.sample, seed=self.seed,
            encoding=self.encoding,
            data_source=self.data_source, split=self.split, field_map=self.field_map,
            prompt_template=self.prompt_template, system_prompt=self.system_prompt,
            skip_invalid=self.skip_invalid,
        )
