"""recipes/verl/*.sh: the arguments they pass to verl compose into the intended configs.

The hybrid/few-shot recipes read real (tiny) `heal mix` files written here, so the batch size they
take from the file, the order-keeping settings and the error messages are all checked end to end.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "verl"
SCRIPTS = sorted(p.name for p in RECIPES.glob("*.sh") if p.name != "common.sh")
CPU_SCRIPTS = ("cpu_smoke.sh", "install_cpu.sh")  # verl on a CPU: run by .ci/verl-job, not dry-run here
PAPER_SCRIPTS = [s for s in SCRIPTS if s not in CPU_SCRIPTS]
README = (RECIPES / "README.md").read_text()

HYBRID_RECIPES = [
    ("hybrid.sh", "paper_grpo"), ("heal.sh", "paper_heal"), ("entropy_loss.sh", "paper_entropy_loss"),
    ("high_entropy_tokens.sh", "paper_high_entropy_tokens"), ("clip_higher.sh", "paper_clip_higher"),
    ("kl_cov.sh", "paper_kl_cov"), ("clip_cov.sh", "paper_clip_cov"),
    ("entropy_advantage.sh", "paper_entropy_advantage"),
]


def _row(source, i):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": f"{source} question {i}?"}],
        "ability": "multiple_choice",
        "reward_model": {"style": "rule", "ground_truth": "A"},
        "extra_info": {"index": i},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Target (32), general (384) and the `heal mix` files the README's commands write."""
    from heal.data.io import write_parquet_rows
    from heal.data.mix import MixConfig, mix_files

    d = tmp_path_factory.mktemp("recipe_data")
    target, general = str(d / "med32.parquet"), str(d / "csqa384.parquet")
    write_parquet_rows([_row("medqa", i) for i in range(32)], target)
    write_parquet_rows([_row("commonsense_qa", i) for i in range(384)], general)
    paths = {"target": target, "general": general}
    for name, kw in {
        "hybrid": dict(general=[general], k=32, general_per_batch=96),
        "fewshot": dict(k=32, repeat=4, general_per_batch=0),
        "small": dict(general=[general], k=8, general_per_batch=24),  # batches of 32
    }.items():
        paths[name] = str(d / f"{name}.parquet")
        mix_files(MixConfig(target=[target], output=paths[name], **kw))
    return paths


HEAL_SYNC_CONFIGS = ("paper_heal", "paper_high_entropy_tokens")  # trainer mode heal_sync


def _env(data, extra_env=None):
    env = dict(os.environ, HEAL_RECIPE_DRY_RUN="1", VAL_FILES="/data/val_a.parquet,/data/val_b.parquet",
               HYBRID_TRAIN=data["hybrid"], FEWSHOT_TRAIN=data["fewshot"], GENERAL_TRAIN=data["general"],
               HEAL_PYTHON=sys.executable)
    for key in ("BATCH_SIZE", "FUSED_ENTROPY", "GENERAL_SOURCES", "TOTAL_EPOCHS", "EXPERIMENT", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(extra_env or {})
    return env


def _run(script, env, args=()):
    return subprocess.run(["bash", str(RECIPES / script), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _dry_run(script, data, extra_env=None, args=()):
    proc = _run(script, _env(data, extra_env), args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines(), proc.stderr


def _compose(lines):
    from hydra import compose, initialize_config_dir

    path = next(l.split("=", 1)[1] for l in lines if l.startswith("--config-path="))
    name = next(l.split("=", 1)[1] for l in lines if l.startswith("--config-name="))
    overrides = [l for l in lines if not l.startswith("--")]
    with initialize_config_dir(config_dir=path, version_base=None):
        return name, compose(config_name=name, overrides=overrides)


def _assert_ordered(cfg, train_file, batch):
    assert list(cfg.data.train_files) == [train_file]
    assert cfg.data.shuffle is False
    assert cfg.data.train_batch_size == batch and cfg.actor_rollout_ref.actor.ppo_mini_batch_size == batch
    assert cfg.data.filter_overlong_prompts is False


def test_every_recipe_is_listed_and_parses():
    expected = {s for s, _ in HYBRID_RECIPES} | {"fewshot.sh", "only_general.sh", *CPU_SCRIPTS}
    assert set(SCRIPTS) == expected
    for script in SCRIPTS:
        assert subprocess.run(["bash", "-n", str(RECIPES / script)]).returncode == 0
        assert script in README, f"{script} missing from recipes/verl/README.md"


@pytest.mark.parametrize("script,config", HYBRID_RECIPES)
def test_hybrid_recipes_train_on_the_mix_in_order(script, config, data):
    lines, _ = _dry_run(script, data, {"FUSED_ENTROPY": "1"})
    name, cfg = _compose(lines)
    assert name == config
    _assert_ordered(cfg, data["hybrid"], 128)
    assert list(cfg.data.val_files) == ["/data/val_a.parquet", "/data/val_b.parquet"]
    if config in HEAL_SYNC_CONFIGS:
        assert cfg.trainer.v1.trainer_mode == "heal_sync" and cfg.heal.fused_entropy is True
        assert cfg.heal.enable is (config == "paper_heal")
    else:
        assert cfg.trainer.v1.trainer_mode == "sync"
        env_vars = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars")
        assert env_vars is not None and str(env_vars.HEAL_FUSED_ENTROPY) == "1"  # reaches every Ray worker


def test_heal_recipe_composes_with_sources_and_overrides(data):
    from heal.integrations.verl.settings import HealSettings

    lines, _ = _dry_run("heal.sh", data, {"GENERAL_SOURCES": "commonsense_qa,openbookqa", "FUSED_ENTROPY": "1"},
                        ["trainer.total_epochs=7"])
    name, cfg = _compose(lines)
    assert name == "paper_heal" and cfg.trainer.total_epochs == 7
    s = HealSettings.from_config(cfg)
    assert s.eda.general_sources == ("commonsense_qa", "openbookqa") and s.fused_entropy


def test_fewshot_recipe_takes_the_repeated_target_file(data):
    import pyarrow.parquet as pq

    rows = pq.read_table(data["fewshot"]).to_pylist()
    assert len(rows) == 128 and {r["data_source"] for r in rows} == {"medqa"}
    assert len({r["prompt"][0]["content"] for r in rows}) == 32  # each of the 32 questions 4 times
    lines, _ = _dry_run("fewshot.sh", data)
    name, cfg = _compose(lines)
    assert name == "paper_grpo" and cfg.trainer.v1.trainer_mode == "sync"
    _assert_ordered(cfg, data["fewshot"], 128)


def test_only_general_recipe_keeps_verl_shuffling(data):
    lines, _ = _dry_run("only_general.sh", data)
    name, cfg = _compose(lines)
    assert name == "paper_grpo" and list(cfg.data.train_files) == [data["general"]]
    assert cfg.data.shuffle is True and cfg.data.train_batch_size == 128


def test_batch_size_comes_from_the_mix_and_batch_size_overrides_it(data):
    lines, err = _dry_run("hybrid.sh", data, {"HYBRID_TRAIN": data["small"]})
    _assert_ordered(_compose(lines)[1], data["small"], 32)
    assert "warning" not in err
    lines, err = _dry_run("kl_cov.sh", data, {"BATCH_SIZE": "64"})
    _assert_ordered(_compose(lines)[1], data["hybrid"], 64)
    assert "BATCH_SIZE=64" in err and "128" in err  # says the override does not match the mix
    proc = _run("kl_cov.sh", _env(data, {"BATCH_SIZE": "0"}))
    assert proc.returncode != 0 and "BATCH_SIZE must be a positive integer" in proc.stderr


def _validate(cfg):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.resolve(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def _startup_checks(cfg):
    """What verl's main_ppo and task runner do with the config before any worker starts: resolve it,
    ``validate_config`` (builds the actor config dataclass), the ref / rollout / algorithm config
    dataclasses, and the trainer of ``trainer.v1.trainer_mode`` (heal_sync validates the heal: block)."""
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.utils.config import omega_conf_to_dataclass

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.resolve(cfg)
    _validate(cfg)
    built = {key: omega_conf_to_dataclass(OmegaConf.select(cfg, key))
             for key in ("actor_rollout_ref.actor", "actor_rollout_ref.rollout", "algorithm")}
    # the reference policy's config, renamed the way verl's ActorRolloutRefWorker.init_model does
    ref = OmegaConf.create(OmegaConf.to_container(cfg.actor_rollout_ref.ref))
    ref.ppo_mini_batch_size = cfg.actor_rollout_ref.actor.ppo_mini_batch_size
    ref.ppo_micro_batch_size = ref.pop("log_prob_micro_batch_size", None)
    ref.ppo_micro_batch_size_per_gpu = ref.pop("log_prob_micro_batch_size_per_gpu", None)
    ref.use_dynamic_bsz = ref.pop("log_prob_use_dynamic_bsz", False)
    ref.ppo_max_token_len_per_gpu = ref.pop("log_prob_max_token_len_per_gpu", None)
    built["actor_rollout_ref.ref"] = omega_conf_to_dataclass(ref)
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    return cfg, built, trainer


@pytest.mark.parametrize("fused", ["0", "1"])
@pytest.mark.parametrize("script", PAPER_SCRIPTS)
def test_every_recipe_passes_verls_startup_checks(script, fused, data):
    from heal.integrations.verl.losses import HealPolicyLossConfig
    from heal.integrations.verl.trainer import HealPPOTrainerSync

    lines, err = _dry_run(script, data, {"FUSED_ENTROPY": fused})
    assert f"python {sys.executable}" in err  # the interpreter HEAL_PYTHON names, not PATH's
    name, cfg = _compose(lines)
    cfg, built, trainer = _startup_checks(cfg)
    actor = built["actor_rollout_ref.actor"]
    assert built["actor_rollout_ref.rollout"].temperature == 0.7 and built["algorithm"].adv_estimator == "grpo"
    if name in HEAL_SYNC_CONFIGS:
        assert isinstance(trainer, HealPPOTrainerSync) and trainer.heal_settings.fused_entropy is (fused == "1")
    else:
        assert type(trainer).__name__ == "PPOTrainerSync"
        env_vars = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars")
        assert (env_vars is not None and str(env_vars.get("HEAL_FUSED_ENTROPY")) == "1") is (fused == "1")
    if name == "paper_high_entropy_tokens":
        assert isinstance(actor.policy_loss, HealPolicyLossConfig) and actor.calculate_entropy and actor.entropy_coeff == 0
        assert trainer.heal_settings.high_entropy_scope == "batch" and trainer._heal_batch_mask
        assert cfg.actor_rollout_ref.actor.policy_loss.high_entropy_scope == "batch"  # told to the loss
    if name == "paper_entropy_advantage":
        assert isinstance(actor.policy_loss, HealPolicyLossConfig) and actor.calculate_entropy and actor.entropy_coeff == 0


def test_high_entropy_tokens_batch_scope_refuses_off_policy_updates(data):
    lines, _ = _dry_run("high_entropy_tokens.sh", data, {}, ["actor_rollout_ref.actor.ppo_mini_batch_size=32"])
    with pytest.raises(ValueError, match=r"ppo_mini_batch_size=32 < data\.train_batch_size=128.*micro_batch"):
        _startup_checks(_compose(lines)[1])
    lines, _ = _dry_run("high_entropy_tokens.sh", data, {}, ["actor_rollout_ref.actor.ppo_epochs=2"])
    with pytest.raises(ValueError, match=r"ppo_epochs=2 > 1"):
        _startup_checks(_compose(lines)[1])
    # the authors' per-micro-batch rule has no such constraint
    lines, _ = _dry_run("high_entropy_tokens.sh", data, {}, ["actor_rollout_ref.actor.ppo_mini_batch_size=32",
                                                             "heal.high_entropy_scope=micro_batch"])
    _, _, trainer = _startup_checks(_compose(lines)[1])
    assert not trainer._heal_batch_mask


def test_recipes_find_their_python(data, tmp_path):
    """Launched from a venv that is not activated: PATH's python lacks heal; VIRTUAL_ENV or HEAL_PYTHON
    points at the right one, and a bad HEAL_PYTHON fails naming the variable."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").write_text("#!/bin/sh\nexit 1\n")  # a python without heal (its checks fail)
    (bare / "python3").chmod(0o755)
    path = f"{bare}:/usr/bin:/bin"
    env = _env(data, {"PATH": path})
    env.pop("HEAL_PYTHON")
    proc = _run("kl_cov.sh", env)
    assert proc.returncode != 0 and "HEAL_PYTHON" in proc.stderr and not proc.stdout
    venv = sys.prefix  # the environment running the tests (a venv in CI), as if activated
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        pytest.skip(f"{venv}/bin/python does not exist: the tests do not run from a virtual environment")
    proc = _run("kl_cov.sh", dict(env, VIRTUAL_ENV=venv))
    assert proc.returncode == 0, proc.stderr
    assert f"python {venv}/bin/python" in proc.stderr
    proc = _run("kl_cov.sh", dict(env, HEAL_PYTHON=str(bare / "python3")))
    assert proc.returncode != 0 and "HEAL_PYTHON=" in proc.stderr


@pytest.mark.parametrize("script,var,mix_flags", [
    ("heal.sh", "HYBRID_TRAIN", "--general-per-batch 96"),
    ("clip_higher.sh", "HYBRID_TRAIN", "--general-per-batch 96"),
    ("fewshot.sh", "FEWSHOT_TRAIN", "--repeat 4 --general-per-batch 0"),
])
def test_missing_training_file_fails_with_the_heal_mix_command(script, var, mix_flags, data, tmp_path):
    env = _env(data)
    env.pop(var)
    proc = _run(script, env)
    assert proc.returncode != 0 and not proc.stdout
    assert var in proc.stderr and "heal mix" in proc.stderr and mix_flags in proc.stderr
    proc = _run(script, _env(data, {var: str(tmp_path / "nope.parquet")}))
    assert proc.returncode != 0 and "does not exist" in proc.stderr and mix_flags in proc.stderr


def test_file_not_from_heal_mix_needs_batch_size(data):
    proc = _run("hybrid.sh", _env(data, {"HYBRID_TRAIN": data["target"]}))
    assert proc.returncode != 0 and "BATCH_SIZE" in proc.stderr and "heal mix" in proc.stderr
    lines, _ = _dry_run("hybrid.sh", data, {"HYBRID_TRAIN": data["target"], "BATCH_SIZE": "32"})
    _assert_ordered(_compose(lines)[1], data["target"], 32)


def test_missing_general_file_names_the_variable(data):
    env = _env(data)
    env.pop("GENERAL_TRAIN")
    proc = _run("only_general.sh", env)
    assert proc.returncode != 0 and "GENERAL_TRAIN" in proc.stderr


def _readme_heal_commands():
    block = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S)).replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip().startswith("heal ")]


def test_readme_heal_commands_parse_with_the_real_cli():
    from heal.cli import build_parser

    commands = _readme_heal_commands()
    assert {c[1] for c in commands} >= {"prepare", "select", "mix"}
    mixes = [" ".join(c) for c in commands if c[1] == "mix"]
    assert any("--k 32 --general-per-batch 96" in m for m in mixes)
    assert any("--k 32 --repeat 4 --general-per-batch 0" in m for m in mixes)
    parser = build_parser()
    for cmd in commands:
        try:
            parser.parse_args(cmd[1:])
        except SystemExit:  # argparse reports the bad flag on stderr
            pytest.fail(f"README command does not parse: {' '.join(cmd)}")
