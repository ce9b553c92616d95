"""Rufus: train language models from human feedback, end to end.

The public API is re-exported here lazily, so `import rufus` is cheap and has no side effects.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "train_sft": ("rufus.trainers.sft", "train_sft"),
    "SFTConfig": ("rufus.trainers.sft", "SFTConfig"),
    "train_reward_model": ("rufus.trainers.reward", "train_reward_model"),
    "RMConfig": ("rufus.trainers.reward", "RMConfig"),
    "eval_reward_model": ("rufus.trainers.reward", "eval_reward_model"),
    "train_ppo": ("rufus.trainers.ppo", "train_ppo"),
    "PPOConfig": ("rufus.trainers.ppo", "PPOConfig"),
    "train_grpo": ("rufus.trainers.grpo", "train_grpo"),
    "GRPOConfig": ("rufus.trainers.grpo", "GRPOConfig"),
    "train_rloo": ("rufus.trainers.rloo", "train_rloo"),
    "RLOOConfig": ("rufus.trainers.rloo", "RLOOConfig"),
    "train_dpo": ("rufus.trainers.dpo", "train_dpo"),
    "DPOConfig": ("rufus.trainers.dpo", "DPOConfig"),
    "train_kto": ("rufus.trainers.kto", "train_kto"),
    "KTOConfig": ("rufus.trainers.kto", "KTOConfig"),
    "train_ilql": ("rufus.trainers.ilql", "train_ilql"),
    "ILQLConfig": ("rufus.trainers.ilql", "ILQLConfig"),
    "train_bon": ("rufus.trainers.bon", "train_bon"),
    "BoNConfig": ("rufus.trainers.bon", "BoNConfig"),
    "generate": ("rufus.generate", "generate"),
    "GenerateConfig": ("rufus.generate", "GenerateConfig"),
    "load_config": ("rufus.config", "load_config"),
    "ConfigError": ("rufus.config", "ConfigError"),
    "DataError": ("rufus.data.errors", "DataError"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rufus' has no attribute {name!r}")
