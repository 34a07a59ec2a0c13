"""The bubblewrap launcher: the sandbox's primary, kernel-enforced layer.

Each run gets fresh mount, pid, network, IPC, UTS (and cgroup) namespaces and runs as an
unprivileged uid with no capabilities:

* caller not root: a new user namespace too, uid/gid 65534 inside it (mapped to the caller's
  uid), no nested user namespaces (``--disable-userns``);
* caller root (bubblewrap would map the sandbox's uid to root outside, and the kernel exempts
  root's uid from ``RLIMIT_NPROC``): no user namespace; the wrapper keeps only CAP_SETUID /
  CAP_SETGID to drop, before anything else, to a fresh uid/gid of its own drawn from
  [2e9, 2.1e9), with no supplementary groups, after which it has no capabilities at all
  (``no_new_privs`` is set by bubblewrap). Where that variant cannot start (root without
  CAP_SYS_ADMIN, e.g. some containers) but user namespaces work, root gets the first variant,
  in which ``max_processes`` does not hold (:func:`~heal.scoring.sandbox.isolation_status` notes it).

It sees a new, read-only root holding only:

* the interpreter binary, its standard library (``site-packages`` / ``dist-packages`` inside it
  hidden by empty mounts: no venv, no third-party packages, no project files) and the shared
  libraries the interpreter and the standard extension modules need (found with ``ldd``; the
  libraries of ``_ctypes``, ``_sqlite3``, ``_ssl``, ``_tkinter``, ``_curses``, ``readline``,
  ``nis``, ``_dbm`` / ``_gdbm`` and ``_crypt`` are left out, so those modules cannot load);
* ``/heal`` (read-only: ``solution.py``, its stdin, the job's settings);
* the working directory ``/work`` (also ``HOME`` and the current directory), ``/tmp`` and
  ``/dev/shm``: one private tmpfs of ``disk_mb`` bytes and
  :data:`~heal.scoring.sandbox.limits.MAX_FILES` inodes (see :func:`_bubblewrap_argv`);
* fresh ``/proc`` (of its own pid namespace) and a minimal ``/dev``.

There are no host files, no host Unix sockets (filesystem or abstract), no network interface
but a down loopback, and no other process of the host to see or signal. bubblewrap loads the
seccomp filter (:mod:`.seccomp`) right before it runs the wrapper (:mod:`.wrapper`).
"""
from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

from heal.scoring.sandbox.limits import MAX_FILES

SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace (caller not root)
# caller root: each run drops to a uid of its own drawn from this range (no user namespace)
_DROP_UID_BASE, _DROP_UID_SPAN = 2_000_000_000, 100_000_000


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when ``unshare -rn`` can create a private network namespace here (checked once)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run([exe, "-rn", "--", "true"], capture_output=True, timeout=10)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _interpreter() -> str:
    """The real interpreter binary (a venv's ``python`` is a link to, or a copy of, it)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _stdlib_dir() -> str:
    return os.path.realpath(os.path.dirname(os.__file__))


def _hidden_dirs() -> Tuple[str, ...]:
    """Third-party package folders inside the standard library's folder (a pyenv / python.org
    build keeps ``site-packages`` there): hidden by kernel isolation, refused by the audit hook."""
    stdlib = _stdlib_dir()
    return tuple(os.path.join(stdlib, n) for n in ("site-packages", "dist-packages")
                 if os.path.isdir(os.path.join(stdlib, n)))


# standard extension modules whose libraries stay out of the sandbox (so they cannot load there)
_EXCLUDED_EXTENSIONS = ("_ctypes", "_sqlite3", "_ssl", "_tkinter", "_curses", "_curses_panel", "readline",
                        "nis", "_dbm", "_gdbm", "_crypt")


@functools.lru_cache(maxsize=1)
def _layout() -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
    """(read-only paths to bind, directories to hide under empty mounts, notes) for the interpreter."""
    py = _interpreter()
    stdlib = _stdlib_dir()
    notes: List[str] = []
    binds = [py, stdlib]
    hidden = list(_hidden_dirs())
    # the shared libraries of the interpreter and of the standard extension modules we allow
    dynload = [p for p in glob.glob(os.path.join(stdlib, "lib-dynload", "*.so"))
               if os.path.basename(p).split(".")[0] not in _EXCLUDED_EXTENSIONS]
    ldd = shutil.which("ldd")
    libs = set()
    if ldd:
        try:
            out = subprocess.run([ldd, py] + sorted(dynload), capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            out = ""
            notes.append(f"ldd failed: {exc}")
        for line in out.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].split("(")[0].strip()
                if target.startswith("/"):
                    libs.add(target)
            elif line.startswith("/") and "(0x" in line:
                libs.add(line.split("(")[0].strip())
    if not libs:
        # no ldd (e.g. musl): the whole system library folders, read-only
        notes.append("ldd unavailable: binding the system library folders")
        libs.update(d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d))
    stdlib_slash = stdlib.rstrip("/") + "/"
    libs = {lib for lib in libs if not lib.startswith(stdlib_slash) and os.path.exists(lib)}
    binds.extend(sorted(libs))
    return tuple(binds), tuple(hidden), tuple(notes)


def _parents(path: str) -> List[str]:
    out = []
    d = os.path.dirname(path)
    while d not in ("/", ""):
        out.append(d)
        d = os.path.dirname(d)
    return out



# One tmpfs holds everything a run can write (/work, /tmp, /dev/shm), mounted with both a size and an
# inode bound before bubblewrap starts: bubblewrap's own --tmpfs takes a size only, and the kernel's
# default inode count of a tmpfs is half the machine's memory pages (each empty file costs ~1 KB of
# unreclaimable kernel memory). util-linux `unshare` gives bubblewrap a private mount namespace (a
# user namespace too when the caller is not root) in which `mount` mounts it; nothing of it is visible
# on the host, and it disappears with the sandbox.
_SCRATCH_SCRIPT = ('mount -t tmpfs -o "mode=0755,size=$2,nr_inodes=$3" heal-scratch "$1" '
                   '&& mkdir -m 1777 "$1/work" "$1/tmp" "$1/shm" && shift 3 && exec "$@"')


def _scratch_prefix(scratch: str, disk_bytes: int, max_files: int, privileged: bool) -> List[str]:
    """The command that mounts the scratch tmpfs at ``scratch`` and then runs the rest of the argv."""
    unshare = shutil.which("unshare") or "unshare"
    userns = [] if privileged else ["--user", "--map-root-user"]
    return [unshare, *userns, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _SCRATCH_SCRIPT,
            "heal-scratch", scratch, str(int(disk_bytes)), str(int(max_files))]


# uid mode -> why a trial sandbox failed under the scratch mount although the mount itself works
# (e.g. a security module that confines what util-linux's unshare starts); its runs then get
# bubblewrap's own tmpfs mounts (set by heal.scoring.sandbox.isolation's trial)
_scratch_refused: Dict[bool, str] = {}


def scratch_mount_available(privileged: bool) -> Tuple[bool, str]:
    """(True, "") when the bounded scratch tmpfs can be mounted here and a sandbox starts under it
    (checked once per uid mode), else (False, why): runs then get bubblewrap's own tmpfs mounts, whose
    inode count is not bounded."""
    if privileged in _scratch_refused:
        return False, _scratch_refused[privileged]
    return _scratch_mount_probe(privileged)


@functools.lru_cache(maxsize=2)
def _scratch_mount_probe(privileged: bool) -> Tuple[bool, str]:
    if shutil.which("unshare") is None or shutil.which("mount") is None or not os.path.exists("/bin/sh"):
        return False, "util-linux `unshare` / `mount` not found"
    with tempfile.TemporaryDirectory(prefix="heal-scratch-probe-") as top:
        os.chmod(top, 0o755)
        argv = _scratch_prefix(top, 1 << 20, 64, privileged) + ["/bin/sh", "-c", 'test -d "$0/work"', top]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"mounting the scratch tmpfs failed: {exc}"
    if r.returncode != 0:
        return False, f"mounting the scratch tmpfs failed: {(r.stderr.strip().splitlines() or ['exit status %d' % r.returncode])[-1]}"
    return True, ""


def _bubblewrap_argv(bwrap: str, src_dir: str, disk_bytes: int, info_fd: Optional[int], seccomp_fd: Optional[int],
                     scratch: Optional[str], privileged: bool) -> List[str]:
    """The command line that starts bubblewrap (the wrapper's command follows it). ``privileged`` (the
    caller is root): no user namespace (bubblewrap would map the sandbox's uid to root outside, which
    the kernel exempts from ``RLIMIT_NPROC``); the wrapper instead drops to a fresh unprivileged uid
    (it keeps only CAP_SETUID / CAP_SETGID to do so, and has none left after). Otherwise uid 65534 in
    a new user namespace, with no further user namespaces allowed.

    ``scratch``: an empty host folder on which the bounded scratch tmpfs (``disk_bytes``,
    :data:`~heal.scoring.sandbox.limits.MAX_FILES` inodes) is mounted in a private mount namespace and
    bound at ``/work``, ``/tmp`` and ``/dev/shm``; None: bubblewrap's own tmpfs mounts (size only)."""
    binds, hidden, _ = _layout()
    argv = _scratch_prefix(scratch, disk_bytes, MAX_FILES, privileged) if scratch else []
    if privileged:
        argv += [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                 "--disable-userns", "--assert-userns-disabled", "--cap-drop", "ALL"]
    argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--proc", "/proc", "--dev", "/dev"]
    # parent folders of the binds, traversable by the sandbox's uid (bubblewrap would make them 0700)
    parents = sorted({d for path in binds for d in _parents(path)}, key=lambda d: (d.count("/"), d))
    for d in parents:
        argv += ["--perms", "0755", "--dir", d]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for path in hidden:
        argv += ["--perms", "0555", "--size", "4096", "--tmpfs", path]
    if scratch:
        argv += ["--bind", scratch + "/shm", "/dev/shm", "--bind", scratch + "/tmp", "/tmp",
                 "--bind", scratch + "/work", "/work"]
    else:
        small = str(min(disk_bytes, 1 << 20))
        argv += ["--perms", "1777", "--size", small, "--tmpfs", "/dev/shm",
                 "--perms", "1777", "--size", small, "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", str(disk_bytes), "--tmpfs", "/work"]
    argv += ["--ro-bind", src_dir, "/heal", "--remount-ro", "/", "--chdir", "/work"]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv
