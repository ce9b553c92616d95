"""Deep Q-Network (Mnih et al., 2015, "Human-level control through deep reinforcement learning").

A network Q_theta(s, .) gives one value per discrete action. The agent acts epsilon-greedily on it,
stores every transition (s, a, r, s', terminated) in a replay buffer, and every `train_every`
environment steps takes one gradient step (Adam) on a uniformly sampled minibatch:

    y    = r + gamma * (1 - terminated) * max_a' Q_target(s', a')
    loss = mean over the batch of  l(Q_theta(s, a) - y)

with l the squared error (`loss=mse`, the default) or the Huber loss (`loss=huber`: smooth L1,
0.5 d^2 for |d| <= 1, |d| - 0.5 beyond). Q_target is a copy of Q_theta that lags behind it: a
hard copy every `target_update_every` steps (tau = 1), or a Polyak average
target <- tau * online + (1 - tau) * target at those steps (tau < 1). No gradient flows through y.

Only *termination* stops the bootstrap (the pole fell: the value of s' is 0). An episode cut by a
time limit (gymnasium's `truncated`) still had a future, so its target bootstraps from s'.

With `double_dqn=true` the next action is chosen by the online network and valued by the target
network (van Hasselt et al., 2016): y = r + gamma * (1 - terminated) * Q_target(s', argmax_a' Q_theta(s', a')).

Epsilon falls linearly from `epsilon_start` to `epsilon_end` over the first
`exploration_fraction * total_steps` steps, then stays; learning starts after `learning_starts`
steps of acting (the buffer fills with exploratory transitions first).

Why squared error by default: the Nature paper clips the error (Huber), but on CartPole the
rare terminal transitions are exactly the large errors (y = 1 against Q near 100), and Huber's
bounded gradient lets the network all but ignore them; with these defaults its Q-values climb far
past the largest possible return (1 / (1 - gamma) = 100) and the policy never learns. The squared
error weighs those transitions fully.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rufus.classic.common import ClassicArgs, ClassicResult, finish_run, make_env, start_run
from rufus.config import ConfigError, as_config, opt


@dataclass
class DQNConfig(ClassicArgs):
    env: str = opt("CartPole-v1", "gymnasium environment id (Discrete actions, Box observations)")
    total_steps: int = opt(300_000, "environment steps in all", ge=1)
    lr: float = opt(2.5e-4, "Adam learning rate", gt=0)
    buffer_size: int = opt(10_000, "transitions the replay buffer holds (the oldest are overwritten)", ge=1)
    batch_size: int = opt(128, "transitions per gradient step, sampled uniformly from the buffer", ge=1)
    gamma: float = opt(0.99, "discount factor", ge=0, le=1)
    hidden_sizes: list[int] = opt([120, 84], "hidden layer widths of the Q-network MLP", ge=1)
    learning_starts: int = opt(10_000, "environment steps before the first gradient step", ge=0)
    train_every: int = opt(10, "environment steps per gradient step", ge=1)
    target_update_every: int = opt(500, "environment steps between target-network updates", ge=1)
    tau: float = opt(1.0, "target update: 1 = hard copy; < 1 = target <- tau * online + (1 - tau) * target", gt=0, le=1)
    epsilon_start: float = opt(1.0, "exploration rate at step 0", ge=0, le=1)
    epsilon_end: float = opt(0.05, "exploration rate after the decay", ge=0, le=1)
    exploration_fraction: float = opt(0.5, "fraction of total_steps over which epsilon falls linearly", ge=0, le=1)
    loss: Literal["mse", "huber"] = opt("mse", "TD-error loss: mse (squared error) or huber (smooth L1, delta 1)")
    max_grad_norm: float = opt(0.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    double_dqn: bool = opt(False, "choose the next action with the online network, value it with the target network")
    eval_episodes: int = opt(10, "greedy episodes at the end for extra['greedy_mean_return'] (0 = none)", ge=0)


# --- pieces ---------------------------------------------------------------------------------------


class QNetwork(nn.Module):
    """MLP: observation -> one Q-value per action."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: list[int]):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class ReplayBuffer:
    """Fixed-size ring buffer of transitions in numpy arrays; `sample` draws uniformly with replacement."""

    def __init__(self, capacity: int, obs_dim: int, seed: int = 0):
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos = 0  # where the next transition goes
        self.size = 0  # how many slots hold a transition
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, float(terminated)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, self.size, size=batch_size)
        return {
            "obs": torch.from_numpy(self.obs[idx]),
            "actions": torch.from_numpy(self.actions[idx]),
            "rewards": torch.from_numpy(self.rewards[idx]),
            "next_obs": torch.from_numpy(self.next_obs[idx]),
            "terminated": torch.from_numpy(self.terminated[idx]),
        }


def linear_epsilon(step: int, start: float, end: float, duration: int) -> float:
    """`start` at step 0, falling linearly to `end` at step `duration`, then `end`."""
    if duration <= 0:
        return end
    return start + (end - start) * min(step / duration, 1.0)


def td_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q_target: torch.Tensor,
    gamma: float,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * V(s'), with V(s') = max_a' Q_target(s', a'), or with
    `next_q_online` (double DQN) V(s') = Q_target(s', argmax_a' Q_online(s', a'))."""
    if next_q_online is None:
        next_value = next_q_target.max(dim=1).values
    else:
        best = next_q_online.argmax(dim=1, keepdim=True)
        next_value = next_q_target.gather(1, best).squeeze(1)
    return rewards + gamma * (1.0 - terminated) * next_value


def dqn_loss(
    q_network: nn.Module,
    target_network: nn.Module,
    batch: dict[str, torch.Tensor],
    gamma: float,
    double_dqn: bool = False,
    loss: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of Q(s, a) against the TD target -- mean squared error or Huber --, Q(s, a) of the batch)."""
    q_taken = q_network(batch["obs"]).gather(1, batch["actions"].long().unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        next_q_target = target_network(batch["next_obs"])
        next_q_online = q_network(batch["next_obs"]) if double_dqn else None
        y = td_targets(batch["rewards"], batch["terminated"], next_q_target, gamma, next_q_online)
    if loss == "huber":
        return F.smooth_l1_loss(q_taken, y), q_taken
    return F.mse_loss(q_taken, y), q_taken


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target (tau = 1: a hard copy)."""
    for t, o in zip(target_network.parameters(), q_network.parameters()):
        if tau >= 1.0:
            t.copy_(o)
        else:
            t.mul_(1.0 - tau).add_(o, alpha=tau)


@torch.no_grad()
def greedy_action(q_network: nn.Module, obs) -> int:
    return int(q_network(torch.as_tensor(np.asarray(obs, dtype=np.float32)).unsqueeze(0)).argmax(dim=1).item())


def evaluate(q_network: nn.Module, env_id: str, episodes: int = 10, seed: int = 0) -> list[float]:
    """Returns of `episodes` episodes acting greedily (argmax_a Q(s, a)) in a fresh env."""
    env = make_env(env_id, seed)
    returns = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(greedy_action(q_network, obs))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def _check(cfg: DQNConfig) -> None:
    """ConfigError naming the key for values DQN cannot run with that each key's own range (checked
    with the config) does not catch."""
    if not cfg.hidden_sizes:
        raise ConfigError(f"hidden_sizes: need at least one positive width, got {cfg.hidden_sizes}")


def _spaces(env, env_id: str) -> tuple[int, int]:
    """(observation size, number of actions), or ConfigError when DQN cannot handle the env."""
    import gymnasium as gym

    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ConfigError(f"env: DQN needs a Discrete action space; {env_id} has {env.action_space}")
    obs_space = env.observation_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ConfigError(f"env: DQN needs a 1-D Box observation space; {env_id} has {obs_space}")
    return int(obs_space.shape[0]), int(env.action_space.n)


# --- training -------------------------------------------------------------------------------------


def train_dqn(config) -> ClassicResult:
    """Train a DQN agent on `config.env`; returns the result with extra['greedy_mean_return']."""
    cfg = as_config(DQNConfig, config)
    _check(cfg)
    env = make_env(cfg.env, cfg.seed)
    try:
        obs_dim, n_actions = _spaces(env, cfg.env)
    except ConfigError:
        env.close()
        raise
    run = start_run(cfg, "dqn")

    q_network = QNetwork(obs_dim, n_actions, cfg.hidden_sizes)
    target_network = copy.deepcopy(q_network)  # starts equal to the online network
    target_network.requires_grad_(False)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(cfg.buffer_size, obs_dim, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    decay_steps = int(cfg.exploration_fraction * cfg.total_steps)

    obs, _ = env.reset(seed=cfg.seed)
    episodic_return, episodic_length = 0.0, 0
    loss_v = q_v = None
    for global_step in range(cfg.total_steps):
        # 1. act epsilon-greedily
        epsilon = linear_epsilon(global_step, cfg.epsilon_start, cfg.epsilon_end, decay_steps)
        if rng.random() < epsilon:
            action = int(rng.integers(n_actions))
        else:
            action = greedy_action(q_network, obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        episodic_return += float(reward)
        episodic_length += 1

        # 2. store the transition; next_obs is the real last observation even when the episode ended,
        #    and only `terminated` (not `truncated`) will stop the bootstrap from it
        buffer.add(obs, action, float(reward), next_obs, terminated)
        if terminated or truncated:
            run.episode(global_step + 1, episodic_return, episodic_length)
            obs, _ = env.reset()
            episodic_return, episodic_length = 0.0, 0
        else:
            obs = next_obs

        # 3. learn: one gradient step every `train_every` steps once `learning_starts` have passed
        step = global_step + 1  # environment steps taken so far
        if step > cfg.learning_starts:
            if step % cfg.train_every == 0:
                loss, q_taken = dqn_loss(
                    q_network, target_network, buffer.sample(cfg.batch_size), cfg.gamma, cfg.double_dqn, cfg.loss
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(q_network.parameters(), cfg.max_grad_norm)
                optimizer.step()
                loss_v, q_v = loss.item(), q_taken.mean().item()
            # 4. move the target network towards the online one
            if step % cfg.target_update_every == 0:
                update_target(target_network, q_network, cfg.tau)

        if step % cfg.log_every == 0:
            stats = {"epsilon": epsilon}
            if loss_v is not None:
                stats.update(loss=loss_v, q_mean=q_v)
            run.log(step, **stats)
        run.advance(1)
    env.close()

    extra = {}
    if cfg.eval_episodes > 0:
        returns = evaluate(q_network, cfg.env, cfg.eval_episodes, seed=cfg.seed + 10_000)
        extra = {"greedy_mean_return": float(np.mean(returns)), "greedy_returns": returns}
    state = {
        "q_network": q_network.state_dict(),
        "target_network": target_network.state_dict(),
        "obs_dim": obs_dim,
        "n_actions": n_actions,
        "hidden_sizes": list(cfg.hidden_sizes),
    }
    return finish_run(run, agent=q_network, state=state, extra=extra)
