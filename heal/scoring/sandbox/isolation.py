"""Which layer runs the code here: bubblewrap when the machine provides it, never a silent weak mode.

``isolation="auto"`` (the default; or the ``HEAL_SANDBOX_ISOLATION`` environment variable) uses
bubblewrap and raises :class:`SandboxUnavailableError`, naming what is missing and how to get it,
when the machine cannot provide it. ``isolation="audit-hook-only"`` opts in to the audit hook alone
(plus a private network namespace through ``unshare -rn`` when available), with a warning once per
process. :func:`isolation_status` reports which layer is active, what is missing and how to get it.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import warnings
from typing import Dict, List, Optional, Tuple

from heal.scoring.sandbox import launcher, limits, pool, process
from heal.scoring.sandbox.seccomp import seccomp_filter

ISOLATION_MODES = ("auto", "bubblewrap", "audit-hook-only")
ISOLATION_ENV = "HEAL_SANDBOX_ISOLATION"

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`) "
    "on a kernel that allows user namespaces (sysctl kernel.unprivileged_userns_clone=1 / "
    "user.max_user_namespaces > 0; inside Docker, run the container with a seccomp profile that allows "
    "unshare/clone of namespaces, e.g. --security-opt seccomp=unconfined)"
)


class SandboxUnavailableError(RuntimeError):
    """The requested isolation cannot be provided on this machine (the message says why and how)."""


def _user_namespace_mode() -> bool:
    """Kernel isolation through a user namespace (caller not root, or root where only that works:
    e.g. without CAP_SYS_ADMIN) rather than a per-run dropped uid (root)."""
    if os.geteuid() != 0:
        return True
    _bubblewrap_probe()
    return bool(_probed_userns)


_probed_userns: List[bool] = []  # root only: the trial needed the user-namespace variant



def bubblewrap_available() -> bool:
    """True when bubblewrap is installed and a trial sandbox runs the interpreter here (checked once)."""
    return _bubblewrap_probe()[0]


@functools.lru_cache(maxsize=1)
def _bubblewrap_probe() -> Tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"kernel namespaces need Linux (this is {sys.platform})"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False, "bubblewrap (`bwrap`) is not installed"
    reasons = []

    def trial(privileged: bool) -> Tuple[bool, str]:
        sandbox = process._Sandbox(("bubblewrap", privileged, 1, False))
        try:
            res = sandbox.run(_TRIAL, "", limits._job(10.0, None, 4096, "stdin", None, 16, True, True), 10.0, 4096)
        finally:
            sandbox.close()
        ok = res.ok and res.stdout.strip() == "ok"
        return ok, "" if ok else (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]

    # root: the per-run uid first (RLIMIT_NPROC holds), else a user namespace
    for privileged in ((True, False) if os.geteuid() == 0 else (False,)):
        try:
            ok, why = trial(privileged)
            if not ok and launcher.scratch_mount_available(privileged)[0]:
                # the scratch tmpfs mounts, but bubblewrap does not start under it: without it, then
                launcher._scratch_refused[privileged] = f"a trial sandbox failed under the scratch mount: {why}"
                ok, _ = trial(privileged)
                if not ok:
                    del launcher._scratch_refused[privileged]
        except OSError as exc:
            return False, f"bubblewrap could not start: {exc}"
        if ok:
            if os.geteuid() == 0 and not privileged:
                _probed_userns.append(True)
            return True, ""
        reasons.append(why)
    return False, f"bubblewrap is installed but a trial sandbox failed: {' / '.join(reasons)}"


_TRIAL = "import os\nassert os.getuid() != 0 and not os.path.exists('/etc')\nprint('ok')"


def resolve_isolation(isolation: Optional[str] = None) -> str:
    """The layer a run with ``isolation`` gets here: ``"bubblewrap"`` or ``"audit-hook-only"``.

    ``None`` reads ``HEAL_SANDBOX_ISOLATION`` (default ``"auto"``). ``"auto"`` and ``"bubblewrap"``
    raise :class:`SandboxUnavailableError` when bubblewrap cannot run here.
    """
    if isolation is None:
        isolation = os.environ.get(ISOLATION_ENV, "").strip() or "auto"
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    if isolation == "audit-hook-only":
        _warn_weak_once()
        return isolation
    ok, reason = _bubblewrap_probe()
    if not ok:
        raise SandboxUnavailableError(
            f"no kernel isolation for running untrusted code: {reason}. To get it, {INSTALL_HINT}. "
            f"To run with the audit hook alone (NOT a security boundary), pass isolation='audit-hook-only' "
            f"(CodeCheckConfig(isolation=...)) or set {ISOLATION_ENV}=audit-hook-only."
        )
    return "bubblewrap"


_warned = threading.Lock()
_warned_once: List[bool] = []


def _warn_weak_once() -> None:
    with _warned:
        if _warned_once:
            return
        _warned_once.append(True)
    warnings.warn(
        "heal sandbox: running untrusted code with the audit hook only (isolation='audit-hook-only'); "
        "this is not a security boundary: a program can escape it. For kernel isolation, " + INSTALL_HINT + ".",
        RuntimeWarning,
        stacklevel=3,
    )


def isolation_status() -> Dict[str, object]:
    """Which isolation layer :func:`run_python` uses here, what is missing and how to get it.

    Keys: ``active`` (``"bubblewrap"``, ``"audit-hook-only"`` (opted in) or ``None``: runs are
    refused), ``requested`` (the mode from ``HEAL_SANDBOX_ISOLATION``, default ``"auto"``),
    ``kernel_isolation`` (bool), ``bubblewrap`` (path / version / usable / why not),
    ``scratch`` (the writable space and its bounds), ``max_open_files``,
    ``network_namespace`` (``unshare -rn`` works, used by the audit-hook-only mode), ``audit_hook``
    (always on), ``interpreter``, ``read_only_binds`` (what the sandbox sees), ``missing`` and
    ``how_to_get`` (empty when nothing is missing).
    """
    requested = os.environ.get(ISOLATION_ENV, "").strip() or "auto"
    bwrap = shutil.which("bwrap")
    version = None
    if bwrap:
        try:
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            version = None
    usable, reason = _bubblewrap_probe()
    if requested not in ISOLATION_MODES:
        active = None
    elif requested == "audit-hook-only":
        active = "audit-hook-only"
    else:
        active = "bubblewrap" if usable else None
    binds, hidden, notes = launcher._layout() if usable else ((), (), ())
    notes = list(notes)
    uid_mode = None
    if usable:
        if _user_namespace_mode():
            uid_mode = "uid 65534 in a user namespace"
            if os.geteuid() == 0:
                notes.append("started by root in a user namespace: the sandbox's uid maps to root outside, which "
                             "the kernel exempts from RLIMIT_NPROC (max_processes does not hold)")
        else:
            uid_mode = "a fresh unprivileged uid per run (no user namespace)"
    bpf = seccomp_filter()
    scratch = None
    if usable:
        bounded, why = launcher.scratch_mount_available(not _user_namespace_mode())
        scratch = (f"one private tmpfs for /work, /tmp and /dev/shm: disk_mb bytes, {limits.MAX_FILES} inodes"
                   if bounded else f"bubblewrap's tmpfs mounts, inodes not bounded ({why})")
        if not bounded:
            notes.append(f"the scratch tmpfs's inode count is not bounded: {why}")
    try:
        pool_size = pool._pool_size("bubblewrap")
    except ValueError as exc:
        pool_size = str(exc)
    return {
        "active": active,
        "requested": requested,
        "kernel_isolation": usable,
        "bubblewrap": {"path": bwrap, "version": version, "usable": usable, "why_not": reason or None},
        "uid": uid_mode,
        "seccomp": f"{len(bpf) // 8}-instruction filter" if bpf is not None else "none (not x86-64 Linux)",
        "scratch": scratch,
        "max_open_files": limits.MAX_OPEN_FILES,
        "pool_size": pool_size,
        "network_namespace": launcher.network_namespace_available(),
        "audit_hook": True,
        "interpreter": launcher._interpreter(),
        "read_only_binds": list(binds),
        "hidden": list(hidden),
        "notes": notes,
        "missing": [] if usable else [reason],
        "how_to_get": "" if usable else INSTALL_HINT,
    }

