"""``heal mix``: write the hybrid (few-shot target + general) training file, in batch order."""

from __future__ import annotations

import argparse
import json

HELP = "build the hybrid training parquet: K target questions + general questions in every batch"

DESCRIPTION = """\
Build HEAL's hybrid training file (paper section 3.1). Every batch holds the K target questions,
each REPEAT times, plus GENERAL_PER_BATCH general questions: batch size = K*REPEAT + GENERAL_PER_BATCH.
With more than K target rows a seeded sample of K is taken. General questions are drawn in a
seeded order without replacement (a new seeded order once all were used). The result is
deterministic for a seed.

The output's row order IS the batch order: train with shuffling off and the batch size printed
here, e.g. verl: data.shuffle=False data.train_batch_size=<batch size> (and keep
data.filter_overlong_prompts from dropping rows, which would shift the batches).
The paper's setting: --k 32 --repeat 1 --general-per-batch 96 (128-question batches; with 384
general questions one pass is 4 steps, each target question seen 4 times).

Target and general rows come from --target and --general files, or, with --general-sources,
from the data_source of every input row. Command-line options override --config (a YAML/JSON
file with keys target, general, output, k, repeat, general_per_batch, steps, seed,
general_sources, shuffle_within_batch).

Every input is checked before any work: it must have the columns verl's dataset loader and
heal's reward read (data_source, prompt as a chat list, reward_model.ground_truth, extra_info;
what `heal prepare` writes), and no data_source may be on both the target and the general side.
The output file appears only once it is complete and checked; a failed run leaves none."""

EPILOG = """\
examples:
  heal mix --target data/med32.parquet --general data/general384.parquet --k 32 --general-per-batch 96 \\
           --steps 200 --seed 0 --output data/hybrid.parquet
  heal mix --target data/all.parquet --general-sources commonsense_qa --k 32 --output data/hybrid.parquet
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--target", nargs="+", default=None, metavar="T.parquet",
                        help="target-domain parquet file(s) from `heal prepare` (required)")
    parser.add_argument("--general", nargs="+", default=None, metavar="G.parquet",
                        help="general-domain parquet file(s) (required unless --general-sources or "
                        "--general-per-batch 0)")
    parser.add_argument("--output", default=None, metavar="OUT.parquet", help="where to write the mix (required)")
    parser.add_argument("--k", type=int, default=None, help="target questions per batch (default: 32)")
    parser.add_argument("--repeat", type=int, default=None, help="copies of each target question per batch (default: 1)")
    parser.add_argument("--general-per-batch", dest="general_per_batch", type=int, default=None,
                        help="general questions per batch (default: 96)")
    parser.add_argument("--steps", type=int, default=None,
                        help="number of batches (default: enough to use every general question once)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument("--general-sources", dest="general_sources", nargs="+", default=None, metavar="NAME",
                        help="pool all input rows and treat those with these data_source values as general")
    parser.add_argument("--no-shuffle-within-batch", dest="shuffle_within_batch", action="store_false",
                        default=None, help="keep target rows first in each batch (default: shuffle each batch)")
    parser.add_argument("--config", default=None, metavar="YAML", help="YAML/JSON file with the same options")


def run(args) -> int:
    from heal.config import load_config, merge_args
    from heal.data.mix import MixConfig, mix_files

    cfg = load_config(args.config, MixConfig) if args.config else MixConfig()
    cfg = merge_args(cfg, args, ["target", "general", "output", "k", "repeat", "general_per_batch", "steps",
                                 "seed", "general_sources", "shuffle_within_batch"])
    for name, flag in (("target", "--target"), ("output", "--output")):
        if not getattr(cfg, name):
            raise ValueError(f"{flag} is required (or '{name}' in --config)")
    summary = mix_files(cfg)
    print(json.dumps(summary))
    print(f"verl: data.train_files={cfg.output} data.shuffle=False "
          f"data.train_batch_size={summary['batch_size']}")
    return 0
