"""Reading local dataset files (JSON / JSONL / parquet / CSV) and writing verl parquet files.

Every parquet row read or written here is checked by :func:`heal.scoring.validate_row`: a row whose
``extra_info`` limits have the wrong type or range (e.g. ``max_output_bytes=4194304.0``), or whose
ground truth its checker cannot use, raises :class:`heal.scoring.InvalidRowError` naming the file,
the row and the key, when the file is prepared or loaded rather than in the middle of training.

Every row number in a message is 1-based and says so (``row 3 (1-based)``); JSONL / CSV records also
name their line (``row 3 (1-based), line 5``). Text files are decoded strictly (UTF-8 by default,
a leading BOM accepted): a byte that does not decode is reported with the file, its byte offset,
line and column, and the fix (``--encoding`` / ``encoding=``, or ``iconv``).

:func:`check_training_rows` is the contract of a training file (what verl's ``RLHFDataset`` and
heal's reward read): ``data_source`` (a non-empty str), ``prompt`` (a non-empty chat list of
``{"role": str, "content": str}``), ``reward_model`` (a mapping with a non-empty str
``ground_truth``) and ``extra_info`` (a mapping; its ``index``, if any, an int). A file that breaks
it raises :class:`DataFileError` naming the file, every missing or invalid column, the first bad
row and the fix. :func:`write_parquet_rows` writes a temporary file next to the target and renames
it only once it is complete, so a failed write never leaves a partial file (or clobbers an old one).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["read_records", "read_records_with_lines", "read_parquet_rows", "read_training_rows",
           "write_parquet_rows", "validate_rows", "check_training_rows", "row_label", "DataFileError",
           "TRAINING_COLUMNS", "FORMATS"]

# the columns of a training file (verl's RLHFDataset + reward loop, heal's compute_score), in order
TRAINING_COLUMNS = ("data_source", "prompt", "reward_model", "extra_info")

PREPARE_HINT = ("run `heal prepare` on it first (heal prepare --domain DOMAIN --input FILE --output "
                "OUT.parquet), which writes data_source, prompt (a chat list), ability, "
                "reward_model {style, ground_truth} and extra_info")


class DataFileError(ValueError):
    """A data file (or list of rows) that heal refuses to use or write as it stands.

    ``path``: the file; ``missing``: the missing columns; ``invalid``: column -> (0-based row index,
    reason) of the first bad row of each invalid column; ``first_bad_row``: 0-based index or None.
    The message gives rows 1-based.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, missing: Sequence[str] = (),
                 invalid: Optional[Dict[str, Tuple[int, str]]] = None, first_bad_row: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.missing = list(missing)
        self.invalid = dict(invalid or {})
        self.first_bad_row = first_bad_row


def row_label(index: int, lines: Optional[Sequence[int]] = None) -> str:
    """``"row 3 (1-based)"`` for the 0-based ``index`` 2; with ``lines`` (the line each record starts
    on, 1-based) ``"row 3 (1-based), line 5"``."""
    label = f"row {index + 1} (1-based)"
    if lines is not None and 0 <= index < len(lines) and lines[index] is not None:
        label += f", line {lines[index]}"
    return label

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
            raise ValueError(f"{path}: {row_label(i)} is a {type(row).__name__}, not an object")
    return data


def _canonical_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None


def _decode(data: bytes, path: str, encoding: str) -> str:
    """``data`` decoded strictly; a UnicodeDecodeError becomes a ValueError naming the file, the byte
    offset, line and column, and the fix."""
    name = _canonical_encoding(encoding)
    base = 0
    if name == "utf-8" and data.startswith(codecs.BOM_UTF8):
        base = len(codecs.BOM_UTF8)  # a UTF-8 BOM (Windows editors) is not part of the text
    try:
        return data[base:].decode(name)
    except UnicodeDecodeError as exc:
        pos = base + exc.start
        line = data.count(b"\n", 0, pos) + 1
        column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        bad = data[pos:pos + max(1, min(exc.end - exc.start, 4))].hex(" ")
        if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            guess, iconv, why = "utf-16", "UTF-16", "it starts with a UTF-16 byte-order mark"
        else:  # the usual culprits; cp1252 is the Windows superset of Latin-1
            guess, iconv, why = "latin-1", "LATIN1", "Latin-1 / Windows-1252 are common"
        stem, ext = os.path.splitext(path)
        raise ValueError(
            f"{path}: not valid {name.upper()} text: byte offset {pos} (line {line}, column {column}) is "
            f"0x{bad.replace(' ', ' 0x')} ({exc.reason}); the file is in another encoding ({why}): "
            f"pass --encoding {guess} (heal prepare; encoding= in Python), or convert it to UTF-8: "
            f"iconv -f {iconv} -t UTF-8 {path} > {stem}.utf8{ext}"
        ) from None


def read_records_with_lines(path, fmt: Optional[str] = None, encoding: str = "utf-8"
                            ) -> Tuple[List[Dict[str, Any]], Optional[List[int]]]:
    """:func:`read_records` and, for JSONL / CSV / TSV, the (1-based) line each record starts on
    (``None`` for JSON and parquet), for messages such as ``row 3 (1-based), line 5``."""
    path = os.fspath(path)
    fmt = _format_of(path, fmt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if fmt == "parquet":
        return read_parquet_rows(path), None
    with open(path, "rb") as f:
        text = _decode(f.read(), path, encoding)
    if fmt == "json":
        try:
            return _rows_from_json(json.loads(text), path), None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if fmt == "jsonl":
        rows, lines = [], []
        for lineno, line in enumerate(io.StringIO(text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object, got {type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
        return rows, lines
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        return [], []
    rows, lines = [], []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValueError(f"{path}:{start}: not valid {fmt.upper()}: {exc}") from None
        if not cells:  # a blank line
            continue
        if len(cells) > len(header):
            raise ValueError(f"{path}: {row_label(len(rows), lines + [start])}: {len(cells)} cells but the "
                             f"header has {len(header)} columns")
        rows.append({k: (cells[i] if i < len(cells) else None) for i, k in enumerate(header)})
        lines.append(start)
    return rows, lines


def read_records(path, fmt: Optional[str] = None, encoding: str = "utf-8") -> List[Dict[str, Any]]:
    """The records (dicts) of a local file; the format comes from the extension unless ``fmt`` is given.

    ``.json`` (a list, ``{"data": [...]}`` or a dict of columns), ``.jsonl``/``.ndjson`` (one
    object per line; blank lines skipped), ``.parquet``, ``.csv`` / ``.tsv`` (all values are
    strings; JSON-looking cells are decoded by the converters). Text files are decoded with
    ``encoding`` (default UTF-8; a BOM is accepted), strictly: see the module docstring.
    """
    return read_records_with_lines(path, fmt, encoding)[0]


def _read_table(path) -> Tuple[List[Dict[str, Any]], List[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parquet file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a parquet file that can be read: {exc}") from None
    return table.to_pylist(), list(table.column_names)


def read_parquet_rows(path) -> List[Dict[str, Any]]:
    """All rows of a parquet file as plain Python dicts / lists (nested columns included)."""
    rows, _ = _read_table(path)
    validate_rows(rows, os.fspath(path))
    return rows


def read_training_rows(path, hint: str = PREPARE_HINT) -> List[Dict[str, Any]]:
    """The rows of a training parquet file (as :func:`read_parquet_rows`), after
    :func:`check_training_rows`: a file verl or heal's reward cannot use raises :class:`DataFileError`."""
    rows, columns = _read_table(path)
    check_training_rows(rows, os.fspath(path), columns=columns, hint=hint)
    validate_rows(rows, os.fspath(path))
    return rows


def validate_rows(rows, where: str = "rows") -> None:
    """:func:`heal.scoring.validate_row` on each row that is a dict; the error names ``where`` and the
    row (1-based)."""
    from heal.scoring import InvalidRowError, validate_row

    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        try:
            validate_row(row)
        except InvalidRowError as exc:
            raise InvalidRowError(f"{where}: {row_label(i)}: {exc}") from None


# ------------------------------------------------------------------ the training-file contract
def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _bad_data_source(value) -> Optional[str]:
    if not isinstance(value, str) or not value.strip():
        return f"expected a non-empty str, got {_describe(value)}"
    return None


def _bad_prompt(value) -> Optional[str]:
    expected = "expected a chat list [{'role': 'user', 'content': str}, ...]"
    if not isinstance(value, (list, tuple)):
        return f"{expected}, got {_describe(value)}"
    if not value:
        return f"{expected}, got an empty list"
    for j, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            return f"{expected}; message {j + 1} (1-based) is {_describe(msg)}"
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            return f"{expected}; message {j + 1} (1-based) has role {_describe(role)}"
        if not isinstance(content, str):
            return f"{expected}; message {j + 1} (1-based) has content {_describe(content)}"
    return None


def _bad_reward_model(value) -> Optional[str]:
    if not isinstance(value, Mapping):
        return f"expected {{'style': 'rule', 'ground_truth': str}}, got {_describe(value)}"
    gt = value.get("ground_truth")
    if not isinstance(gt, str) or not gt.strip():
        return f"'ground_truth' must be a non-empty str, got {_describe(gt)}"
    return None


def _bad_extra_info(value) -> Optional[str]:
    if not isinstance(value, Mapping):
        return f"expected a mapping (struct), got {_describe(value)}"
    index = value.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        return f"'index' must be an int, got {_describe(index)}"
    return None


_COLUMN_CHECKS = {"data_source": _bad_data_source, "prompt": _bad_prompt,
                  "reward_model": _bad_reward_model, "extra_info": _bad_extra_info}


def check_training_rows(rows: Sequence[Mapping[str, Any]], where: str = "rows", *,
                        columns: Optional[Sequence[str]] = None, hint: str = PREPARE_HINT) -> None:
    """Raise :class:`DataFileError` unless every row has the columns of a training file (see the
    module docstring). The message names ``where``, every missing column, the first bad row of each
    invalid column (1-based), the first bad row overall, the columns present and ``hint``.
    ``columns``: the file's columns (default: every key of any row)."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows if isinstance(r, Mapping) for k in r))
    if not rows:
        raise DataFileError(f"{where}: has no rows", path=where, first_bad_row=None)
    missing = [c for c in TRAINING_COLUMNS if c not in columns]
    invalid: Dict[str, Tuple[int, str]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            invalid.setdefault("(row)", (i, f"is {_describe(row)}, not a mapping"))
            continue
        for col, check in _COLUMN_CHECKS.items():
            if col in missing or col in invalid:
                continue
            reason = "missing" if col not in row else check(row[col])
            if reason is not None:
                invalid[col] = (i, reason)
        if len(invalid) + len(missing) == len(TRAINING_COLUMNS) + ("(row)" in invalid):
            break
    if not missing and not invalid:
        return
    parts = []
    if missing:
        parts.append("missing column(s) " + ", ".join(repr(c) for c in missing))
    for col, (i, reason) in invalid.items():
        parts.append(f"invalid column '{col}': {row_label(i)}: {reason}" if col != "(row)"
                     else f"{row_label(i)} {reason}")
    first = 0 if missing else min(i for i, _ in invalid.values())
    have = ", ".join(columns) if columns else "none"
    raise DataFileError(
        f"{where}: not a training file verl and heal can use: {'; '.join(parts)}; first bad row: "
        f"{row_label(first)}. Its columns: {have}; {hint}",
        path=where, missing=missing, invalid=invalid, first_bad_row=first)


# ------------------------------------------------------------------ writing
def write_parquet_rows(rows: Iterable[Dict[str, Any]], path, metadata: Optional[Dict[str, str]] = None) -> str:
    """Write rows (dicts) as one parquet file, row order kept; ``metadata`` goes in the schema.

    The columns are every key of any row, in order of first appearance (a row without one gets
    null there). The file appears only once complete: the rows are checked
    (:func:`validate_rows`), written to a temporary file in the same folder, read back (row count)
    and renamed over ``path``; on any failure the temporary file is removed and an existing
    ``path`` is left as it was.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    if not rows:
        raise ValueError("no rows to write")
    path = os.fspath(path)
    validate_rows(rows, path)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"{path}: {row_label(i)} is {_describe(r)}, not a mapping")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})
    except (pa.ArrowException, TypeError) as exc:
        raise ValueError(f"{path}: the rows cannot be stored as parquet columns: {exc}") from None
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        written = pq.read_metadata(tmp).num_rows
        if written != len(rows):
            raise OSError(f"{tmp}: wrote {written} rows instead of {len(rows)}")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
