"""The policy and value networks of the on-policy agents (PPO, TRPO), for discrete and continuous actions.

Discrete actions: pi(. | s) = Categorical(softmax(logits(s))). Continuous (Box) actions: a diagonal
Gaussian N(mu(s), diag(sigma^2)) with a state-independent log sigma, the parameterisation of
Schulman et al. 2015 (TRPO, Sec. 8) and of PPO's MuJoCo runs (Schulman et al. 2017, Sec. 6.1);
log-probabilities and KLs sum over the action dimensions. Networks are two tanh layers with
orthogonal initialisation (gain sqrt(2), 0.01 on the policy's output, 1 on the value's), as in
"The 37 Implementation Details of PPO" (details 2 and 13).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from rufus.config import ConfigError


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(inp: int, out: int, hidden: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(
        layer_init(nn.Linear(inp, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, out), std=out_std),
    )


def spaces(env, env_id: str, algo: str) -> tuple[int, object]:
    """(flat observation size, action space); ConfigError unless Box observations and Discrete or
    one-dimensional-shaped Box actions."""
    import gymnasium as gym

    obs_space = getattr(env, "single_observation_space", env.observation_space)
    act_space = getattr(env, "single_action_space", env.action_space)
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(f"env: {env_id} needs a Box observation space, got {obs_space}")
    if not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.Box)) or (
        isinstance(act_space, gym.spaces.Box) and len(act_space.shape) != 1
    ):
        raise ConfigError(f"env: {env_id} needs Discrete or a flat Box action space for {algo}, got {act_space}")
    return int(np.prod(obs_space.shape)), act_space


class Policy(nn.Module):
    """pi_theta(a | s) for a Discrete or a flat Box action space."""

    def __init__(self, obs_dim: int, action_space, hidden: int = 64):
        super().__init__()
        import gymnasium as gym

        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.act_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        self.net = mlp(obs_dim, self.act_dim, hidden, out_std=0.01)  # logits, or the Gaussian's mean
        if not self.discrete:
            self.log_std = nn.Parameter(torch.zeros(self.act_dim))
            self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, act_dim) the logits, or the Gaussian's mean."""
        return self.net(obs)

    def params(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, k) everything that fixes pi(. | s): the logits, or the mean and log sigma side by side
        (what a rollout stores to rebuild pi_old exactly, `from_params`)."""
        out = self.net(obs)
        return out if self.discrete else torch.cat([out, self.log_std.expand_as(out)], -1)

    def from_params(self, params: torch.Tensor) -> Distribution:
        if self.discrete:
            return Categorical(logits=params)
        mean, log_std = params.split(self.act_dim, -1)
        return Independent(Normal(mean, log_std.exp()), 1)

    def dist(self, obs: torch.Tensor) -> Distribution:
        return self.from_params(self.params(obs))

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """The most likely action: argmax of the logits, or the mean (clipped to the bounds)."""
        out = self.net(obs)
        return out.argmax(-1) if self.discrete else torch.maximum(torch.minimum(out, self.high), self.low)

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        """What the environment is given: the index, or the sample clipped to the action bounds (the
        unclipped sample is what the log-probabilities are of)."""
        if self.discrete:
            return action.numpy()
        return torch.maximum(torch.minimum(action, self.high), self.low).numpy()


def value_net(obs_dim: int, hidden: int = 64) -> nn.Sequential:
    """V(s): obs -> hidden -> tanh -> hidden -> tanh -> 1."""
    return mlp(obs_dim, 1, hidden, out_std=1.0)


def policy_returns(policy: Policy, env_id: str, seed: int, episodes: int) -> list[float]:
    """Returns of `episodes` episodes of the greedy policy on a fresh environment (episode i reset
    with seed + i)."""
    from rufus.classic.common import episode_returns

    def act(obs: torch.Tensor):
        action = policy.greedy(obs)[0]
        return int(action) if policy.discrete else action.numpy()

    return episode_returns(act, env_id, seed, episodes)
