"""The sandbox's two layers against the escape classes of issue 13, each with a benign canary.

* kernel layer alone (bubblewrap, the audit hook switched off): the program may do anything
  Python allows and still must not reach the host: a secret file, files to create outside, an
  orphan to leave, a host Unix socket / TCP port to reach, a ``/dev/shm`` segment to read, a
  host process to signal, more processes or disk than allowed;
* audit hook (second layer), on its own and on top of bubblewrap: the ten tricks that got
  through the old hook are refused;
* legitimate programs pass under the default (both layers);
* no silent weak mode: without kernel isolation ``run_python`` refuses unless opted in.

Tests that need kernel isolation skip, with the reason, only where bubblewrap cannot run.
Each sandbox run costs one interpreter start-up; the programs bundle several attempts each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings

import pytest

from heal.scoring import sandbox
from heal.scoring.sandbox import (SandboxUnavailableError, bubblewrap_available, isolation_status, resolve_isolation,
                                  run_python)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

KERNEL = sys.platform.startswith("linux") and bubblewrap_available()
needs_kernel = pytest.mark.skipif(
    not KERNEL,
    reason="kernel isolation unavailable on this machine: %s (%s)"
    % (sandbox.isolation._bubblewrap_probe()[1] if sys.platform.startswith("linux") else "not Linux", sandbox.isolation.INSTALL_HINT),
)
HOOK_MODES = ["audit-hook-only", pytest.param("bubblewrap", marks=needs_kernel)]
STDLIB = os.path.dirname(os.__file__)
DYNLOAD = os.path.join(STDLIB, "lib-dynload")


def _ext(name):
    """Path of a standard extension module's shared object (where the interpreter has it built in,
    the path it would have: the hook refuses by name and place before anything is loaded)."""
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin and spec.origin.endswith(".so"):
        return spec.origin
    return os.path.join(DYNLOAD, name + importlib.machinery.EXTENSION_SUFFIXES[0])


def _any_ext():
    """Some shared object of the standard library, whose bytes the program copies."""
    import glob

    found = sorted(glob.glob(os.path.join(DYNLOAD, "*.so")))
    return found[0] if found else sys.executable


@pytest.fixture(autouse=True)
def _quiet_weak_mode_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="heal sandbox: running untrusted code with the audit hook only")
        yield


@pytest.fixture
def canary(tmp_path):
    """Host-side canaries: a secret file, a Unix socket (path + abstract), a TCP port, a /dev/shm
    segment and a host process, all checked after the run."""
    token = "CANARY-" + uuid.uuid4().hex
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "host.sock"))
    unix.listen(4)
    unix.setblocking(False)
    abstract_name = "heal-canary-" + uuid.uuid4().hex
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen(4)
    abstract.setblocking(False)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    shm = "/dev/shm/heal-canary-" + uuid.uuid4().hex
    with open(shm, "w") as f:
        f.write(token)
    host = subprocess.Popen(["sleep", "120"])
    info = {
        "token": token, "secret": str(secret), "dir": str(tmp_path), "unix": str(tmp_path / "host.sock"),
        "abstract": abstract_name, "port": tcp.getsockname()[1], "shm": shm, "pid": host.pid,
        "nice": os.getpriority(os.PRIO_PROCESS, host.pid), "marker": "heal-orphan-" + uuid.uuid4().hex,
        "outside_name": "heal-escape-" + uuid.uuid4().hex,
    }
    try:
        yield info
        for srv in (unix, abstract, tcp):
            with pytest.raises(BlockingIOError):
                srv.accept()  # nobody connected
        assert host.poll() is None, "the host process was killed"
        assert os.getpriority(os.PRIO_PROCESS, host.pid) == info["nice"], "the host process was reniced"
        with open(shm) as f:
            assert f.read() == token, "the /dev/shm segment was overwritten"
        for d in (tmp_path, STDLIB, "/tmp", "/dev/shm", os.getcwd()):
            assert not os.path.exists(os.path.join(d, info["outside_name"])), f"a file was created in {d}"
        assert not _orphans(info["marker"]), "a process outlived run_python"
    finally:
        host.kill()
        host.wait()
        for srv in (unix, abstract, tcp):
            srv.close()
        os.unlink(shm)
        for d in (STDLIB, "/tmp", "/dev/shm"):  # clean up after a failed escape test
            p = os.path.join(d, info["outside_name"])
            if os.path.exists(p):
                os.unlink(p)


def _orphans(marker):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    for pid in found:  # never leave one behind, even when the test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return found


def _fill(code, c):
    for k, v in c.items():
        code = code.replace("{" + k + "}", str(v))
    return code


def kernel_only(code, c, **kw):
    """Run under bubblewrap with the audit hook switched off; the program prints one JSON line."""
    kw = {"timeout_s": 3.0, "memory_mb": 256, "max_output_bytes": 64 << 10, "disk_mb": 8, "max_processes": 16, **kw}
    r = sandbox._run(_fill(code, c), "", isolation="bubblewrap", mode="stdin", fn_name=None, isolate_network=True,
                     audit_hook=False, **kw)
    assert c["token"] not in r.stdout + r.stderr, "the secret leaked"
    return r


def _json(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ kernel layer alone
ATTEMPT = '''
import json, os, sys
out = {}
def attempt(name, fn):
    try:
        out[name] = repr(fn())[:200]
    except BaseException as e:
        out[name] = "refused: %s: %s" % (type(e).__name__, e)
'''


@needs_kernel
def test_kernel_layer_identity_and_view(canary):
    r = kernel_only(ATTEMPT + '''
attempt("uid", lambda: (os.getuid(), os.getgid(), os.geteuid()))
attempt("root", lambda: sorted(os.listdir("/")))
attempt("caps", lambda: [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1])
attempt("pid", lambda: os.getpid())
attempt("procs", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
attempt("stdlib_site", lambda: os.listdir(os.path.join(os.path.dirname(os.__file__), "site-packages")))
attempt("venv", lambda: os.listdir("{venv}"))
attempt("project", lambda: os.listdir("{project}"))
attempt("etc", lambda: os.listdir("/etc"))
attempt("dev", lambda: sorted(os.listdir("/dev")))
attempt("shm", lambda: os.listdir("/dev/shm"))
attempt("hostname", lambda: os.uname().nodename)
attempt("net", lambda: sorted(os.listdir("/sys/class/net")))
print(json.dumps(out))
''', {**canary, "venv": sys.prefix, "project": os.getcwd()})
    out = _json(r)
    uid = eval(out["uid"])
    # uid 65534 in a user namespace, or (started by root) a fresh unprivileged uid of its own
    assert uid[0] == uid[1] == uid[2] and (uid[0] == 65534 or uid[0] >= sandbox.launcher._DROP_UID_BASE), uid
    assert out["caps"] == "'0000000000000000'"
    procs = eval(out["procs"])
    assert 1 in procs and len(procs) <= 3, procs  # only the sandbox's own pid namespace
    # the root holds the read-only binds (interpreter, stdlib, libraries) and the sandbox's own mounts
    allowed = {b.split("/")[1] for b in isolation_status()["read_only_binds"]} | {"proc", "dev", "tmp", "work", "heal"}
    root = eval(out["root"])
    assert set(root) <= allowed and "etc" not in root and "home" not in root, root
    assert out["stdlib_site"] == "[]", out["stdlib_site"]
    keys = ["project", "etc", "net"] + (["venv"] if sys.prefix != sys.base_prefix else [])
    for key in keys:
        assert out[key].startswith("refused: FileNotFoundError"), (key, out[key])
    assert out["shm"] == "[]"
    assert out["hostname"] == "'sandbox'"


@needs_kernel
def test_kernel_layer_secret_files_and_writes_outside(canary):
    r = kernel_only(ATTEMPT + '''
stdlib = os.path.dirname(os.__file__)
attempt("secret", lambda: open("{secret}").read())
attempt("secret_dir", lambda: os.listdir("{dir}"))
attempt("write_stdlib", lambda: open(os.path.join(stdlib, "{outside_name}"), "w").write("x"))
attempt("dirfd_stdlib", lambda: os.open("{outside_name}", os.O_CREAT | os.O_WRONLY, dir_fd=os.open(stdlib, os.O_RDONLY)))
attempt("write_root", lambda: open("/{outside_name}", "w").write("x"))
attempt("write_dir", lambda: open("{dir}/{outside_name}", "w").write("x"))
attempt("mkfifo_stdlib", lambda: os.mkfifo(os.path.join(stdlib, "{outside_name}")))
attempt("mknod_dev", lambda: os.mknod("/work/{outside_name}", 0o600 | 0o020000, os.makedev(1, 3)))
attempt("tmp", lambda: open("/tmp/{outside_name}", "w").write("x"))  # the sandbox's own /tmp
attempt("shm", lambda: open("/dev/shm/{outside_name}", "w").write("x"))  # its own /dev/shm
attempt("host_shm", lambda: open("{shm}").read())
attempt("sqlite", lambda: __import__("sqlite3").connect("{dir}/{outside_name}").execute("create table t(x)"))
attempt("ctypes", lambda: __import__("ctypes").CDLL(None).system(b"cat {secret} > /work/leak; cat /work/leak"))
attempt("cffi", lambda: __import__("_cffi_backend"))
print(json.dumps(out))
''', canary)
    out = _json(r)
    for key in ("secret", "secret_dir", "write_dir", "host_shm"):
        assert out[key].startswith("refused: FileNotFoundError"), (key, out[key])
    for key in ("write_stdlib", "dirfd_stdlib", "write_root", "mkfifo_stdlib"):
        assert out[key].startswith("refused: OSError") or "Read-only" in out[key] or "Permission" in out[key], \
            (key, out[key])
    assert out["mknod_dev"].startswith("refused: PermissionError"), out["mknod_dev"]  # no CAP_MKNOD
    assert out["tmp"] == "1" and out["shm"] == "1"  # private tmpfs mounts, checked absent on the host
    # site-packages is hidden; the libraries of _ctypes / _sqlite3 are left out (a statically linked
    # interpreter may still have them: then they find no host file and no shell)
    assert out["cffi"].startswith("refused: ModuleNotFoundError"), out["cffi"]
    assert out["sqlite"].startswith("refused:"), out["sqlite"]
    assert out["ctypes"].startswith("refused:") or out["ctypes"] != "0", out["ctypes"]


@needs_kernel
def test_kernel_layer_sockets_and_host_processes(canary):
    r = kernel_only(ATTEMPT + '''
import socket, signal
def unix(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    s.connect(addr)
    return "connected"
attempt("unix_path", lambda: unix("{unix}"))
attempt("unix_abstract", lambda: unix("\\0{abstract}"))
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=0.5) and "connected")
attempt("kill", lambda: os.kill({pid}, signal.SIGKILL))
attempt("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL))
attempt("renice", lambda: os.setpriority(os.PRIO_PROCESS, {pid}, 19))
attempt("kill_all", lambda: os.kill(-1, signal.SIGKILL))
print(json.dumps(out))
''', canary)
    out = _json(r)
    for key in ("unix_path", "unix_abstract", "tcp", "kill", "pidfd", "renice"):
        assert out[key].startswith("refused:"), (key, out[key])
    # the fixture checks that no server saw a connection and the host process lives, un-reniced


@needs_kernel
@pytest.mark.skipif(sandbox.seccomp.seccomp_filter() is None, reason="no seccomp filter for this architecture")
def test_kernel_layer_seccomp_filter(canary):
    r = kernel_only(ATTEMPT + '''
import socket, threading
attempt("seccomp", lambda: [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0])
attempt("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
attempt("mkfifo_work", lambda: os.mkfifo("/work/fifo"))
attempt("pidfd_self", lambda: os.pidfd_open(os.getpid()))
attempt("unshare", lambda: os.unshare(os.CLONE_NEWUSER) if hasattr(os, "unshare") else "no os.unshare")
t = threading.Thread(target=lambda: out.__setitem__("thread", "ran"))
t.start(); t.join()
print(json.dumps(out))
''', canary)
    out = _json(r)
    assert out["seccomp"] == "'2'"  # filter mode
    for key in ("inet", "inet6", "netlink", "mkfifo_work", "pidfd_self"):
        assert out[key].startswith("refused: PermissionError"), (key, out[key])
    assert out["unix"] == "None" and out["thread"] == "ran"  # AF_UNIX and threads (clone3 -> clone) work
    assert out["unshare"] in ("'no os.unshare'",) or out["unshare"].startswith("refused: PermissionError")


@needs_kernel
@pytest.mark.parametrize("parent", ["exits", "hangs"])
def test_kernel_layer_no_process_outlives_the_run(canary, parent):
    # every way to leave a process behind: a double-forked child in a new session (survives
    # killpg), posix_spawn and subprocess in new sessions, each of which would sleep on; the seccomp
    # filter refuses process creation (EPERM); the parent then exits normally or hangs until the
    # wall timeout, and nothing of the run is left either way
    code = '''
import os, subprocess, sys, time
SLEEPER = [sys.executable, "-S", "-c", "import time; time.sleep(60)", "{marker}"]
def double_fork():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, SLEEPER)
        os._exit(0)
refused = []
for name, spawn in [("fork", double_fork),
                    ("posix_spawn", lambda: os.posix_spawn(sys.executable, SLEEPER, {}, setsid=True)),
                    ("subprocess", lambda: subprocess.Popen(SLEEPER, start_new_session=True))]:
    try:
        spawn()
    except PermissionError as e:
        refused.append("%s:%d" % (name, e.errno))
time.sleep(0.3)
print("spawned; refused:", ",".join(refused), flush=True)
''' + ("time.sleep(60)\n" if parent == "hangs" else "")
    r = kernel_only(code, canary, timeout_s=1.5)
    assert "spawned; refused: fork:1,posix_spawn:1,subprocess:1" in r.stdout, (r.stdout, r.stderr[-1500:])
    assert r.timed_out == (parent == "hangs")
    assert not _orphans(canary["marker"])


@needs_kernel
def test_kernel_layer_process_and_disk_limits(canary):
    r = kernel_only(ATTEMPT + '''
import threading, time
def fork():
    if os.fork() == 0:
        os._exit(0)
attempt("fork", fork)  # a run is one process (seccomp); its threads count against max_processes
threading.stack_size(1 << 18)
threads = []
def thread_many():
    try:
        for _ in range(200):
            t = threading.Thread(target=time.sleep, args=(2,), daemon=True)
            t.start()
            threads.append(t)
    finally:
        out["threads"] = len(threads)
attempt("thread_bomb", thread_many)
def fill(folder):
    n = 0
    for i in range(100):
        with open(os.path.join(folder, "f%d" % i), "wb") as f:
            f.write(b"x" * 60000)
        n += 60000
    return n
attempt("disk", lambda: fill("/work"))
print(json.dumps(out))
''', canary, max_processes=16, disk_mb=1, memory_mb=2048)  # (each thread reserves a 64 MiB malloc arena)
    out = _json(r)
    assert out["fork"].startswith("refused: PermissionError: [Errno 1]"), out["fork"]
    if os.geteuid() == 0 and sandbox.isolation._user_namespace_mode():
        # root without the per-run uid variant: the kernel exempts the mapped uid (root) from
        # RLIMIT_NPROC, and isolation_status says so
        assert any("RLIMIT_NPROC" in n for n in isolation_status()["notes"])
    else:
        # RLIMIT_NPROC (threads included) stops the threads, not memory (2 GiB of address space)
        assert out["thread_bomb"].startswith("refused: RuntimeError: can't start new thread"), out["thread_bomb"]
        assert 8 <= out["threads"] < 16, out["threads"]
    assert "No space left on device" in out["disk"], out["disk"]


# ------------------------------------------------------------------ audit hook (second layer)
HOOK_ATTEMPTS = {
    # 1. _posixsubprocess loaded from its .so under another name; fork_exec raises no audit event
    "posixsubprocess_by_path": '''
import importlib.util, os
spec = importlib.util.spec_from_file_location("x._posixsubprocess", "{posixsubprocess}")
m = importlib.util.module_from_spec(spec)
print("loaded", m)
''',
    # the stub that lets `import subprocess` work refuses to fork
    "posixsubprocess_stub": '''
import _posixsubprocess
_posixsubprocess.fork_exec(["/bin/sh", "-c", "cat {secret}"], [b"/bin/sh"], True, (), None, None,
                           -1, -1, -1, -1, -1, -1, -1, -1, False, False, -1, None, None, None, -1, None)
''',
    # 2. a subinterpreter runs without the hook
    "subinterpreter": '''
import importlib.util
for name in ("_xxsubinterpreters", "_interpreters"):
    try:
        __import__(name).create()
        print("created")
    except ModuleNotFoundError:
        pass
spec = importlib.util.spec_from_file_location("y._xxsubinterpreters", "{xxsub}")
m = importlib.util.module_from_spec(spec)
print("loaded", m.create())
''',
    # 3. the hook's own state through the traceback of a refused open
    "hook_state_from_traceback": '''
try:
    open("{secret}")
except PermissionError as e:
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    f = tb.tb_frame
    print(sorted(f.f_locals))
print(open("{secret}").read())
''',
    # 4. __fspath__ patched: the hook would check str(), the kernel opens what __fspath__ returns
    "fspath_patched": '''
import pathlib, _io
pathlib.PurePath.__fspath__ = lambda self: "{secret}"
print(_io.FileIO(pathlib.PosixPath("decoy")).read())
''',
    "fspath_patched_path_open": '''
import pathlib
pathlib.PurePath.__fspath__ = lambda self: "{secret}"
print(pathlib.Path("decoy").read_text())
''',
    # 5. _cffi_backend from site-packages gives libc's system()
    "cffi": '''
import _cffi_backend
print("imported")
''',
    # ... or any native extension / file of the base interpreter's site-packages (inside its stdlib
    # folder on pyenv / python.org builds)
    "site_packages_native": '''
import importlib.machinery, importlib.util
spec = importlib.machinery.PathFinder.find_spec("_cffi_backend", ["{stdlib}/site-packages", "/usr/lib/python3/dist-packages"])
spec = spec or importlib.util.spec_from_file_location("_cffi_backend", "{stdlib}/site-packages/_cffi_backend.so")
m = importlib.util.module_from_spec(spec)
print("loaded", m)
''',
    "site_packages_listing": '''
import os
print(os.listdir("{stdlib}/site-packages"))
print(open("{stdlib}/site-packages/README.txt").read())
''',
    # 6. a native extension written into the working directory and imported
    "native_extension_in_workdir": '''
import importlib.util
data = open("{bisect}", "rb").read()
open("_bisect.cpython-evil.so", "wb").write(data)
spec = importlib.util.spec_from_file_location("_bisect", "_bisect.cpython-evil.so")
m = importlib.util.module_from_spec(spec)
print("loaded native code", m)
''',
    # 7. dir_fd of a read-only root: a file created in the standard library (a .pth there would
    # run in every later Python)
    "dir_fd_write": '''
import os
fd = os.open("{stdlib}", os.O_RDONLY)
os.open("{outside_name}", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
''',
    "dir_fd_subdir": '''
import os
fd = os.open("{stdlib}/json", os.O_RDONLY | os.O_DIRECTORY)
print(os.listdir(fd))
''',
    # 8. sqlite3 ATTACH / VACUUM INTO anywhere; mknod / mkfifo (no audit events)
    "sqlite_connect": '''
import sqlite3
sqlite3.connect("{dir}/{outside_name}").execute("create table t(x)")
''',
    "sqlite_module": '''
import _sqlite3
''',
    "mkfifo": '''
import os
os.mkfifo("{dir}/{outside_name}")
''',
    "mknod": '''
import os
os.mknod("{dir}/{outside_name}")
''',
    # 9. /dev/shm of other processes; signals / priority of other processes
    "shm_module": '''
import _posixshmem
fd = _posixshmem.shm_open("/{shm_name}", 0, 0)
print(open(fd).read())
''',
    "shm_file": '''
print(open("{shm}").read())
''',
    "kill": '''
import os, signal
os.kill({pid}, signal.SIGKILL)
''',
    "pidfd": '''
import os, signal
signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)
''',
    "renice": '''
import os
os.setpriority(os.PRIO_PROCESS, {pid}, 19)
''',
    # 10. a host Unix socket (a network namespace does not cover filesystem sockets), abstract ones, TCP
    "unix_socket": '''
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("{unix}")
print("connected")
''',
    "unix_abstract": '''
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\\0{abstract}")
print("connected")
''',
    "tcp": '''
import socket
socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
print("connected")
''',
    # 10. process creation of any kind
    "fork": '''
import os
if os.fork() == 0:
    os.execv("/bin/sleep", ["/bin/sleep", "60", "{marker}"])
''',
    "subprocess": '''
import subprocess
subprocess.Popen(["/bin/sleep", "60", "{marker}"], start_new_session=True)
''',
    "ctypes": '''
import ctypes
ctypes.CDLL(None).system(b"cat {secret}")
''',
    "trace_function": '''
import sys
sys.settrace(lambda *a: None)
''',
}


@pytest.mark.parametrize("isolation", HOOK_MODES)
@pytest.mark.parametrize("name", sorted(HOOK_ATTEMPTS))
def test_audit_hook_refuses_each_known_escape(canary, isolation, name):
    c = {**canary, "posixsubprocess": _ext("_posixsubprocess"), "xxsub": _ext("_xxsubinterpreters"),
         "bisect": _any_ext(), "stdlib": STDLIB, "shm_name": os.path.basename(canary["shm"])}
    r = run_python(_fill(HOOK_ATTEMPTS[name], c), timeout_s=2.0, memory_mb=256, isolation=isolation)
    assert r.returncode not in (0, None), (name, r.stdout, r.stderr[-1500:])
    assert canary["token"] not in r.stdout + r.stderr
    assert not any(w in r.stdout for w in ("loaded", "created", "imported", "connected"))
    # refused by the hook (or the attribute it would use removed), not by an accident of the test
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("PermissionError: sandbox:") or (
        last.startswith("AttributeError: module") and any(w in last for w in ("mkfifo", "mknod", "pidfd", "setpriority"))
    ), (name, r.stderr[-1500:])


# ------------------------------------------------------------------ legitimate programs
LEGIT = r'''
import asyncio, subprocess, threading, sys, json, heapq, collections, math, fractions, itertools, bisect, re
import random, decimal, functools, dataclasses, typing, enum, statistics, string, operator, copy, array
import hashlib, zlib, bz2, lzma, struct, datetime, time, io, pathlib, uuid

async def work(i):
    await asyncio.sleep(0.001)
    return i * i
async def main():
    return sum(await asyncio.gather(*(work(i) for i in range(5))))
total = asyncio.run(main())

acc = []
lock = threading.Lock()
def worker(k):
    s = sum(range(k * 1000))
    with lock:
        acc.append(s)
threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join()

sys.setrecursionlimit(20000)
def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)

big = bytearray(150 * 1024 * 1024)  # large but allowed (limit 512 MiB)
big[-1] = 7
data = sys.stdin.read()
pathlib.Path("scratch.txt").write_text("hi")
print(json.dumps({"asyncio": total, "threads": len(acc), "depth": depth(10000), "big": big[-1],
                  "stdin_lines": len(data.splitlines()), "sha": hashlib.sha256(b"x").hexdigest()[:8],
                  "zlib": len(zlib.compress(b"a" * 1000)) < 100, "scratch": pathlib.Path("scratch.txt").read_text(),
                  "subprocess": hasattr(subprocess, "run")}))
'''


@pytest.mark.parametrize("isolation", HOOK_MODES)
def test_legitimate_programs_work(isolation):
    stdin = "\n".join(str(i) for i in range(100000)) + "\n"
    r = run_python(LEGIT, stdin, timeout_s=10.0, memory_mb=512, isolation=isolation)
    assert r.ok, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out == {"asyncio": 30, "threads": 8, "depth": 10000, "big": 7, "stdin_lines": 100000,
                   "sha": "2d711642", "zlib": True, "scratch": "hi", "subprocess": True}
    assert r.isolation == isolation


@needs_kernel
def test_default_is_kernel_isolation_with_the_hook():
    r = run_python("import os\nprint(os.getuid())\nopen('/etc/hostname')", timeout_s=2.0)
    assert r.isolation == "bubblewrap"
    uid = int(r.stdout.strip())
    assert uid == sandbox.launcher.SANDBOX_UID or uid >= sandbox.launcher._DROP_UID_BASE
    assert "PermissionError: sandbox:" in r.stderr  # the hook's refusal, on top of the kernel's


@needs_kernel
def test_user_namespace_variant(monkeypatch):
    # what a non-root caller gets (uid 65534 in a user namespace, no nested user namespaces);
    # started by root here, so only the view is checked (the kernel exempts root's uid from RLIMIT_NPROC)
    monkeypatch.setattr(sandbox.isolation, "_user_namespace_mode", lambda: True)
    r = sandbox._run("import os, json\nprint(json.dumps([os.getuid(), sorted(os.listdir('/')), "
                     "[l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]]))",
                     "", isolation="bubblewrap", timeout_s=3.0, memory_mb=256, max_output_bytes=4096, mode="stdin",
                     fn_name=None, isolate_network=True, disk_mb=4, max_processes=16, audit_hook=False)
    assert r.ok, r.stderr
    uid, root, caps = json.loads(r.stdout)
    assert uid == sandbox.launcher.SANDBOX_UID and caps == "0000000000000000"
    assert "etc" not in root and "work" in root and "heal" in root
    r = run_python(LEGIT, "1\n2\n", timeout_s=10.0, memory_mb=512)
    assert r.ok, r.stderr[-2000:]


@pytest.mark.parametrize("isolation", HOOK_MODES)
def test_pooled_sandboxes_are_fresh_for_every_run(isolation, monkeypatch):
    monkeypatch.setenv(sandbox.pool.POOL_ENV, "2")
    write = "open('left-behind.txt', 'w').write('x')\nimport os\nprint(sorted(os.listdir('.')))"
    outs = [run_python(write, timeout_s=2.0, isolation=isolation).stdout.strip() for _ in range(3)]
    assert outs == ["['left-behind.txt']"] * 3  # nothing of a previous run is left
    unpooled = sandbox._run(write, "", isolation=sandbox.resolve_isolation(isolation), timeout_s=2.0, memory_mb=256,
                            max_output_bytes=4096, mode="stdin", fn_name=None, isolate_network=True, disk_mb=64,
                            max_processes=64, pool_size=0)
    assert unpooled.stdout.strip() == outs[0]
    monkeypatch.setenv(sandbox.pool.POOL_ENV, "many")
    with pytest.raises(ValueError, match="HEAL_SANDBOX_POOL"):
        run_python("print(1)", isolation=isolation)


@needs_kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="the per-run uid variant is for callers that are root")
def test_root_falls_back_to_the_user_namespace_variant(monkeypatch):
    real_argv = sandbox.launcher._bubblewrap_argv

    def argv(*args):
        out = real_argv(*args)
        return out + ["--this-option-does-not-exist"] if args[-1] else out  # the per-run uid variant fails

    monkeypatch.setattr(sandbox.launcher, "_bubblewrap_argv", argv)
    monkeypatch.setattr(sandbox.isolation, "_probed_userns", [])
    sandbox.isolation._bubblewrap_probe.cache_clear()
    try:
        assert sandbox.isolation._bubblewrap_probe() == (True, "")
        assert sandbox.isolation._user_namespace_mode()
        r = run_python("import os\nprint(os.getuid())", timeout_s=3.0)
        assert r.ok and r.stdout.strip() == str(sandbox.launcher.SANDBOX_UID)
    finally:
        sandbox.isolation._bubblewrap_probe.cache_clear()
        monkeypatch.undo()
        sandbox.pool._pool.close()
    assert not sandbox.isolation._user_namespace_mode()


# ------------------------------------------------------------------ no silent weak mode
def test_refuses_without_kernel_isolation(monkeypatch):
    monkeypatch.setattr(sandbox.isolation, "_bubblewrap_probe", lambda: (False, "bubblewrap (`bwrap`) is not installed"))
    monkeypatch.delenv(sandbox.ISOLATION_ENV, raising=False)
    for isolation in (None, "auto", "bubblewrap"):
        with pytest.raises(SandboxUnavailableError, match="bwrap.*not installed.*apt-get install bubblewrap.*audit-hook-only"):
            run_python("print(1)", isolation=isolation)
    status = isolation_status()
    assert status["active"] is None and status["missing"] and "bubblewrap" in status["how_to_get"]
    # the explicit opt-in, by argument or environment, runs with the hook alone and warns once per process
    monkeypatch.setattr(sandbox.isolation, "_warned_once", [])
    with pytest.warns(RuntimeWarning, match="not a security boundary"):
        assert run_python("print(1)", isolation="audit-hook-only", timeout_s=2.0).stdout.strip() == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv(sandbox.ISOLATION_ENV, "audit-hook-only")
        r = run_python("print(2)", timeout_s=2.0)  # no second warning
    assert r.ok and r.isolation == "audit-hook-only"
    assert isolation_status()["active"] == "audit-hook-only"


def test_isolation_argument_errors(monkeypatch):
    with pytest.raises(ValueError, match="isolation"):
        run_python("print(1)", isolation="none")
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "off")
    with pytest.raises(ValueError, match="isolation"):
        resolve_isolation()
    with pytest.raises(ValueError, match="disk_mb"):
        run_python("print(1)", disk_mb=0, isolation="audit-hook-only")
    with pytest.raises(ValueError, match="max_processes"):
        run_python("print(1)", max_processes=0, isolation="audit-hook-only")


def test_isolation_status_reports_the_layer():
    status = isolation_status()
    assert set(status) >= {"active", "requested", "kernel_isolation", "bubblewrap", "audit_hook", "missing",
                           "how_to_get", "read_only_binds"}
    assert status["audit_hook"] is True
    if status["kernel_isolation"]:
        assert status["missing"] == [] and status["bubblewrap"]["usable"]
        binds = status["read_only_binds"]
        assert sandbox.launcher._interpreter() in binds and STDLIB in binds
        assert not any("site-packages" in b or "dist-packages" in b for b in binds)
    else:
        assert status["missing"] and status["how_to_get"]


def test_bench_sandbox_tiny(tmp_path, capsys):
    import argparse

    from heal.bench import sandbox as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--runs", "2", "--workers", "1", "--pool", "1", "--checker-rows", "1", "--output-dir", str(tmp_path)])
    assert bench.run(args) == 0
    doc = json.loads((tmp_path / "sandbox-cpu.json").read_text())
    assert doc["benchmark"] == "sandbox" and all(r["failed"] == 0 for r in doc["rows"])
    assert all(r["failed_rows"] == 0 for r in doc["checker"]) and len(doc["checker"]) == (2 if KERNEL else 0)
    paths = {r["path"] for r in doc["rows"]}
    assert "process-only" in paths and (("kernel" in paths) == KERNEL)
    assert (tmp_path / "sandbox-cpu.md").read_text().startswith("# Code sandbox throughput")
    with pytest.raises(ValueError, match="workers"):
        bench.run(parser.parse_args(["--workers", "0"]))


# ---------------------------------------------------------------- teardown without races
def _sandbox_key(isolation):
    if isolation == "bubblewrap":
        return ("bubblewrap", not sandbox.isolation._user_namespace_mode(), 64, False)
    return ("audit-hook-only", False, 0, False)


@pytest.mark.parametrize("isolation", HOOK_MODES)
def test_teardown_never_signals_a_reaped_process_group(isolation, monkeypatch):
    """A reaped group's id may already name an unrelated process group (pid reuse): killpg only while
    the sandbox's process is unreaped."""
    calls = []
    real_killpg = os.killpg
    current = {}

    def recording_killpg(pgid, sig):
        proc = current["sb"].proc
        calls.append((pgid, proc.returncode is not None))  # (group, already reaped by Popen.wait?)
        return real_killpg(pgid, sig)

    monkeypatch.setattr(sandbox.process.os, "killpg", recording_killpg)
    key = _sandbox_key(isolation)
    kernel = isolation == "bubblewrap"
    job = sandbox.limits._job(2.0, 256, 4096, "stdin", None, 16, kernel, True)
    for program, timed_out in [("print('hi')", False), ("import time\ntime.sleep(30)", True)]:
        current["sb"] = sb = sandbox.process._Sandbox(key)
        r = sb.run(program, "", job, 1.0, 4096)
        sb.close()
        assert r.timed_out == timed_out and (timed_out or r.stdout == "hi\n"), r
        assert calls and all(not reaped for _, reaped in calls), calls
        calls.clear()
    # a sandbox whose process was reaped before its teardown (e.g. by the pool's alive() check)
    current["sb"] = sb = sandbox.process._Sandbox(key)
    sb.proc.kill()
    sb.proc.wait()
    sb.close()
    assert calls == []


def test_teardown_does_not_signal_a_stale_pid_from_the_info_pipe():
    """The pid bubblewrap reported may have been reaped and reused by the time of the teardown: the
    namespace's pid 1 is signalled only when it is still our bubblewrap's child."""
    victim = subprocess.Popen(["sleep", "60"])  # stands for an unrelated process that got the pid
    sb = sandbox.process._Sandbox(_sandbox_key("audit-hook-only"))
    r, w = os.pipe()
    os.write(w, json.dumps({"child-pid": victim.pid}).encode())
    os.close(w)
    sb.info_r = r
    try:
        sb.close()  # the sandbox's process is alive and unreaped: it is stopped, the victim is not
        time.sleep(0.1)
        assert victim.poll() is None, "teardown killed a process that was not the sandbox's"
        assert sb.proc.returncode is not None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("isolation", HOOK_MODES)
def test_runs_in_a_process_holding_more_than_1024_descriptors(isolation):
    """A trainer process may hold thousands of descriptors; waiting on the sandbox must not use
    select() (which fails on descriptors >= 1024)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        pytest.skip(f"RLIMIT_NOFILE is {soft}")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        key = _sandbox_key(isolation)
        job = sandbox.limits._job(2.0, 256, 4096, "stdin", None, 16, isolation == "bubblewrap", True)
        for program, timed_out in [("print(6 * 7)", False), ("import time\ntime.sleep(30)", True)]:
            sb = sandbox.process._Sandbox(key)
            try:
                r = sb.run(program, "", job, 1.0, 4096)
            finally:
                sb.close()
            assert r.timed_out == timed_out and (timed_out or r.stdout == "42\n"), r
    finally:
        for fd in held:
            os.close(fd)
