"""Run untrusted Python (model-written code) in a separate, kernel-isolated process.

Two layers, the first one enforced by the kernel:

1. **Kernel isolation (primary layer), through bubblewrap** (``bwrap``; Debian/Ubuntu package
   ``bubblewrap``). Each run gets fresh mount, pid, network, IPC, UTS (and cgroup) namespaces and
   runs as an unprivileged uid with no capabilities:

   * caller not root: a new user namespace too, uid/gid 65534 inside it (mapped to the caller's
     uid), no nested user namespaces (``--disable-userns``);
   * caller root (bubblewrap would map the sandbox's uid to root outside, and the kernel exempts
     root's uid from ``RLIMIT_NPROC``): no user namespace; the wrapper keeps only CAP_SETUID /
     CAP_SETGID to drop, before anything else, to a fresh uid/gid of its own drawn from
     [2e9, 2.1e9), with no supplementary groups, after which it has no capabilities at all
     (``no_new_privs`` is set by bubblewrap). Where that variant cannot start (root without
     CAP_SYS_ADMIN, e.g. some containers) but user namespaces work, root gets the first variant,
     in which ``max_processes`` does not hold (:func:`isolation_status` notes it).

   It sees a new, read-only root holding only:

   * the interpreter binary, its standard library (``site-packages`` / ``dist-packages`` inside it
     hidden by empty mounts: no venv, no third-party packages, no project files) and the shared
     libraries the interpreter and the standard extension modules need (found with ``ldd``; the
     libraries of ``_ctypes``, ``_sqlite3``, ``_ssl``, ``_tkinter``, ``_curses``, ``readline``,
     ``nis``, ``_dbm`` / ``_gdbm`` and ``_crypt`` are left out, so those modules cannot load);
   * ``/heal`` (read-only: ``solution.py``, its stdin, the job's settings) and a private,
     size-limited tmpfs working directory ``/work`` (``disk_mb``), also ``HOME`` and the current
     directory;
   * fresh ``/proc`` (of its own pid namespace), a minimal ``/dev``, and 1 MiB private ``/dev/shm``
     and ``/tmp`` tmpfs mounts.

   There are no host files, no host Unix sockets (filesystem or abstract), no network interface
   but a down loopback, and no other process of the host to see or signal. ``RLIMIT_NPROC``
   (``max_processes``) caps processes and threads. A seccomp filter
   (:mod:`heal.scoring.seccomp`, x86-64) refuses inet / netlink / packet sockets, ``ptrace``,
   ``pidfd_*``, ``mknod``, ``unshare`` / ``setns`` / namespace flags of ``clone``, mounts,
   ``bpf``, ``io_uring``, ``perf_event_open``, ``userfaultfd``, keys, modules and the like.
   bubblewrap runs with ``--die-with-parent`` and ``--new-session``; when the run ends or times
   out the sandbox's pid 1 is killed, the kernel then kills every process left in its pid
   namespace, and :func:`run_python` returns only once that namespace is gone: nothing outlives it.
   Teardown signals only processes known to be the sandbox's: pid 1 through a pidfd, the process
   group only before its leader is reaped (``_Sandbox._stop``), so a reused pid is never hit.

2. **An audit hook (second layer)**, installed by a small wrapper before the code runs
   (:func:`sys.addaudithook`, which code cannot remove). It refuses socket creation (but
   ``AF_UNIX`` socket pairs, which ``asyncio`` needs; connect / bind / sendto are refused), process
   creation (``subprocess``, ``os.system``, ``os.fork``, ``os.exec*``, ``os.kill``, ...),
   ``ctypes``, ``gc`` object walks, raising rlimits, links, ``chdir``, ``sqlite3.connect``, new
   subinterpreters (``cpython.PyInterpreterState_New``), trace / profile functions and access to
   frames through tracebacks (``tb_frame``: ``traceback.format_exc()`` fails; uncaught exceptions
   still print); imports of ``_posixsubprocess``, ``_xxsubinterpreters`` / ``_interpreters``,
   ``_ctypes``, ``_cffi_backend``, ``_posixshmem``, ``_sqlite3`` and the test modules, matched on
   the last dotted component of the module name and on the file name of an extension loaded by
   path, and any native extension from outside the read-only standard library; opening files
   outside the working directory (reading the standard library and ``/dev/urandom`` stays
   allowed, opening a directory outside the working directory does not, so no ``dir_fd`` can
   point outside it) and path operations (listdir, remove, rename, mkdir ...) outside it. Paths
   must be exact ``str`` / ``bytes`` (``pathlib.Path.open`` / ``read_text`` / ``write_text`` are
   adapted to pass a ``str``; other path objects are refused, so ``__fspath__`` cannot show the
   hook one path and the kernel another). ``import subprocess`` / ``import asyncio`` work
   (``_posixsubprocess`` is a stub whose ``fork_exec`` refuses); ``os.mknod``, ``os.mkfifo``,
   ``os.pidfd_open``, ``os.setpriority`` and ``signal.pidfd_send_signal`` (no audit events) are
   removed. The hook is one function whose state is immutable values in its own closure cells,
   reachable from no frame. On its own it is **not** a security boundary (CPython has too many
   ways around an audit hook: hand-made bytecode through ``code.replace`` or ``marshal``, which
   the standard library itself uses and so cannot be refused, reads and writes memory); it narrows what code can try and makes refusals readable
   (``PermissionError: sandbox: ...``).

Both layers apply ``setrlimit`` before the code runs: CPU seconds, address space (memory), file
size (stdout/stderr go to files and cannot grow past ``max_output_bytes``), no core files; the
parent enforces the wall-clock limit, counted from the moment the program starts (the wrapper
says so through a pipe), so a slow sandbox start on a loaded machine does not eat into it (start-up
itself may take up to ``STARTUP_TIMEOUT_S``). The environment is replaced by a minimal one.

**Pool.** Starting a sandbox (namespaces, mounts, interpreter) costs tens of milliseconds, mostly
waiting on the kernel, so ``HEAL_SANDBOX_POOL`` (default 4) sandboxes per kind are started ahead
of their jobs by a daemon thread; each waits for its program and is used for exactly one run,
then torn down (0: start one per run). ``heal bench sandbox`` measures both.

**No silent weak mode.** ``isolation="auto"`` (the default; or the ``HEAL_SANDBOX_ISOLATION``
environment variable) uses bubblewrap and raises :class:`SandboxUnavailableError`, naming what is
missing and how to get it, when the machine cannot provide it. ``isolation="audit-hook-only"``
opts in to the audit hook alone (plus a private network namespace through ``unshare -rn`` when
available), with a warning once per process. :func:`isolation_status` reports which layer is
active, what is missing and how to get it.

Outputs are read back truncated to ``max_output_bytes``.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import glob
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Dict, List, Optional, Tuple

from heal.scoring.seccomp import seccomp_filter

__all__ = [
    "RunResult", "run_python", "isolation_status", "resolve_isolation", "SandboxUnavailableError",
    "network_namespace_available", "bubblewrap_available", "ISOLATION_MODES", "ISOLATION_ENV",
]

ISOLATION_MODES = ("auto", "bubblewrap", "audit-hook-only")
ISOLATION_ENV = "HEAL_SANDBOX_ISOLATION"
SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace (caller not root)
# the most a sandbox + interpreter may take to start before the program's wall-clock limit begins
STARTUP_TIMEOUT_S = 30.0
# sandboxes started ahead of their jobs (per kind), unless HEAL_SANDBOX_POOL says otherwise
POOL_ENV = "HEAL_SANDBOX_POOL"
DEFAULT_POOL_SIZE = 4
# caller root: each run drops to a uid of its own drawn from this range (no user namespace)
_DROP_UID_BASE, _DROP_UID_SPAN = 2_000_000_000, 100_000_000

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`) "
    "on a kernel that allows user namespaces (sysctl kernel.unprivileged_userns_clone=1 / "
    "user.max_user_namespaces > 0; inside Docker, run the container with a seccomp profile that allows "
    "unshare/clone of namespaces, e.g. --security-opt seccomp=unconfined)"
)

# The wrapper runs in the child before the untrusted code: limits, stubs, then the audit hook, then exec.
_WRAPPER = r'''
# Only built-in modules until the program runs (`os`, `json`, `pathlib`, `signal` each cost
# milliseconds to import, and most programs never touch them).
def _main():
    import sys, posix, resource
    cfg = eval(sys.argv[1], {"__builtins__": {}})  # a dict of literals written by the parent
    if cfg["drop_to"]:
        # kernel isolation started by root: become a fresh unprivileged uid (all capabilities go)
        uid, gid = cfg["drop_to"]
        posix.setgroups([])
        posix.setgid(gid)
        posix.setuid(uid)
        if posix.getuid() != uid or posix.geteuid() != uid or posix.getgid() != gid:
            raise SystemExit("sandbox: could not drop privileges")
    # A sandbox may be started ahead of its job (the pool): wait for the parent's go, then read the
    # job (limits, mode, ...) it wrote next to the program. EOF instead of go: not needed, exit.
    if posix.read(cfg["go_fd"], 1) != b"1":
        raise SystemExit(0)
    posix.close(cfg["go_fd"])
    with open(cfg["job"], encoding="utf-8") as f:
        cfg.update(eval(f.read(), {"__builtins__": {}}))
    fd = posix.open(cfg["stdin"], posix.O_RDONLY)
    posix.dup2(fd, 0)
    posix.close(fd)

    def lim(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(which)
            if hard == resource.RLIM_INFINITY or value <= hard:
                resource.setrlimit(which, (value, hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, cfg["cpu_s"])
    lim(resource.RLIMIT_FSIZE, cfg["fsize"])
    if cfg["mem_bytes"]:
        lim(resource.RLIMIT_AS, cfg["mem_bytes"])
    if cfg["nproc"]:
        lim(resource.RLIMIT_NPROC, cfg["nproc"])
    with open(cfg["src"], encoding="utf-8", errors="replace") as f:
        src = f.read()
    mode, fn_name = cfg["mode"], cfg["fn_name"]
    if mode == "call":
        import json
        call_input = sys.stdin.read()
    code = compile(src, "solution.py", "exec")
    if cfg["hook"]:
        _second_layer(cfg)
    ready_fd = cfg["ready_fd"]
    del cfg, src, f
    user_globals = {"__name__": "__main__", "__builtins__": __builtins__}
    posix.write(ready_fd, b"1")  # the parent's wall clock starts now
    posix.close(ready_fd)
    if mode == "stdin":
        exec(code, user_globals)
        sys.stdout.flush()
        return
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # the program's own prints do not count
    exec(code, user_globals)
    if "Solution" in user_globals and hasattr(user_globals["Solution"], fn_name):
        fn = getattr(user_globals["Solution"](), fn_name)
    elif fn_name in user_globals:
        fn = user_globals[fn_name]
    else:
        raise NameError("function %r not defined" % fn_name)
    result = fn(*[json.loads(line) for line in call_input.splitlines() if line.strip()])
    real_stdout.write(json.dumps(result))
    real_stdout.flush()


def _second_layer(cfg):
    # stubs the audit hook relies on, then the hook
    import sys, posix, _signal, io
    import types  # reads a traceback's tb_frame when first imported, which the hook refuses

    # `import subprocess` / `import asyncio` need a _posixsubprocess module: a stub whose fork_exec
    # refuses. The real one can then only be loaded anew, which the hook refuses.
    stub = type(sys)("_posixsubprocess")

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: process creation is blocked")

    stub.fork_exec = fork_exec
    sys.modules["_posixsubprocess"] = stub
    # these raise no audit event; `os` and `signal` take their functions from these modules when
    # first imported (checked for modules already imported)
    for mod, names in ((posix, ("mknod", "mkfifo", "pidfd_open", "setpriority")),
                       (_signal, ("pidfd_send_signal",)),
                       (sys.modules.get("os"), ("mknod", "mkfifo", "pidfd_open", "setpriority")),
                       (sys.modules.get("signal"), ("pidfd_send_signal",))):
        for name in names:
            if mod is not None and hasattr(mod, name):
                delattr(mod, name)

    # The hook refuses path objects (their __fspath__ could differ from what it is shown). When the
    # program imports pathlib, Path.open is made to hand io.open the str it converts to, which is
    # then both checked and opened. (A program that undoes this only gets its path objects refused.)
    _io_open, _fspath = io.open, posix.fspath

    def path_open(self, mode="r", buffering=-1, encoding=None, errors=None, newline=None):
        if "b" not in mode:
            encoding = io.text_encoding(encoding)
        return _io_open(_fspath(self), mode, buffering, encoding, errors, newline)

    class PathlibPatch:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "pathlib":
                return None
            sys.meta_path.remove(PathlibPatch)
            for finder in sys.meta_path:
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def patched_exec_module(module):
                exec_module(module)
                module.Path.open = path_open

            spec.loader.exec_module = patched_exec_module
            return spec

    sys.meta_path.insert(0, PathlibPatch)
    sys.addaudithook(_make_hook(cfg["root"], tuple(cfg["ro_roots"]), tuple(cfg["ro_hidden"]), frozenset(cfg["ro_files"]),
                                posix.stat))


def _make_hook(root, ro_roots, ro_hidden, ro_files, stat):
    # The hook is ONE function: its state lives in its own closure cells and holds only immutable
    # values and captured builtins, so rebinding a global or builtin does not reach it, and there
    # is no helper function whose __closure__ a frame could hand out. Paths are normalised as
    # strings (no os.path call the program could patch); links cannot be made, so a normalised
    # path inside the fresh working directory is really inside it.
    str_, bytes_, int_, float_, bool_, tuple_, type_, len_ = str, bytes, int, float, bool, tuple, type, len
    NoneType_ = type(None)
    PermissionError_, OSError_, ValueError_ = PermissionError, OSError, ValueError
    WRITE = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND (Linux)
    S_IFMT, S_IFDIR = 0o170000, 0o040000
    BLOCK_PREFIX = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.forkpty", "pty.", "os.kill", "os.killpg", "os.chroot", "os.setuid", "os.setgid",
                    "os.symlink", "os.link", "os.chdir", "os.fchdir", "gc.get_", "sys.remote_exec",
                    "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
                    "nntplib.", "telnetlib.", "_posixsubprocess", "resource.setrlimit", "resource.prlimit",
                    "sqlite3.", "cpython.PyInterpreterState_New", "cpython.run_", "sys.settrace",
                    "sys.setprofile", "sys._current_frames", "sys._current_exceptions", "sys.monitoring",
                    "signal.pthread_kill", "os.setpriority", "os.mkfifo", "os.mknod")
    BLOCK_EXACT = frozenset({"os.system", "os.popen", "os.startfile"})
    BLOCK_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_interpreters",
                               "_xxinterpchannels", "_interpchannels", "_interpqueues", "_cffi_backend",
                               "_posixshmem", "_sqlite3", "_testcapi", "_testinternalcapi", "_testmultiphase",
                               "_testsinglephase", "_testimportmultiple", "_testclinic", "_testbuffer",
                               "_tracemalloc", "_lsprof", "xxsubtype", "xxlimited", "xxlimited_35"})
    # the hook calls no code of the program, so the only way to one of its frames is the traceback
    # of an exception it raised (generator / coroutine frames, which asyncio reads, are the program's)
    FRAME_ATTRS = frozenset({"tb_frame"})
    NO_PATH_ARGS = frozenset({"os.putenv", "os.unsetenv", "os.sched_setaffinity"})
    READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "glob.glob",
                             "glob.glob/2"})
    PLAIN_ARGS = frozenset({int_, float_, bool_, NoneType_, tuple_, list, dict})
    root_slash = root.rstrip("/") + "/"
    ro_slash = tuple_(r.rstrip("/") + "/" for r in ro_roots)
    # third-party packages inside the standard library's folder (site-packages): not readable, and
    # no native code from there
    hidden_slash = tuple_(r.rstrip("/") + "/" for r in ro_hidden) or ("\0",)

    def hook(event, args):
        if event == "open":
            n = len_(args)
            path = args[0] if n > 0 else None
            omode = args[1] if n > 1 else None
            flags = args[2] if n > 2 else None
            if path is None or type_(path) is int_:  # an fd: opened before, under this hook
                return
            write = (type_(omode) is str_ and ("w" in omode or "a" in omode or "x" in omode or "+" in omode)) \
                or (type_(flags) is int_ and flags & WRITE != 0)
            paths = ((path, write),)
        elif event == "import":
            name = args[0] if len_(args) > 0 else None
            if type_(name) is str_ and name.rpartition(".")[2] in BLOCK_IMPORTS:
                raise PermissionError_("sandbox: import of %s is blocked" % name)
            filename = args[1] if len_(args) > 1 else None
            if type_(filename) is str_:
                if filename.rpartition("/")[2].partition(".")[0] in BLOCK_IMPORTS:
                    raise PermissionError_("sandbox: loading %s is blocked" % filename)
                # a native extension: only the read-only standard library's own (one written into
                # the working directory could be anything)
                if not filename.startswith(ro_slash) or filename.startswith(hidden_slash) or "/../" in filename \
                        or "/./" in filename or "//" in filename:
                    raise PermissionError_("sandbox: loading native code from %s is blocked" % filename)
            elif filename is not None:
                raise PermissionError_("sandbox: import with a file name of type other than str is blocked")
            return
        elif event == "object.__getattr__":
            if len_(args) > 1 and type_(args[1]) is str_ and args[1] in FRAME_ATTRS:
                raise PermissionError_("sandbox: access to frames (%s) is blocked" % args[1])
            return
        elif event == "socket.__new__":
            # AF_UNIX only (asyncio's self-pipe is a socketpair); connect / bind / sendto stay refused
            if len_(args) > 1 and type_(args[1]) is int_ and args[1] == 1:
                return
            raise PermissionError_("sandbox: %s is blocked" % event)
        elif event in BLOCK_EXACT or event.startswith(BLOCK_PREFIX):
            raise PermissionError_("sandbox: %s is blocked" % event)
        elif event.startswith(("os.", "shutil.", "glob.")) and event not in NO_PATH_ARGS:
            write = event not in READ_EVENTS
            paths = ()
            for a in args:
                if type_(a) is str_ or type_(a) is bytes_:
                    paths = paths + ((a, write),)
                elif type_(a) not in PLAIN_ARGS:
                    # a path object (exact str / bytes only) or anything else
                    raise PermissionError_("sandbox: %s with an argument other than str / bytes / numbers is blocked"
                                           % event)
        else:
            return
        for path, write in paths:
            t = type_(path)
            # exact types only: a str/bytes subclass or a custom __fspath__ could show the check one
            # path and the system call another
            if t is str_:
                p = path
            elif t is bytes_:
                p = path.decode("utf-8", "surrogateescape")
            else:
                raise PermissionError_("sandbox: paths must be str or bytes (path objects are blocked)")
            if not p.startswith("/"):
                p = root_slash + p
            parts = []
            for part in p.split("/"):
                if part == "" or part == ".":
                    continue
                if part == "..":
                    if parts:
                        parts.pop()
                else:
                    parts.append(part)
            p = "/" + "/".join(parts)
            if p == root or p.startswith(root_slash) or p == "/dev/null":
                continue
            if not write and (p in ro_files or (p.startswith(ro_slash) and not p.startswith(hidden_slash)
                                                and p + "/" not in hidden_slash)):
                # reading the standard library is fine; opening a directory outside the working
                # directory would give a dir_fd to open (or create) things relative to it
                if event != "open":
                    continue
                try:
                    st_mode = stat(p).st_mode
                except (OSError_, ValueError_):
                    continue
                if st_mode & S_IFMT != S_IFDIR:
                    continue
                raise PermissionError_("sandbox: opening a directory outside the working directory is blocked: %r"
                                       % (p,))
            raise PermissionError_("sandbox: access outside the working directory is blocked: %r" % (p,))

    return hook


_main()
'''


class SandboxUnavailableError(RuntimeError):
    """The requested isolation cannot be provided on this machine (the message says why and how)."""


@dataclasses.dataclass
class RunResult:
    """Outcome of :func:`run_python`."""

    returncode: Optional[int]  # None when killed on timeout
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool  # stdout reached max_output_bytes
    isolation: str = ""  # the layer that ran it: "bubblewrap" or "audit-hook-only"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


# ------------------------------------------------------------------ what this machine provides
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


def _user_namespace_mode() -> bool:
    """Kernel isolation through a user namespace (caller not root, or root where only that works:
    e.g. without CAP_SYS_ADMIN) rather than a per-run dropped uid (root)."""
    if os.geteuid() != 0:
        return True
    _bubblewrap_probe()
    return bool(_probed_userns)


_probed_userns: List[bool] = []  # root only: the trial needed the user-namespace variant


def _bubblewrap_argv(bwrap: str, src_dir: str, disk_bytes: int, info_fd: Optional[int], seccomp_fd: Optional[int],
                     privileged: bool) -> List[str]:
    """bubblewrap's command line. ``privileged`` (the caller is root): no user namespace (bubblewrap
    would map the sandbox's uid to root outside, which the kernel exempts from ``RLIMIT_NPROC``);
    the wrapper instead drops to a fresh unprivileged uid (it keeps only CAP_SETUID / CAP_SETGID to
    do so, and has none left after). Otherwise uid 65534 in a new user namespace, with no further
    user namespaces allowed."""
    binds, hidden, _ = _layout()
    if privileged:
        argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
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
    small = str(min(disk_bytes, 1 << 20))
    argv += ["--perms", "1777", "--size", small, "--tmpfs", "/dev/shm",
             "--perms", "1777", "--size", small, "--tmpfs", "/tmp",
             "--perms", "1777", "--size", str(disk_bytes), "--tmpfs", "/work",
             "--ro-bind", src_dir, "/heal", "--remount-ro", "/", "--chdir", "/work"]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


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
    # root: the per-run uid first (RLIMIT_NPROC holds), else a user namespace
    for privileged in ((True, False) if os.geteuid() == 0 else (False,)):
        try:
            sandbox = _Sandbox(("bubblewrap", privileged, 1, False))
        except OSError as exc:
            return False, f"bubblewrap could not start: {exc}"
        try:
            res = sandbox.run(_TRIAL, "", _job(10.0, None, 4096, "stdin", None, 16, True, True), 10.0, 4096)
        finally:
            sandbox.close()
        if res.ok and res.stdout.strip() == "ok":
            if os.geteuid() == 0 and not privileged:
                _probed_userns.append(True)
            return True, ""
        reasons.append((res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1])
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
    binds, hidden, notes = _layout() if usable else ((), (), ())
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
    try:
        pool = _pool_size("bubblewrap")
    except ValueError as exc:
        pool = str(exc)
    return {
        "active": active,
        "requested": requested,
        "kernel_isolation": usable,
        "bubblewrap": {"path": bwrap, "version": version, "usable": usable, "why_not": reason or None},
        "uid": uid_mode,
        "seccomp": f"{len(bpf) // 8}-instruction filter" if bpf is not None else "none (not x86-64 Linux)",
        "pool_size": pool,
        "network_namespace": network_namespace_available(),
        "audit_hook": True,
        "interpreter": _interpreter(),
        "read_only_binds": list(binds),
        "hidden": list(hidden),
        "notes": notes,
        "missing": [] if usable else [reason],
        "how_to_get": "" if usable else INSTALL_HINT,
    }


# ------------------------------------------------------------------------------ running code
def _read_capped(path: str, limit: int):
    with open(path, "rb") as f:
        # no more than the file holds: f.read(n) allocates n bytes up front, whatever the file's size
        data = f.read(min(limit, os.fstat(f.fileno()).st_size) + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _wait_readable(fd: int, timeout_s: float) -> bool:
    """Wait until ``fd`` is readable (a pipe with data or closed, an exited process's pidfd); False on
    timeout. ``poll``, not ``select``: a trainer process may hold more than 1024 descriptors."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(math.ceil(timeout_s * 1000)))))


def _pidfd_open(pid: int) -> Optional[int]:
    """A pidfd for ``pid`` (None where the kernel or Python has none): a handle that keeps naming
    that one process, so signals through it can never reach another process that reuses the pid."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _pidfd_alive(pidfd: int) -> bool:
    """The pidfd's process has not been reaped (it may have exited: a zombie still holds its pid)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except OSError:
        return False


def _ppid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


class _Sandbox:
    """One sandboxed interpreter, started ahead of its job and used for exactly one run.

    Layout of its temporary folder: ``src/`` (``solution.py``, ``stdin``, ``job``: written by the
    parent when the job comes; bound read-only at ``/heal`` under kernel isolation), ``io/``
    (``stdout``, ``stderr``: the child's fds 1 and 2) and, without kernel isolation, ``work/``.
    The wrapper waits on the *go* pipe, reads the job, then writes to the *ready* pipe right before
    the program starts: the wall-clock limit counts from there, not from the start of a sandbox /
    interpreter on a loaded machine.
    """

    def __init__(self, key):
        isolation, privileged, disk_mb, isolate_network = key
        kernel = isolation == "bubblewrap"
        self.key, self.kernel = key, kernel
        self.top = tempfile.mkdtemp(prefix="heal-sandbox-")
        self.proc = None
        self.pidfd: Optional[int] = None  # of self.proc, taken at spawn (None: no pidfd support)
        self.go_w = self.ready_r = self.info_r = None
        child_fds: List[int] = []
        try:
            top = os.path.realpath(self.top)
            src_dir, io_dir = os.path.join(top, "src"), os.path.join(top, "io")
            os.mkdir(src_dir, 0o755)
            os.chmod(src_dir, 0o755)  # whatever the umask: the sandbox's uid must read it
            os.mkdir(io_dir, 0o700)
            for name in ("solution.py", "stdin", "job"):
                with open(os.path.join(src_dir, name), "w"):
                    pass
                os.chmod(os.path.join(src_dir, name), 0o644)
            self.src_dir, self.out_path, self.err_path = src_dir, os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
            inside = "/heal" if kernel else src_dir
            if kernel:
                root = "/work"
            else:
                root = os.path.join(top, "work")
                os.mkdir(root)
            go_r, self.go_w = os.pipe()
            self.ready_r, ready_w = os.pipe()
            child_fds += [go_r, ready_w]
            uid = _DROP_UID_BASE + secrets.randbelow(_DROP_UID_SPAN) if privileged else None
            cfg = {
                "root": root, "src": inside + "/solution.py", "stdin": inside + "/stdin", "job": inside + "/job",
                "ro_roots": [_stdlib_dir()],  # real paths
                "ro_hidden": list(_hidden_dirs()),
                "ro_files": ["/dev/urandom", "/dev/null"],
                "drop_to": [uid, uid] if privileged else None,
                "go_fd": go_r, "ready_fd": ready_w,
            }
            cmd = [_interpreter() if kernel else sys.executable, "-I", "-S", "-c", _WRAPPER, repr(cfg)]
            if kernel:
                self.info_r, info_w = os.pipe()
                child_fds.append(info_w)
                filter_r = None
                bpf = seccomp_filter()
                if bpf is not None:
                    filter_r, filter_w = os.pipe()
                    child_fds.append(filter_r)
                    with os.fdopen(filter_w, "wb") as fw:  # a few hundred bytes: fits the pipe's buffer
                        fw.write(bpf)
                cmd = _bubblewrap_argv(shutil.which("bwrap"), src_dir, int(disk_mb) << 20, info_w, filter_r,
                                       privileged) + cmd
            elif isolate_network and network_namespace_available():
                cmd = [shutil.which("unshare"), "-rn", "--"] + cmd
            env = {"PATH": "/usr/bin:/bin", "HOME": root, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
                   "OMP_NUM_THREADS": "1"}
            with open(self.out_path, "wb") as fout, open(self.err_path, "wb") as ferr:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr, cwd=src_dir if kernel else root,
                    env=env, start_new_session=True, close_fds=True, pass_fds=tuple(child_fds),
                )
            # only this object ever reaps its process, so the pid is still the child's here
            self.pidfd = _pidfd_open(self.proc.pid)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run(self, code: str, stdin: str, job: dict, timeout_s: float, max_output_bytes: int) -> RunResult:
        for name, text in (("solution.py", code), ("stdin", stdin), ("job", repr(job))):
            with open(os.path.join(self.src_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        timed_out = False
        try:
            try:
                os.write(self.go_w, b"1")
            except BrokenPipeError:
                pass  # it died before its job: its stderr says why
            os.close(self.go_w)
            self.go_w = None
            # start-up (whatever is left of it), then the program's own wall time; the pipe also turns
            # readable (EOF) when the process ends before the program starts
            if not _wait_readable(self.ready_r, STARTUP_TIMEOUT_S):
                raise subprocess.TimeoutExpired("sandbox", STARTUP_TIMEOUT_S)
            if self.pidfd is not None:
                # wait for the exit without reaping: until _stop reaps it, the process group id stays ours
                if not _wait_readable(self.pidfd, timeout_s):
                    raise subprocess.TimeoutExpired("sandbox", timeout_s)
            else:
                self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            self._stop()
        returncode = None if timed_out else self.proc.returncode
        stdout, truncated = _read_capped(self.out_path, max_output_bytes)
        stderr, _ = _read_capped(self.err_path, max_output_bytes)
        return RunResult(returncode, stdout, stderr, timed_out, truncated, self.key[0])

    def _stop(self) -> None:
        """Kill the sandbox (its pid namespace and its process group), reap the process, and return
        once the namespace is gone.

        Signals reach only the sandbox's own processes: this object is the only code that reaps its
        process, so until it does, neither its pid nor its process group id can name anything else.
        The group is therefore signalled only while ``returncode`` is None, and, where the process
        has a pidfd (taken at spawn), only while that pidfd's process is unreaped: a reaped group is
        never ``killpg``-ed (its id may by then belong to an unrelated process group). The
        namespace's pid 1 is signalled through a pidfd, and only after checking that its process is
        the child of our still unreaped bubblewrap."""
        if self.proc is None:
            return
        ns_pidfd = None
        if self.proc.returncode is None:
            if self.info_r is not None:
                ns_pidfd = _kill_sandbox_init(self.info_r, self.proc.pid, use_pidfd=self.pidfd is not None)
            if self.pidfd is None or _pidfd_alive(self.pidfd):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if ns_pidfd is not None:
            # readable once pid 1 has exited, which it does after the kernel emptied its namespace
            _wait_readable(ns_pidfd, 5.0)
            os.close(ns_pidfd)

    def close(self) -> None:
        """Stop the process (if any), release the pipes and remove the folder."""
        self._stop()
        for name in ("go_w", "ready_r", "info_r"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        shutil.rmtree(self.top, ignore_errors=True)


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


def _run(code, stdin, *, isolation, timeout_s, memory_mb, max_output_bytes, mode, fn_name, isolate_network,
         disk_mb, max_processes, audit_hook=True, pool=None) -> RunResult:
    # audit_hook=False runs the program under the kernel layer alone (for tests of that layer);
    # pool: sandboxes started ahead (None: HEAL_SANDBOX_POOL, default DEFAULT_POOL_SIZE; 0: none)
    kernel = isolation == "bubblewrap"
    # started by root, the sandbox drops to a uid of its own (see _bubblewrap_argv)
    privileged = kernel and not _user_namespace_mode()
    key = (isolation, privileged, int(disk_mb) if kernel else 0, bool(isolate_network) and not kernel)
    size = _pool_size(isolation) if pool is None else int(pool)
    sandbox = _pool.take(key, size) if size > 0 else None
    if sandbox is None:
        sandbox = _Sandbox(key)
    job = _job(timeout_s, memory_mb, max_output_bytes, mode, fn_name, max_processes, kernel, audit_hook)
    try:
        return sandbox.run(code, stdin, job, timeout_s, max_output_bytes)
    finally:
        sandbox.close()


def _kill_sandbox_init(info_r: int, parent: int, use_pidfd: bool = True) -> Optional[int]:
    """SIGKILL the sandbox's pid 1 (bubblewrap reports its host pid on the info pipe): the kernel
    then kills everything else in its pid namespace. Call only while ``parent`` (our bubblewrap) is
    unreaped, so that a process whose parent is ``parent`` is bubblewrap's child. Returns a pidfd of
    that process to wait on (None when it is already gone, or without pidfd support: then it waits
    here, up to 5 s)."""
    os.set_blocking(info_r, False)
    try:
        info = json.loads(os.read(info_r, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return None
    pid = info.get("child-pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return None
    pidfd = _pidfd_open(pid) if use_pidfd else None
    if pidfd is not None:
        # the pidfd names one process; reading its parent, then finding it still unreaped, shows the
        # /proc entry read was that process's (a pid is not reused before its process is reaped)
        if _ppid(pid) != parent or not _pidfd_alive(pidfd):
            os.close(pidfd)
            return None
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        return pidfd
    if use_pidfd or _gone(pid) or _ppid(pid) != parent:
        return None  # gone already (pidfd_open failed), or no longer bubblewrap's child
    try:
        os.kill(pid, signal.SIGKILL)  # (no pidfds on this system: checked just before, by pid)
    except (ProcessLookupError, PermissionError):
        return None
    deadline = time.monotonic() + 5.0
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    return None


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


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
    ``memory_mb``: address-space limit (None: unlimited). ``max_output_bytes``: the largest
    stdout / stderr kept (a program writing more is stopped by the file-size limit).
    ``isolation``: ``"auto"`` (default, or ``HEAL_SANDBOX_ISOLATION``) / ``"bubblewrap"``: kernel
    isolation, :class:`SandboxUnavailableError` when this machine cannot provide it;
    ``"audit-hook-only"``: the audit hook alone (not a security boundary; warns once per process).
    ``disk_mb``: size of the private working directory (kernel isolation). ``max_processes``:
    ``RLIMIT_NPROC`` inside the sandbox, threads included (kernel isolation).
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
    if not (_finite_number(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if memory_mb is not None and not (_finite_number(memory_mb) and memory_mb > 0):
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
