"""heal's verl configs (heal_trainer, paper_*): compose with verl's ppo_trainer, keys exist in verl,
paper hyperparameters, verl's own start-up validation."""

import os

import pytest

verl = pytest.importorskip("verl")

import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from heal.integrations.verl.config_dir import CONFIG_NAMES, config_dir  # noqa: E402

_MISSING = object()


@pytest.fixture(scope="module")
def composed():
    from hydra import compose, initialize_config_dir

    base_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=base_dir, version_base=None):
        base = compose(config_name="ppo_trainer")
    out = {}
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        for name in CONFIG_NAMES:
            out[name] = compose(config_name=name, overrides=["actor_rollout_ref.model.path=/nonexistent"])
    return base, out


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _has(cfg, path):
    node = cfg
    for part in path.split("."):
        if not OmegaConf.is_config(node):
            return False
        try:
            node = node._get_node(part)  # also finds mandatory (???) keys, which `in` does not
        except Exception:  # struct configs raise on unknown keys
            return False
        if node is None:
            return False
    return True


# keys under mappings verl hands on as they are (to transformers' config, FSDP's MixedPrecision, vLLM's
# engine, ray.init), and a RolloutConfig field that verl's yaml leaves out (cpu_smoke sets them)
_PASSED_ON = ("actor_rollout_ref.model.override_config.", "actor_rollout_ref.actor.fsdp_config.mixed_precision.",
              "actor_rollout_ref.rollout.engine_kwargs.vllm.", "ray_kwargs.ray_init.",
              "actor_rollout_ref.rollout.enable_sleep_mode")


def test_passed_on_keys_are_read_by_verl():
    import dataclasses

    from verl.workers.config import RolloutConfig

    assert "enable_sleep_mode" in {f.name for f in dataclasses.fields(RolloutConfig)}


def test_every_key_we_set_exists_in_verls_config(composed):
    base, _ = composed
    for name in ("_paper_common",) + CONFIG_NAMES:
        raw = yaml.safe_load(open(os.path.join(config_dir(), name + ".yaml")))
        own = {k: v for k, v in raw.items() if k not in ("hydra", "defaults", "heal")}
        heal_keys = {"high_entropy_ratio", "entropy_adv_alpha", "entropy_adv_kappa"}  # HealPolicyLossConfig
        unknown = [p for p in _leaves(own) if not _has(base, p) and p.rsplit(".", 1)[-1] not in heal_keys
                   and not p.startswith(_PASSED_ON)]
        assert unknown == [], f"{name}.yaml sets keys verl does not have: {unknown}"


def test_paper_hyperparameters(composed):
    _, cfgs = composed
    for name in [n for n in CONFIG_NAMES if n.startswith("paper_")]:
        c = cfgs[name]
        assert c.actor_rollout_ref.rollout.n == 8 and c.actor_rollout_ref.rollout.temperature == 0.7
        assert c.data.train_batch_size == 128 and c.actor_rollout_ref.actor.ppo_mini_batch_size == 128
        assert c.data.max_prompt_length == 1024 and c.data.max_response_length == 3072
        assert c.algorithm.adv_estimator == "grpo" and c.actor_rollout_ref.actor.optim.lr == 1e-6
        assert c.actor_rollout_ref.actor.use_kl_loss and c.actor_rollout_ref.actor.kl_loss_coef == 0.001
        assert c.actor_rollout_ref.actor.kl_loss_type == "low_var_kl"
        assert c.trainer.n_gpus_per_node == 8 and c.trainer.nnodes == 1
    a = {n: cfgs[n].actor_rollout_ref.actor for n in CONFIG_NAMES}
    assert a["paper_grpo"].entropy_coeff == 0 and a["paper_grpo"].policy_loss.loss_mode == "vanilla"
    assert a["paper_entropy_loss"].entropy_coeff == 0.001
    assert (a["paper_clip_higher"].clip_ratio_low, a["paper_clip_higher"].clip_ratio_high) == (0.2, 0.28)
    assert a["paper_grpo"].clip_ratio_high == 0.2
    kl = a["paper_kl_cov"].policy_loss
    assert (kl.loss_mode, kl.kl_cov_ratio, kl.ppo_kl_coef) == ("kl_cov", 0.0002, 1.0)
    cc = a["paper_clip_cov"].policy_loss
    assert (cc.loss_mode, cc.clip_cov_ratio, cc.clip_cov_lb, cc.clip_cov_ub) == ("clip_cov", 0.0002, 1.0, 5.0)
    he = a["paper_high_entropy_tokens"]
    assert he.policy_loss.loss_mode == "high_entropy_tokens" and he.policy_loss.high_entropy_ratio == 0.2
    assert he.calculate_entropy
    ea = a["paper_entropy_advantage"]
    assert (ea.policy_loss.entropy_adv_alpha, ea.policy_loss.entropy_adv_kappa) == (0.4, 2.0) and ea.calculate_entropy
    assert cfgs["paper_heal"].trainer.v1.trainer_mode == "heal_sync"
    assert cfgs["paper_grpo"].trainer.v1.trainer_mode == "sync"
    for name in CONFIG_NAMES[1:]:
        assert cfgs[name].reward.custom_reward_function.path == "pkg://heal.scoring"
        assert cfgs[name].reward.custom_reward_function.name == "compute_score_with_info"
    from verl.utils.import_utils import load_extern_object

    from heal.scoring import compute_score_with_info

    # how verl loads it
    assert load_extern_object("pkg://heal.scoring", "compute_score_with_info") is compute_score_with_info


def test_heal_blocks(composed):
    from heal.integrations.verl.settings import HealSettings

    _, cfgs = composed
    s = HealSettings.from_config(cfgs["paper_heal"])
    assert s.eda.general_sources == ("commonsense_qa",) and s.eda.weight == 1.0 and s.eda.min_length == 50
    with pytest.raises(ValueError, match=r"heal\.general_sources"):
        HealSettings.from_config(cfgs["heal_trainer"])  # must be set by the user


@pytest.mark.parametrize("name", ["paper_heal", "paper_high_entropy_tokens", "paper_entropy_advantage", "paper_kl_cov",
                                  "cpu_smoke"])
def test_verls_startup_validation_accepts_the_configs(composed, name):
    """verl's main_ppo validates the config before starting Ray; ours must pass it (incl. the
    HealPolicyLossConfig built through hydra's _target_)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    cfg = OmegaConf.create(OmegaConf.to_container(composed[1][name]))
    OmegaConf.resolve(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.policy_loss.loss_mode == cfg.actor_rollout_ref.actor.policy_loss.loss_mode
