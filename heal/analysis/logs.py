"""The two file formats ``heal plot`` reads (and the demo / integrations write).

Metrics log (``heal plot curves``), one JSON object per line, any of:

* flat: ``{"step": 12, "eda/entropy_mean_target": 0.41, "eda/entropy_mean_general": 0.57, ...}`` -- e.g.
  the metrics dict returned by :func:`heal.reward.eda_step` with the step added;
* verl's file logger (``trainer.logger=['file']``, ``VERL_FILE_LOGGER_PATH``):
  ``{"step": 12, "data": {"actor/entropy": 0.5, ...}}``;
* verl's console logger lines pasted into a text file: ``step:12 - actor/entropy:0.5 - ...``, also as
  Ray prints them (``(TaskRunner pid=123) step:12 - ...``, ANSI colour codes, a trailing
  ``[repeated 2x across cluster]``: all stripped); lines not of that form are skipped;
* TRL's ``trainer_state.json`` (written with each checkpoint, ``out/checkpoint-*/trainer_state.json``):
  one JSON document ``{"log_history": [{"step": 12, "eda/entropy_mean_target": 0.41, ...}, ...]}``
  (entries without a ``step`` are skipped).

Non-numeric values are ignored. Several records for one step are merged (later keys win).

Rollout dump (``heal plot heatmap`` / ``heal plot dynamics``), one JSON object per trajectory::

    {"step": 0, "data_source": "math", "entropy": [0.91, 0.12, ...],
     "uid": "q3", "acc": 1.0, "text": "..."}

``entropy`` (per-token entropies of the response, required) and ``data_source`` (required) ;
``step`` defaults to 0; ``uid`` (prompt id), ``acc`` and anything else are optional and kept.

:func:`write_rollout_dump` writes a whole dump (overwrites); :func:`append_rollout_dump` appends one
training step's trajectories, which is what the verl (``heal.rollout_dump``) and TRL
(``heal_rollout_dump``) integrations call once per step.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "load_metrics", "load_rollout_dump", "write_rollout_dump", "append_rollout_dump", "parse_console_line",
]

_CONSOLE_RE = re.compile(r"^\s*step:(\d+)\s*-\s*(.*)$")
# what Ray adds to a worker's console output: colour codes, "(TaskRunner pid=123)" / "(WorkerDict pid=1,
# ip=10.0.0.2)" in front, "[repeated 2x across cluster]" behind (log deduplication)
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RAY_PREFIX_RE = re.compile(r"^\s*\([^()]*\bpid=\d+[^()]*\)\s*")
_RAY_REPEATED_RE = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")


def _strip_console_decorations(line: str) -> str:
    """A console line without Ray's colour codes, ``(Actor pid=N)`` prefix and dedup suffix."""
    line = _ANSI_RE.sub("", line)
    line = _RAY_PREFIX_RE.sub("", line, count=1)
    return _RAY_REPEATED_RE.sub("", line)


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def parse_console_line(line: str) -> Optional[Dict[str, float]]:
    """``step:3 - a/b:0.5 - c:1`` -> ``{"step": 3, "a/b": 0.5, "c": 1.0}``; None if not such a line.
    Ray's decorations (``(TaskRunner pid=N)`` prefix, ANSI colours, dedup suffix) are stripped first."""
    m = _CONSOLE_RE.match(_strip_console_decorations(line))
    if not m:
        return None
    rec: Dict[str, float] = {"step": int(m.group(1))}
    for part in m.group(2).split(" - "):
        key, sep, val = part.rpartition(":")
        num = _number(val.strip())
        if sep and key.strip() and num is not None:
            rec[key.strip()] = num
    return rec


def _trainer_state_history(path: str) -> Optional[list]:
    """TRL/transformers ``trainer_state.json``'s ``log_history``, or None if ``path`` is not one."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("{") or '"log_history"' not in text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None  # a JSON-lines file (several documents)
    if not isinstance(obj, Mapping) or "log_history" not in obj:
        return None
    if not isinstance(obj["log_history"], list):
        raise ValueError(f"{path}: 'log_history' must be a list of records")
    return obj["log_history"]


def load_metrics(path: str) -> Dict[int, Dict[str, float]]:
    """``{step: {metric: value}}`` from a metrics log (see the module docstring), steps ascending."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics log not found: {path}")
    out: Dict[int, Dict[str, float]] = {}
    history = _trainer_state_history(path)
    if history is not None:
        for entry in history:
            if not isinstance(entry, Mapping) or "step" not in entry:
                continue
            rec = {k: _number(v) for k, v in entry.items() if k != "step"}
            clean = {k: v for k, v in rec.items() if v is not None and math.isfinite(v)}
            out.setdefault(int(entry["step"]), {}).update(clean)
        if not out:
            raise ValueError(f"{path}: no metrics records found (log_history has no entry with a 'step')")
        return dict(sorted(out.items()))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if not line.startswith("{"):  # a console line, perhaps as Ray prints it
                line = _strip_console_decorations(line).strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
                if "step" not in obj:
                    raise ValueError(f"{path}:{lineno}: record has no 'step'")
                data = obj["data"] if isinstance(obj.get("data"), Mapping) else obj
                step = int(obj["step"])
                rec = {k: _number(v) for k, v in data.items() if k != "step"}
            else:
                parsed = parse_console_line(line)
                if parsed is None:
                    continue
                step = int(parsed.pop("step"))
                rec = parsed
            clean = {k: v for k, v in rec.items() if v is not None and math.isfinite(v)}
            out.setdefault(step, {}).update(clean)
    if not out:
        raise ValueError(f"{path}: no metrics records found")
    return dict(sorted(out.items()))


def load_rollout_dump(path: str) -> List[Dict[str, Any]]:
    """The records of a rollout dump (see the module docstring); ``step`` filled in (default 0)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rollout dump not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            for field in ("entropy", "data_source"):
                if field not in rec:
                    raise ValueError(f"{path}:{lineno}: record has no {field!r}")
            if not isinstance(rec["entropy"], list):
                raise ValueError(f"{path}:{lineno}: 'entropy' must be a list of floats")
            rec["step"] = int(rec.get("step", 0))
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no rollout records found")
    return out


def _write_records(f: IO[str], records: Iterable[Mapping[str, Any]]) -> int:
    """Validate and write rollout records as JSON lines. Entropies are written as float32 values,
    exactly: each as the shortest decimal that reads back as the same float32 (so a reward
    recomputed from a dump equals the one the trainer computed)."""
    import numpy as np

    n = 0
    for rec in records:
        if "entropy" not in rec or "data_source" not in rec:
            raise ValueError("every rollout record needs 'entropy' and 'data_source'")
        rec = dict(rec)
        rec["entropy"] = [float(str(x)) for x in np.asarray(rec["entropy"], dtype=np.float32).reshape(-1)]
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n += 1
    return n


def _open_dump(path: str, mode: str) -> IO[str]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode, encoding="utf-8")


def write_rollout_dump(path: str, records: Iterable[Mapping[str, Any]]) -> str:
    """Write records (each with ``entropy`` and ``data_source``) as a rollout dump JSONL (overwrites)."""
    with _open_dump(path, "w") as f:
        _write_records(f, records)
    return path


def _plain(value: Any) -> Any:
    """JSON-friendly scalar: tensors / numpy scalars -> Python numbers (floats rounded to 6 decimals)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)


def append_rollout_dump(
    path: str,
    step: int,
    entropies: Sequence[Any],
    data_sources: Sequence[str],
    **columns: Sequence[Any],
) -> int:
    """Append one training step's trajectories to the rollout dump at ``path``; return the count.

    ``entropies``: one 1-D sequence per trajectory (a tensor, array or list of the response's valid
    tokens only). ``data_sources``: one name per trajectory. Every keyword (e.g. ``uid``, ``acc``,
    ``eda_reward``, ``s_target``) is a per-trajectory column of the same length, stored under its
    name (tensors and numpy values become Python numbers, floats rounded to 6 decimals, NaN/inf
    become null). Entropies are stored as exact float32 values. Writes one JSON line per trajectory (``{"step": step, "data_source": ...,
    "entropy": [...], ...}``), creating parent directories; call it once per step.
    """
    n = len(entropies)
    if len(data_sources) != n:
        raise ValueError(f"data_sources has {len(data_sources)} entries for {n} trajectories")
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} entries for {n} trajectories")
    cols = {name: (col.tolist() if hasattr(col, "tolist") else list(col)) for name, col in columns.items()}

    def records():
        for i in range(n):
            ent = entropies[i]
            if hasattr(ent, "detach"):
                ent = ent.detach().float().cpu()
            ent = ent.tolist() if hasattr(ent, "tolist") else list(ent)
            if not isinstance(ent, list):
                raise ValueError(f"entropies[{i}] must be 1-D")
            rec = {"step": int(step), "data_source": str(data_sources[i]), "entropy": ent}
            rec.update((name, _plain(col[i])) for name, col in cols.items())
            yield rec

    with _open_dump(path, "a") as f:
        return _write_records(f, records())
