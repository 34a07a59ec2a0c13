"""Run untrusted Python (model-written code) in a separate, kernel-isolated process.

One file per layer, so that each defence is found in one place:

* :mod:`.launcher`: **kernel isolation (the primary layer), through bubblewrap** (``bwrap``;
  Debian/Ubuntu package ``bubblewrap``): fresh mount, pid, network, IPC, UTS and cgroup
  namespaces, an unprivileged uid with no capabilities, a read-only root holding only the
  interpreter and its standard library, a size-limited private working directory.
* :mod:`.seccomp`: the system-call filter bubblewrap loads before the wrapper runs (x86-64).
* :mod:`.limits`: the limits of one run (time, memory, output, disk, processes, descriptors), how
  each is enforced, and the host resources a run can take.
* :mod:`.wrapper`: the first code in the sandbox: waits for its job, applies the limits, installs
  the audit hook and runs the program.
* :mod:`.audit_hook`: **the audit hook (second layer)**. It narrows what code can try and makes
  refusals readable; on its own it is not a security boundary, and nothing relies on it.
* :mod:`.process`: one sandbox, its wall clock, its output and its race-free teardown.
* :mod:`.pool`: sandboxes started ahead of their jobs (``HEAL_SANDBOX_POOL``, default 4).
* :mod:`.isolation`: which layer runs the code here, and no silent weak mode: ``"auto"`` raises
  :class:`SandboxUnavailableError` when bubblewrap cannot run; :func:`isolation_status` says why.

Outputs are read back truncated to ``max_output_bytes``.
"""
from __future__ import annotations

from typing import Optional

from heal.scoring.sandbox import isolation, limits, pool
from heal.scoring.sandbox.isolation import (ISOLATION_ENV, ISOLATION_MODES, SandboxUnavailableError,
                                            bubblewrap_available, isolation_status, resolve_isolation)
from heal.scoring.sandbox.launcher import network_namespace_available
from heal.scoring.sandbox.process import RunResult, _Sandbox

__all__ = [
    "RunResult", "run_python", "isolation_status", "resolve_isolation", "SandboxUnavailableError",
    "network_namespace_available", "bubblewrap_available", "ISOLATION_MODES", "ISOLATION_ENV",
]


def _run(code, stdin, *, isolation, timeout_s, memory_mb, max_output_bytes, mode, fn_name, isolate_network,
         disk_mb, max_processes, audit_hook=True, pool_size=None) -> RunResult:
    # audit_hook=False runs the program under the kernel layer alone (for tests of that layer);
    # pool_size: sandboxes started ahead (None: HEAL_SANDBOX_POOL, default DEFAULT_POOL_SIZE; 0: none)
    kernel = isolation == "bubblewrap"
    # started by root, the sandbox drops to a uid of its own (see launcher._bubblewrap_argv)
    privileged = kernel and not _isolation._user_namespace_mode()
    key = (isolation, privileged, int(disk_mb) if kernel else 0, bool(isolate_network) and not kernel)
    size = pool._pool_size(isolation) if pool_size is None else int(pool_size)
    sandbox = pool._pool.take(key, size) if size > 0 else None
    if sandbox is None:
        sandbox = _Sandbox(key)
    job = limits._job(timeout_s, memory_mb, max_output_bytes, mode, fn_name, max_processes, kernel, audit_hook,
                     disk_mb)
    try:
        return sandbox.run(code, stdin, job, timeout_s, max_output_bytes)
    finally:
        sandbox.close()


_isolation = isolation  # (the name `isolation` is also _run's argument)


def run_python(
    code: str,
    stdin: str = "",
    *,
    timeout_s: float = 2.0,
    memory_mb: Optional[int] = 512,
    max_output_bytes: int = 1 << 20,
    mode: str = "stdin",
    fn_name: Optional[str] = None,
    isolate_network: bool = True,
    isolation: Optional[str] = None,
    disk_mb: int = 64,
    max_processes: int = 64,
) -> RunResult:
    """Run ``code`` in a sandboxed child process (see the module docstring).

    ``mode="stdin"``: run the program with ``stdin`` as standard input; ``stdout`` is its output.
    ``mode="call"``: call function ``fn_name`` (``Solution().fn_name`` when the code defines a
    class ``Solution``) with the JSON values on the lines of ``stdin`` as arguments; ``stdout``
    is the JSON of the return value.
    ``timeout_s``: wall-clock limit of the program, counted from when it starts (sandbox and
    interpreter start-up are not counted, up to ``STARTUP_TIMEOUT_S``); the CPU-time limit is its
    ceiling + 1 s.
    ``memory_mb``: address-space limit of the run's one process (None: unlimited).
    ``max_output_bytes``: the largest stdout / stderr kept (both are pipes the parent reads: stdout
    past it stops the program, ``output_truncated``; stderr past it is dropped).
    ``isolation``: ``"auto"`` (default, or ``HEAL_SANDBOX_ISOLATION``) / ``"bubblewrap"``: kernel
    isolation, :class:`SandboxUnavailableError` when this machine cannot provide it;
    ``"audit-hook-only"``: the audit hook alone (not a security boundary; warns once per process).
    ``disk_mb``: everything the program can write (``/work``, ``/tmp`` and ``/dev/shm`` together,
    :data:`~heal.scoring.sandbox.limits.MAX_FILES` inodes) under kernel isolation; without it, the
    largest file. ``max_processes``: ``RLIMIT_NPROC`` inside the sandbox: threads (kernel
    isolation refuses new processes). :mod:`heal.scoring.sandbox.limits` lists what bounds every
    host resource a run can take.
    ``isolate_network``: in the audit-hook-only mode, also run in a private network namespace
    when available (kernel isolation always has its own).
    Each call gets a fresh sandbox; ``HEAL_SANDBOX_POOL`` of them (default 4) are started ahead of
    their jobs by a background thread. ``RunResult.isolation`` names the layer that ran the code.
    Thread-safe (verl scores from thread pools).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str, got {type(stdin).__name__}")
    if mode not in ("stdin", "call"):
        raise ValueError(f"mode must be 'stdin' or 'call', got {mode!r}")
    if mode == "call" and not fn_name:
        raise ValueError("fn_name is required when mode='call'")
    if not (limits._finite_number(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if memory_mb is not None and not (limits._finite_number(memory_mb) and memory_mb > 0):
        raise ValueError(f"memory_mb must be a finite number > 0 or None, got {memory_mb!r}")
    if not (isinstance(max_output_bytes, int) and not isinstance(max_output_bytes, bool) and max_output_bytes > 0):
        raise ValueError(f"max_output_bytes must be an int > 0, got {max_output_bytes!r}")
    if not (isinstance(disk_mb, int) and disk_mb >= 1):
        raise ValueError(f"disk_mb must be an int >= 1, got {disk_mb!r}")
    if not (isinstance(max_processes, int) and max_processes >= 1):
        raise ValueError(f"max_processes must be an int >= 1, got {max_processes!r}")
    layer = resolve_isolation(isolation)
    return _run(code, stdin, isolation=layer, timeout_s=timeout_s, memory_mb=memory_mb,
                max_output_bytes=max_output_bytes, mode=mode, fn_name=fn_name, isolate_network=isolate_network,
                disk_mb=disk_mb, max_processes=max_processes)
