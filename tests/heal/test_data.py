"""Dataset readers and the per-domain converters to verl's parquet layout."""

import json

import pyarrow.parquet as pq
import pytest

from heal.data import DOMAINS, PROMPTS, ConversionStats, convert_records, prepare_file, read_records
from heal.data.io import read_parquet_rows, write_parquet_rows
from heal.scoring import compute_score

VERL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]

CSQA_HF = {  # CommonsenseQA as on the HF hub
    "id": "075e483d21c29a511267ef62bedc0461",
    "question": "The sanctions against the school were a punishing blow, and they seemed to what?",
    "question_concept": "punishing",
    "choices": {"label": ["A", "B", "C", "D", "E"],
                "text": ["ignore", "enforce", "authoritarian", "yell at", "avoid"]},
    "answerKey": "A",
}
CSQA_ORIG = {  # the original CommonsenseQA jsonl
    "answerKey": "B",
    "id": "q2",
    "question": {"question_concept": "x", "stem": "Where is a river?",
                 "choices": [{"label": "A", "text": "sky"}, {"label": "B", "text": "valley"}]},
}
MEDQA = {
    "question": "A 23-year-old woman presents with ... Which is the most likely diagnosis?",
    "answer": "Pyelonephritis",
    "options": {"A": "Cystitis", "B": "Pyelonephritis", "C": "Urethritis", "D": "Vaginitis"},
    "meta_info": "step1",
    "answer_idx": "B",
}
MEDMCQA = {"question": "Q?", "opa": "one", "opb": "two", "opc": "three", "opd": "four", "cop": 2, "id": "m1"}
DEEPSCALER = {"problem": "Compute $1+\\frac{1}{2}$.", "answer": "\\frac{3}{2}", "solution": "... \\boxed{\\frac{3}{2}}"}
MATH_SOLUTION_ONLY = {"problem": "What is $2^3$?", "solution": "We get $2^3 = \\boxed{8}$."}
GSM8K = {"question": "Natalia sold 48 clips ...", "answer": "She sold 48/2 = 24 ... 48+24 = 72\n#### 72"}
PHYSICS = {"question": "A ball falls 20 m. Speed at the ground?", "answer": "19.8 m/s"}
LCB_STDIN = {
    "question_title": "A+B", "question_content": "Read two integers and print their sum.",
    "platform": "atcoder", "question_id": "abc000_a", "starter_code": "",
    "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
    "private_test_cases": json.dumps([{"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]),
    "metadata": "{}",
}
LCB_FUNCTIONAL = {
    "question_content": "Return the sum of nums plus k.", "question_id": "lc1",
    "starter_code": "class Solution:\n    def addAll(self, nums: List[int], k: int) -> int:\n        ",
    "public_test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"}]),
    "private_test_cases": "eJxLTEoGAAJNASc=",  # compressed pickle: refused, public tests kept
    "metadata": json.dumps({"func_name": "addAll"}),
}
APPS = {"question": "Print the double of n.", "input_output": json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})}


def _check_layout(row, domain):
    assert list(row) == VERL_COLUMNS
    assert isinstance(row["data_source"], str) and row["data_source"]
    assert row["prompt"][-1]["role"] == "user" and isinstance(row["prompt"][-1]["content"], str)
    assert row["ability"] == domain
    assert row["reward_model"]["style"] == "rule"
    assert isinstance(row["reward_model"]["ground_truth"], str)
    extra = row["extra_info"]
    assert extra["domain"] == domain and extra["checker"] == DOMAINS[domain].kind
    assert isinstance(extra["index"], int) and extra["split"]


# ---------------------------------------------------------------- multiple choice
def test_commonsense_hf_layout():
    (row,) = convert_records([CSQA_HF], "commonsense")
    _check_layout(row, "commonsense")
    assert row["data_source"] == "commonsense_qa"
    assert row["reward_model"]["ground_truth"] == "A"
    content = row["prompt"][0]["content"]
    assert CSQA_HF["question"] in content and "A. ignore" in content and "E. avoid" in content
    assert "\\boxed{" in content
    assert json.loads(row["extra_info"]["choices"])["B"] == "enforce"
    assert row["extra_info"]["source_id"] == CSQA_HF["id"]


def test_commonsense_original_jsonl_layout():
    (row,) = convert_records([CSQA_ORIG], "commonsense")
    assert row["reward_model"]["ground_truth"] == "B"
    assert "Where is a river?" in row["prompt"][0]["content"] and "B. valley" in row["prompt"][0]["content"]


def test_medicine_medqa_and_medmcqa_layouts():
    (row,) = convert_records([MEDQA], "medicine")
    _check_layout(row, "medicine")
    assert row["data_source"] == "medqa" and row["reward_model"]["ground_truth"] == "B"
    (row,) = convert_records([MEDMCQA], "medicine")  # option columns, 0-based integer answer
    assert row["reward_model"]["ground_truth"] == "C"
    assert "D. four" in row["prompt"][0]["content"]
    # answer given as option text, choices as a list
    (row,) = convert_records([{"question": "q", "options": ["x", "y"], "answer": "y"}], "medicine")
    assert row["reward_model"]["ground_truth"] == "B"


@pytest.mark.parametrize(
    "record, match",
    [
        ({"choices": ["a", "b"], "answerKey": "A"}, "row 1 \\(1-based\\): missing field 'question'"),
        ({"question": "q", "answerKey": "A"}, "row 1 \\(1-based\\): missing field 'choices'"),
        ({"question": "q", "choices": ["a", "b"]}, "row 1 \\(1-based\\): missing field 'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answerKey": "F"}, "field 'answerKey'"),
        ({"question": "q", "choices": ["a", "b"], "answerKey": 5}, "out of range"),
        ({"question": "q", "choices": ["a"], "answerKey": "A"}, "at least 2"),
    ],
)
def test_choice_errors_name_the_row_and_field(record, match):
    with pytest.raises(ValueError, match=match):
        convert_records([record], "commonsense")


# ---------------------------------------------------------------- math / physics
def test_math_layouts():
    rows = convert_records([DEEPSCALER, MATH_SOLUTION_ONLY, GSM8K], "math")
    for r in rows:
        _check_layout(r, "math")
        assert "\\boxed{}" in r["prompt"][0]["content"]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["\\frac{3}{2}", "8", "72"]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2]


def test_math_solution_without_final_answer_is_an_error():
    with pytest.raises(ValueError, match="row 1 \\(1-based\\): field 'solution'"):
        convert_records([{"problem": "p", "solution": "no box here"}], "math")


def test_physics_layout_and_units_prompt():
    (row,) = convert_records([PHYSICS], "physics", data_source="my_physics")
    _check_layout(row, "physics")
    assert row["data_source"] == "my_physics" and row["reward_model"]["ground_truth"] == "19.8 m/s"
    assert "units" in row["prompt"][0]["content"]


# ---------------------------------------------------------------- code
def test_code_livecodebench_stdin_merges_public_and_private():
    (row,) = convert_records([LCB_STDIN], "code")
    _check_layout(row, "code")
    gt = json.loads(row["reward_model"]["ground_truth"])
    assert gt == {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}
    assert "```python" in row["prompt"][0]["content"] and "standard input" in row["prompt"][0]["content"]
    assert row["extra_info"]["source_id"] == "abc000_a" and row["extra_info"]["num_tests"] == 2


def test_code_livecodebench_functional_uses_metadata_fn_name():
    with pytest.warns(UserWarning, match="private_test_cases"):
        (row,) = convert_records([LCB_FUNCTIONAL], "code")
    gt = json.loads(row["reward_model"]["ground_truth"])
    assert gt["fn_name"] == "addAll" and gt["inputs"] == ["[1, 2]\n3"]
    content = row["prompt"][0]["content"]
    assert "def addAll" in content and "return" in content


def test_code_apps_layout_and_errors():
    (row,) = convert_records([APPS], "code")
    assert json.loads(row["reward_model"]["ground_truth"]) == {"inputs": ["2\n"], "outputs": ["4\n"]}
    with pytest.raises(ValueError, match="row 1 \\(1-based\\): missing field 'tests'"):
        convert_records([{"question": "q"}], "code")
    with pytest.raises(ValueError, match="row 1 \\(1-based\\): field 'tests'"):
        convert_records([{"question": "q", "tests": "not json"}], "code")
    with pytest.raises(ValueError, match="row 1 \\(1-based\\): field 'tests'"):
        convert_records([{"question": "q", "tests": {"inputs": ["1"], "outputs": []}}], "code")


def test_converted_rows_score_with_compute_score():
    (mc,) = convert_records([MEDQA], "medicine")
    (m,) = convert_records([DEEPSCALER], "math")
    (c,) = convert_records([APPS], "code")
    for row, good, bad in [
        (mc, "... so \\boxed{B}", "Answer: A"),
        (m, "... = \\boxed{1.5}", "\\boxed{2}"),
        (c, "```python\nprint(2 * int(input()))\n```", "```python\nprint(5)\n```"),
    ]:
        args = (row["data_source"], row["reward_model"]["ground_truth"])
        assert compute_score(args[0], good, args[1], row["extra_info"]) == 1.0
        assert compute_score(args[0], bad, args[1], row["extra_info"]) == 0.0


# ---------------------------------------------------------------- options
def test_field_map_template_and_system_prompt():
    rec = {"Q": "What is 3*3?", "A": "9"}
    (row,) = convert_records([rec], "math", field_map={"question": "Q", "answer": "A"},
                             prompt_template="Solve: {question}", system_prompt="You are careful.")
    assert row["prompt"] == [{"role": "system", "content": "You are careful."},
                             {"role": "user", "content": "Solve: What is 3*3?"}]
    with pytest.raises(ValueError, match="field_map key 'nope'"):
        convert_records([rec], "math", field_map={"nope": "Q"})
    with pytest.raises(ValueError, match="missing field 'Z' \\(mapped from 'question'\\)"):
        convert_records([rec], "math", field_map={"question": "Z"})
    with pytest.raises(ValueError, match="placeholder"):
        convert_records([rec], "math", field_map={"question": "Q", "answer": "A"}, prompt_template="{nope}")


def test_skip_invalid_counts_rows():
    stats = ConversionStats()
    rows = convert_records([DEEPSCALER, {"problem": "no answer"}, GSM8K], "math", skip_invalid=True, stats=stats)
    assert len(rows) == 2 and (stats.read, stats.written, stats.skipped) == (3, 2, 1)
    assert stats.reasons[0].startswith("row 2 (1-based): missing field 'answer'")
    assert [r["extra_info"]["index"] for r in rows] == [0, 1]


def test_unknown_domain():
    with pytest.raises(ValueError, match="domain must be one of"):
        convert_records([DEEPSCALER], "biology")


def test_every_domain_has_a_prompt():
    for dom in DOMAINS.values():
        assert dom.kind in PROMPTS


# ---------------------------------------------------------------- files
def _write_all_formats(tmp_path, records):
    import csv

    paths = {}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(records))
    paths["json_wrapped"] = tmp_path / "w.json"
    paths["json_wrapped"].write_text(json.dumps({"data": records}))
    paths["json_columns"] = tmp_path / "c.json"
    paths["json_columns"].write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}))
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    paths["parquet"] = tmp_path / "d.parquet"
    write_parquet_rows(records, paths["parquet"])
    return paths


def test_read_records_every_format(tmp_path):
    records = [{"problem": f"p{i}", "answer": str(i)} for i in range(4)]
    for name, path in _write_all_formats(tmp_path, records).items():
        assert read_records(path) == records, name


def test_csv_with_json_cells_converts(tmp_path):
    p = tmp_path / "mc.csv"
    p.write_text('question,options,answer_idx\n"Q?","{""A"": ""x"", ""B"": ""y""}",B\n')
    (row,) = convert_records(read_records(p), "medicine")
    assert row["reward_model"]["ground_truth"] == "B" and "B. y" in row["prompt"][0]["content"]


def test_read_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="extension"):
        read_records(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"row 1 \(1-based\)"):
        read_records(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="format must be"):
        read_records(tmp_path / "bad.json", fmt="xml")


def test_prepare_file_writes_verl_parquet(tmp_path):
    src = tmp_path / "csqa.jsonl"
    src.write_text("\n".join(json.dumps({**CSQA_HF, "id": str(i), "answerKey": "ABCDE"[i % 5]}) for i in range(40)))
    out = tmp_path / "out" / "general.parquet"
    stats = prepare_file(src, out, "commonsense", sample=10, seed=3)
    assert stats.written == 10
    table = pq.read_table(out)
    assert table.column_names == VERL_COLUMNS
    rows = read_parquet_rows(out)
    assert [r["extra_info"]["index"] for r in rows] == list(range(10))
    ids = [r["extra_info"]["source_id"] for r in rows]
    assert len(set(ids)) == 10
    # same seed, same sample; another seed, another sample
    prepare_file(src, tmp_path / "again.parquet", "commonsense", sample=10, seed=3)
    assert [r["extra_info"]["source_id"] for r in read_parquet_rows(tmp_path / "again.parquet")] == ids
    prepare_file(src, tmp_path / "other.parquet", "commonsense", sample=10, seed=4)
    assert [r["extra_info"]["source_id"] for r in read_parquet_rows(tmp_path / "other.parquet")] != ids
    assert b"heal.prepare" in table.schema.metadata


def test_verl_rlhf_dataset_reads_the_output(tmp_path):
    """verl's own dataset class loads what we write (a tiny word-level tokenizer; no download)."""
    pytest.importorskip("verl")
    omegaconf = pytest.importorskip("omegaconf")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from verl.utils.dataset.rl_dataset import RLHFDataset

    rows = convert_records([CSQA_HF, MEDQA], "medicine") + convert_records([DEEPSCALER], "math")
    path = tmp_path / "mixed.parquet"
    write_parquet_rows(rows, path)
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = omegaconf.OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 4096,
                                      "filter_overlong_prompts": False, "return_raw_chat": True})
    ds = RLHFDataset(data_files=[str(path)], tokenizer=tok, config=cfg)
    assert len(ds) == 3
    item = ds[2]
    assert item["data_source"] == "deepscaler"
    assert item["reward_model"]["ground_truth"] == "\\frac{3}{2}"
    assert item["extra_info"]["checker"] == "math"
