"""Pictures: entropy dynamics per domain, the pairwise ED distance heatmap (paper Figure 9),
entropy curves over training steps, and the selection report's figure.

Everything draws with matplotlib's Agg backend into a PNG file (its folder must exist) and returns the
file's path. A domain has one colour in every figure (:func:`domain_colors`): the target domain blue,
the general domain red, any other domain a colour picked by its name.

The distance between two entropy dynamics is ``d = -s`` (paper appendix D.1) with ``s`` the EDA
similarity (default ``kl``: ``s = -KL(softmax(a') || softmax(b'))`` after nearest-neighbour alignment),
from :func:`heal_kernels.pairwise_similarity`. Pairs involving an empty trajectory are NaN (blank).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DOMAIN_COLORS",
    "domain_color",
    "domain_colors",
    "entropy_temperature_note",
    "distance_matrix",
    "domain_order",
    "plot_distance_heatmap",
    "plot_distance_heatmaps_by_step",
    "plot_entropy_dynamics",
    "plot_entropy_curves",
    "entropy_metric_keys",
    "plot_selection",
]

# One colour per domain in every figure (demo report, heal plot curves / dynamics, the selection report):
# HEAL's two roles have fixed colours, any other domain (a data_source name) keeps one picked by its name.
TARGET_COLOR = "#1f77b4"  # blue
GENERAL_COLOR = "#d62728"  # red
DOMAIN_COLORS = {"target": TARGET_COLOR, "general": GENERAL_COLOR}
_OTHER_COLORS = ["#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _domain_role(label: str) -> str:
    """``"target (heal_demo_math)"`` (the demo's labels) -> ``"target"``; other labels as they are."""
    head = re.split(r"[\s(]", str(label).strip(), maxsplit=1)[0].lower()
    return head if head in DOMAIN_COLORS else str(label)


def domain_colors(labels: Sequence[str]) -> Dict[str, str]:
    """The colour of each label: ``target`` / ``general`` (also ``"target (<data_source>)"``) always
    :data:`TARGET_COLOR` / :data:`GENERAL_COLOR`; any other domain the colour its name hashes to, the
    next free one where two names of the same figure hash alike (so it does not depend on the order
    the domains come in)."""
    import hashlib

    out: Dict[str, str] = {}
    taken = set()
    for label in dict.fromkeys(labels):
        role = _domain_role(label)
        if role in DOMAIN_COLORS:
            out[label] = DOMAIN_COLORS[role]
    for label in sorted(set(labels) - set(out)):
        # md5 (a spread, not security): heal prepare's default data_sources and the demo's all differ
        start = int(hashlib.md5(str(label).encode("utf-8")).hexdigest(), 16) % len(_OTHER_COLORS)
        free = [_OTHER_COLORS[(start + i) % len(_OTHER_COLORS)] for i in range(len(_OTHER_COLORS))]
        color = next((c for c in free if c not in taken), free[0])
        taken.add(color)
        out[label] = color
    return out


def domain_color(label: str, labels: Optional[Sequence[str]] = None) -> str:
    """The colour of ``label`` in a figure that shows ``labels`` (default: only it); see :func:`domain_colors`."""
    return domain_colors(list(labels or []) + [label])[label]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Write ``fig`` to ``path``. The folder must exist: a mistyped path is an error, not a new folder."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"output folder does not exist: {folder}")
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return path


def distance_matrix(entropies: Sequence[Sequence[float]], *, metric: str = "kl",
                    kl_direction: str = "scored_first"):
    """``d = -s`` for all pairs: a float64 numpy ``[B, B]`` (row = scored trajectory); NaN for empty ones."""
    import numpy as np
    import torch

    from heal.dynamics import pack_sequences
    from heal_kernels import pairwise_similarity

    if len(entropies) == 0:
        return np.zeros((0, 0))
    values, cu = pack_sequences([torch.as_tensor(list(map(float, e)), dtype=torch.float32) for e in entropies])
    s = pairwise_similarity(values, cu, metric=metric, kl_direction=kl_direction)
    return (-s.to(torch.float64)).numpy()


def domain_order(domains: Sequence[str], first: Optional[Sequence[str]] = None) -> Tuple[List[int], List[str]]:
    """A stable permutation grouping equal domains, the ``first`` domains leading (then by first
    appearance); returns ``(order, domain names in that order)``."""
    names: List[str] = []
    for d in list(first or []) + list(domains):
        if d in domains and d not in names:
            names.append(d)
    order = sorted(range(len(domains)), key=lambda i: (names.index(domains[i]), i))
    return order, names


def entropy_temperature_note(values: Sequence[Any]) -> str:
    """Title suffix naming the temperature the entropies were taken at (``heal.entropy_temperature``):
    ``" (entropy at T=0.7)"``, or ``""`` when the logs do not say (older logs, the TRL integration)."""
    temps = sorted({float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not temps:
        return ""
    return " (entropy at T=" + "/".join(f"{t:g}" for t in temps) + ")"


def _heatmap_axes(ax, d, domains_sorted: Sequence[str], names: Sequence[str], vmin, vmax, cmap):
    import numpy as np

    im = ax.imshow(np.ma.masked_invalid(d), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    # domain blocks: separators and one tick per block
    ticks, labels, start = [], [], 0
    for name in names:
        size = sum(1 for x in domains_sorted if x == name)
        if size == 0:
            continue
        ticks.append(start + (size - 1) / 2)
        labels.append(f"{name}\n(n={size})")
        if start > 0:
            ax.axhline(start - 0.5, color="white", lw=1.5)
            ax.axvline(start - 0.5, color="white", lw=1.5)
        start += size
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    return im


def _finite_range(mats) -> Tuple[float, float]:
    import numpy as np

    vals = np.concatenate([m[np.isfinite(m)].ravel() for m in mats if m.size]) if mats else np.zeros(0)
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = 0.0, float(np.quantile(vals, 0.99))
    return lo, hi if hi > lo else lo + 1e-6


def plot_distance_heatmap(entropies: Sequence[Sequence[float]], domains: Sequence[str], path: str, *,
                          first: Optional[Sequence[str]] = None, metric: str = "kl",
                          title: Optional[str] = None, cmap: str = "magma", matrix=None) -> str:
    """Pairwise ED distance heatmap, trajectories grouped by domain (``first`` domains first).

    Dark = similar dynamics, bright = distant (as in the paper's Figure 9). The colour scale runs
    from 0 to the 99th percentile of the finite distances (diagonal included). ``matrix``: a
    precomputed ``d`` (in the input order) to skip :func:`distance_matrix`.
    """
    import numpy as np

    if len(entropies) != len(domains):
        raise ValueError(f"entropies and domains must have the same length, got {len(entropies)} and {len(domains)}")
    d = np.asarray(matrix) if matrix is not None else distance_matrix(entropies, metric=metric)
    order, names = domain_order(domains, first)
    d = d[np.ix_(order, order)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
    vmin, vmax = _finite_range([d])
    im = _heatmap_axes(ax, d, [domains[i] for i in order], names, vmin, vmax, cmap)
    fig.colorbar(im, ax=ax, label=f"distance d = -s ({metric})")
    ax.set_title(title or f"Pairwise entropy-dynamics distance ({len(domains)} trajectories)")
    return _save(fig, path)


def plot_distance_heatmaps_by_step(records: Sequence[Mapping[str, Any]], path: str, *,
                                   data_source: Optional[str] = None, steps: Optional[Sequence[int]] = None,
                                   max_per_step: int = 64, metric: str = "kl", first: Optional[Sequence[str]] = None,
                                   cmap: str = "magma") -> str:
    """One heatmap per training step side by side, one shared colour scale (Figure 9 style).

    ``records``: rollout-dump records (:mod:`heal.analysis.logs`). ``data_source``: keep only that
    domain (the paper shows the Math domain). ``steps``: which steps (default: all, at most 6 evenly
    spaced). ``max_per_step``: the first that many trajectories of each step (after filtering).
    """
    import numpy as np

    recs = [r for r in records if data_source is None or r["data_source"] == data_source]
    if not recs:
        raise ValueError(f"no rollout records{' with data_source ' + repr(data_source) if data_source else ''}")
    all_steps = sorted({int(r["step"]) for r in recs})
    if steps:
        missing = [s for s in steps if s not in all_steps]
        if missing:
            raise ValueError(f"steps {missing} not in the dump (it has {all_steps})")
        chosen = list(steps)
    elif len(all_steps) > 6:
        chosen = [all_steps[round(i * (len(all_steps) - 1) / 5)] for i in range(6)]
    else:
        chosen = all_steps
    panels = []
    for st in chosen:
        group = [r for r in recs if int(r["step"]) == st][:max_per_step]
        doms = [str(r["data_source"]) for r in group]
        d = distance_matrix([r["entropy"] for r in group], metric=metric)
        order, names = domain_order(doms, first)
        panels.append((st, d[np.ix_(order, order)], [doms[i] for i in order], names))
    vmin, vmax = _finite_range([p[1] for p in panels])
    plt = _plt()
    # constrained layout keeps each panel's tick labels (the domain names) clear of its neighbours
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.2, 4.8), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (st, d, doms, names) in zip(axes[0], panels):
        im = _heatmap_axes(ax, d, doms, names, vmin, vmax, cmap)
        ax.set_title(f"step {st}")
    fig.colorbar(im, ax=list(axes[0]), label=f"distance d = -s ({metric})", shrink=0.85)
    fig.suptitle("Pairwise entropy-dynamics distance" + (f" ({data_source})" if data_source else "")
                 + entropy_temperature_note([r.get("entropy_temperature") for r in recs]))
    return _save(fig, path)


def plot_entropy_dynamics(entropies: Sequence[Sequence[float]], domains: Sequence[str], path: str, *,
                          first: Optional[Sequence[str]] = None, title: Optional[str] = None) -> str:
    """Per-token entropy along the response, one panel per domain: every trajectory as a thin line
    and the mean over the trajectories still running at each position (thick), plus a last panel
    comparing the domain means on a normalised position axis (each trajectory resampled to 50 points)."""
    import numpy as np

    if len(entropies) != len(domains):
        raise ValueError(f"entropies and domains must have the same length, got {len(entropies)} and {len(domains)}")
    _, names = domain_order(domains, first)
    colors = domain_colors(names)
    plt = _plt()
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.6 * (len(names) + 1), 3.6), squeeze=False)
    axes = axes[0]
    grid = np.linspace(0, 1, 50)
    for k, name in enumerate(names):
        ax = axes[k]
        color = colors[name]
        seqs = [np.asarray(e, dtype=float) for e, d in zip(entropies, domains) if d == name]
        seqs_ne = [s for s in seqs if s.size]
        for s in seqs_ne:
            ax.plot(np.arange(s.size), s, color=color, alpha=0.25, lw=0.7)
        if seqs_ne:
            width = max(s.size for s in seqs_ne)
            tot, cnt = np.zeros(width), np.zeros(width)
            for s in seqs_ne:
                tot[: s.size] += s
                cnt[: s.size] += 1
            ax.plot(np.arange(width), tot / np.maximum(cnt, 1), color=color, lw=2.2, label="mean")
            resampled = [np.interp(grid, np.linspace(0, 1, s.size), s) if s.size > 1 else np.full_like(grid, s[0])
                         for s in seqs_ne]
            mean_curve = np.mean(resampled, axis=0)
            axes[-1].plot(grid, mean_curve, color=color, lw=2,
                          label=f"{name} (mean {np.mean(np.concatenate(seqs_ne)):.2f} nats)")
        ax.set_title(f"{name}: {len(seqs)} trajectories")
        ax.set_xlabel("response token")
        ax.set_ylabel("token entropy (nats)")
        ax.grid(alpha=0.3)
    axes[-1].set_title("domain means (normalised position)")
    axes[-1].set_xlabel("position in response (0 = first token, 1 = last)")
    axes[-1].set_ylabel("token entropy (nats)")
    axes[-1].grid(alpha=0.3)
    if any(len(e) for e in entropies):
        axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


_ENTROPY_KEY_RE = re.compile(r"^eda/entropy(?:_mean)?_(\w+)$")
# eda/entropy_* keys that are not a domain's entropy (the TRL integration's timing / pass flag)
_NOT_DOMAIN_ENTROPY = ("eda/entropy_forward_time_s", "eda/entropy_shared_pass", "eda/entropy_source")


def entropy_metric_keys(metrics: Mapping[int, Mapping[str, float]]) -> List[str]:
    """Default curves: ``eda/entropy_<domain>`` / ``eda/entropy_mean_<domain>`` keys, else
    ``actor/entropy`` (verl's mean policy entropy) when present."""
    keys = sorted({k for rec in metrics.values() for k in rec
                   if _ENTROPY_KEY_RE.match(k) and k not in _NOT_DOMAIN_ENTROPY})
    if not keys:
        keys = sorted({k for rec in metrics.values() for k in rec if k in ("actor/entropy", "actor/entropy_loss")})
    return keys


def plot_entropy_curves(metrics: Mapping[int, Mapping[str, float]], path: str, *,
                        keys: Optional[Sequence[str]] = None, title: Optional[str] = None,
                        smooth: int = 1) -> str:
    """Metric curves over training steps (default: the per-domain entropy keys, see
    :func:`entropy_metric_keys`). ``smooth``: centred moving-average window (1 = raw)."""
    import numpy as np

    keys = list(keys) if keys else entropy_metric_keys(metrics)
    if not keys:
        raise ValueError("no entropy metrics found (expected keys like eda/entropy_mean_target, "
                         "eda/entropy_mean_general or actor/entropy); pass keys=... to choose")
    present = {k for rec in metrics.values() for k in rec}
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"metric keys not in the log: {missing}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    labels = {key: (m.group(1) if m else key) for key in keys for m in [_ENTROPY_KEY_RE.match(key)]}
    colors = domain_colors(list(labels.values()))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(s, rec[key]) for s, rec in metrics.items() if key in rec]
        xs = np.array([p[0] for p in pts], dtype=float)
        ys = np.array([p[1] for p in pts], dtype=float)
        if smooth > 1 and ys.size >= smooth:
            kernel = np.ones(smooth) / smooth
            ys = np.convolve(np.pad(ys, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"), kernel, mode="valid")
        ax.plot(xs, ys, lw=1.8, color=colors[labels[key]], label=labels[key],
                marker="o" if xs.size <= 30 else None, ms=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean token entropy (nats)")
    ax.set_title(title or "Entropy per domain over training"
                 + entropy_temperature_note([rec.get("heal/entropy_temperature") for rec in metrics.values()]))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_selection(stats: Sequence[Any], chosen: Sequence[Any], path: str) -> str:
    """Score histogram (chosen vs rejected) and the mean ± sd of each group's statistics, one axis per
    unit: Acc and Uncertainty are fractions in [0, 1], Diversity and the score c = Uncertainty x
    Diversity are in nats."""
    import numpy as np

    chosen_keys = {s.key for s in chosen}
    rej = [s for s in stats if s.key not in chosen_keys]
    ch = [s for s in stats if s.key in chosen_keys]
    plt = _plt()
    fig, (ax1, ax_frac, ax_nats) = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained",
                                                gridspec_kw={"width_ratios": [1.5, 1, 1]})
    scores = np.array([s.score for s in stats], dtype=float)
    bins = np.linspace(0, max(scores.max() if scores.size else 1.0, 1e-6), 21)
    ax1.hist([[s.score for s in rej], [s.score for s in ch]], bins=bins, stacked=True,
             color=["#bbbbbb", "#d62728"], label=[f"rejected ({len(rej)})", f"chosen ({len(ch)})"])
    if ch:
        ax1.axvline(min(s.score for s in ch), color="k", ls="--", lw=1, label="cut")
    ax1.set_xlabel("score c = Uncertainty x Diversity (nats)")
    ax1.set_ylabel("questions")
    ax1.set_title("Score distribution")
    ax1.legend(fontsize=8)
    groups = ((-0.2, ch, "#d62728", "chosen"), (0.2, rej, "#888888", "rejected"))
    for ax, names, attrs, ylabel, title in (
            (ax_frac, ["Acc", "Uncertainty"], ["acc", "uncertainty"], "fraction (0-1)", "Acc, Uncertainty"),
            (ax_nats, ["Diversity", "score"], ["diversity", "score"], "nats", "Diversity, score")):
        x = np.arange(len(names))
        for off, group, color, label in groups:
            means = [np.mean([getattr(s, a) for s in group]) if group else 0.0 for a in attrs]
            sds = [np.std([getattr(s, a) for s in group]) if group else 0.0 for a in attrs]
            ax.bar(x + off, means, width=0.4, yerr=sds, color=color, label=label, capsize=3)
        ax.set_xticks(x)
        ax.set_xticklabels(names)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (mean ± sd)")
        ax.grid(axis="y", alpha=0.3)
    ax_frac.set_ylim(0, 1.05)
    ax_nats.set_ylim(bottom=0)
    ax_frac.legend(fontsize=8)
    return _save(fig, path)
