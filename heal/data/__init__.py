"""Datasets in verl's parquet layout: converters per domain, few-shot sampling, hybrid mixing.

* :mod:`heal.data.io`: read JSON / JSONL / parquet / CSV records; write parquet rows (atomically);
  :func:`check_training_rows`, the columns a training file must have (:class:`DataFileError`).
* :mod:`heal.data.convert`: :func:`convert_records` / :func:`prepare_file` (``heal prepare``).
* :mod:`heal.data.mix`: :func:`sample_few_shot`, :func:`split_by_source`, :func:`hybrid_mix`,
  :func:`mix_files` (``heal mix``).
"""

from heal.data.convert import DOMAINS, PROMPTS, ConversionStats, PrepareConfig, convert_records, prepare_file
from heal.data.io import (DataFileError, check_training_rows, read_parquet_rows, read_records, read_training_rows,
                          write_parquet_rows)
from heal.data.mix import MixConfig, hybrid_mix, mix_files, sample_few_shot, split_by_source

__all__ = [
    "DOMAINS", "PROMPTS", "ConversionStats", "PrepareConfig", "convert_records", "prepare_file",
    "read_records", "read_parquet_rows", "read_training_rows", "write_parquet_rows", "check_training_rows",
    "DataFileError",
    "MixConfig", "hybrid_mix", "mix_files", "sample_few_shot", "split_by_source",
]
