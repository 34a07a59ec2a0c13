import time, os, sys, subprocess, select, warnings
warnings.simplefilter("ignore")
from heal.scoring import sandbox
orig_popen = subprocess.Popen
marks = {}
class P(orig_popen):
    def __init__(self, *a, **k):
        marks["popen0"] = time.perf_counter()
        super().__init__(*a, **k)
        marks["popen1"] = time.perf_counter()
    def wait(self, timeout=None):
        r = super().wait(timeout)
        marks.setdefault("exit", time.perf_counter())
        return r
sandbox.subprocess.Popen = P
orig_sel = select.select
def sel(*a):
    r = orig_sel(*a); marks["ready"] = time.perf_counter(); return r
sandbox.select.select = sel
orig_reap = sandbox._reap_sandbox
def reap(fd):
    t = time.perf_counter(); orig_reap(fd); marks["reap"] = time.perf_counter() - t
sandbox._reap_sandbox = reap
for iso in ["audit-hook-only", "bubblewrap"] * 2:
    acc = {}
    for i in range(10):
        marks.clear()
        t0 = time.perf_counter()
        sandbox.run_python("print(1)", isolation=iso)
        t1 = time.perf_counter()
        for k, v in [("setup", marks["popen0"] - t0), ("popen", marks["popen1"] - marks["popen0"]), ("to_ready", marks["ready"] - marks["popen1"]),
                     ("to_exit", marks["exit"] - marks["ready"]), ("reap", marks.get("reap", 0)), ("total", t1 - t0)]:
            acc.setdefault(k, []).append(v * 1e3)
    print(iso, {k: round(sorted(v)[len(v)//2], 1) for k, v in acc.items()})
