import time, os, warnings
from concurrent.futures import ThreadPoolExecutor
warnings.simplefilter("ignore")
from heal.scoring.sandbox import run_python
N = 40
for iso in ["audit-hook-only", "bubblewrap"]:
    run_python("print(1)", isolation=iso)
    for w in (1, 2, 4, 8):
        t = time.perf_counter()
        with ThreadPoolExecutor(w) as p:
            rs = list(p.map(lambda _: run_python("print(1)", isolation=iso), range(N)))
        assert all(r.ok for r in rs)
        print(iso, w, "%.1f runs/s" % (N / (time.perf_counter() - t)), os.getloadavg()[0])
