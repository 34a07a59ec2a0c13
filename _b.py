import time, os, sys, subprocess, warnings, resource
warnings.simplefilter("ignore")
from heal.scoring.sandbox import run_python
def cpu():
    a = resource.getrusage(resource.RUSAGE_CHILDREN); b = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
py = sys.executable
for name, fn in [("bare python -I -S", lambda: subprocess.run([py, "-I", "-S", "-c", "pass"])),
                 ("python + import pathlib", lambda: subprocess.run([py, "-I", "-S", "-c", "import pathlib, json, resource"])),
                 ("hook-only", lambda: run_python("print(1)", isolation="audit-hook-only")),
                 ("bubblewrap", lambda: run_python("print(1)", isolation="bubblewrap"))]:
    fn()
    t = time.perf_counter(); c = cpu()
    for i in range(20): fn()
    print("%-28s wall %.1f ms  cpu %.1f ms" % (name, (time.perf_counter() - t) / 20 * 1e3, (cpu() - c) / 20 * 1e3))
print(os.getloadavg())
