"""The fused-entropy drop-in against verl's own entropy_from_logits / logprobs_from_logits."""

import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402

from heal.integrations.verl import fused_entropy as fused  # noqa: E402


def _reference_ops():
    """heal_kernels' float64 executable spec, as float32 ops (used if the fused ops are missing)."""
    from heal_kernels import reference

    def entropy_and_logprobs(logits, labels, temperature=1.0, *, check=False):
        ent, lp = reference.entropy_and_logprobs(logits, labels, temperature)
        return ent.to(torch.float32), lp.to(torch.float32)

    def token_entropy(logits, temperature=1.0):
        return reference.token_entropy(logits, temperature).to(torch.float32)

    return entropy_and_logprobs, token_entropy


@pytest.fixture
def dropin(monkeypatch):
    try:
        import heal_kernels

        heal_kernels.entropy_and_logprobs, heal_kernels.token_entropy  # noqa: B018
    except (ImportError, AttributeError):  # fused ops not built yet: test the plumbing on the spec
        both, ent = _reference_ops()
        monkeypatch.setattr(fused, "_op", lambda: both)
        monkeypatch.setattr(fused, "_entropy_op", lambda: ent)
    import verl.utils.torch_functional as verl_F

    originals = {n: getattr(verl_F, n) for n in ("entropy_from_logits", "logprobs_from_logits")}
    fused.use_fused_entropy()
    yield originals
    fused.restore_verl_entropy()


def test_use_fused_entropy_swaps_verls_functions_and_restores(dropin):
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

    assert fused.fused_entropy_enabled()
    assert verl_F.entropy_from_logits is fused.entropy_from_logits
    assert verl_F.entropy_from_logits_with_chunking is fused.entropy_from_logits_with_chunking
    assert verl_F.logprobs_from_logits is fused.logprobs_from_logits
    assert fsdp_impl.logprobs_from_logits is fused.logprobs_from_logits  # the name the FSDP engine calls
    assert fsdp_impl.verl_F.entropy_from_logits is fused.entropy_from_logits  # read when the engine is built
    fused.restore_verl_entropy()
    assert not fused.fused_entropy_enabled()
    assert verl_F.entropy_from_logits is dropin["entropy_from_logits"]
    assert fsdp_impl.logprobs_from_logits is dropin["logprobs_from_logits"]
    fused.use_fused_entropy()  # idempotent re-enable
    fused.use_fused_entropy()
    assert fsdp_impl.logprobs_from_logits is fused.logprobs_from_logits


@pytest.mark.parametrize("shape,vocab,dtype", [((37,), 1000, torch.float32), ((3, 5), 257, torch.float32), ((11,), 64, torch.bfloat16)])
def test_numbers_and_gradients_match_verl(dropin, shape, vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits32 = torch.randn(*shape, vocab, generator=g) * 3
    logits32[..., :3] -= 40  # some near-zero probabilities
    labels = torch.randint(0, vocab, shape, generator=g)
    w_ent = torch.randn(*shape, generator=g)
    w_lp = torch.randn(*shape, generator=g)

    def run(ent_fn, lp_fn):
        x = logits32.to(dtype).clone().requires_grad_(True)
        scaled = x / 0.7  # verl scales by the temperature before calling these functions
        ent = ent_fn(scaled)
        lp = lp_fn(scaled, labels)
        ((ent.float() * w_ent).sum() + (lp.float() * w_lp).sum()).backward()
        return ent.float(), lp.float(), x.grad.float()

    ent_v, lp_v, grad_v = run(lambda z: dropin["entropy_from_logits"](z.float()), dropin["logprobs_from_logits"])
    ent_h, lp_h, grad_h = run(fused.entropy_from_logits, fused.logprobs_from_logits)
    assert ent_h.dtype == torch.float32 and ent_h.shape == shape and lp_h.shape == shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ent_h, ent_v, atol=tol, rtol=tol)
    torch.testing.assert_close(lp_h, lp_v, atol=tol, rtol=tol)
    torch.testing.assert_close(grad_h, grad_v, atol=tol, rtol=tol)
    assert bool((lp_h <= 0).all())


def test_chunked_variant_and_torch_compile(dropin):
    logits = torch.randn(9, 100)
    want = dropin["entropy_from_logits"](logits)
    torch.testing.assert_close(fused.entropy_from_logits_with_chunking(logits, chunk_size=4), want, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(fused.entropy_from_logits, dynamic=True)  # as the FSDP engine wraps it
    torch.testing.assert_close(compiled(logits), want, atol=1e-5, rtol=1e-5)


def test_bad_labels_shape(dropin):
    with pytest.raises(ValueError, match="labels"):
        fused.logprobs_from_logits(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("", False), ("0", False), ("no", False)])
def test_env_switch(value, expected):
    assert fused.env_requests_fused_entropy({fused.ENV_VAR: value}) is expected


def test_env_switch_rejects_garbage():
    with pytest.raises(ValueError, match="HEAL_FUSED_ENTROPY"):
        fused.env_requests_fused_entropy({fused.ENV_VAR: "maybe"})


def test_torchtitan_engine_binding_is_patched(dropin, monkeypatch):
    """verl's torchtitan engine binds logprobs_from_logits at import (``from verl.utils.torch_functional
    import logprobs_from_logits``); the drop-in replaces that binding too, whether the module is imported
    before or after use_fused_entropy(). (torchtitan itself is not installed here: a stand-in module
    with the same import-time binding takes the engine module's name.)"""
    import sys
    import types

    name = "verl.workers.engine.torchtitan.transformer_impl"
    assert name in fused._ENGINE_MODULES
    fake = types.ModuleType(name)
    fake.logprobs_from_logits = dropin["logprobs_from_logits"]  # what the real module's import binds
    monkeypatch.setitem(sys.modules, name, fake)
    fused.use_fused_entropy()  # already-imported engine module: patched now
    assert fake.logprobs_from_logits is fused.logprobs_from_logits
    fused.restore_verl_entropy()
    assert fake.logprobs_from_logits is dropin["logprobs_from_logits"]
    fused.use_fused_entropy()
    assert fake.logprobs_from_logits is fused.logprobs_from_logits


@pytest.mark.parametrize("overrides,names", [
    ({}, None),
    ({"actor_rollout_ref": {"actor": {"strategy": "megatron"}}}, ["strategy=megatron", "Megatron"]),
    ({"actor_rollout_ref": {"actor": {"strategy": "mindspeed"}}}, ["strategy=mindspeed"]),
    # verl's fused-kernel forwards run heal's fused linear op (heal.integrations.verl.fused_linear)
    ({"actor_rollout_ref": {"model": {"use_fused_kernels": True}}}, None),
    ({"actor_rollout_ref": {"actor": {"strategy": "megatron"}, "model": {"use_fused_kernels": True}}}, None),
    ({"actor_rollout_ref": {"actor": {"strategy": "torchtitan"}}}, None),
])
def test_uncovered_path_notice_names_the_engine(overrides, names):
    from omegaconf import OmegaConf

    base = {"actor_rollout_ref": {"actor": {"strategy": "fsdp"}, "model": {"use_fused_kernels": False}}}
    cfg = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(overrides))
    notice = fused.uncovered_path_notice(cfg)
    if names is None:
        assert notice is None
    else:
        assert notice is not None and all(n in notice for n in names) and "verl's own code" in notice


def test_uncovered_path_notice_is_logged_once_at_heal_sync_startup(caplog, monkeypatch):
    from hydra import compose, initialize_config_dir

    from heal.integrations.verl.config_dir import config_dir
    from heal.integrations.verl.trainer import HealPPOTrainerSync

    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="paper_heal", overrides=[
            "heal.fused_entropy=true",
            "data.train_files=[/x.parquet]", "data.val_files=[/y.parquet]"])
    # megatron is not installed here: mark the config's own engine as uncovered to see the notice
    monkeypatch.setitem(fused._UNCOVERED_STRATEGIES, "fsdp", "a test stand-in for an uncovered engine")
    fused._noticed.clear()
    with caplog.at_level("WARNING", logger="heal.integrations.verl.fused_entropy"):
        HealPPOTrainerSync(cfg)
        HealPPOTrainerSync(cfg)
    hits = [r for r in caplog.records if "strategy=fsdp" in r.getMessage()]
    assert len(hits) == 1


def test_env_switch_notice_from_verls_own_trainer(caplog, monkeypatch):
    """HEAL_FUSED_ENTROPY=1 with verl's plain sync trainer (the recipes' other runs): the notice comes
    from the trainer's construction too."""
    from hydra import compose, initialize_config_dir

    from heal.integrations.verl.config_dir import config_dir
    from verl.trainer.ppo.v1 import get_trainer_cls

    monkeypatch.setenv(fused.ENV_VAR, "1")
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="paper_kl_cov", overrides=[
            "data.train_files=[/x.parquet]", "data.val_files=[/y.parquet]"])
    monkeypatch.setitem(fused._UNCOVERED_STRATEGIES, "fsdp", "a test stand-in for an uncovered engine")
    fused._noticed.clear()
    with caplog.at_level("WARNING", logger="heal.integrations.verl.fused_entropy"):
        get_trainer_cls("sync")(cfg)
    assert any("strategy=fsdp" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(fused.ENV_VAR, "0")
    fused._noticed.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="heal.integrations.verl.fused_entropy"):
        get_trainer_cls("sync")(cfg)
    assert not caplog.records
