"""Data safety of `heal prepare` / `heal mix`: no file a trainer cannot use is ever written.

Each CLI test runs the command in a temporary folder (a real `python -m heal` process, or
``heal.cli.main`` with argv) and checks the message, the exit code and that no output file,
partial or temporary, is left behind. The verl test loads what `heal prepare` and `heal mix`
write with verl's own dataset class (skipped where verl is not installed).
"""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import heal.cli as cli
from heal.data.io import read_parquet_rows, write_parquet_rows
from heal.data.synthetic import arithmetic_rows, choice_rows


def _heal(cwd, *argv):
    """``python -m heal ARGV`` in ``cwd``: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "heal", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def heal_main(monkeypatch, capsys):
    """``heal.cli.main`` limited to prepare and mix; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", {k: cli.SUBCOMMANDS[k] for k in ("prepare", "mix")})

    def run(*argv):
        capsys.readouterr()
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            rc = exc.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def data(tmp_path):
    """Valid target (arithmetic) and general (choice) parquet files, and an empty output folder."""
    (tmp_path / "in").mkdir()
    target, general = tmp_path / "in" / "target.parquet", tmp_path / "in" / "general.parquet"
    write_parquet_rows(arithmetic_rows(6), target)
    write_parquet_rows(choice_rows(12), general)
    return tmp_path, target, general, tmp_path / "out"


def _raw_parquet(path, rows):
    """Written by something else than heal (no checks)."""
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _mix_args(target, general, out):
    return ["mix", "--target", target, "--general", general, "--k", "2", "--general-per-batch", "4",
            "--output", out / "hybrid.parquet"]


# ------------------------------------------------------------------ 1. heal mix validates its inputs
def test_mix_refuses_a_target_without_the_verl_columns(data):
    tmp, _, general, out = data
    bad = _raw_parquet(tmp / "in" / "raw.parquet", [{"data_source": "medqa", "question": f"q{i}?"} for i in range(4)])
    rc, stdout, err = _heal(tmp, *_mix_args(bad, general, out))
    assert rc == 2, (stdout, err)
    assert "Traceback" not in err and "verl:" not in stdout
    line = err.strip().splitlines()[-1]
    assert line.startswith("heal mix: error: ") and str(bad) in line
    for col in ("'prompt'", "'reward_model'", "'extra_info'"):
        assert col in line
    assert "missing column" in line and "row 1 (1-based)" in line
    assert "run `heal prepare` on it first" in line
    assert _files(out) == []


def test_mix_without_data_source_is_a_named_error_not_a_keyerror(data):
    tmp, target, _, out = data
    rows = [{k: v for k, v in r.items() if k != "data_source"} for r in choice_rows(8)]
    bad = _raw_parquet(tmp / "in" / "nosource.parquet", rows)
    rc, stdout, err = _heal(tmp, *_mix_args(target, bad, out))
    assert rc == 2, (stdout, err)
    assert "Traceback" not in err and "KeyError" not in err
    line = err.strip().splitlines()[-1]
    assert str(bad) in line and "missing column(s) 'data_source'" in line and "row 1 (1-based)" in line
    assert _files(out) == []


def test_mix_names_the_first_bad_row_of_each_invalid_column(data, heal_main):
    tmp, target, _, out = data
    rows = [{**r, "prompt": r["prompt"][0]["content"]} for r in choice_rows(8)]  # plain strings
    bad = _raw_parquet(tmp / "in" / "g1.parquet", rows)
    rc, _, err = heal_main(*_mix_args(target, bad, out))
    assert rc == 2
    assert "invalid column 'prompt': row 1 (1-based)" in err and "chat list" in err
    rows = choice_rows(8)
    rows[3]["prompt"] = [{"role": "user"}]  # no content
    rows[4]["reward_model"] = {"style": "rule", "ground_truth": None}
    bad = _raw_parquet(tmp / "in" / "g2.parquet", rows)
    rc, _, err = heal_main(*_mix_args(target, bad, out))
    assert rc == 2
    assert str(bad) in err
    assert "invalid column 'prompt': row 4 (1-based)" in err
    assert "invalid column 'reward_model': row 5 (1-based)" in err and "ground_truth" in err
    assert "first bad row: row 4 (1-based)" in err
    assert _files(out) == []


def test_mix_refuses_the_same_data_source_on_both_sides(data, heal_main):
    tmp, target, general, out = data
    rc, _, err = heal_main(*_mix_args(general, general, out))  # a file mixed with itself
    assert rc == 2 and "'synthetic_choice'" in err and "both" in err
    other = tmp / "in" / "more_choice.parquet"
    write_parquet_rows(choice_rows(6, seed=1), other)
    rc, _, err = heal_main(*_mix_args(other, general, out))
    assert rc == 2 and "'synthetic_choice'" in err and str(other) in err and str(general) in err
    assert _files(out) == []
    rc, _, err = heal_main(*_mix_args(target, general, out))  # distinct sources: fine
    assert rc == 0, err


def test_mix_never_leaves_a_partial_file(data, heal_main, monkeypatch):
    tmp, target, general, out = data
    out.mkdir()
    keep = out / "hybrid.parquet"
    keep.write_bytes(b"previous run")

    def broken_write(table, where, *a, **kw):  # the disk fills up half way through
        f = where if hasattr(where, "write") else open(where, "wb")
        f.write(b"PAR1 partial")
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="No space left"):
        heal_main(*_mix_args(target, general, out))
    assert _files(out) == ["hybrid.parquet"] and keep.read_bytes() == b"previous run"
    monkeypatch.undo()
    # a failing validation leaves the previous file as it was, too
    bad = _raw_parquet(tmp / "in" / "raw.parquet", [{"data_source": "medqa", "question": "q?"}] * 4)
    rc, _, _ = heal_main(*_mix_args(bad, general, out))
    assert rc == 2 and _files(out) == ["hybrid.parquet"] and keep.read_bytes() == b"previous run"


def test_mix_success_replaces_the_output_atomically(data):
    tmp, target, general, out = data
    rc, stdout, err = _heal(tmp, *_mix_args(target, general, out))
    assert rc == 0, err
    assert "data.train_batch_size=6" in stdout
    assert _files(out) == ["hybrid.parquet"]  # no temporary file left next to it
    assert len(read_parquet_rows(out / "hybrid.parquet")) == 6 * 3


def test_write_parquet_rows_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def broken_write(table, where, *a, **kw):
        f = where if hasattr(where, "write") else open(where, "wb")
        f.write(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError):
        write_parquet_rows(choice_rows(3), tmp_path / "x.parquet")
    assert _files(tmp_path) == []


# ------------------------------------------------------------------ 2. rough edges
def test_prepare_non_utf8_input_names_file_line_byte_and_the_fix(tmp_path, heal_main):
    lines = [json.dumps({"problem": "What is 1+1?", "answer": "2"}),
             json.dumps({"problem": "What is 2+2?", "answer": "4"}),
             '{"problem": "Caf\xe9 costs 3, tea 2: total?", "answer": "5"}']
    src = tmp_path / "latin1.jsonl"
    src.write_bytes("\n".join(lines).encode("latin-1"))
    offset = len(lines[0]) + 1 + len(lines[1]) + 1 + lines[2].index("\xe9")
    out = tmp_path / "out"
    rc, _, err = _heal(tmp_path, "prepare", "--domain", "math", "--input", src, "--output", out / "m.parquet")
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert str(src) in line and "not valid UTF-8" in line
    assert f"byte offset {offset}" in line and "line 3" in line
    assert "--encoding" in line and "iconv" in line
    assert _files(out) == []
    # the suggested fix works
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", src, "--output", out / "m.parquet",
                           "--encoding", "latin-1")
    assert rc == 0, err
    assert "Café" in read_parquet_rows(out / "m.parquet")[2]["prompt"][0]["content"]


def test_prepare_encodings_bom_utf16_and_unknown_names(tmp_path, heal_main):
    out = tmp_path / "out"
    record = json.dumps({"problem": "What is 1+1?", "answer": "2"})
    bom = tmp_path / "bom.jsonl"  # as Windows editors save "UTF-8"
    bom.write_bytes(b"\xef\xbb\xbf" + record.encode())
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", bom, "--output", out / "a.parquet")
    assert rc == 0, err
    wide = tmp_path / "wide.jsonl"
    wide.write_bytes(record.encode("utf-16"))
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", wide, "--output", out / "b.parquet")
    assert rc == 2 and str(wide) in err and "--encoding utf-16" in err and "byte offset 0" in err
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", wide, "--output", out / "b.parquet",
                           "--encoding", "utf-16")
    assert rc == 0, err
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", wide, "--output", out / "c.parquet",
                           "--encoding", "klingon")
    assert rc == 2 and "field 'encoding'" in err and "'klingon'" in err
    assert _files(out) == ["a.parquet", "b.parquet"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "json"])
def test_prepare_row_numbers_are_1_based_everywhere(tmp_path, heal_main, kind):
    good, bad = {"problem": "What is 1+1?", "answer": "2"}, {"problem": "No answer here"}
    src = tmp_path / f"d.{kind}"
    if kind == "jsonl":  # a blank line: row 2 is on line 3
        src.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        where = "row 2 (1-based), line 3"
    elif kind == "csv":  # the header is line 1
        src.write_text("problem,answer\nWhat is 1+1?,2\nNo answer here,\n")
        where = "row 2 (1-based), line 3"
    else:
        src.write_text(json.dumps([good, bad]))
        where = "row 2 (1-based)"
    out = tmp_path / "out"
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", src, "--output", out / "m.parquet")
    assert rc == 2
    assert f"{src}: {where}: missing field 'answer'" in err
    assert _files(out) == []
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", src, "--output", out / "m.parquet",
                           "--skip-invalid")
    assert rc == 0 and f"skipped {where}: missing field 'answer'" in err


def test_read_records_non_object_row_is_1_based(tmp_path):
    from heal.data.io import read_records

    (tmp_path / "a.json").write_text(json.dumps([{"a": 1}, 2]))
    with pytest.raises(ValueError, match=r"row 2 \(1-based\) is a int"):
        read_records(tmp_path / "a.json")


# ------------------------------------------------------------------ verl's own loader
def _verl_dataset(path):
    omegaconf = pytest.importorskip("omegaconf")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    # filter_overlong_prompts on: verl applies the chat template to every prompt and drops the rows
    # where that fails, so the row count proves every prompt is a chat list verl can use
    cfg = omegaconf.OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 100000,
                                      "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1,
                                      "cache_dir": str(path.parent / "verl_cache")})
    return RLHFDataset(data_files=[str(path)], tokenizer=tok, config=cfg)


def test_verl_rlhf_dataset_loads_prepare_and_mix_outputs(tmp_path, heal_main):
    pytest.importorskip("verl.utils.dataset.rl_dataset")
    med = tmp_path / "med.jsonl"
    med.write_text("\n".join(json.dumps({"question": f"Medical question {i}?", "options": {"A": "x", "B": "y"},
                                         "answer_idx": "AB"[i % 2]}) for i in range(10)))
    csqa = tmp_path / "csqa.jsonl"
    csqa.write_text("\n".join(json.dumps({
        "id": f"g{i}", "question": f"General question {i}?",
        "choices": {"label": list("ABCDE"), "text": [f"o{j}" for j in range(5)]},
        "answerKey": "ABCDE"[i % 5]}) for i in range(12)))
    tgt, gen, hyb = tmp_path / "med.parquet", tmp_path / "gen.parquet", tmp_path / "hybrid.parquet"
    assert heal_main("prepare", "--domain", "medicine", "--input", med, "--output", tgt, "--sample", "4")[0] == 0
    assert heal_main("prepare", "--domain", "commonsense", "--input", csqa, "--output", gen)[0] == 0
    rc, _, err = heal_main("mix", "--target", tgt, "--general", gen, "--k", "4", "--general-per-batch", "4",
                           "--output", hyb)
    assert rc == 0, err

    prepared = _verl_dataset(gen)
    assert len(prepared) == 12
    item = prepared[0]
    assert item["data_source"] == "commonsense_qa" and item["raw_prompt"][-1]["role"] == "user"
    assert item["reward_model"]["ground_truth"] in "ABCDE" and item["extra_info"]["checker"] == "choice"

    mixed = _verl_dataset(hyb)
    assert len(mixed) == 8 * 3
    roles = [mixed[i]["extra_info"]["hybrid_role"] for i in range(len(mixed))]
    assert roles.count("target") == 12 and roles.count("general") == 12
    for i in range(len(mixed)):
        row = mixed[i]
        assert row["data_source"] in ("medqa", "commonsense_qa")
        assert isinstance(row["reward_model"]["ground_truth"], str) and row["raw_prompt"]


# ------------------------------------------------------------------ silent data loss
def test_write_parquet_rows_keeps_columns_the_first_row_lacks(tmp_path):
    rows = [{"data_source": "a", "x": 1}, {"data_source": "b", "x": 2, "ability": "math"}]
    back = read_parquet_rows(write_parquet_rows(rows, tmp_path / "r.parquet"))
    assert back == [{"data_source": "a", "x": 1, "ability": None}, {"data_source": "b", "x": 2, "ability": "math"}]


def test_prepare_refuses_a_csv_row_with_more_cells_than_the_header(tmp_path, heal_main):
    src = tmp_path / "m.csv"  # an unquoted comma would shift "000 + 1?" into the answer
    src.write_text("problem,answer\nWhat is 2+2?,4\nWhat is 1,000 + 1?,1001\n")
    out = tmp_path / "out"
    rc, _, err = heal_main("prepare", "--domain", "math", "--input", src, "--output", out / "m.parquet")
    assert rc == 2
    assert f"{src}: row 2 (1-based), line 3: 3 cells but the header has 2 columns" in err
    assert _files(out) == []
