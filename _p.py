import time, os, sys, subprocess
from heal.scoring import sandbox
py = sandbox._interpreter()
src = "/tmp/bx/src"; os.makedirs(src, exist_ok=True)
base = sandbox._bubblewrap_argv("/usr/bin/bwrap", src, 64 << 20, None, None, True)
def without(argv, flag, n):
    out = []; i = 0
    while i < len(argv):
        if argv[i] == flag: i += 1 + n; continue
        out.append(argv[i]); i += 1
    return out
variants = {
  "full": base,
  "no-net": without(base, "--unshare-net", 0),
  "no-proc": without(base, "--proc", 1),
  "no-dev": without(base, "--dev", 1),
  "no-dirs": without(without(base, "--dir", 1), "--perms", 1),
  "no-remount": without(base, "--remount-ro", 1),
  "only-pid": ["/usr/bin/bwrap", "--unshare-pid", "--ro-bind", "/", "/"],
  "nothing": ["/usr/bin/bwrap", "--ro-bind", "/", "/"],
}
N = 15
for trial in range(2):
  for name, argv in variants.items():
    cmd = argv + [py, "-I", "-S", "-c", "pass"]
    subprocess.run(cmd, check=True)
    t = time.perf_counter()
    for i in range(N): subprocess.run(cmd, check=True)
    print("%-12s %.1f ms" % (name, (time.perf_counter() - t) / N * 1e3))
  t = time.perf_counter()
  for i in range(N): subprocess.run([py, "-I", "-S", "-c", "pass"], check=True)
  print("%-12s %.1f ms" % ("plain", (time.perf_counter() - t) / N * 1e3))
print(len(base), os.getloadavg())
