"""Shared benchmark plumbing: device description, timing, memory, result files, the results-folder option.

torch is imported inside the functions that need it: the benchmarks' ``add_arguments`` use this module
while ``heal --help`` builds its parser, which must stay instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence

if TYPE_CHECKING:
    import torch

# Where `heal bench NAME` writes unless --output-dir says otherwise: a folder of the current directory that
# is never the repository's committed benchmarks/results/ (the tables the README quotes). The scripts
# benchmarks/<name>.py and benchmarks/gpu_run.sh, which produce those tables, pass --output-dir explicitly.
DEFAULT_RESULTS_DIR = Path("heal-bench-results")


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores like it and says which spelling to use instead."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output_dir_argument(parser: argparse.ArgumentParser, dest: str = "output_dir") -> None:
    """``--output-dir DIR`` (default ``./heal-bench-results``) into ``args.<dest>``, and the old spelling
    ``--out-dir`` as a hidden alias that warns. Every benchmark takes its results folder this way."""
    parser.add_argument("--output-dir", dest=dest, default=str(DEFAULT_RESULTS_DIR), metavar="DIR",
                        help=f"results folder (default: ./{DEFAULT_RESULTS_DIR}; the scripts benchmarks/<name>.py "
                        "write the repository's committed tables, benchmarks/results)")
    parser.add_argument("--out-dir", dest=dest, action=_DeprecatedAlias, replacement="--output-dir",
                        default=argparse.SUPPRESS, metavar="DIR", help=argparse.SUPPRESS)


def resolve_device(name: str) -> torch.device:
    """The device a benchmark's ``--device`` names: ``auto`` = CUDA when present, else the CPU;
    ``cuda`` without a CUDA device stops with a clear message."""
    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    return device


def device_name(device: torch.device) -> str:
    """Human name of the device, e.g. ``NVIDIA H100 80GB HBM3`` or the CPU model."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def device_slug(device: torch.device) -> str:
    """Short file-name-safe device tag: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device) -> Dict[str, object]:
    import torch

    info: Dict[str, object] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import verl

        info["verl"] = getattr(verl, "__version__", "unknown")
    except Exception:
        info["verl"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    iters: int = 10,
    max_seconds: float = 30.0,
) -> Dict[str, float]:
    """Median / min wall time of ``fn()`` in milliseconds.

    On CUDA each iteration is timed with events after a synchronize; on CPU with
    ``perf_counter``. Stops early once ``max_seconds`` have been spent (at least one timed run).
    """
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    spent = 0.0
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if spent > max_seconds:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated *beyond what was allocated before* while ``fn`` runs.

    CUDA: the caching allocator's peak statistics. CPU: the profiler's allocation events, each
    counted once (``self_cpu_memory_usage``: a nested op does not count its children's allocations
    again), replayed in time order; ``None`` when the profiler gives nothing usable.
    """
    import torch

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch.profiler import ProfilerActivity, profile

        with _without_kineto_markers(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e for e in prof.events() if getattr(e, "self_cpu_memory_usage", 0)),
            key=lambda e: e.time_range.start,
        )
        live = peak = 0
        for e in events:
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
        return int(peak)
    except Exception:
        return None


# What kineto (torch.profiler's backend) writes to stderr at every profiler start and stop, e.g.
# "USDT:2026-12-07 05:08:53 5011:5011 SyncActivityProfilerHandler.cpp:52] profiler_start": trace markers
# at its highest log level, so KINETO_LOG_LEVEL cannot drop them without dropping its errors as well.
_KINETO_MARKER = re.compile(rb"^USDT:.*\] profiler_(start|stop)\s*$")


@contextlib.contextmanager
def _without_kineto_markers() -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2, where C++ code writes) going to a
    temporary file; afterwards pass every line on to stderr except kineto's start / stop markers."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp.read().splitlines(keepends=True) if not _KINETO_MARKER.match(line))
            while kept:
                kept = kept[os.write(2, kept):]


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written per second), GB/s."""
    import torch

    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def agg_subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the non-interactive Agg backend: the figure
    and axes of a result plot, for :func:`write_results` to save. Raises ``ImportError`` when
    matplotlib is not installed (plotting is optional: callers catch it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def write_results(
    name: str,
    device: torch.device,
    payload: Dict[str, object],
    markdown: str,
    out_dir: Optional[Path] = None,
    figure=None,
) -> Dict[str, Path]:
    """Write ``<name>-<device>.json`` / ``.md`` (and ``.png`` when a matplotlib figure is given) into
    ``out_dir`` (default :data:`DEFAULT_RESULTS_DIR`, ``./heal-bench-results``)."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_slug(device)}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    doc = {"benchmark": name, "environment": environment(device), **payload}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    if figure is not None:
        paths["png"] = out_dir / f"{stem}.png"
        figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
    return paths
