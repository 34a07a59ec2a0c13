"""The wrapper: the first Python code of every sandbox, run as ``python -I -S -c SOURCE CFG``.

It waits for the parent's go (a sandbox is started ahead of its job), reads the job, applies the
run's resource limits in the child (:mod:`.limits` documents them), installs the audit hook
(:mod:`.audit_hook`), tells the parent the program starts (the wall clock starts there) and runs
the program. Only built-in modules are imported before the program runs.
"""

from heal.scoring.sandbox import audit_hook

_MAIN = r'''
# Only built-in modules until the program runs (`os`, `json`, `pathlib`, `signal` each cost
# milliseconds to import, and most programs never touch them).
def _main():
    import sys, posix, resource
    cfg = eval(sys.argv[1], {"__builtins__": {}})  # a dict of literals written by the parent
    if cfg["drop_to"]:
        # kernel isolation started by root: become a fresh unprivileged uid (all capabilities go)
        uid, gid = cfg["drop_to"]
        posix.setgroups([])
        posix.setgid(gid)
        posix.setuid(uid)
        if posix.getuid() != uid or posix.geteuid() != uid or posix.getgid() != gid:
            raise SystemExit("sandbox: could not drop privileges")
    # A sandbox may be started ahead of its job (the pool): wait for the parent's go, then read the
    # job (limits, mode, ...) it wrote next to the program. EOF instead of go: not needed, exit.
    if posix.read(cfg["go_fd"], 1) != b"1":
        raise SystemExit(0)
    posix.close(cfg["go_fd"])
    with open(cfg["job"], encoding="utf-8") as f:
        cfg.update(eval(f.read(), {"__builtins__": {}}))
    fd = posix.open(cfg["stdin"], posix.O_RDONLY)
    posix.dup2(fd, 0)
    posix.close(fd)

    def lim(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(which)
            if hard == resource.RLIM_INFINITY or value <= hard:
                resource.setrlimit(which, (value, hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, cfg["cpu_s"])
    lim(resource.RLIMIT_FSIZE, cfg["fsize"])
    if cfg["mem_bytes"]:
        lim(resource.RLIMIT_AS, cfg["mem_bytes"])
    if cfg["nproc"]:
        lim(resource.RLIMIT_NPROC, cfg["nproc"])
    lim(resource.RLIMIT_NOFILE, cfg["nofile"])
    with open(cfg["src"], encoding="utf-8", errors="replace") as f:
        src = f.read()
    mode, fn_name = cfg["mode"], cfg["fn_name"]
    if mode == "call":
        import json
        call_input = sys.stdin.read()
    code = compile(src, "solution.py", "exec")
    if cfg["hook"]:
        _second_layer(cfg)
    ready_fd = cfg["ready_fd"]
    del cfg, src, f
    user_globals = {"__name__": "__main__", "__builtins__": __builtins__}
    posix.write(ready_fd, b"1")  # the parent's wall clock starts now
    posix.close(ready_fd)
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


'''

SOURCE = _MAIN + audit_hook.SOURCE + "\n_main()\n"
