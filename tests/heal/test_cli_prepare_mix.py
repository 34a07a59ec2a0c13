"""`heal prepare` and `heal mix` through the real `heal` dispatcher (heal.cli.main)."""

import json

import pytest

import heal.cli as cli
from heal.data.io import read_parquet_rows


@pytest.fixture
def heal_main(monkeypatch):
    # only the two subcommands under test, so this file does not depend on the others
    monkeypatch.setattr(cli, "SUBCOMMANDS", {k: cli.SUBCOMMANDS[k] for k in ("prepare", "mix")})
    return cli.main


@pytest.fixture
def files(tmp_path):
    csqa = tmp_path / "csqa.jsonl"
    csqa.write_text("\n".join(json.dumps({
        "id": f"g{i}", "question": f"General question {i}?",
        "choices": {"label": list("ABCDE"), "text": [f"o{j}" for j in range(5)]},
        "answerKey": "ABCDE"[i % 5]}) for i in range(60)))
    med = tmp_path / "med.json"
    med.write_text(json.dumps([{"Q": f"Medical question {i}?", "opts": {"A": "x", "B": "y", "C": "z"},
                                "gold": "ABC"[i % 3]} for i in range(20)]))
    return tmp_path, csqa, med


def test_prepare_then_mix(heal_main, files, capsys):
    tmp, csqa, med = files
    gen, tgt, hyb = tmp / "gen.parquet", tmp / "med.parquet", tmp / "hybrid.parquet"
    assert heal_main(["prepare", "--domain", "commonsense", "--input", str(csqa), "--output", str(gen)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"output": str(gen), "domain": "commonsense", "read": 60, "written": 60, "skipped": 0}
    assert heal_main(["prepare", "--domain", "medicine", "--input", str(med), "--output", str(tgt),
                      "--field-map", "question=Q", "choices=opts", "--field-map", "answer=gold",
                      "--data-source", "medbullets", "--sample", "8", "--seed", "1"]) == 0
    rows = read_parquet_rows(tgt)
    assert len(rows) == 8 and {r["data_source"] for r in rows} == {"medbullets"}
    capsys.readouterr()
    assert heal_main(["mix", "--target", str(tgt), "--general", str(gen), "--k", "4", "--repeat", "2",
                      "--general-per-batch", "8", "--steps", "5", "--seed", "0", "--output", str(hyb)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[0])
    assert summary["batch_size"] == 16 and summary["steps"] == 5 and summary["rows"] == 80
    assert "data.shuffle=False" in lines[1] and "data.train_batch_size=16" in lines[1]
    mixed = read_parquet_rows(hyb)
    assert len(mixed) == 80
    assert sum(r["data_source"] == "medbullets" for r in mixed[:16]) == 8


def test_config_file_and_cli_override(heal_main, files, capsys):
    tmp, csqa, _ = files
    gen = tmp / "gen.parquet"
    assert heal_main(["prepare", "--domain", "commonsense", "--input", str(csqa), "--output", str(gen)]) == 0
    capsys.readouterr()
    cfg = tmp / "mix.yaml"
    cfg.write_text(f"target: [{gen}]\ngeneral_sources: []\noutput: {tmp / 'a.parquet'}\nk: 5\n"
                   "general_per_batch: 0\nseed: 3\n")
    assert heal_main(["mix", "--config", str(cfg), "--k", "6"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert summary["k"] == 6 and summary["batch_size"] == 6 and summary["seed"] == 3
    pcfg = tmp / "prep.yaml"
    pcfg.write_text(f"domain: commonsense\ninput: {csqa}\noutput: {tmp / 'p.parquet'}\nsample: 7\n")
    assert heal_main(["prepare", "--config", str(pcfg)]) == 0
    assert len(read_parquet_rows(tmp / "p.parquet")) == 7


@pytest.mark.parametrize(
    "argv, match",
    [
        (["prepare", "--domain", "math", "--output", "o.parquet"], "--input is required"),
        (["prepare", "--domain", "math", "--input", "{csqa}", "--output", "{tmp}/o.parquet"],
         "csqa.jsonl: row 1 (1-based), line 1: missing field 'answer'"),
        (["prepare", "--domain", "commonsense", "--input", "{csqa}", "--output", "{tmp}/o.parquet",
          "--field-map", "question"], "--field-map: expected FIELD=COLUMN"),
        (["prepare", "--domain", "commonsense", "--input", "{csqa}", "--output", "{tmp}/o.parquet",
          "--field-map", "bogus=x"], "'bogus' is not a field of domain 'commonsense'"),
        (["prepare", "--domain", "math", "--input", "{tmp}/missing.jsonl", "--output", "{tmp}/o.parquet"],
         "input file not found"),
        (["prepare", "--config", "{tmp}/bad.yaml"], "bad.yaml: unknown field 'domian'"),
        (["mix", "--output", "{tmp}/o.parquet"], "--target is required"),
        (["mix", "--target", "{tmp}/nope.parquet", "--general", "{tmp}/nope.parquet", "--output", "{tmp}/o.parquet"],
         "parquet file not found"),
        (["mix", "--config", "{tmp}/badmix.yaml"], "badmix.yaml: field 'k': expected int"),
        (["mix", "--target", "{tmp}/x.parquet", "--output", "{tmp}/o.parquet", "--k", "0"], "field 'k' must be >= 1"),
    ],
)
def test_errors_print_one_line_naming_the_field(heal_main, files, capsys, argv, match):
    tmp, csqa, _ = files
    (tmp / "bad.yaml").write_text("domian: math\n")
    (tmp / "badmix.yaml").write_text("k: lots\n")
    argv = [a.format(tmp=tmp, csqa=csqa) for a in argv]
    assert heal_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"heal {argv[0]}: error: ") and len(err.strip().splitlines()) == 1
    assert match in err


@pytest.mark.parametrize("command", ["prepare", "mix"])
def test_help_lists_every_option_the_code_reads(heal_main, capsys, command):
    with pytest.raises(SystemExit) as exc:
        heal_main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    from heal.data.convert import PrepareConfig
    from heal.data.mix import MixConfig

    schema = PrepareConfig if command == "prepare" else MixConfig
    import dataclasses

    for f in dataclasses.fields(schema):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "shuffle_within_batch":
            flag = "--no-shuffle-within-batch"
        assert flag in text, flag
        assert f.name in text  # the config-file key is documented too
    assert "--config" in text and "examples:" in text
