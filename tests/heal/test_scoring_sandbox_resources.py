"""Host resources a sandboxed program can take are bounded by its run's limits (disk, inodes,
descriptors, output), measured from the host while the program runs.

Each test runs the program under the kernel layer with the audit hook off (so that what refuses is
the kernel), samples a host-side figure in a thread while it runs, and has a benign canary that must
keep working. The system calls the seccomp filter refuses are tested in
``test_scoring_sandbox_seccomp.py``.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from heal.scoring import sandbox
from heal.scoring.sandbox import bubblewrap_available, run_python
from heal.scoring.sandbox import launcher, limits

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and bubblewrap_available()),
    reason="kernel isolation unavailable on this machine",
)


def kernel_only(code, **kw):
    kw = {"timeout_s": 10.0, "memory_mb": 64, "max_output_bytes": 64 << 10, "disk_mb": 1, "max_processes": 16, **kw}
    return sandbox._run(code, "", isolation="bubblewrap", mode="stdin", fn_name=None, isolate_network=True,
                        audit_hook=False, **kw)


def last_json(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def meminfo_kb(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class Sampler:
    """Samples ``fn()`` every 20 ms in a thread while the block runs; ``peak`` is the largest rise
    over the value before."""

    def __init__(self, fn):
        self.fn, self.values, self.stop = fn, [], threading.Event()

    def __enter__(self):
        self.before = self.fn()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self.stop.is_set():
            self.values.append(self.fn())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.values.append(self.fn())

    @property
    def peak(self):
        return max(self.values) - self.before


def test_scratch_tmpfs_bounds_inodes():
    """60,000 empty files at disk_mb=1 took ~58 MB of host kernel slab; the scratch tmpfs now has
    MAX_FILES inodes for /work, /tmp and /dev/shm together."""
    code = r'''
import json, os
made, err = 0, None
try:
    for i in range(60000):
        open("/work/f%d" % i, "w").close()
        made += 1
except OSError as e:
    err = e.errno
import time; time.sleep(0.3)
print(json.dumps({"made": made, "errno": err}))
'''
    with Sampler(lambda: meminfo_kb("Slab")) as slab:
        out = last_json(kernel_only(code))
    import errno

    assert out["errno"] == errno.ENOSPC and out["made"] <= limits.MAX_FILES, out
    # 60,000 inodes would be ~58 MB; MAX_FILES of them ~4 MB (other processes share this machine)
    assert slab.peak < 24 << 10, f"host slab grew by {slab.peak} kB"


def test_scratch_tmpfs_canary_and_shared_budget():
    """The benign side: files in /work, /tmp and /dev/shm work, within one disk_mb budget."""
    code = r'''
import json, os
sizes = {}
for d in ("/work", "/tmp", "/dev/shm"):
    with open(d + "/x", "wb") as f:
        f.write(b"a" * (1 << 20))
    sizes[d] = os.path.getsize(d + "/x")
try:
    with open("/work/big", "wb") as f:
        f.write(b"b" * (8 << 20))
    over = False
except OSError:
    over = True
print(json.dumps({"sizes": sizes, "over": over}))
'''
    out = last_json(kernel_only(code, disk_mb=4))
    assert out["sizes"] == {"/work": 1 << 20, "/tmp": 1 << 20, "/dev/shm": 1 << 20}
    assert out["over"], "8 MB more fitted in a 4 MB budget"


def test_scratch_tmpfs_not_visible_on_the_host():
    r = kernel_only("open('/work/x', 'w').write('x')\nprint('ok')")
    assert r.ok and r.stdout.strip() == "ok"
    with open("/proc/self/mounts") as f:
        assert "heal-scratch" not in f.read()


def test_outputs_are_pipes_never_host_files():
    """stdout / stderr were host files limited by RLIMIT_FSIZE only (fallocate with KEEP_SIZE took
    300 MB of host disk); now they are pipes the parent reads."""
    code = r'''
import json, os, stat
kinds = [stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (1, 2)]
try:
    os.posix_fallocate(1, 0, 200 << 20)
    falloc = "allocated"
except OSError as e:
    falloc = e.errno
print(json.dumps({"fifo": kinds, "fallocate": falloc}))
'''
    import shutil as _sh
    with Sampler(lambda: -_sh.disk_usage(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))).free) as disk:
        out = last_json(kernel_only(code))
    assert out["fifo"] == [True, True], out
    assert out["fallocate"] != "allocated", out
    assert disk.peak < 64 << 20, f"host disk use grew by {disk.peak} bytes"


def test_output_cap_stops_the_program_and_stderr_is_dropped_past_it():
    r = run_python("import sys\nsys.stdout.write('x' * 100000)\nsys.stdout.flush()\nimport time\ntime.sleep(5)",
                   max_output_bytes=1000, timeout_s=8.0)
    assert r.output_truncated and not r.ok and not r.timed_out and r.stdout == "x" * 1000
    r = run_python("import sys\nsys.stderr.write('e' * 300000)\nprint('answer')", max_output_bytes=1000)
    assert r.ok and r.stdout == "answer\n" and r.stderr == "e" * 1000
    # a large answer passes through intact while the parent reads it
    r = run_python("import sys\nsys.stdout.write('y' * (3 << 20))", max_output_bytes=4 << 20)
    assert r.ok and len(r.stdout) == 3 << 20


def test_descriptors_bound_socket_buffers():
    """AF_UNIX socket pairs, each filled to its buffer, took 66 MB at memory_mb=64 (the descriptor
    limit was the trainer's, 20,000); now RLIMIT_NOFILE is MAX_OPEN_FILES."""
    code = r'''
import json, socket
pairs, queued, err = [], 0, None
try:
    for _ in range(5000):
        a, b = socket.socketpair()
        a.setblocking(False)
        pairs.append((a, b))
        try:
            while True:
                queued += a.send(b"z" * 65536)
        except BlockingIOError:
            pass
except OSError as e:
    err = e.errno
import time; time.sleep(0.3)
print(json.dumps({"pairs": len(pairs), "queued": queued, "errno": err}))
'''
    with Sampler(lambda: -meminfo_kb("MemAvailable")) as mem:
        out = last_json(kernel_only(code))
    import errno

    assert out["errno"] == errno.EMFILE and out["pairs"] <= limits.MAX_OPEN_FILES // 2, out
    assert out["queued"] < 32 << 20, out
    assert mem.peak < 48 << 10, f"host memory use grew by {mem.peak} kB"
    # canary: a few pairs and files are fine
    r = kernel_only("import socket\na, b = socket.socketpair()\na.send(b'hi')\nprint(b.recv(2).decode())")
    assert r.ok and r.stdout.strip() == "hi"


def test_runs_still_work_without_the_bounded_scratch(monkeypatch):
    """Where util-linux cannot mount it, runs fall back to bubblewrap's tmpfs mounts (status says so)."""
    monkeypatch.setattr(launcher, "scratch_mount_available", lambda privileged: (False, "not here (test)"))
    try:
        r = sandbox._run("open('/work/x', 'w').write('x')\nprint(open('/work/x').read())", "", isolation="bubblewrap",
                         timeout_s=5.0, memory_mb=256, max_output_bytes=4096, mode="stdin", fn_name=None,
                         isolate_network=True, disk_mb=4, max_processes=16, pool_size=0)
        assert r.ok and r.stdout.strip() == "x"
        status = sandbox.isolation_status()
        assert "inodes not bounded" in status["scratch"] and "not here (test)" in status["scratch"]
    finally:
        monkeypatch.undo()
        sandbox.pool._pool.close()
    assert "disk_mb bytes" in sandbox.isolation_status()["scratch"]


def test_threads_fit_in_the_memory_limit():
    """One process, many threads: glibc's per-thread malloc arenas (64 MB of address space each) let
    only 6 threads start at memory_mb=256; the sandbox caps the arenas (MALLOC_ARENA_MAX)."""
    code = r'''
import threading, time
started = []
def work():
    time.sleep(0.3)
for _ in range(16):
    t = threading.Thread(target=work)
    t.start()
    started.append(t)
for t in started:
    t.join()
print(len(started))
'''
    r = run_python(code, memory_mb=256, timeout_s=10.0)
    assert r.ok and r.stdout.strip() == "16", r.stderr[-500:]


def test_endless_stderr_still_times_out():
    """stderr past the cap is read and dropped: a program that writes it without end is still
    stopped by its wall clock (the parent's reads never starve its deadline)."""
    t0 = time.monotonic()
    r = run_python("import os\nb = b'e' * 65536\nwhile True:\n    os.write(2, b)", max_output_bytes=1000, timeout_s=1.0)
    assert r.timed_out and r.returncode is None and len(r.stderr) == 1000
    assert time.monotonic() - t0 < 15.0


def test_probe_drops_the_scratch_mount_when_bubblewrap_fails_under_it(monkeypatch):
    """Where the scratch tmpfs mounts but bubblewrap cannot start under util-linux's unshare (e.g. a
    security module confining what unshare starts), the probe keeps kernel isolation and runs get
    bubblewrap's own tmpfs mounts, with the reason in isolation_status()."""
    monkeypatch.setattr(launcher, "_scratch_mount_probe", lambda privileged: (True, ""))
    monkeypatch.setattr(launcher, "_SCRATCH_SCRIPT", 'echo "bwrap: confined (test)" >&2; exit 3')
    monkeypatch.setattr(launcher, "_scratch_refused", {})
    monkeypatch.setattr(sandbox.isolation, "_probed_userns", [])
    sandbox.isolation._bubblewrap_probe.cache_clear()
    sandbox.pool._pool.close()
    try:
        assert sandbox.isolation._bubblewrap_probe() == (True, "")
        privileged = not sandbox.isolation._user_namespace_mode()
        assert "confined (test)" in launcher._scratch_refused[privileged]
        r = run_python("open('/work/x', 'w').write('x')\nprint(open('/work/x').read())", timeout_s=5.0)
        assert r.ok and r.stdout.strip() == "x"
        assert "inodes not bounded" in sandbox.isolation_status()["scratch"]
    finally:
        sandbox.isolation._bubblewrap_probe.cache_clear()
        monkeypatch.undo()
        sandbox.pool._pool.close()
    assert sandbox.isolation._bubblewrap_probe() == (True, "")
    assert "disk_mb bytes" in sandbox.isolation_status()["scratch"]
