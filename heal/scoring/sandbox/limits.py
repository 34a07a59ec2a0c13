"""The limits of one run, and what bounds every host resource a program can take.

Set by the parent per run (the *job*); the wrapper (:mod:`.wrapper`) applies the rlimits in the
child before the program runs. Under kernel isolation (bubblewrap), whatever the program does:

* **Time.** Wall clock ``timeout_s`` from the program's start, enforced by the parent (the whole
  pid namespace is killed); CPU time ``ceil(timeout_s) + 1`` s (``RLIMIT_CPU``).
* **Memory.** ``memory_mb`` of address space (``RLIMIT_AS``) for the one process a run has: the
  seccomp filter refuses process creation (threads stay, up to ``max_processes``, ``RLIMIT_NPROC``),
  and refuses the kernel memory that ``RLIMIT_AS`` does not count: ``memfd_create``, SysV shared
  memory, message queues and semaphores, POSIX message queues, larger pipe buffers
  (``F_SETPIPE_SZ``). What is left outside the address space is bounded by the limits below.
* **Disk and files.** Everything the program can write (``/work``, ``/tmp``, ``/dev/shm``) is one
  private tmpfs of ``disk_mb`` bytes and :data:`MAX_FILES` inodes (each inode is about 1 KB of kernel
  memory), mounted in the sandbox's own mount namespace (:mod:`.launcher`); no host file is
  writable. ``fallocate`` is refused.
* **Output.** stdout and stderr are pipes read by the parent, never host files: stdout past
  ``max_output_bytes`` stops the program (``output_truncated``), stderr past it is read and dropped.
* **Descriptors.** :data:`MAX_OPEN_FILES` (``RLIMIT_NOFILE``), so socket-pair and pipe buffers are
  bounded too (a few hundred KB each at the kernel's defaults).
* **Kernel-global budgets.** ``io_setup`` (the host's ``fs.aio-nr``), inotify and fanotify, BPF,
  io_uring, keys, user namespaces: refused.
* **Other runs.** No file is shared writable, and the shared read-only ones cannot be locked
  (``flock``, ``fcntl`` record / OFD locks, leases) or watched (inotify, fanotify, dnotify).
"""
from __future__ import annotations

import math

# inodes of a run's scratch tmpfs (/work, /tmp and /dev/shm together)
MAX_FILES = 4096
# RLIMIT_NOFILE of the program: descriptors it may hold at once
MAX_OPEN_FILES = 64


def _job(timeout_s, memory_mb, max_output_bytes, mode, fn_name, max_processes, kernel, audit_hook,
         disk_mb=None) -> dict:
    """The per-run settings the wrapper reads after its go."""
    return {
        "cpu_s": int(math.ceil(timeout_s)) + 1,
        # the largest file the program may write: its disk (stdout / stderr are pipes the parent caps;
        # without kernel isolation the working folder is on the host, and this bounds each file)
        "fsize": int(disk_mb) << 20 if disk_mb else int(max_output_bytes) + 1,
        "nofile": MAX_OPEN_FILES,
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
