"""The audit hook: the sandbox's second layer (:func:`sys.addaudithook`), installed by the wrapper
right before the program runs.

It refuses socket creation (but ``AF_UNIX`` socket pairs), process creation, ``ctypes``, ``gc``
object walks, raising rlimits, links, ``chdir``, ``sqlite3.connect``, new subinterpreters, trace /
profile functions, ``tb_frame``, imports of dangerous modules and native code from outside the
read-only standard library, and file / path operations outside the working directory. On its own
it is **not** a security boundary (hand-made bytecode gets around any audit hook); nothing relies
on it: every limit it enforces is also enforced by the kernel layer (:mod:`.launcher`,
:mod:`.seccomp`, :mod:`.limits`). It makes refusals readable (``PermissionError: sandbox: ...``).

``SOURCE`` is Python source that runs inside the sandbox (no heal import there): it defines
``_second_layer(cfg)``, which installs stubs and then the hook.
"""

SOURCE = r'''
def _second_layer(cfg):
    # stubs the audit hook relies on, then the hook
    import sys, posix, _signal, io
    import types  # reads a traceback's tb_frame when first imported, which the hook refuses

    # `import subprocess` / `import asyncio` need a _posixsubprocess module: a stub whose fork_exec
    # refuses. The real one can then only be loaded anew, which the hook refuses.
    stub = type(sys)("_posixsubprocess")

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: process creation is blocked")

    stub.fork_exec = fork_exec
    sys.modules["_posixsubprocess"] = stub
    # these raise no audit event; `os` and `signal` take their functions from these modules when
    # first imported (checked for modules already imported)
    for mod, names in ((posix, ("mknod", "mkfifo", "pidfd_open", "setpriority")),
                       (_signal, ("pidfd_send_signal",)),
                       (sys.modules.get("os"), ("mknod", "mkfifo", "pidfd_open", "setpriority")),
                       (sys.modules.get("signal"), ("pidfd_send_signal",))):
        for name in names:
            if mod is not None and hasattr(mod, name):
                delattr(mod, name)

    # The hook refuses path objects (their __fspath__ could differ from what it is shown). When the
    # program imports pathlib, Path.open is made to hand io.open the str it converts to, which is
    # then both checked and opened. (A program that undoes this only gets its path objects refused.)
    _io_open, _fspath = io.open, posix.fspath

    def path_open(self, mode="r", buffering=-1, encoding=None, errors=None, newline=None):
        if "b" not in mode:
            encoding = io.text_encoding(encoding)
        return _io_open(_fspath(self), mode, buffering, encoding, errors, newline)

    class PathlibPatch:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "pathlib":
                return None
            sys.meta_path.remove(PathlibPatch)
            for finder in sys.meta_path:
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def patched_exec_module(module):
                exec_module(module)
                module.Path.open = path_open

            spec.loader.exec_module = patched_exec_module
            return spec

    sys.meta_path.insert(0, PathlibPatch)
    sys.addaudithook(_make_hook(cfg["root"], tuple(cfg["ro_roots"]), tuple(cfg["ro_hidden"]), frozenset(cfg["ro_files"]),
                                posix.stat))


def _make_hook(root, ro_roots, ro_hidden, ro_files, stat):
    # The hook is ONE function: its state lives in its own closure cells and holds only immutable
    # values and captured builtins, so rebinding a global or builtin does not reach it, and there
    # is no helper function whose __closure__ a frame could hand out. Paths are normalised as
    # strings (no os.path call the program could patch); links cannot be made, so a normalised
    # path inside the fresh working directory is really inside it.
    str_, bytes_, int_, float_, bool_, tuple_, type_, len_ = str, bytes, int, float, bool, tuple, type, len
    NoneType_ = type(None)
    PermissionError_, OSError_, ValueError_ = PermissionError, OSError, ValueError
    WRITE = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND (Linux)
    S_IFMT, S_IFDIR = 0o170000, 0o040000
    BLOCK_PREFIX = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.forkpty", "pty.", "os.kill", "os.killpg", "os.chroot", "os.setuid", "os.setgid",
                    "os.symlink", "os.link", "os.chdir", "os.fchdir", "gc.get_", "sys.remote_exec",
                    "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
                    "nntplib.", "telnetlib.", "_posixsubprocess", "resource.setrlimit", "resource.prlimit",
                    "sqlite3.", "cpython.PyInterpreterState_New", "cpython.run_", "sys.settrace",
                    "sys.setprofile", "sys._current_frames", "sys._current_exceptions", "sys.monitoring",
                    "signal.pthread_kill", "os.setpriority", "os.mkfifo", "os.mknod")
    BLOCK_EXACT = frozenset({"os.system", "os.popen", "os.startfile"})
    BLOCK_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_interpreters",
                               "_xxinterpchannels", "_interpchannels", "_interpqueues", "_cffi_backend",
                               "_posixshmem", "_sqlite3", "_testcapi", "_testinternalcapi", "_testmultiphase",
                               "_testsinglephase", "_testimportmultiple", "_testclinic", "_testbuffer",
                               "_tracemalloc", "_lsprof", "xxsubtype", "xxlimited", "xxlimited_35"})
    # the hook calls no code of the program, so the only way to one of its frames is the traceback
    # of an exception it raised (generator / coroutine frames, which asyncio reads, are the program's)
    FRAME_ATTRS = frozenset({"tb_frame"})
    NO_PATH_ARGS = frozenset({"os.putenv", "os.unsetenv", "os.sched_setaffinity"})
    READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "glob.glob",
                             "glob.glob/2"})
    PLAIN_ARGS = frozenset({int_, float_, bool_, NoneType_, tuple_, list, dict})
    root_slash = root.rstrip("/") + "/"
    ro_slash = tuple_(r.rstrip("/") + "/" for r in ro_roots)
    # third-party packages inside the standard library's folder (site-packages): not readable, and
    # no native code from there
    hidden_slash = tuple_(r.rstrip("/") + "/" for r in ro_hidden) or ("\0",)

    def hook(event, args):
        if event == "open":
            n = len_(args)
            path = args[0] if n > 0 else None
            omode = args[1] if n > 1 else None
            flags = args[2] if n > 2 else None
            if path is None or type_(path) is int_:  # an fd: opened before, under this hook
                return
            write = (type_(omode) is str_ and ("w" in omode or "a" in omode or "x" in omode or "+" in omode)) \
                or (type_(flags) is int_ and flags & WRITE != 0)
            paths = ((path, write),)
        elif event == "import":
            name = args[0] if len_(args) > 0 else None
            if type_(name) is str_ and name.rpartition(".")[2] in BLOCK_IMPORTS:
                raise PermissionError_("sandbox: import of %s is blocked" % name)
            filename = args[1] if len_(args) > 1 else None
            if type_(filename) is str_:
                if filename.rpartition("/")[2].partition(".")[0] in BLOCK_IMPORTS:
                    raise PermissionError_("sandbox: loading %s is blocked" % filename)
                # a native extension: only the read-only standard library's own (one written into
                # the working directory could be anything)
                if not filename.startswith(ro_slash) or filename.startswith(hidden_slash) or "/../" in filename \
                        or "/./" in filename or "//" in filename:
                    raise PermissionError_("sandbox: loading native code from %s is blocked" % filename)
            elif filename is not None:
                raise PermissionError_("sandbox: import with a file name of type other than str is blocked")
            return
        elif event == "object.__getattr__":
            if len_(args) > 1 and type_(args[1]) is str_ and args[1] in FRAME_ATTRS:
                raise PermissionError_("sandbox: access to frames (%s) is blocked" % args[1])
            return
        elif event == "socket.__new__":
            # AF_UNIX only (asyncio's self-pipe is a socketpair); connect / bind / sendto stay refused
            if len_(args) > 1 and type_(args[1]) is int_ and args[1] == 1:
                return
            raise PermissionError_("sandbox: %s is blocked" % event)
        elif event in BLOCK_EXACT or event.startswith(BLOCK_PREFIX):
            raise PermissionError_("sandbox: %s is blocked" % event)
        elif event.startswith(("os.", "shutil.", "glob.")) and event not in NO_PATH_ARGS:
            write = event not in READ_EVENTS
            paths = ()
            for a in args:
                if type_(a) is str_ or type_(a) is bytes_:
                    paths = paths + ((a, write),)
                elif type_(a) not in PLAIN_ARGS:
                    # a path object (exact str / bytes only) or anything else
                    raise PermissionError_("sandbox: %s with an argument other than str / bytes / numbers is blocked"
                                           % event)
        else:
            return
        for path, write in paths:
            t = type_(path)
            # exact types only: a str/bytes subclass or a custom __fspath__ could show the check one
            # path and the system call another
            if t is str_:
                p = path
            elif t is bytes_:
                p = path.decode("utf-8", "surrogateescape")
            else:
                raise PermissionError_("sandbox: paths must be str or bytes (path objects are blocked)")
            if not p.startswith("/"):
                p = root_slash + p
            parts = []
            for part in p.split("/"):
                if part == "" or part == ".":
                    continue
                if part == "..":
                    if parts:
                        parts.pop()
                else:
                    parts.append(part)
            p = "/" + "/".join(parts)
            if p == root or p.startswith(root_slash) or p == "/dev/null":
                continue
            if not write and (p in ro_files or (p.startswith(ro_slash) and not p.startswith(hidden_slash)
                                                and p + "/" not in hidden_slash)):
                # reading the standard library is fine; opening a directory outside the working
                # directory would give a dir_fd to open (or create) things relative to it
                if event != "open":
                    continue
                try:
                    st_mode = stat(p).st_mode
                except (OSError_, ValueError_):
                    continue
                if st_mode & S_IFMT != S_IFDIR:
                    continue
                raise PermissionError_("sandbox: opening a directory outside the working directory is blocked: %r"
                                       % (p,))
            raise PermissionError_("sandbox: access outside the working directory is blocked: %r" % (p,))

    return hook


'''
