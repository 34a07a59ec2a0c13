"""recipes/verl/*.sh: the arguments they pass to verl compose into the intended configs."""

import os
import pathlib
import subprocess

import pytest

verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "verl"
SCRIPTS = sorted(p.name for p in RECIPES.glob("*.sh") if p.name != "common.sh")

ENV = {
    "HEAL_RECIPE_DRY_RUN": "1",
    "TARGET_TRAIN": "/data/medqa_32.parquet",
    "GENERAL_TRAIN": "/data/csqa_384.parquet",
    "VAL_FILES": "/data/val_a.parquet,/data/val_b.parquet",
}


def _dry_run(script, extra_env=None, args=()):
    env = dict(os.environ, **ENV, **(extra_env or {}))
    proc = subprocess.run(["bash", str(RECIPES / script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _compose(lines):
    from hydra import compose, initialize_config_dir

    path = next(l.split("=", 1)[1] for l in lines if l.startswith("--config-path="))
    name = next(l.split("=", 1)[1] for l in lines if l.startswith("--config-name="))
    overrides = [l for l in lines if not l.startswith("--")]
    with initialize_config_dir(config_dir=path, version_base=None):
        return name, compose(config_name=name, overrides=overrides)


def test_every_recipe_is_listed_and_parses():
    expected = {
        "fewshot.sh", "hybrid.sh", "only_general.sh", "heal.sh", "entropy_loss.sh", "high_entropy_tokens.sh",
        "clip_higher.sh", "kl_cov.sh", "clip_cov.sh", "entropy_advantage.sh",
    }
    assert set(SCRIPTS) == expected
    readme = (RECIPES / "README.md").read_text()
    for script in SCRIPTS:
        assert subprocess.run(["bash", "-n", str(RECIPES / script)]).returncode == 0
        assert script in readme, f"{script} missing from recipes/verl/README.md"


def test_heal_recipe_composes_with_sources_and_fused_entropy():
    from heal.integrations.verl.settings import HealSettings

    lines = _dry_run("heal.sh", {"GENERAL_SOURCES": "commonsense_qa,openbookqa", "FUSED_ENTROPY": "1"}, ["trainer.total_epochs=7"])
    name, cfg = _compose(lines)
    assert name == "paper_heal" and cfg.trainer.v1.trainer_mode == "heal_sync"
    assert list(cfg.data.train_files) == [ENV["TARGET_TRAIN"], ENV["GENERAL_TRAIN"]]
    assert list(cfg.data.val_files) == ["/data/val_a.parquet", "/data/val_b.parquet"]
    assert cfg.trainer.total_epochs == 7
    s = HealSettings.from_config(cfg)
    assert s.eda.general_sources == ("commonsense_qa", "openbookqa") and s.fused_entropy


@pytest.mark.parametrize(
    "script,config,n_files",
    [("only_general.sh", "paper_grpo", 1), ("fewshot.sh", "paper_grpo", 1), ("kl_cov.sh", "paper_kl_cov", 2)],
)
def test_baseline_recipes_compose(script, config, n_files):
    lines = _dry_run(script, {"FUSED_ENTROPY": "1"})
    name, cfg = _compose(lines)
    assert name == config and len(cfg.data.train_files) == n_files
    assert cfg.trainer.v1.trainer_mode == "sync"
    env_vars = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars")
    assert env_vars is not None and str(env_vars.HEAL_FUSED_ENTROPY) == "1"  # reaches every Ray worker


def test_missing_data_path_fails_naming_the_variable():
    env = dict(os.environ, HEAL_RECIPE_DRY_RUN="1", VAL_FILES="/v.parquet")
    env.pop("TARGET_TRAIN", None)
    proc = subprocess.run(["bash", str(RECIPES / "fewshot.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "TARGET_TRAIN" in proc.stderr
