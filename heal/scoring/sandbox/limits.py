"""The limits of one run, and how each is enforced.

Set by the parent per run (the *job*) and applied by the wrapper (:mod:`.wrapper`) with
``setrlimit`` in the child before the program runs: CPU seconds, address space (memory), file
size, no core files, processes and threads.
"""
from __future__ import annotations

import math


def _job(timeout_s, memory_mb, max_output_bytes, mode, fn_name, max_processes, kernel, audit_hook) -> dict:
    """The per-run settings the wrapper reads after its go."""
    return {
        "cpu_s": int(math.ceil(timeout_s)) + 1,
        # room for the truncation check: one byte more than we keep
        "fsize": int(max_output_bytes) + 1,
        "mem_bytes": max(1, int(memory_mb * (1 << 20))) if memory_mb else 0,  # (0.5 MiB is not "no limit")
        # RLIMIT_NPROC counts per uid (inside the sandbox's user namespace, or the fresh uid of a
        # root-started sandbox); in the audit-hook-only mode it would count every process of the
        # caller's uid (or nothing, for root)
        "nproc": int(max_processes) if kernel else 0,
        "mode": mode,
        "fn_name": fn_name,
        "hook": bool(audit_hook),
    }


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)
