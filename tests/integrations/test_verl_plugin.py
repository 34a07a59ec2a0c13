"""heal's verl plugin: entry point, registration in a fresh process, post-import hooks."""

import importlib
import importlib.machinery
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("verl")

from heal.integrations.verl import _hooks  # noqa: E402


def test_entry_point_is_declared_and_loads():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="verl.plugins") if ep.name == "heal"]
    assert len(eps) == 1, "heal is not installed with its verl.plugins entry point (pip install -e .)"
    ep = eps[0]
    assert ep.module == "heal.integrations.verl.plugin"
    loaded = ep.load()  # what verl does: import + attribute lookup, no call
    assert callable(loaded)


_PROBE = textwrap.dedent(
    """
    import json, sys
    import verl
    out = {"losses_imported_by_plain_import": "verl.trainer.ppo.core_algos" in sys.modules}
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls
    import verl.workers.engine_workers as engine_workers
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    cls = get_trainer_cls("heal_sync")
    out.update(
        losses=sorted(k for k in POLICY_LOSS_REGISTRY if k in ("high_entropy_tokens", "entropy_advantage")),
        loss_fn_module=get_policy_loss_fn("high_entropy_tokens").__module__,
        trainer=cls.__module__ + "." + cls.__name__,
        trainer_is_sync_subclass=issubclass(cls, PPOTrainerSync),
        ppo_loss_wrapped=bool(getattr(engine_workers.ppo_loss, "__heal_wrapped__", False)),
        fused_entropy=verl_F.entropy_from_logits.__module__,
        fused_logprobs_in_engine=fsdp_impl.logprobs_from_logits.__module__,
    )
    print("HEAL_PROBE " + json.dumps(out))
    """
)


def test_plain_import_verl_registers_heal_in_a_fresh_process():
    env = dict(os.environ, HEAL_FUSED_ENTROPY="1", VERL_USE_EXTERNAL_PLUGINS="auto")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("HEAL_PROBE ")][-1]
    out = json.loads(line[len("HEAL_PROBE "):])
    assert out["losses"] == ["entropy_advantage", "high_entropy_tokens"]
    assert out["loss_fn_module"] == "heal.integrations.verl.losses"
    assert out["trainer"] == "heal.integrations.verl.trainer.HealPPOTrainerSync"
    assert out["trainer_is_sync_subclass"] is True
    assert out["ppo_loss_wrapped"] is True
    assert out["fused_entropy"] == "heal.integrations.verl.fused_entropy"  # HEAL_FUSED_ENTROPY=1 applied
    assert out["fused_logprobs_in_engine"] == "heal.integrations.verl.fused_entropy"
    # the plugin itself is cheap: verl's loss registry is imported only when someone asks for it
    assert out["losses_imported_by_plain_import"] is False


@pytest.fixture
def tmp_package(tmp_path, monkeypatch):
    pkg = tmp_path / "heal_hook_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "target.py").write_text("VALUE = 41\nREGISTRY = {}\n")
    (pkg / "other.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "heal_hook_probe"
    for name in [m for m in sys.modules if m.startswith("heal_hook_probe")]:
        del sys.modules[name]


def test_when_imported_runs_after_the_module_body(tmp_package):
    seen = []

    def hook(module):
        seen.append(module.VALUE)
        module.REGISTRY["heal"] = True

    _hooks.when_imported(f"{tmp_package}.target", hook)
    assert seen == []
    mod = importlib.import_module(f"{tmp_package}.target")
    assert seen == [41] and mod.REGISTRY == {"heal": True}
    assert isinstance(mod.__loader__, importlib.machinery.SourceFileLoader)  # original loader kept
    assert isinstance(mod.__spec__.loader, importlib.machinery.SourceFileLoader)
    _hooks.when_imported(f"{tmp_package}.target", lambda m: seen.append("again"))  # already imported: now
    assert seen == [41, "again"]
    importlib.reload(mod)
    assert seen == [41, "again"]  # one-shot


def test_a_failing_hook_does_not_break_the_import(tmp_package, caplog):
    def boom(module):
        raise RuntimeError("hook failure")

    _hooks.when_imported(f"{tmp_package}.other", boom)
    with caplog.at_level(logging.WARNING, logger="heal.integrations.verl._hooks"):
        mod = importlib.import_module(f"{tmp_package}.other")
    assert mod.VALUE == 1
    assert "hook failure" in caplog.text or "failed" in caplog.text
