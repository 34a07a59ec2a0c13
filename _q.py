import time, sys
from heal.scoring.sandbox import run_python, isolation_status
import json
t=time.perf_counter(); st = isolation_status(); print(time.perf_counter()-t); print(json.dumps(st, indent=1)[:1500])
for iso in ["bubblewrap", "audit-hook-only"]:
    for code in ["print(1+1)", "import asyncio, subprocess, threading\nprint('ok')", "import os\nprint(os.getuid(), os.listdir('.'), open('/proc/self/uid_map').read())", "import os; print(os.listdir('/'))", "raise ValueError('boom')",
                 "import pathlib\np = pathlib.Path('a.txt')\np.write_text('ok')\nprint(p.read_text())"]:
        t=time.perf_counter(); r = run_python(code, isolation=iso); print(iso, "%.3f" % (time.perf_counter()-t), r.returncode, repr(r.stdout[:200]), r.stderr[-300:])
