"""Loader for heal's compiled C++ CPU kernels (``csrc/``), built on first use and cached.

* :func:`load_extension` -- generic: build (or load from torch's extension cache) a
  ``torch.utils.cpp_extension`` module from sources in ``csrc/``; ``None`` (plus one warning) when
  there is no compiler or the build fails, so callers fall back to pure torch.
* :func:`load_pairwise` -- the all-pairs similarity kernels (``csrc/pairwise.cpp``).

Nothing is compiled when :mod:`heal_kernels` is imported: only when a CPU op first needs it.
``HEAL_KERNELS_NO_BUILD=1`` disables building (the torch fallbacks run). Flags: ``-O3 -fopenmp``,
plus ``-march=native`` when the compiler accepts it; the extension name then carries a hash of the
CPU model, the flags and the sources' contents, so a cache shared between different machines never
loads a foreign build, and an edited source always gets its own build (never a stale one that a
concurrent build compiled from the previous text, which ninja's timestamps alone can miss).
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
import warnings
from pathlib import Path
from typing import List, Optional

__all__ = ["load_extension", "load_pairwise", "csrc_dir", "extension_flags", "EXTENSIONS", "extension_info"]

# every C++ extension heal builds: name -> sources in csrc/ (``heal env`` reports each one)
EXTENSIONS = {
    "heal_entropy": ["entropy.cpp"],
    "heal_pairwise": ["pairwise.cpp"],
    "heal_linear": ["linear.cpp"],
}

_LOCK = threading.Lock()
_CACHE: dict = {}


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
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=_tagged_name(name, paths),
            sources=[str(p) for p in paths],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("HEAL_KERNELS_VERBOSE_BUILD", "") == "1",
        )
    except Exception as exc:  # compiler errors, missing ninja, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"heal_kernels: building C++ extension {name!r} failed ({first}); using the pure-torch CPU path")
        return None


def _tagged_name(name: str, sources=None) -> str:
    """The module name torch builds ``name`` under: a hash of this CPU, the flags and the contents of
    ``sources`` (paths; default: :data:`EXTENSIONS` ``[name]`` in :func:`csrc_dir`) appended."""
    if sources is None:
        sources = [csrc_dir() / s for s in EXTENSIONS.get(name, [])]
    h = hashlib.sha1((_cpu_fingerprint() + "|" + " ".join(extension_flags())).encode())
    for src in sources:
        try:
            h.update(Path(src).read_bytes())
        except OSError:
            pass
    return f"{name}_{h.hexdigest()[:10]}"


def _build_directory(tagged: str) -> str:
    """Where ``torch.utils.cpp_extension.load`` builds and caches ``tagged``: ``TORCH_EXTENSIONS_DIR``
    or torch's per-user cache with its ``py<ver>_<accelerator>`` folder, as torch computes it (without
    creating anything)."""
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


def extension_info(build: bool = False) -> List[dict]:
    """One dict per extension in :data:`EXTENSIONS`: ``name``, ``module`` (the tagged name),
    ``sources_found``, ``cache_dir``, ``built`` (a compiled module is in the cache) and, when
    ``build`` is true, ``loaded`` (building / loading it now succeeded; this compiles on a first
    call). Never compiles unless ``build``."""
    out = []
    for name, sources in EXTENSIONS.items():
        tagged = _tagged_name(name)
        d = _build_directory(tagged)
        row = {
            "name": name,
            "module": tagged,
            "sources_found": all((csrc_dir() / s).is_file() for s in sources),
            "cache_dir": d,
            "built": os.path.isfile(os.path.join(d, tagged + ".so")),
        }
        if build:
            row["loaded"] = load_extension(name, sources) is not None
            row["built"] = os.path.isfile(os.path.join(d, tagged + ".so"))
        out.append(row)
    return out


def load_pairwise():
    """The all-pairs similarity extension (``csrc/pairwise.cpp``) or ``None``."""
    return load_extension("heal_pairwise", EXTENSIONS["heal_pairwise"])
