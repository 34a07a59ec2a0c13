"""Plots and reports: entropy dynamics per domain, pairwise ED distance heatmaps (paper Figure 9),
entropy curves over training steps, selection reports.

* :mod:`heal.analysis.logs` -- the metrics-log and rollout-dump file formats ``heal plot`` reads.
* :mod:`heal.analysis.plots` -- the matplotlib (Agg) figures.

Imports are lazy (matplotlib / torch load when a figure is drawn).
"""

from heal.analysis.logs import (
    append_rollout_dump,
    load_metrics,
    load_rollout_dump,
    parse_console_line,
    write_rollout_dump,
)
from heal.analysis.plots import (
    distance_matrix,
    domain_order,
    entropy_metric_keys,
    plot_distance_heatmap,
    plot_distance_heatmaps_by_step,
    plot_entropy_curves,
    plot_entropy_dynamics,
    plot_selection,
)

__all__ = [
    "load_metrics", "load_rollout_dump", "write_rollout_dump", "append_rollout_dump", "parse_console_line",
    "distance_matrix", "domain_order", "plot_distance_heatmap", "plot_distance_heatmaps_by_step",
    "plot_entropy_dynamics", "plot_entropy_curves", "entropy_metric_keys", "plot_selection",
]
