"""heal: the HEAL method (hybrid-domain entropy dynamics alignment) on top of heal_kernels."""

from heal.reward import EDAResult, combine_rewards, eda_reward

__all__ = ["eda_reward", "combine_rewards", "EDAResult"]
__version__ = "0.1.0"
