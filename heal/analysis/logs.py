"""The two file formats ``heal plot`` reads (and the demo / integrations write).

Metrics log (``heal plot curves``), one JSON object per line, any of:

* flat: ``{"step": 12, "eda/entropy_target": 0.41, "eda/entropy_general": 0.57, ...}`` -- e.g. the
  metrics dict returned by :func:`heal.reward.eda_step` with the step added;
* verl's file logger (``trainer.logger=['file']``, ``VERL_FILE_LOGGER_PATH``):
  ``{"step": 12, "data": {"actor/entropy": 0.5, ...}}``;
* verl's console logger lines pasted into a text file: ``step:12 - actor/entropy:0.5 - ...``
  (lines not of that form are skipped).

Non-numeric values are ignored. Several records for one step are merged (later keys win).

Rollout dump (``heal plot heatmap`` / ``heal plot dynamics``), one JSON object per trajectory::

    {"step": 0, "data_source": "math", "entropy": [0.91, 0.12, ...],
     "uid": "q3", "acc": 1.0, "text": "..."}

``entropy`` (per-token entropies of the response, required) and ``data_source`` (required) ;
``step`` defaults to 0; ``uid`` (prompt id), ``acc`` and anything else are optional and kept.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = ["load_metrics", "load_rollout_dump", "write_rollout_dump", "parse_console_line"]

_CONSOLE_RE = re.compile(r"^\s*step:(\d+)\s*-\s*(.*)$")


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
    """``step:3 - a/b:0.5 - c:1`` -> ``{"step": 3, "a/b": 0.5, "c": 1.0}``; None if not such a line."""
    m = _CONSOLE_RE.match(line)
    if not m:
        return None
    rec: Dict[str, float] = {"step": int(m.group(1))}
    for part in m.group(2).split(" - "):
        key, sep, val = part.rpartition(":")
        num = _number(val.strip())
        if sep and key.strip() and num is not None:
            rec[key.strip()] = num
    return rec


def load_metrics(path: str) -> Dict[int, Dict[str, float]]:
    """``{step: {metric: value}}`` from a metrics log (see the module docstring), steps ascending."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics log not found: {path}")
    out: Dict[int, Dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
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


def write_rollout_dump(path: str, records: Iterable[Mapping[str, Any]]) -> str:
    """Write records (each with ``entropy`` and ``data_source``) as a rollout dump JSONL."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            if "entropy" not in rec or "data_source" not in rec:
                raise ValueError("every rollout record needs 'entropy' and 'data_source'")
            rec = dict(rec)
            rec["entropy"] = [round(float(x), 6) for x in rec["entropy"]]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
