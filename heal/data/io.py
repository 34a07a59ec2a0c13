"""Reading local dataset files (JSON / JSONL / parquet / CSV) and writing verl parquet files.

Every parquet row read or written here is checked by :func:`heal.scoring.validate_row`: a row whose
``extra_info`` limits have the wrong type or range (e.g. ``max_output_bytes=4194304.0``), or whose
ground truth its checker cannot use, raises :class:`heal.scoring.InvalidRowError` naming the file,
the row and the key, when the file is prepared or loaded rather than in the middle of training.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["read_records", "read_parquet_rows", "write_parquet_rows", "validate_rows", "FORMATS"]

# extension -> format name
FORMATS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}


def _format_of(path: str, fmt: Optional[str]) -> str:
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise ValueError(f"format must be one of {sorted(set(FORMATS.values()))}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the format of {path!r} from its extension; use one of "
                         f"{', '.join(sorted(FORMATS))} (or pass format=)")
    return FORMATS[ext]


def _rows_from_json(data: Any, path: str) -> List[Dict[str, Any]]:
    if isinstance(data, dict):
        # {"data": [...]} / {"rows": [...]} / ... or a dict of equal-length columns
        for key in ("data", "rows", "records", "examples", "train", "test"):
            if isinstance(data.get(key), list):
                return _rows_from_json(data[key], path)
        if data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise ValueError(f"{path}: column lists have different lengths {sorted(lengths)}")
            n = lengths.pop()
            return [{k: v[i] for k, v in data.items()} for i in range(n)]
        raise ValueError(f"{path}: expected a list of records, {{'data': [...]}} or a dict of columns")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, not an object")
    return data


def read_records(path, fmt: Optional[str] = None) -> List[Dict[str, Any]]:
    """The records (dicts) of a local file; the format comes from the extension unless ``fmt`` is given.

    ``.json`` (a list, ``{"data": [...]}`` or a dict of columns), ``.jsonl``/``.ndjson`` (one
    object per line; blank lines skipped), ``.parquet``, ``.csv`` / ``.tsv`` (all values are
    strings; JSON-looking cells are decoded by the converters).
    """
    path = os.fspath(path)
    fmt = _format_of(path, fmt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if fmt == "parquet":
        return read_parquet_rows(path)
    with open(path, encoding="utf-8", newline="" if fmt in ("csv", "tsv") else None) as f:
        if fmt == "json":
            try:
                return _rows_from_json(json.load(f), path)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if fmt == "jsonl":
            rows = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected an object, got {type(row).__name__}")
                rows.append(row)
            return rows
        reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
        return [dict(r) for r in reader]


def read_parquet_rows(path) -> List[Dict[str, Any]]:
    """All rows of a parquet file as plain Python dicts / lists (nested columns included)."""
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parquet file not found: {path}")
    rows = pq.read_table(path).to_pylist()
    validate_rows(rows, path)
    return rows


def validate_rows(rows, where: str = "rows") -> None:
    """:func:`heal.scoring.validate_row` on each row that is a dict; the error names ``where`` and the row."""
    from heal.scoring import InvalidRowError, validate_row

    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        try:
            validate_row(row)
        except InvalidRowError as exc:
            raise InvalidRowError(f"{where}: row {i}: {exc}") from None


def write_parquet_rows(rows: Iterable[Dict[str, Any]], path, metadata: Optional[Dict[str, str]] = None) -> str:
    """Write rows (dicts) as one parquet file, row order kept; ``metadata`` goes in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    if not rows:
        raise ValueError("no rows to write")
    path = os.fspath(path)
    validate_rows(rows, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    pq.write_table(table, path)
    return path
