"""One sandboxed interpreter, started ahead of its job and used for exactly one run, and its teardown.

The parent enforces the wall-clock limit, counted from the moment the program starts (the wrapper
says so through a pipe), so a slow sandbox start on a loaded machine does not eat into it (start-up
itself may take up to ``STARTUP_TIMEOUT_S``). The environment is replaced by a minimal one.

Teardown: bubblewrap runs with ``--die-with-parent`` and ``--new-session``; when the run ends or
times out the sandbox's pid 1 is killed, the kernel then kills every process left in its pid
namespace, and a run returns only once that namespace is gone: nothing outlives it. Teardown
signals only processes known to be the sandbox's: pid 1 through a pidfd, the process group only
before its leader is reaped (:meth:`_Sandbox._stop`), so a reused pid is never hit.
"""
from __future__ import annotations

import dataclasses
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
import time
from typing import List, Optional

from heal.scoring.sandbox import launcher, wrapper
from heal.scoring.sandbox.seccomp import seccomp_filter

# the most a sandbox + interpreter may take to start before the program's wall-clock limit begins
STARTUP_TIMEOUT_S = 30.0


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



# ------------------------------------------------------------------------------ running code
class _Capture:
    """One output pipe of a run, read as the program writes: the first ``limit`` bytes are kept.
    ``stops``: passing the limit stops the program (stdout); otherwise the rest is read and dropped."""

    def __init__(self, fd: int, limit: int, stops: bool = True):
        self.fd, self.limit, self.stops = fd, limit, stops
        self.data = bytearray()
        self.over = self.eof = False

    def read(self, max_chunks: int = 16) -> None:
        """Read what the pipe holds, at most ``max_chunks`` x 64 KiB: a program that writes as fast as
        the parent reads must not keep the caller from its deadline."""
        for _ in range(max_chunks):
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            room = self.limit - len(self.data)
            if len(chunk) > room:
                self.over = True
            if room > 0:
                self.data += chunk[:room]
            if self.over and self.stops:
                return

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


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
    parent when the job comes; bound read-only at ``/heal`` under kernel isolation) and
    ``scratch/`` (kernel isolation: the mount point of the run's bounded tmpfs, which only the
    sandbox's mount namespace sees) or ``work/`` (audit hook only). stdout and stderr are pipes that
    the parent reads while the program runs (never host files: a program cannot take host disk
    through them, e.g. with ``fallocate``).
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
        self.go_w = self.ready_r = self.info_r = self.out_r = self.err_r = None
        child_fds: List[int] = []
        try:
            top = os.path.realpath(self.top)
            src_dir = os.path.join(top, "src")
            os.mkdir(src_dir, 0o755)
            os.chmod(src_dir, 0o755)  # whatever the umask: the sandbox's uid must read it
            for name in ("solution.py", "stdin", "job"):
                with open(os.path.join(src_dir, name), "w"):
                    pass
                os.chmod(os.path.join(src_dir, name), 0o644)
            self.src_dir = src_dir
            inside = "/heal" if kernel else src_dir
            if kernel:
                root = "/work"
            else:
                root = os.path.join(top, "work")
                os.mkdir(root)
            go_r, self.go_w = os.pipe()
            self.ready_r, ready_w = os.pipe()
            child_fds += [go_r, ready_w]
            uid = launcher._DROP_UID_BASE + secrets.randbelow(launcher._DROP_UID_SPAN) if privileged else None
            cfg = {
                "root": root, "src": inside + "/solution.py", "stdin": inside + "/stdin", "job": inside + "/job",
                "ro_roots": [launcher._stdlib_dir()],  # real paths
                "ro_hidden": list(launcher._hidden_dirs()),
                "ro_files": ["/dev/urandom", "/dev/null"],
                "drop_to": [uid, uid] if privileged else None,
                "go_fd": go_r, "ready_fd": ready_w,
            }
            cmd = [launcher._interpreter() if kernel else sys.executable, "-I", "-S", "-c", wrapper.SOURCE, repr(cfg)]
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
                scratch = None
                if launcher.scratch_mount_available(privileged)[0]:
                    scratch = os.path.join(top, "scratch")
                    os.mkdir(scratch, 0o755)
                cmd = launcher._bubblewrap_argv(shutil.which("bwrap"), src_dir, int(disk_mb) << 20, info_w, filter_r,
                                                scratch, privileged) + cmd
            elif isolate_network and launcher.network_namespace_available():
                cmd = [shutil.which("unshare"), "-rn", "--"] + cmd
            env = {"PATH": "/usr/bin:/bin", "HOME": root, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
                   "OMP_NUM_THREADS": "1",
                   # glibc gives each thread a 64 MB malloc arena of address space: under RLIMIT_AS a
                   # program could start only a handful of threads
                   "MALLOC_ARENA_MAX": "2"}
            self.out_r, out_w = os.pipe()
            self.err_r, err_w = os.pipe()
            child_fds += [out_w, err_w]
            for fd in (self.out_r, self.err_r):
                os.set_blocking(fd, False)
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, cwd=src_dir if kernel else root,
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
        out, err = _Capture(self.out_r, max_output_bytes), _Capture(self.err_r, max_output_bytes, stops=False)
        timed_out = False
        try:
            try:
                os.write(self.go_w, b"1")
            except BrokenPipeError:
                pass  # it died before its job: its stderr says why
            os.close(self.go_w)
            self.go_w = None
            # start-up (whatever is left of it), then the program's own wall time; the ready pipe also
            # turns readable (EOF) when the process ends before the program starts. Without a pidfd the
            # exit is polled (that reaps the process: _stop then signals nothing).
            end = self._pump((out, err), self.ready_r, STARTUP_TIMEOUT_S)
            if end == "ready":
                end = self._pump((out, err), self.pidfd, timeout_s)
            timed_out = end == "timeout"
        finally:
            self._stop()
        # every writer is gone now: what is left in the pipes
        self._pump((out, err), None, 5.0)
        returncode = None if timed_out else self.proc.returncode
        return RunResult(returncode, out.text(), err.text(), timed_out, out.over, self.key[0])

    def _pump(self, streams, until_fd: Optional[int], timeout_s: float) -> str:
        """Read the output pipes until ``until_fd`` turns readable (``"ready"``), the process exits
        (``until_fd`` None: polled), both pipes reach EOF after the process is gone (``"eof"``),
        stdout passes its cap (``"over"``) or ``timeout_s`` passes (``"timeout"``)."""
        deadline = time.monotonic() + timeout_s
        poller = select.poll()
        live = {s.fd: s for s in streams if not s.eof}
        for fd in live:
            poller.register(fd, select.POLLIN)
        if until_fd is not None:
            poller.register(until_fd, select.POLLIN)
        while True:
            if until_fd is None and not live and self.proc.returncode is not None:
                return "eof"
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            waiting_for_exit = until_fd is None and self.proc.returncode is None
            wait_ms = int(math.ceil(min(left, 0.01) if waiting_for_exit else left) * 1000)
            events = poller.poll(max(0, wait_ms))
            done = False
            for fd, _ in events:
                if fd == until_fd:
                    done = True
                    continue
                stream = live[fd]
                stream.read()
                if stream.eof:
                    poller.unregister(fd)
                    del live[fd]
            if any(s.over and s.stops for s in streams):
                return "over"
            if done:
                return "ready"
            if waiting_for_exit and self.proc.poll() is not None:
                return "ready"

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
        for name in ("go_w", "ready_r", "info_r", "out_r", "err_r"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        shutil.rmtree(self.top, ignore_errors=True)



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
