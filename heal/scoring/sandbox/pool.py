"""Sandboxes started ahead of their jobs.

Starting a sandbox (namespaces, mounts, interpreter) costs tens of milliseconds, mostly waiting on
the kernel, so ``HEAL_SANDBOX_POOL`` (default 4) sandboxes per kind are started ahead of their jobs
by a daemon thread; each waits for its program and is used for exactly one run, then torn down
(0: start one per run). ``heal bench sandbox`` measures both.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Dict, List, Optional

from heal.scoring.sandbox.process import _Sandbox

# sandboxes started ahead of their jobs (per kind), unless HEAL_SANDBOX_POOL says otherwise
POOL_ENV = "HEAL_SANDBOX_POOL"
DEFAULT_POOL_SIZE = 4


class _Pool:
    """Sandboxes started ahead of their jobs, ``size`` per kind (isolation, uid mode, disk size,
    network flag), by one long-lived daemon thread: bubblewrap's ``--die-with-parent`` follows the
    thread that started it, so sandboxes must not be started by short-lived worker threads."""

    def __init__(self):
        self.cond = threading.Condition()
        self.ready: Dict[tuple, List[_Sandbox]] = {}
        self.sizes: Dict[tuple, int] = {}
        self.thread: Optional[threading.Thread] = None
        self.pid = os.getpid()

    def take(self, key, size: int) -> Optional[_Sandbox]:
        with self.cond:
            self.sizes[key] = max(size, self.sizes.get(key, 0))
            queue = self.ready.setdefault(key, [])
            sandbox = None
            while queue:
                candidate = queue.pop(0)
                if candidate.alive():
                    sandbox = candidate
                    break
                candidate.close()
            if self.thread is None:
                self.thread = threading.Thread(target=self._fill, name="heal-sandbox-pool", daemon=True)
                self.thread.start()
            self.cond.notify()
        return sandbox

    def _fill(self) -> None:
        while True:
            with self.cond:
                todo = [(k, n - len(self.ready.get(k, []))) for k, n in self.sizes.items()]
                todo = [(k, n) for k, n in todo if n > 0]
                if not todo:
                    self.cond.wait()
                    continue
            for key, n in todo:
                for _ in range(n):
                    try:
                        sandbox = _Sandbox(key)
                    except OSError:
                        time.sleep(0.5)  # out of processes / files: try later; runs start their own
                        continue
                    with self.cond:
                        self.ready.setdefault(key, []).append(sandbox)

    def close(self) -> None:
        with self.cond:
            sandboxes = [sb for queue in self.ready.values() for sb in queue]
            self.ready.clear()
            self.sizes.clear()
        for sandbox in sandboxes:
            sandbox.close()


_pool = _Pool()
atexit.register(lambda: _pool.close() if _pool.pid == os.getpid() else None)


def _forget_pool_in_child() -> None:
    # a forked child must never hand out its parent's sandboxes
    global _pool
    _pool = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool_size(isolation: str) -> int:
    value = os.environ.get(POOL_ENV, "").strip()
    if not value:
        return DEFAULT_POOL_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"{POOL_ENV} must be an integer >= 0, got {value!r}") from None
    if size < 0:
        raise ValueError(f"{POOL_ENV} must be an integer >= 0, got {value!r}")
    return size
