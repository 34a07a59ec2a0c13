"""Few-shot sampling and the hybrid (target + general) training file of HEAL (paper §3.1, §4.1).

Every training batch holds the K few-shot target questions, each ``repeat`` times, plus
``general_per_batch`` general-domain questions, so ``batch_size = k * repeat + general_per_batch``.
General questions are taken in a seeded random order without replacement; when the pool is
used up a new seeded permutation starts (a new general epoch). With ``shuffle_within_batch``
the rows of each batch are put in a seeded random order. Everything is deterministic for a seed.

The paper's setting: 32 target + 96 general questions per 128-question batch
(``k=32, repeat=1, general_per_batch=96``); with 384 selected general questions one pass over
them is 4 steps, in which every target question is seen 4 times (``steps=4``).

The output is one parquet file whose **row order is the batch order**: rows
``[s * batch_size, (s + 1) * batch_size)`` are step ``s``. Train on it with shuffling off and
the batch size equal to ``batch_size``; in verl::

    data.train_files=hybrid.parquet data.shuffle=False data.train_batch_size=<batch_size>
    data.filter_overlong_prompts=False   # (or make sure no prompt is too long: dropping a row
                                          #  shifts every later batch)

``extra_info`` of each row gains ``hybrid_step`` (its batch) and ``hybrid_role``
(``"target"`` / ``"general"``). Which rows are target and which general comes from the
files they were read from, or from their ``data_source`` (``general_sources``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import random
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from heal.data.io import check_training_rows, read_training_rows, row_label, write_parquet_rows

__all__ = ["sample_few_shot", "split_by_source", "hybrid_mix", "MixConfig", "mix_files"]


def sample_few_shot(rows: Sequence[Any], k: int, seed: int = 0) -> List[Any]:
    """``k`` distinct rows drawn at random (seeded), in the order drawn."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > len(rows):
        raise ValueError(f"k={k} is larger than the {len(rows)} rows available")
    return [copy.deepcopy(rows[i]) for i in random.Random(seed).sample(range(len(rows)), k)]


def split_by_source(rows: Iterable[Dict[str, Any]], general_sources: Iterable[str]
                    ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(target_rows, general_rows)``: general rows are those whose ``data_source`` is listed."""
    general_sources = set(general_sources)
    target, general = [], []
    for i, r in enumerate(rows):
        if "data_source" not in r:
            raise ValueError(f"{row_label(i)}: missing field 'data_source'")
        (general if r["data_source"] in general_sources else target).append(r)
    return target, general


def _tagged(row: Dict[str, Any], step: int, role: str) -> Dict[str, Any]:
    r = copy.deepcopy(row)
    extra = dict(r.get("extra_info") or {})
    extra["hybrid_step"] = step
    extra["hybrid_role"] = role
    r["extra_info"] = extra
    return r


def hybrid_mix(
    target_rows: Sequence[Dict[str, Any]],
    general_rows: Sequence[Dict[str, Any]],
    *,
    k: int = 32,
    repeat: int = 1,
    general_per_batch: int = 96,
    steps: Optional[int] = None,
    seed: int = 0,
    shuffle_within_batch: bool = True,
) -> List[Dict[str, Any]]:
    """Rows of ``steps`` hybrid batches, in batch order (see the module docstring).

    ``target_rows``: if more than ``k``, a seeded sample of ``k`` is taken (:func:`sample_few_shot`).
    ``steps``: default ``ceil(len(general_rows) / general_per_batch)`` (every general question at
    least once), or 1 when ``general_per_batch == 0``.
    """
    for name, value, lo in (("k", k, 1), ("repeat", repeat, 1), ("general_per_batch", general_per_batch, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if len(target_rows) < k:
        raise ValueError(f"k={k} but only {len(target_rows)} target rows")
    if general_per_batch > 0 and not general_rows:
        raise ValueError("general_per_batch > 0 but there are no general rows")
    if general_per_batch > len(general_rows) and general_rows:
        raise ValueError(f"general_per_batch={general_per_batch} is larger than the "
                         f"{len(general_rows)} general rows")
    rng = random.Random(seed)
    target = list(target_rows) if len(target_rows) == k else sample_few_shot(target_rows, k, seed)
    if steps is None:
        steps = max(1, math.ceil(len(general_rows) / general_per_batch)) if general_per_batch else 1
    order: Deque[int] = collections.deque()
    out: List[Dict[str, Any]] = []
    for step in range(steps):
        batch = [_tagged(r, step, "target") for r in target for _ in range(repeat)]
        picked: List[int] = []
        seen = set()
        while len(picked) < general_per_batch:
            if not order:
                perm = list(range(len(general_rows)))
                rng.shuffle(perm)
                # no question twice in one batch across a general-epoch boundary
                order = collections.deque([i for i in perm if i not in seen] + [i for i in perm if i in seen])
            i = order.popleft()
            picked.append(i)
            seen.add(i)
        batch += [_tagged(general_rows[i], step, "general") for i in picked]
        if shuffle_within_batch:
            rng.shuffle(batch)
        out.extend(batch)
    return out


@dataclasses.dataclass
class MixConfig:
    """Options of ``heal mix`` (also the schema of its ``--config`` YAML file)."""

    target: List[str] = dataclasses.field(default_factory=list)  # parquet files (heal prepare output)
    general: List[str] = dataclasses.field(default_factory=list)
    output: str = ""
    k: int = 32
    repeat: int = 1
    general_per_batch: int = 96
    steps: Optional[int] = None
    seed: int = 0
    general_sources: Optional[List[str]] = None  # split all input rows by data_source instead of by file
    shuffle_within_batch: bool = True

    def validate(self) -> "MixConfig":
        for name in ("k", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.general_per_batch < 0:
            raise ValueError(f"field 'general_per_batch' must be >= 0, got {self.general_per_batch}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"field 'steps' must be >= 1, got {self.steps}")
        return self

    @property
    def batch_size(self) -> int:
        return self.k * self.repeat + self.general_per_batch


def _sources(files: Sequence[Tuple[str, List[Dict[str, Any]]]]) -> Dict[str, List[str]]:
    """data_source -> the files (in order, once each) that hold it."""
    out: Dict[str, List[str]] = {}
    for path, rows in files:
        for source in dict.fromkeys(r["data_source"] for r in rows):
            out.setdefault(source, []).append(path)
    return out


def mix_files(config: MixConfig) -> Dict[str, Any]:
    """Read the parquet inputs, mix them (:func:`hybrid_mix`) and write ``config.output``.

    Before any work every input file is checked (:func:`heal.data.io.read_training_rows`: the
    columns verl's dataset loader and heal's reward read; :class:`heal.data.io.DataFileError` names
    the file, the missing / invalid columns and the first bad row, 1-based), and, when target and
    general rows come from separate files, no ``data_source`` may be on both sides (the EDA reward
    tells target from general rows by ``data_source``). The output appears only once complete.

    Returns a summary: batch_size, steps, rows, target/general counts and data_sources.
    """
    config.validate()
    if not config.output:
        raise ValueError("field 'output' is required")
    if not config.target:
        raise ValueError("field 'target' is required (one or more parquet files)")
    if config.general_sources is None and not config.general and config.general_per_batch:
        raise ValueError("field 'general' is required unless general_per_batch is 0 or general_sources is given")
    target_files = [(str(p), read_training_rows(p)) for p in config.target]
    general_files = [(str(p), read_training_rows(p)) for p in config.general]
    target = [r for _, rows in target_files for r in rows]
    general = [r for _, rows in general_files for r in rows]
    if config.general_sources is not None:
        target, general = split_by_source(target + general, config.general_sources)
        if not general and config.general_per_batch:
            raise ValueError(f"no row has a data_source in general_sources {config.general_sources}")
    else:
        t_src, g_src = _sources(target_files), _sources(general_files)
        both = [s for s in t_src if s in g_src]
        if both:
            files = lambda by: ", ".join(dict.fromkeys(p for s in both for p in by[s]))  # noqa: E731
            raise ValueError(
                f"data_source {', '.join(repr(s) for s in both)} is on both sides of the mix (target: "
                f"{files(t_src)}; general: {files(g_src)}): the EDA reward tells target from general rows "
                "by data_source, so its comparison would be meaningless. Give one side its own data_source "
                "(heal prepare --data-source NAME), or pool the files with --general-sources NAME")
    rows = hybrid_mix(target, general, k=config.k, repeat=config.repeat,
                      general_per_batch=config.general_per_batch, steps=config.steps, seed=config.seed,
                      shuffle_within_batch=config.shuffle_within_batch)
    steps = len(rows) // config.batch_size
    summary = {
        "batch_size": config.batch_size,
        "steps": steps,
        "rows": len(rows),
        "k": config.k,
        "repeat": config.repeat,
        "general_per_batch": config.general_per_batch,
        "seed": config.seed,
        "target_pool": len(target),
        "general_pool": len(general),
        "target_sources": sorted({r["data_source"] for r in target}),
        "general_sources": sorted({r["data_source"] for r in general}),
    }
    check_training_rows(rows, config.output)
    write_parquet_rows(rows, config.output, metadata={"heal.mix": json.dumps(summary)})
    summary["output"] = config.output
    return summary
