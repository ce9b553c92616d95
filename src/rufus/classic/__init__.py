"""Classic reinforcement learning on gymnasium: the foundations RLHF's algorithms come from.

One file per algorithm, each readable top to bottom; the policy-gradient agents call the same
`rufus.losses` and `rufus.advantages` functions as the language-model trainers. Run one with
`rufus classic <algo> env=<id> key=value ...` or `rufus.classic.train(algo, config)`.
"""

from __future__ import annotations

# algo name -> (module, config class, train function)
ALGOS = {
    "q_learning": ("rufus.classic.tabular", "TabularConfig", "train_q_learning"),
    "sarsa": ("rufus.classic.tabular", "TabularConfig", "train_sarsa"),
    "td_prediction": ("rufus.classic.tabular", "PredictionConfig", "train_prediction"),
    "dqn": ("rufus.classic.dqn", "DQNConfig", "train_dqn"),
    "reinforce": ("rufus.classic.reinforce", "ReinforceConfig", "train_reinforce"),
    "a2c": ("rufus.classic.a2c", "A2CConfig", "train_a2c"),
    "ppo": ("rufus.classic.ppo", "PPOConfig", "train_ppo"),
    "trpo": ("rufus.classic.trpo", "TRPOConfig", "train_trpo"),
    "ddpg": ("rufus.classic.ddpg", "DDPGConfig", "train_ddpg"),
    "td3": ("rufus.classic.ddpg", "TD3Config", "train_td3"),
}


def load(algo: str):
    """(config class, train function) of `algo`."""
    import importlib

    if algo not in ALGOS:
        raise ValueError(f"unknown classic algorithm {algo!r}; choose from {', '.join(ALGOS)}")
    module, cfg_name, fn_name = ALGOS[algo]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, fn_name)


def train(algo: str, config):
    """Run classic algorithm `algo` with `config` (its config dataclass or a dict)."""
    cfg_cls, fn = load(algo)
    return fn(config)
