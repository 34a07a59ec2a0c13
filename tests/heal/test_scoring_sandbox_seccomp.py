"""The seccomp filter of the code sandbox (:mod:`heal.scoring.sandbox.seccomp`).

* exactly: a small classic-BPF interpreter runs the assembled filter on synthetic ``seccomp_data``
  (syscall number, architecture, arguments) and checks the verdict of every refused call and
  argument, and of the calls CPython needs;
* end to end: programs run in the real sandbox with the audit hook switched off, so that the kernel
  is what refuses; each has a benign canary in the same run and, where the host can see the
  resource, a host-side measurement while the program holds what it managed to create. Calls with
  no standard-library API go through a tiny static C probe compiled at test time (skipped without a
  compiler or a static libc), copied into the sandbox's ``/work`` and run with ``os.execv``.

The system-call numbers here are the kernel's x86-64 table, written out on purpose (not read from
the module under test).
"""

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest

from heal.scoring import sandbox
from heal.scoring.sandbox import seccomp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
ALLOW, KILL, EPERM, ENOSYS = "allow", "kill", "EPERM", "ENOSYS"

# x86-64 numbers (arch/x86/entry/syscalls/syscall_64.tbl)
NR = {
    "read": 0, "write": 1, "close": 3, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
    "ioctl": 16, "pread64": 17, "access": 21, "madvise": 28, "dup": 32, "getpid": 39, "socket": 41,
    "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "exit": 60, "wait4": 61,
    "uname": 63, "fcntl": 72, "flock": 73, "ftruncate": 77, "getdents64": 217, "readlink": 89,
    "sysinfo": 99, "ptrace": 101, "personality": 135, "arch_prctl": 158, "modify_ldt": 154, "gettid": 186,
    "futex": 202, "set_tid_address": 218, "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233,
    "openat": 257, "newfstatat": 262, "set_robust_list": 273, "epoll_create1": 291, "dup3": 292,
    "pipe2": 293, "prlimit64": 302, "getrandom": 318, "rseq": 334, "lseek": 8, "rt_sigprocmask": 14,
    "getsockname": 51, "clone3": 435, "unshare": 272,
    # refused by this task's findings
    "memfd_create": 319, "memfd_secret": 447,
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
    "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
    "mq_getsetattr": 245,
    "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
    "io_pgetevents": 333,
    "inotify_init": 253, "inotify_add_watch": 254, "inotify_rm_watch": 255, "inotify_init1": 294,
    "fanotify_init": 300, "fanotify_mark": 301,
    "fallocate": 285, "open_tree_attr": 467,
}
REFUSED = ["memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl",
           "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
           "mq_timedreceive", "mq_notify", "mq_getsetattr", "io_setup", "io_destroy", "io_getevents", "io_submit",
           "io_cancel", "io_pgetevents", "inotify_init", "inotify_add_watch", "inotify_rm_watch", "inotify_init1",
           "fanotify_init", "fanotify_mark", "flock", "fallocate", "modify_ldt", "personality", "open_tree_attr",
           "fork", "vfork", "ptrace", "unshare"]
# what CPython used (strace -f of the legitimate-programs test on the host: start-up, asyncio,
# threads, hashlib, zlib, pathlib, stdin), with the arguments it passes
CPYTHON_USES = ["read", "write", "close", "mmap", "mprotect", "munmap", "brk", "rt_sigaction", "rt_sigprocmask",
                "ioctl", "pread64", "access", "madvise", "dup", "getpid", "uname", "getdents64", "readlink",
                "sysinfo", "arch_prctl", "gettid", "futex", "set_tid_address", "exit_group", "exit", "epoll_wait",
                "epoll_ctl", "openat", "newfstatat", "set_robust_list", "epoll_create1", "dup3", "pipe2",
                "prlimit64", "getrandom", "rseq", "lseek", "getsockname", "execve", "wait4", "ftruncate"]

F = {"F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_SETFL": 4, "F_GETLK": 5, "F_SETLK": 6,
     "F_SETLKW": 7, "F_SETOWN": 8, "F_GETOWN": 9, "F_SETSIG": 10, "F_GETSIG": 11, "F_SETOWN_EX": 15,
     "F_GETOWN_EX": 16, "F_OFD_GETLK": 36, "F_OFD_SETLK": 37, "F_OFD_SETLKW": 38, "F_SETLEASE": 1024,
     "F_GETLEASE": 1025, "F_NOTIFY": 1026, "F_DUPFD_CLOEXEC": 1030, "F_SETPIPE_SZ": 1031, "F_GETPIPE_SZ": 1032,
     "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034, "F_GET_RW_HINT": 1035, "F_SET_RW_HINT": 1036}
FCNTL_ALLOWED = {"F_DUPFD", "F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL", "F_DUPFD_CLOEXEC", "F_GETPIPE_SZ",
                 "F_GET_SEALS"}

CSIGNAL_SIGCHLD = 17
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND, CLONE_VFORK = 0x100, 0x200, 0x400, 0x800, 0x4000
CLONE_THREAD, CLONE_SYSVSEM, CLONE_SETTLS = 0x10000, 0x40000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID = 0x100000, 0x200000
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
THREAD_FLAGS = (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_SETTLS
                | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID)  # glibc's pthread_create
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK = 1, 2, 10, 16, 17, 40


# ------------------------------------------------------------------ a classic-BPF interpreter
def run_bpf(prog: bytes, nr: int, args=(), arch=AUDIT_ARCH_X86_64) -> str:
    """The verdict of a seccomp filter on one system call (the subset of classic BPF it may use)."""
    args = list(args) + [0] * (6 - len(args))
    data = struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, arch, 0x401000, *[a & 0xFFFFFFFFFFFFFFFF for a in args])
    insns = [struct.unpack("<HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert 0 < len(insns) <= 4096 and len(prog) % 8 == 0
    acc, pc = 0, 0
    while True:
        assert 0 <= pc < len(insns), "fell off the end of the filter"
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # LD | W | ABS
            assert k % 4 == 0 and k + 4 <= len(data), k
            acc = struct.unpack_from("<I", data, k)[0]
        elif code in (0x15, 0x25, 0x35, 0x45):  # JEQ / JGT / JGE / JSET, K
            cond = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if cond else jf
        elif code == 0x05:  # JA
            pc += k
        elif code == 0x06:  # RET | K
            action, value = k & 0xFFFF0000, k & 0xFFFF
            if action == 0x7FFF0000:
                return ALLOW
            if action in (0x80000000, 0x00000000):
                return KILL
            if action == 0x00050000:
                return {1: EPERM, 38: ENOSYS}.get(value, "errno %d" % value)
            raise AssertionError("unexpected action %#x" % k)
        else:
            raise AssertionError("opcode %#x not understood by the test interpreter" % code)


@pytest.fixture(scope="module")
def prog():
    return seccomp._x86_64_filter()


def test_bpf_refused_calls(prog):
    for name in REFUSED:
        assert run_bpf(prog, NR[name], [0, 0, 0, 0, 0, 0]) == EPERM, name
    for name in ("memfd_create", "shmget", "io_setup", "inotify_init1", "fanotify_init", "flock", "fallocate"):
        # whatever the arguments
        assert run_bpf(prog, NR[name], [1, 0x200, 0x380, 7, 0, 0]) == EPERM, name
    assert run_bpf(prog, NR["clone3"]) == ENOSYS  # glibc then falls back to clone


def test_bpf_fcntl_is_an_allowlist(prog):
    for name, cmd in F.items():
        want = ALLOW if name in FCNTL_ALLOWED else EPERM
        assert run_bpf(prog, NR["fcntl"], [3, cmd, 0]) == want, name
    for cmd in list(range(0, 64)) + list(range(1024, 1048)) + [0xFFFFFFFF, 0x7FFFFFFF]:
        want = ALLOW if cmd in {F[n] for n in FCNTL_ALLOWED} else EPERM
        assert run_bpf(prog, NR["fcntl"], [3, cmd, 0]) == want, cmd
    # the kernel takes cmd as an unsigned int: the filter looks at the same low 32 bits
    assert run_bpf(prog, NR["fcntl"], [3, (1 << 32) | F["F_SETLK"], 0]) == EPERM
    assert run_bpf(prog, NR["fcntl"], [3, (1 << 32) | F["F_GETFL"], 0]) == ALLOW


def test_bpf_socket_families(prog):
    for call in ("socket", "socketpair"):
        assert run_bpf(prog, NR[call], [AF_UNIX, 1, 0]) == ALLOW, call
        for family in (AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK, 0, 45):
            assert run_bpf(prog, NR[call], [family, 1, 0]) == EPERM, (call, family)


def test_bpf_process_creation(prog):
    assert run_bpf(prog, NR["clone"], [THREAD_FLAGS, 0, 0, 0, 0]) == ALLOW  # a thread
    for flags in (CSIGNAL_SIGCHLD,  # fork through clone
                  CLONE_VM | CLONE_VFORK | CSIGNAL_SIGCHLD,  # posix_spawn
                  CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND,  # a thread-like process of its own
                  THREAD_FLAGS | CLONE_NEWUSER, THREAD_FLAGS | CLONE_NEWNET, CLONE_NEWPID | CSIGNAL_SIGCHLD):
        assert run_bpf(prog, NR["clone"], [flags, 0, 0, 0, 0]) == EPERM, hex(flags)
    for name in ("fork", "vfork"):
        assert run_bpf(prog, NR[name]) == EPERM


def test_bpf_what_cpython_needs_stays(prog):
    for name in CPYTHON_USES:
        assert run_bpf(prog, NR[name], [3, 0, 0]) == ALLOW, name
    assert run_bpf(prog, NR["socketpair"], [AF_UNIX, 1, 0, 0]) == ALLOW  # asyncio's self-pipe
    for cmd in ("F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL", "F_DUPFD_CLOEXEC"):  # os.set_blocking / dup / ...
        assert run_bpf(prog, NR["fcntl"], [3, F[cmd], 1]) == ALLOW, cmd


def test_bpf_other_abis_are_killed(prog):
    assert run_bpf(prog, 0x40000000 | NR["read"]) == KILL  # x32
    assert run_bpf(prog, 20, arch=AUDIT_ARCH_I386) == KILL  # i386 getpid through int 0x80
    assert run_bpf(prog, 0xFFFFFFFF & -1) == KILL  # nr -1 has the x32 bit set too


# ------------------------------------------------------------------ end to end, kernel layer alone
KERNEL = sys.platform.startswith("linux") and sandbox.bubblewrap_available()
needs_filter = pytest.mark.skipif(
    not KERNEL or seccomp.seccomp_filter() is None,
    reason="kernel isolation with a seccomp filter unavailable here (bubblewrap unusable or not x86-64)")


def kernel_run(code, stdin="", **kw):
    kw = {"timeout_s": 6.0, "memory_mb": 256, "max_output_bytes": 64 << 10, "disk_mb": 8, "max_processes": 16, **kw}
    return sandbox._run(code, stdin, isolation="bubblewrap", mode="stdin", fn_name=None, isolate_network=True,
                        audit_hook=False, pool_size=0, **kw)


def _json(r):
    assert r.returncode == 0, (r.stdout[-1000:], r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


class HostPeak:
    """Samples a host-side quantity while a run holds what it made: peak minus the value before."""

    def __init__(self, read):
        self.read, self.peak, self._stop = read, None, threading.Event()

    def __enter__(self):
        self.before = self.peak = self.read()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def delta(self):
        return self.peak - self.before


def shmem_kib():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def aio_nr():
    with open("/proc/sys/fs/aio-nr") as f:
        return int(f.read())


ATTEMPT = '''
import json, os, sys, threading, time
out = {}
def attempt(name, fn):
    try:
        out[name] = repr(fn())[:200]
    except BaseException as e:
        out[name] = "refused: %s: %s" % (type(e).__name__, e)
def canary_thread():
    t = threading.Thread(target=lambda: out.__setitem__("thread", "ran"))
    t.start(); t.join()
'''


def refused_eperm(value):
    return value.startswith("refused: PermissionError: [Errno 1]")


@needs_filter
def test_memfd_refused_and_no_host_shared_memory():
    code = ATTEMPT + '''
canary_thread()
with open("/work/canary", "w") as f:
    f.write("ok")
out["work"] = repr(open("/work/canary").read())
fds = []
def make():  # as many as its descriptors allow (150 at most)
    for i in range(150):
        fd = os.memfd_create("m%d" % i)
        fds.append(fd)
        os.write(fd, b"x" * (1 << 20))
attempt("memfd", make)
out["made"] = len(fds)
print(json.dumps(out), flush=True)
time.sleep(1.0)  # hold what was made while the host looks
'''
    with HostPeak(shmem_kib) as shmem:
        out = _json(kernel_run(code, memory_mb=64))
    assert refused_eperm(out["memfd"]) and out["made"] == 0, (out, "host Shmem +%d KiB" % shmem.delta)
    assert out["thread"] == "ran" and out["work"] == "'ok'"
    assert shmem.delta < 24 << 10, "host shared memory grew by %d KiB" % shmem.delta


@needs_filter
def test_fallocate_refused():
    code = ATTEMPT + '''
fd = os.open("/work/f", os.O_CREAT | os.O_RDWR, 0o600)
attempt("work", lambda: os.posix_fallocate(fd, 0, 1 << 20))
attempt("stdout", lambda: os.posix_fallocate(1, 0, 32 << 20))  # a pipe to the parent (or a host file)
out["stdout_bytes"] = os.fstat(1).st_blocks * 512
os.write(fd, b"x" * 4096)  # canary: ordinary writes, truncation
os.ftruncate(fd, 8192)
out["size"] = os.fstat(fd).st_size
sys.stdout.write(json.dumps(out) + "\\n")
'''
    out = _json(kernel_run(code))
    assert refused_eperm(out["work"]) and refused_eperm(out["stdout"]), out
    assert out["stdout_bytes"] < 1 << 20, out
    assert out["size"] == 8192


def _host_locks(path):
    ino = os.stat(path).st_ino

    def count():
        n = 0
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                dev_ino = next((x for x in fields if x.count(":") == 2), "")
                n += dev_ino.rsplit(":", 1)[-1] == str(ino)
        return n
    return count


@needs_filter
def test_locks_leases_dnotify_and_pipe_size_refused():
    lib = os.path.realpath(os.__file__)  # read-only in every sandbox, shared by all of them
    code = ATTEMPT + '''
import fcntl, signal, struct
signal.signal(signal.SIGIO, signal.SIG_IGN)  # dnotify's signal, should a watch be set
def lk(kind):  # struct flock: l_type, l_whence, l_start, l_len, l_pid
    return struct.pack("hhqqi4x", kind, 0, 0, 0, 0)
fd = os.open("{lib}", os.O_RDONLY)
attempt("flock", lambda: fcntl.flock(fd, fcntl.LOCK_SH))
attempt("lockf", lambda: fcntl.lockf(fd, fcntl.LOCK_SH))
attempt("setlk", lambda: fcntl.fcntl(fd, 6, lk(fcntl.F_RDLCK)))
attempt("getlk", lambda: fcntl.fcntl(fd, 5, lk(fcntl.F_WRLCK)))
attempt("ofd_setlk", lambda: fcntl.fcntl(fd, 37, lk(fcntl.F_RDLCK)))
attempt("ofd_setlkw", lambda: fcntl.fcntl(fd, 38, lk(fcntl.F_RDLCK)))
attempt("ofd_getlk", lambda: fcntl.fcntl(fd, 36, lk(fcntl.F_WRLCK)))
attempt("setlease", lambda: fcntl.fcntl(fd, 1024, fcntl.F_RDLCK))
attempt("getlease", lambda: fcntl.fcntl(fd, 1025))
dfd = os.open(os.path.dirname("{lib}"), os.O_RDONLY)
attempt("dnotify", lambda: fcntl.fcntl(dfd, 1026, 0x80000001))  # DN_MULTISHOT | DN_ACCESS
r, w = os.pipe()
attempt("setpipe_sz", lambda: fcntl.fcntl(w, 1031, 1 << 20))
# canaries: what CPython and the standard library use
attempt("getpipe_sz", lambda: fcntl.fcntl(w, 1032))
attempt("getfl", lambda: fcntl.fcntl(r, fcntl.F_GETFL) & os.O_ACCMODE)
def blocking():
    os.set_blocking(r, False)
    return os.get_blocking(r)
attempt("set_blocking", blocking)
def inheritable():
    os.set_inheritable(r, True)
    return os.get_inheritable(r)
attempt("set_inheritable", inheritable)
attempt("dup", lambda: os.dup(r) > r)
attempt("dupfd_cloexec", lambda: fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 40))
canary_thread()
print(json.dumps(out), flush=True)
time.sleep(1.0)  # hold whatever locks it got while the host looks
'''.replace("{lib}", lib)
    with HostPeak(_host_locks(lib)) as locks:
        out = _json(kernel_run(code))
    for key in ("flock", "lockf", "setlk", "getlk", "ofd_setlk", "ofd_setlkw", "ofd_getlk", "setlease", "getlease",
                "dnotify", "setpipe_sz"):
        assert refused_eperm(out[key]), (key, out, "host saw %d locks" % locks.delta)
    assert out["getpipe_sz"] == "65536" and out["getfl"] == "0" and out["set_blocking"] == "False"
    assert out["set_inheritable"] == "True" and out["dup"] == "True" and out["dupfd_cloexec"] == "40"
    assert out["thread"] == "ran"
    assert locks.delta == 0, "the host saw %d locks on %s" % (locks.delta, lib)


@needs_filter
def test_socketpair_only_unix():
    code = ATTEMPT + '''
import socket
attempt("inet", lambda: socket.socketpair(socket.AF_INET, socket.SOCK_STREAM))
attempt("inet6", lambda: socket.socketpair(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("netlink", lambda: socket.socketpair(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("vsock", lambda: socket.socketpair(40, socket.SOCK_STREAM))
def unix():
    a, b = socket.socketpair()
    a.sendall(b"ping")
    return b.recv(4)
attempt("unix", unix)
print(json.dumps(out))
'''
    out = _json(kernel_run(code))
    for key in ("inet", "inet6", "netlink", "vsock"):
        assert refused_eperm(out[key]), (key, out[key])
    assert out["unix"] == "b'ping'"


@needs_filter
def test_process_creation_refused_threads_stay():
    code = ATTEMPT + '''
import subprocess
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)
attempt("fork", fork)
attempt("posix_spawn", lambda: os.waitpid(os.posix_spawn(sys.executable, [sys.executable, "-c", "0"], {}), 0))
attempt("subprocess", lambda: subprocess.run([sys.executable, "-c", "0"]).returncode)
attempt("init", lambda: [l.split()[1] for l in open("/proc/1/status") if l.startswith("Seccomp:")][0])
attempt("pid", os.getpid)
threads = [threading.Thread(target=time.sleep, args=(0.05,)) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
out["threads"] = len(threads)
print(json.dumps(out))
'''
    # (each thread reserves a stack and a 64 MiB glibc malloc arena of address space)
    out = _json(kernel_run(code, memory_mb=1024))
    for key in ("fork", "posix_spawn", "subprocess"):
        assert refused_eperm(out[key]), (key, out[key])
    # bubblewrap forked (its init is pid 1, under the filter too) before it loaded the filter
    assert out["pid"] == "2" and out["init"] == "'2'", out
    assert out["threads"] == 8


PROBE_C = r'''
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* argv: groups separated by "--", each "NAME NR ARG..." (ARG: a number, "@" a zeroed scratch
   buffer, "s:TEXT" a string), or "shm COUNT MB" (SysV segments created, attached, touched,
   detached), "aio COUNT" (io_setup(512) COUNT times), "vfork", "hold MS". Prints "NAME ret errno". */
static char scratch[64][256];
int main(int argc, char **argv) {
    int i = 1, slot = 0;
    while (i < argc) {
        int end = i;
        while (end < argc && strcmp(argv[end], "--") != 0) end++;
        const char *name = argv[i];
        long r = 0; int err = 0;
        if (!strcmp(name, "shm")) {
            long n = strtol(argv[i + 1], 0, 0), mb = strtol(argv[i + 2], 0, 0), made = 0;
            for (long k = 0; k < n; k++) {
                int id = shmget(IPC_PRIVATE, mb << 20, IPC_CREAT | 0600);
                if (id < 0) { err = errno; break; }
                char *p = shmat(id, 0, 0);
                if (p == (void *)-1) { err = errno; break; }
                memset(p, 1, mb << 20);
                shmdt(p);
                made++;
            }
            r = made;
        } else if (!strcmp(name, "aio")) {
            long n = strtol(argv[i + 1], 0, 0), made = 0;
            for (long k = 0; k < n; k++) {
                unsigned long ctx = 0;
                if (syscall(SYS_io_setup, 512, &ctx) != 0) { err = errno; break; }
                made++;
            }
            r = made;
        } else if (!strcmp(name, "vfork")) {
            pid_t p = vfork();
            if (p == 0) _exit(0);
            if (p < 0) { r = -1; err = errno; } else { r = 1; waitpid(p, 0, 0); }
        } else if (!strcmp(name, "hold")) {
            fflush(stdout);
            usleep(strtol(argv[i + 1], 0, 0) * 1000);
        } else {
            long nr = strtol(argv[i + 1], 0, 0), a[6] = {0, 0, 0, 0, 0, 0};
            for (int k = i + 2; k < end && k < i + 8; k++) {
                if (!strcmp(argv[k], "@")) a[k - i - 2] = (long)scratch[slot++ % 64];
                else if (!strncmp(argv[k], "s:", 2)) a[k - i - 2] = (long)(argv[k] + 2);
                else a[k - i - 2] = strtol(argv[k], 0, 0);
            }
            errno = 0;
            r = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
            if (r == 0 && (nr == 56 || nr == 57)) _exit(0); /* the child of fork / clone */
            if (r > 0 && (nr == 56 || nr == 57)) waitpid(r, 0, 0);
            err = r == -1 ? errno : 0;
        }
        printf("%s %ld %d\n", name, r, err);
        i = end + 1;
    }
    return 0;
}
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the static probe")
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE_C)
    r = subprocess.run([cc, "-static", "-O2", "-o", str(d / "probe"), str(d / "probe.c")], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip("cannot build a static C probe here (static libc missing?): " + r.stderr[-300:])
    return (d / "probe").read_bytes()


RUN_PROBE = '''
import base64, os, sys
data = base64.b64decode(sys.stdin.read())
with open("/work/probe", "wb") as f:
    f.write(data)
os.chmod("/work/probe", 0o755)
assert "noexec" not in [l for l in open("/proc/self/mounts") if " /work " in l][0]
sys.stdout.flush()
os.execv("/work/probe", ["/work/probe"] + %r)
'''

PROBE_CALLS = [
    ["getpid", "39"],  # the unfiltered control
    ["shmget", "29", "0", "4096", "0x380"],  # IPC_PRIVATE, 4 KiB, IPC_CREAT | 0600
    ["msgget", "68", "0", "0x380"],
    ["semget", "64", "0", "1", "0x380"],
    ["mq_open", "240", "s:heal-probe", "0x42", "0600", "0"],  # O_CREAT | O_RDWR
    ["io_setup", "206", "16", "@"],
    ["inotify_init1", "294", "0"],
    ["fanotify_init", "300", "0x200", "0"],  # FAN_REPORT_FID: allowed without privileges since 5.13
    ["modify_ldt", "154", "0", "@", "16"],  # read the LDT
    ["personality", "135", "0xffffffff"],  # query
    ["memfd_secret", "447", "0"],
    ["open_tree_attr", "467", "-100", "s:/work", "0", "0", "0"],  # AT_FDCWD, no clone, no attributes
    ["memfd_create", "319", "s:m", "0"],
    ["flock", "73", "0", "1"],
    ["fork", "57"],
    ["clone", "56", "17", "0", "0", "0", "0"],  # SIGCHLD: a process, not a thread
    ["vfork"],
    ["shm", "12", "16"],  # 192 MiB of SysV shared memory at memory_mb=128
    ["aio", "8"],  # 8 x io_setup(512): 4096 of the host's fs.aio-max-nr
    ["hold", "1000"],
]


@needs_filter
def test_probe_calls_without_a_stdlib_api_refused(probe):
    args = []
    for call in PROBE_CALLS:
        args += call + ["--"]
    with HostPeak(shmem_kib) as shmem, HostPeak(aio_nr) as aio:
        r = kernel_run(RUN_PROBE % args[:-1], base64.b64encode(probe).decode(), memory_mb=128)
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    got = {}
    for line in r.stdout.splitlines():
        name, ret, err = line.split()
        got[name] = (int(ret), int(err))
    assert set(got) == {c[0] for c in PROBE_CALLS}, r.stdout
    assert got["getpid"][0] > 0 and got["getpid"][1] == 0, got  # the probe runs, unfiltered calls work
    ctx = (got, "host Shmem +%d KiB, fs.aio-nr +%d" % (shmem.delta, aio.delta))
    for name in ("shmget", "msgget", "semget", "mq_open", "io_setup", "inotify_init1", "fanotify_init", "modify_ldt",
                 "personality", "memfd_secret", "open_tree_attr", "memfd_create", "flock", "fork", "clone", "vfork"):
        assert got[name] == (-1, 1), (name, ctx)
    assert got["shm"] == (0, 1) and got["aio"] == (0, 1), ctx
    assert shmem.delta < 96 << 10, "host shared memory grew by %d KiB" % shmem.delta
    assert aio.delta < 2048, "fs.aio-nr grew by %d" % aio.delta
