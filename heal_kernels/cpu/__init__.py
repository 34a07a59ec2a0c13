"""Loader for heal's compiled C++ CPU kernels (``csrc/``), built on first use and cached.

* :func:`load_extension` -- generic: build (or load from torch's extension cache) a
  ``torch.utils.cpp_extension`` module from sources in ``csrc/``; ``None`` (plus one warning) when
  there is no compiler or the build fails, so callers fall back to pure torch.
* :func:`load_pairwise` -- the all-pairs similarity kernels (``csrc/pairwise.cpp``).

Nothing is compiled when :mod:`heal_kernels` is imported: only when a CPU op first needs it.
``HEAL_KERNELS_NO_BUILD=1`` disables building (the torch fallbacks run). Flags: ``-O3 -fopenmp``,
plus ``-march=native`` when the compiler accepts it.

The cache key (:func:`extension_key`) is a hash of what the compiled module depends on: the
contents of the ``.cpp`` sources and of the headers beside them, the flags, the CPU model, the torch
version and the Python ABI -- never the sources' paths. The module is built under that key, in its
own folder ``<cache>/<name>_<key>`` (``TORCH_EXTENSIONS_DIR`` or torch's per-user extension cache),
so a cache shared between machines never loads a foreign build, an edited source or header always
gets its own build (never a stale one that a concurrent build compiled from the previous text, which
ninja's timestamps alone can miss), and two checkouts or virtual environments with the same sources
and torch share one build. A module already in the cache is imported directly, without asking ninja
(whose build file names the sources' paths, so a second checkout would otherwise rebuild it).

A build prints one line to stderr when it starts and one when it ends (``heal: building ...`` /
``heal: built heal_linear in 41.2 s``); loading from the cache prints nothing.
:func:`builds_this_process` tells which extensions this process compiled and how long each took.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

__all__ = ["load_extension", "load_pairwise", "csrc_dir", "extension_flags", "EXTENSIONS", "extension_info",
           "extension_key", "builds_this_process"]

# every C++ extension heal builds: name -> sources in csrc/ (``heal env`` reports each one)
EXTENSIONS = {
    "heal_entropy": ["entropy.cpp"],
    "heal_pairwise": ["pairwise.cpp"],
    "heal_linear": ["linear.cpp"],
}

_LOCK = threading.Lock()
_CACHE: dict = {}
_BUILT: Dict[str, float] = {}  # extension name -> seconds its build took, for builds this process ran
_HEADER_SUFFIXES = (".h", ".hpp", ".hh", ".cuh")


def csrc_dir() -> Path:
    """Folder holding the C++ sources: ``heal_kernels/csrc`` in an installed wheel (package data
    ``heal_kernels.csrc``), else the source tree's top-level ``csrc/`` (editable installs)."""
    here = Path(__file__).resolve().parents[1]
    for d in (here / "csrc", here.parent / "csrc"):
        if d.is_dir() and any(d.glob("*.cpp")):
            return d
    return here.parent / "csrc"


def _cpu_fingerprint() -> str:
    model, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model + "|" + flags


@functools.lru_cache(maxsize=None)
def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("int main() { return 0; }\n")
        try:
            r = subprocess.run([cxx, flag, str(src), "-o", str(Path(d) / "t")], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


@functools.lru_cache(maxsize=None)
def extension_flags() -> List[str]:
    """C++ flags used for every extension."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64") and _compiler_accepts("-march=native"):
        flags.append("-march=native")
    return flags


def load_extension(name: str, sources: List[str]):
    """Build (first call) or load the torch C++ extension ``name`` from ``sources`` (file names in
    :func:`csrc_dir`, or absolute paths). Returns the module, or ``None`` after one warning when no
    compiler is present, building is disabled (``HEAL_KERNELS_NO_BUILD=1``) or the build fails.
    Cached per process.
    """
    with _LOCK:
        if name in _CACHE:
            return _CACHE[name]
        _CACHE[name] = mod = _build(name, sources)
        return mod


def builds_this_process() -> Dict[str, float]:
    """``{name: seconds}`` for every extension this process compiled (not those loaded from the cache)."""
    return dict(_BUILT)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _build(name: str, sources: List[str]):
    if os.environ.get("HEAL_KERNELS_NO_BUILD", "") == "1":
        return None
    paths = [Path(s) if os.path.isabs(s) else csrc_dir() / s for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        warnings.warn(f"heal_kernels: C++ sources not found ({', '.join(missing)}); using the pure-torch CPU path")
        return None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        warnings.warn(f"heal_kernels: no C++ compiler ({cxx!r}) found; using the pure-torch CPU path (slower)")
        return None
    flags = extension_flags()
    tagged = _tagged_name(name, paths)
    directory = _build_directory(tagged)
    lock = os.path.join(directory, "lock")  # torch's marker of a build in progress
    cached = os.path.join(directory, tagged + _lib_suffix())
    if os.path.isfile(cached) and not os.path.exists(lock):
        try:  # built before, here or by another checkout / venv with the same key: no ninja, no rebuild
            return _import_built(tagged, cached)
        except ImportError:  # unreadable or foreign file: build it again below
            pass
    if os.path.exists(lock):
        _say(f"heal: waiting for another process that is building heal's C++ kernels ({name}) ...")
    else:
        _say(f"heal: building heal's C++ kernels ({name}), once per source version; this can take a minute ...")
    t0 = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        os.makedirs(directory, exist_ok=True)
        mod = cpp_extension.load(
            name=tagged,
            sources=[str(p) for p in paths],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=directory,
            verbose=os.environ.get("HEAL_KERNELS_VERBOSE_BUILD", "") == "1",
        )
    except Exception as exc:  # compiler errors, missing ninja, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"heal_kernels: building C++ extension {name!r} failed ({first}); using the pure-torch CPU path")
        return None
    _BUILT[name] = seconds = time.perf_counter() - t0
    _say(f"heal: built {name} in {seconds:.1f} s (cached in {directory})")
    return mod


def _lib_suffix() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"


def _import_built(module_name: str, path: str):
    """Import the compiled module at ``path``, as ``cpp_extension.load`` does after its build."""
    import importlib.util

    import torch  # noqa: F401  (the module links against libtorch: torch loads its libraries first)

    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_key(name: str, sources=None) -> str:
    """The cache key of extension ``name``: a hash of the contents of ``sources`` (paths; default:
    :data:`EXTENSIONS` ``[name]`` in :func:`csrc_dir`) and of every header in their folders, the
    compile flags, this CPU, the torch version and the Python ABI. Paths are not part of it: two
    copies of the same sources have the same key; any changed byte gives another."""
    import torch

    if sources is None:
        sources = [csrc_dir() / s for s in EXTENSIONS.get(name, [])]
    sources = [Path(s) for s in sources]
    h = hashlib.sha1()
    for part in (_cpu_fingerprint(), " ".join(extension_flags()), f"torch {torch.__version__}",
                 f"python {sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}"):
        h.update(part.encode() + b"\0")
    for src in sources:
        h.update(b"source\0")
        try:
            h.update(src.read_bytes())
        except OSError:
            pass
    # the headers the sources may include ("heal_simd.h"), by file name: an edited header is a new build
    for folder in sorted({src.parent for src in sources}, key=str):
        try:
            headers = sorted(p for p in folder.iterdir() if p.suffix in _HEADER_SUFFIXES and p.is_file())
        except OSError:
            headers = []
        for hdr in headers:
            h.update(b"header\0" + hdr.name.encode() + b"\0")
            try:
                h.update(hdr.read_bytes())
            except OSError:
                pass
    return h.hexdigest()[:10]


def _tagged_name(name: str, sources=None) -> str:
    """The module name torch builds ``name`` under: ``name`` + ``_`` + :func:`extension_key`."""
    return f"{name}_{extension_key(name, sources)}"


def _build_directory(tagged: str) -> str:
    """The folder ``tagged`` is built and cached in (:func:`_build` passes it to ``cpp_extension.load``):
    ``TORCH_EXTENSIONS_DIR`` or torch's per-user cache with its ``py<ver>_<accelerator>`` folder, as
    torch computes its default (without creating anything)."""
    import torch
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            acc = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            acc = "cu" + torch.version.cuda.replace(".", "")
        else:
            acc = "cpu"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{py}_{acc}")
    return os.path.join(root, tagged)


def extension_info(build: bool = False, log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """One dict per extension in :data:`EXTENSIONS`: ``name``, ``module`` (the tagged name),
    ``sources_found``, ``cache_dir``, ``built`` (a compiled module is in the cache) and, when
    ``build`` is true, ``loaded`` (building / loading it now succeeded; this compiles on a first
    call) and ``build_s`` (seconds this call spent compiling it; 0 when it came from the cache).
    Never compiles unless ``build``. ``log``: called with one line per extension before it is built
    or loaded (``heal env --build`` prints them), e.g. ``[2/3] heal_linear: not built yet, compiling``."""
    out = []
    for i, (name, sources) in enumerate(EXTENSIONS.items(), 1):
        tagged = _tagged_name(name)
        d = _build_directory(tagged)
        lib = os.path.join(d, tagged + _lib_suffix())
        row = {
            "name": name,
            "module": tagged,
            "sources_found": all((csrc_dir() / s).is_file() for s in sources),
            "cache_dir": d,
            "built": os.path.isfile(lib),
        }
        if build:
            if log is not None:
                if name in _CACHE:
                    state = "already loaded"
                elif row["built"]:
                    state = "loading the cached build"
                elif os.environ.get("HEAL_KERNELS_NO_BUILD", "") == "1":
                    state = "not built, and building is disabled (HEAL_KERNELS_NO_BUILD=1)"
                else:
                    state = "not built yet, compiling it"
                log(f"[{i}/{len(EXTENSIONS)}] {name}: {state}")
            built_before = name in _BUILT
            row["loaded"] = load_extension(name, sources) is not None
            row["build_s"] = _BUILT[name] if name in _BUILT and not built_before else 0.0
            row["built"] = os.path.isfile(lib)
        out.append(row)
    return out


def load_pairwise():
    """The all-pairs similarity extension (``csrc/pairwise.cpp``) or ``None``."""
    return load_extension("heal_pairwise", EXTENSIONS["heal_pairwise"])
