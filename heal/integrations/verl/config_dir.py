"""Print (``python -m heal.integrations.verl.config_dir``) or return the folder of heal's verl configs.

Pass it to verl's launcher as ``--config-path``; the configs pull verl's own ``ppo_trainer`` through
``hydra.searchpath: [pkg://verl.trainer.config]``::

    python -m verl.trainer.main_ppo --config-path="$(python -m heal.integrations.verl.config_dir)" \\
        --config-name=paper_heal data.train_files=... data.val_files=...
"""

from __future__ import annotations

import os

__all__ = ["config_dir", "CONFIG_NAMES"]

CONFIG_NAMES = (
    "heal_trainer",
    "paper_grpo",
    "paper_heal",
    "paper_entropy_loss",
    "paper_clip_higher",
    "paper_kl_cov",
    "paper_clip_cov",
    "paper_high_entropy_tokens",
    "paper_entropy_advantage",
    "cpu_smoke",
)


def config_dir() -> str:
    """Absolute path of ``heal/integrations/verl/config``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


if __name__ == "__main__":
    print(config_dir())
