"""Run untrusted Python (model-written code) in a separate, limited process.

Best-effort isolation, in layers (none of them is a security boundary on its own; for hostile
code at scale use a container or a sandbox service):

* a fresh process ``python -I -S`` (isolated mode: no user site, no ``PYTHON*`` variables, no
  site-packages; the standard library only) with a minimal environment, in its own session so
  that the whole process group is killed on timeout;
* a fresh temporary working directory holding only ``solution.py``;
* ``setrlimit`` before the code runs: CPU seconds, address space (memory), file size (so
  stdout/stderr, which go to files, cannot grow past ``max_output_bytes``), no core files;
* a wall-clock timeout enforced by the parent;
* no network: the process runs inside a new network namespace (``unshare -rn``) when the
  machine allows it (:func:`network_namespace_available`), and in every case an audit hook
  (:func:`sys.addaudithook`, which code cannot remove) refuses socket creation / connection,
  process creation (``subprocess``, ``os.system``, ``os.fork``, ``os.exec*``, importing
  ``_posixsubprocess``), ``ctypes``, ``gc`` object walks, raising rlimits, links, ``chdir``, opening files
  outside the working directory (read access to the standard library and ``/dev/urandom``
  stays allowed) and path operations (listdir, remove, rename ...) outside it. The hook is a
  closure over captured builtins, so rebinding globals or builtins does not switch it off;
  paths must be exact ``str`` / ``bytes`` / ``pathlib`` objects.

Outputs are read back truncated to ``max_output_bytes``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional

__all__ = ["RunResult", "run_python", "network_namespace_available"]

# The wrapper runs in the child before the untrusted code: limits, then the audit hook, then exec.
_WRAPPER = r'''
def _main():
    import sys, os, resource, json, pathlib
    cfg = json.loads(sys.argv[1])

    def lim(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(which)
            if hard == resource.RLIM_INFINITY or value <= hard:
                resource.setrlimit(which, (value, hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, int(cfg["cpu_s"]))
    lim(resource.RLIMIT_FSIZE, int(cfg["fsize"]))
    if cfg["mem_bytes"]:
        lim(resource.RLIMIT_AS, int(cfg["mem_bytes"]))
    root = os.path.realpath(cfg["root"])
    with open(os.path.join(root, "solution.py"), encoding="utf-8", errors="replace") as f:
        src = f.read()
    mode, fn_name = cfg["mode"], cfg["fn_name"]
    call_input = sys.stdin.read() if mode == "call" else ""
    code = compile(src, "solution.py", "exec")
    sys.addaudithook(_make_hook(root, tuple(os.path.realpath(p) for p in cfg["ro_roots"]),
                                frozenset(cfg["ro_files"]), (pathlib.PosixPath, pathlib.PurePosixPath)))
    del cfg, src, f
    user_globals = {"__name__": "__main__", "__builtins__": __builtins__}
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


def _make_hook(root, ro_roots, ro_files, path_types):
    # Everything the hook uses is bound here (closure cells, builtins captured), so that the
    # program cannot rebind a global or builtin to switch it off. Paths are normalised as strings
    # (no os.path call the program could patch); links cannot be made, so a normalised path
    # inside the fresh working directory is really inside it.
    isinstance_, str_, bytes_, int_, hasattr_, any_, tuple_ = isinstance, str, bytes, int, hasattr, any, tuple
    type_, bool_ = type, bool
    PermissionError_ = PermissionError
    WRITE = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND (Linux)
    BLOCK_PREFIX = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.forkpty", "pty.", "os.kill", "os.killpg", "os.chroot", "os.setuid", "os.setgid",
                    "os.symlink", "os.link", "os.chdir", "os.fchdir", "gc.get_", "sys.remote_exec",
                    "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
                    "nntplib.", "telnetlib.", "_posixsubprocess", "resource.setrlimit", "resource.prlimit")
    BLOCK_EXACT = frozenset({"os.system", "os.popen", "os.startfile"})
    BLOCK_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_testcapi",
                               "_testinternalcapi", "_tracemalloc"})
    NO_PATH_ARGS = frozenset({"os.putenv", "os.unsetenv", "os.sched_setaffinity"})
    READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "glob.glob",
                             "glob.glob/2"})
    root_slash = root.rstrip("/") + "/"
    ro_slash = tuple_(r.rstrip("/") + "/" for r in ro_roots)

    def normalise(p):
        if not p.startswith("/"):
            p = root_slash + p
        parts = []
        for part in p.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def check_path(path, write):
        t = type_(path)
        if path is None or t is int_ or t is bool_:
            return
        # exact types only: a str/bytes subclass or a custom __fspath__ could show the check one
        # path and the system call another
        if t is str_:
            p = path
        elif t is bytes_:
            p = path.decode("utf-8", "surrogateescape")
        elif t in path_types:
            p = str_(path)
        else:
            raise PermissionError_("sandbox: a path of type %s is blocked" % t.__name__)
        p = normalise(p)
        if p == root or p.startswith(root_slash) or p == "/dev/null":
            return
        if not write and (p in ro_files or any_(p.startswith(r) for r in ro_slash)):
            return
        raise PermissionError_("sandbox: access outside the working directory is blocked: %r" % (p,))

    def hook(event, args):
        if event == "open":
            path, omode, flags = (tuple_(args) + (None, None, None))[:3]
            write = bool(omode and any_(c in str_(omode) for c in "wax+")) or bool(
                isinstance_(flags, int_) and flags & WRITE)
            check_path(path, write)
        elif event == "import":
            if args and args[0] in BLOCK_IMPORTS:
                raise PermissionError_("sandbox: import of %s is blocked" % args[0])
        elif event in BLOCK_EXACT or event.startswith(BLOCK_PREFIX):
            raise PermissionError_("sandbox: %s is blocked" % event)
        elif event.startswith(("os.", "shutil.", "glob.")) and event not in NO_PATH_ARGS:
            for a in args:
                if isinstance_(a, (str_, bytes_)) or hasattr_(a, "__fspath__"):
                    check_path(a, event not in READ_EVENTS)

    return hook


_main()
'''


@dataclasses.dataclass
class RunResult:
    """Outcome of :func:`run_python`."""

    returncode: Optional[int]  # None when killed on timeout
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool  # stdout reached max_output_bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


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


def _ro_roots():
    paths = sysconfig.get_paths()
    roots = {paths.get("stdlib"), paths.get("platstdlib"), os.path.dirname(os.__file__)}
    return sorted(os.path.realpath(p) for p in roots if p)


def _read_capped(path: str, limit: int):
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


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
) -> RunResult:
    """Run ``code`` in a sandboxed child process (see the module docstring).

    ``mode="stdin"``: run the program with ``stdin`` as standard input; ``stdout`` is its output.
    ``mode="call"``: call function ``fn_name`` (``Solution().fn_name`` when the code defines a
    class ``Solution``) with the JSON values on the lines of ``stdin`` as arguments; ``stdout``
    is the JSON of the return value.
    ``timeout_s``: wall-clock limit (the CPU-time limit is its ceiling + 1 s).
    ``memory_mb``: address-space limit (None: unlimited). ``max_output_bytes``: the largest
    stdout / stderr kept (a program writing more is stopped by the file-size limit).
    ``isolate_network``: also run in a private network namespace when available.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if mode not in ("stdin", "call"):
        raise ValueError(f"mode must be 'stdin' or 'call', got {mode!r}")
    if mode == "call" and not fn_name:
        raise ValueError("fn_name is required when mode='call'")
    if not (timeout_s > 0):
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb is not None and memory_mb <= 0:
        raise ValueError(f"memory_mb must be > 0 or None, got {memory_mb}")
    if max_output_bytes <= 0:
        raise ValueError(f"max_output_bytes must be > 0, got {max_output_bytes}")

    with tempfile.TemporaryDirectory(prefix="heal-sandbox-") as top:
        root = os.path.join(top, "work")
        io_dir = os.path.join(top, "io")
        os.mkdir(root)
        os.mkdir(io_dir)
        with open(os.path.join(root, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        in_path, out_path, err_path = (os.path.join(io_dir, n) for n in ("stdin", "stdout", "stderr"))
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        cfg = {
            "root": root,
            "ro_roots": _ro_roots(),
            "ro_files": ["/dev/urandom", "/dev/null"],
            "cpu_s": int(math.ceil(timeout_s)) + 1,
            # room for the truncation check: one byte more than we keep
            "fsize": int(max_output_bytes) + 1,
            "mem_bytes": int(memory_mb) * (1 << 20) if memory_mb else 0,
            "mode": mode,
            "fn_name": fn_name,
        }
        cmd = [sys.executable, "-I", "-S", "-c", _WRAPPER, json.dumps(cfg)]
        if isolate_network and network_namespace_available():
            cmd = [shutil.which("unshare"), "-rn", "--"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1"}
        timed_out = False
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            proc = subprocess.Popen(
                cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=root, env=env, start_new_session=True,
                close_fds=True,
            )
            try:
                # small allowance for interpreter start-up on a loaded machine
                returncode = proc.wait(timeout=timeout_s + 0.5)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        stdout, truncated = _read_capped(out_path, max_output_bytes)
        stderr, _ = _read_capped(err_path, max_output_bytes)
    return RunResult(returncode, stdout, stderr, timed_out, truncated)
