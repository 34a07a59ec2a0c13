"""``heal prepare``: convert a local dataset file into verl's RL parquet layout."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "convert a local dataset file (JSON/JSONL/parquet/CSV) of one domain into verl's parquet layout"

DESCRIPTION = """\
Convert a local dataset file of one domain into verl's RL parquet layout: columns data_source,
prompt (chat list), ability, reward_model {style: rule, ground_truth}, extra_info. The input
format comes from the extension (.json .jsonl .ndjson .parquet .csv .tsv) unless --format is given;
text files are read as UTF-8 unless --encoding is given. Errors name the file and the row (1-based,
with its line for JSONL / CSV); the output file is written only once all went well, never in part.

Domains and the answer each row must carry (field names are auto-detected; see --field-map):
  commonsense, medicine  multiple choice: question, choices/options, answer letter (answerKey, answer_idx, ...)
  physics, math          question/problem and a final answer (answer, or the \\boxed{} of solution)
  code                   question and stdin/stdout test cases (input_output, tests, public_test_cases, ...)

Command-line options override the values of --config (a YAML/JSON file whose keys are the long
option names with '_' for '-': domain, input, output, data_source, split, format, encoding,
field_map, prompt_template, system_prompt, sample, seed, skip_invalid)."""

EPILOG = """\
examples:
  heal prepare --domain commonsense --input csqa_train.jsonl --output data/general.parquet
  heal prepare --domain medicine --input medqa.jsonl --output data/med32.parquet --sample 32 --seed 0
  heal prepare --domain math --input problems.csv --output data/math.parquet --field-map question=Problem answer=Answer
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from heal.data.convert import DOMAINS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--domain", choices=sorted(DOMAINS), default=None, help="the dataset's domain (required)")
    parser.add_argument("--input", default=None, metavar="FILE", help="the local file to convert (required)")
    parser.add_argument("--output", default=None, metavar="OUT.parquet", help="where to write the parquet file (required)")
    parser.add_argument("--data-source", dest="data_source", default=None, metavar="NAME",
                        help="data_source of every row (default per domain: " +
                        ", ".join(f"{k}={v.data_source}" for k, v in sorted(DOMAINS.items())) +
                        "); it selects the answer checker and splits target from general in `heal mix`")
    parser.add_argument("--split", default=None, help="split name stored in extra_info (default: train)")
    parser.add_argument("--format", default=None, choices=["json", "jsonl", "parquet", "csv", "tsv"],
                        help="input format (default: from the file extension)")
    parser.add_argument("--encoding", default=None, metavar="NAME",
                        help="text encoding of a JSON/JSONL/CSV input (default: utf-8; e.g. latin-1, cp1252, utf-16)")
    parser.add_argument("--field-map", dest="field_map", nargs="+", action="extend", default=None,
                        metavar="FIELD=COLUMN",
                        help="take a field from a differently named column, e.g. question=Problem answer=Answer "
                        "(fields: question, choices, answer, tests, starter_code, fn_name, id)")
    parser.add_argument("--prompt-template", dest="prompt_template", default=None, metavar="TEXT",
                        help="replace the domain's prompt; placeholders {question}, {options} (multiple "
                        "choice), {starter_code} (code)")
    parser.add_argument("--system-prompt", dest="system_prompt", default=None, metavar="TEXT",
                        help="add a system turn before the user prompt")
    parser.add_argument("--sample", type=int, default=None, metavar="K",
                        help="keep a seeded random sample of K rows (few-shot target sets)")
    parser.add_argument("--seed", type=int, default=None, help="seed of --sample (default: 0)")
    parser.add_argument("--skip-invalid", dest="skip_invalid", action="store_true", default=None,
                        help="skip rows that cannot be converted (default: stop at the first, naming it)")
    parser.add_argument("--config", default=None, metavar="YAML", help="YAML/JSON file with the same options")


def parse_field_map(items) -> dict:
    """``["question=Problem", ...]`` -> ``{"question": "Problem"}``; ValueError names --field-map."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--field-map: expected FIELD=COLUMN, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def run(args) -> int:
    from heal.config import load_config, merge_args
    from heal.data.convert import PrepareConfig

    cfg = load_config(args.config, PrepareConfig) if args.config else PrepareConfig()
    cli_map = parse_field_map(args.field_map)
    args.field_map = {**cfg.field_map, **cli_map} if cli_map else None
    cfg = merge_args(cfg, args, ["domain", "input", "output", "data_source", "split", "format", "encoding",
                                 "field_map", "prompt_template", "system_prompt", "sample", "seed", "skip_invalid"])
    for name, flag in (("domain", "--domain"), ("input", "--input"), ("output", "--output")):
        if not getattr(cfg, name):
            raise ValueError(f"{flag} is required (or '{name}' in --config)")
    stats = cfg.run()
    summary = {"output": cfg.output, "domain": cfg.domain, "read": stats.read, "written": stats.written,
               "skipped": stats.skipped}
    print(json.dumps(summary))
    for reason in stats.reasons:
        print(f"skipped {reason}", file=sys.stderr)
    return 0
