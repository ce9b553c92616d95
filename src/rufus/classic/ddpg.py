"""DDPG and TD3: deterministic actor-critic for continuous actions, learned off-policy from replay.

DDPG (Lillicrap et al. 2016, "Continuous control with deep reinforcement learning") learns a
critic Q(s, a) and a deterministic actor mu(s), each with a slowly moving target copy Q', mu':

    critic:  y = r + gamma * (1 - terminated) * Q'(s', mu'(s'))
             minimise (Q(s, a) - y)^2 over a minibatch from the replay buffer
    actor:   maximise Q(s, mu(s))          (loss = -mean Q(s, mu(s)); the gradient flows through a)
    targets: theta' <- tau * theta + (1 - tau) * theta'       after every update

and explores with mu(s) plus noise (Ornstein-Uhlenbeck or Gaussian), clipped to the action bounds.

TD3 (Fujimoto et al. 2018, "Addressing Function Approximation Error in Actor-Critic Methods")
changes three things against DDPG's overestimation of Q:

    twin critics:        y = r + gamma * (1 - terminated) * min(Q1'(s', a~), Q2'(s', a~)),
                         both Q1 and Q2 regress on the same y
    target smoothing:    a~ = clip(mu'(s') + clip(eps, -noise_clip, noise_clip), low, high),
                         eps ~ N(0, target_noise^2)
    delayed policy:      the actor and all target networks are updated once every
                         `policy_delay` critic updates, the actor on Q1 only.

Only termination stops the bootstrap: a time-limit truncation (Pendulum ends every episode at 200
steps) still bootstraps from Q'(s', .), since the state s' is not terminal.

Noise scales (`noise_sigma`, `target_noise`, `noise_clip`) are fractions of the action half-range
(high - low) / 2, so the same numbers work for an action in [-1, 1] and one in [-2, 2].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rufus.classic.common import ClassicArgs, ClassicResult, finish_run, make_env, start_run
from rufus.config import ConfigError, as_config, opt


@dataclass
class DDPGConfig(ClassicArgs):
    env: str = opt("Pendulum-v1", "gymnasium environment id (needs a bounded Box action space)")
    total_steps: int = opt(15_000, "environment steps in all (Pendulum-v1: 75 episodes of 200)", ge=1)
    buffer_size: int = opt(100_000, "replay buffer capacity in transitions", ge=1)
    batch_size: int = opt(256, "transitions per gradient update", ge=1)
    learning_starts: int = opt(1_000, "steps of uniform random actions before the first update", ge=0)
    gamma: float = opt(0.99, "discount factor", ge=0, le=1)
    tau: float = opt(0.005, "soft target update rate: target <- tau * online + (1 - tau) * target", gt=0, le=1)
    actor_lr: float = opt(1e-3, "Adam learning rate of the actor", gt=0)
    critic_lr: float = opt(1e-3, "Adam learning rate of the critic(s)", gt=0)
    hidden_sizes: list[int] = opt([256, 256], "hidden layer widths of the actor and critic MLPs", ge=1)
    noise: Literal["ou", "gaussian"] = opt("ou", "exploration noise: Ornstein-Uhlenbeck or Gaussian")
    noise_sigma: float = opt(0.2, "exploration noise scale, as a fraction of the action half-range", ge=0)
    ou_theta: float = opt(0.15, "Ornstein-Uhlenbeck pull towards zero per step (noise=ou)", ge=0)
    eval_episodes: int = opt(10, "greedy episodes (deterministic actor, no noise) after training", ge=0)


@dataclass
class TD3Config(DDPGConfig):
    noise: Literal["ou", "gaussian"] = opt("gaussian", "exploration noise: Ornstein-Uhlenbeck or Gaussian")
    noise_sigma: float = opt(0.1, "exploration noise scale, as a fraction of the action half-range", ge=0)
    policy_delay: int = opt(2, "critic updates per actor (and target network) update", ge=1)
    target_noise: float = opt(0.2, "std of the target policy smoothing noise (fraction of half-range)", ge=0)
    noise_clip: float = opt(0.5, "smoothing noise is clipped to +-noise_clip (fraction of half-range)", ge=0)


# --- networks -------------------------------------------------------------------------------------


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """mu(s) = centre + half_range * tanh(MLP(s)): a deterministic action inside [low, high]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim])
        self.register_buffer("centre", torch.as_tensor((high + low) / 2, dtype=torch.float32))
        self.register_buffer("half_range", torch.as_tensor((high - low) / 2, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.centre + self.half_range * torch.tanh(self.net(obs))


class Critic(nn.Module):
    """`n_q` independent Q(s, a) networks (1 for DDPG, 2 for TD3); forward gives (n_q, batch)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], n_q: int = 1):
        super().__init__()
        self.qs = nn.ModuleList(mlp([obs_dim + act_dim, *hidden, 1]) for _ in range(n_q))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])

    def q1(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """The first critic alone, (batch,): what the actor ascends."""
        return self.qs[0](torch.cat([obs, act], dim=-1)).squeeze(-1)


# --- the update rules, as small functions ---------------------------------------------------------


@torch.no_grad()
def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta' <- tau * theta + (1 - tau) * theta' for every parameter (Polyak averaging)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(1.0 - tau).add_(o, alpha=tau)


def smoothed_target_action(
    next_action: torch.Tensor,
    noise: torch.Tensor,
    noise_clip: torch.Tensor | float,
    low: torch.Tensor,
    high: torch.Tensor,
) -> torch.Tensor:
    """TD3's a~ = clip(mu'(s') + clip(noise, -noise_clip, noise_clip), low, high)."""
    clip = torch.as_tensor(noise_clip, dtype=noise.dtype)
    return torch.clamp(next_action + torch.clamp(noise, -clip, clip), low, high)


def bootstrap_target(
    reward: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, gamma: float
) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * min over critics of Q'(s', a').

    `next_q` is (n_q, batch): one row for DDPG, two for TD3 (the min is then the clipped double-Q
    target). A truncated but not terminated transition keeps its bootstrap term."""
    return reward + gamma * (1.0 - terminated) * next_q.min(dim=0).values


class OUNoise:
    """Ornstein-Uhlenbeck noise, x <- x - theta * x + sigma * eps with eps ~ N(0, 1):
    temporally correlated exploration (DDPG's choice), restarted at 0 every episode."""

    def __init__(self, size: int, theta: float, sigma: float, rng: np.random.Generator):
        self.theta, self.sigma, self.rng = theta, sigma, rng
        self.x = np.zeros(size)

    def reset(self) -> None:
        self.x[:] = 0.0

    def step(self, eps: np.ndarray | None = None) -> np.ndarray:
        if eps is None:
            eps = self.rng.standard_normal(self.x.shape)
        self.x = self.x - self.theta * self.x + self.sigma * eps
        return self.x.copy()


class GaussianNoise:
    """Independent N(0, sigma^2) noise each step (TD3's choice)."""

    def __init__(self, size: int, sigma: float, rng: np.random.Generator):
        self.size, self.sigma, self.rng = size, sigma, rng

    def reset(self) -> None:
        pass

    def step(self) -> np.ndarray:
        return self.sigma * self.rng.standard_normal(self.size)


class ReplayBuffer:
    """A ring of the last `capacity` transitions (s, a, r, s', terminated)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, rng: np.random.Generator):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.size, self.pos, self.rng = capacity, 0, 0, rng

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int) -> tuple[torch.Tensor, ...]:
        idx = self.rng.integers(0, self.size, size=n)
        return tuple(
            torch.from_numpy(a[idx]) for a in (self.obs, self.actions, self.rewards, self.next_obs, self.terminated)
        )


# --- training -------------------------------------------------------------------------------------


def _check(cfg: DDPGConfig) -> None:
    """What each key's own range (checked with the config) does not say."""
    if not cfg.hidden_sizes:
        raise ConfigError(f"hidden_sizes: needs one or more positive widths, got {cfg.hidden_sizes}")
    if cfg.noise not in ("ou", "gaussian"):
        raise ConfigError(f"noise: must be 'ou' or 'gaussian', got {cfg.noise!r}")


def _continuous_env(cfg: DDPGConfig, seed: int):
    """The environment, checked: Box observations, a bounded Box action space."""
    import gymnasium as gym

    env = make_env(cfg.env, seed)
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"env: DDPG/TD3 need a Box action space, {cfg.env} has {env.action_space}")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        env.close()
        raise ConfigError(f"env: DDPG/TD3 need finite action bounds, {cfg.env} has {env.action_space}")
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"env: DDPG/TD3 need a Box observation space, {cfg.env} has {env.observation_space}")
    return env


def _flat(obs) -> np.ndarray:
    return np.asarray(obs, dtype=np.float32).reshape(-1)


def greedy_returns(actor: Actor, env_id: str, episodes: int, seed: int) -> list[float]:
    """Returns of `episodes` episodes acting with mu(s), no noise."""
    env = make_env(env_id, seed)
    out = []
    with torch.no_grad():
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                action = actor(torch.from_numpy(_flat(obs))).numpy()
                obs, reward, terminated, truncated, _ = env.step(action.reshape(env.action_space.shape))
                total += float(reward)
                done = terminated or truncated
            out.append(total)
    env.close()
    return out


def train_ddpg(config) -> ClassicResult:
    """DDPG: one critic, actor and targets updated every step, OU noise by default."""
    return _train(as_config(DDPGConfig, config), "ddpg")


def train_td3(config) -> ClassicResult:
    """TD3: twin critics, target policy smoothing, actor and targets updated every `policy_delay`."""
    return _train(as_config(TD3Config, config), "td3")


def _train(cfg: DDPGConfig, algo: str) -> ClassicResult:
    td3 = algo == "td3"
    _check(cfg)
    n_q = 2 if td3 else 1
    policy_delay = cfg.policy_delay if td3 else 1
    env = _continuous_env(cfg, cfg.seed)
    run = start_run(cfg, algo)
    rng = np.random.default_rng(cfg.seed)

    obs_dim = int(np.prod(env.observation_space.shape))
    act_shape = env.action_space.shape
    act_dim = int(np.prod(act_shape))
    low = env.action_space.low.reshape(-1).astype(np.float64)
    high = env.action_space.high.reshape(-1).astype(np.float64)
    half_range = (high - low) / 2
    low_t, high_t = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
    half_range_t = torch.as_tensor(half_range, dtype=torch.float32)

    actor = Actor(obs_dim, act_dim, cfg.hidden_sizes, low, high)
    critic = Critic(obs_dim, act_dim, cfg.hidden_sizes, n_q)
    actor_target, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
    for p in [*actor_target.parameters(), *critic_target.parameters()]:
        p.requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr, foreach=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, foreach=True)

    buffer = ReplayBuffer(cfg.buffer_size, obs_dim, act_dim, rng)
    if cfg.noise == "ou":
        noise = OUNoise(act_dim, cfg.ou_theta, cfg.noise_sigma, rng)
    else:
        noise = GaussianNoise(act_dim, cfg.noise_sigma, rng)

    obs, _ = env.reset(seed=cfg.seed)
    obs = _flat(obs)
    ep_return, ep_length, updates = 0.0, 0, 0
    critic_loss = actor_loss = q_mean = float("nan")

    for global_step in range(1, cfg.total_steps + 1):
        # act: uniform random until learning_starts, then mu(s) + noise, clipped to the bounds
        if global_step <= cfg.learning_starts:
            action = env.action_space.sample().reshape(-1).astype(np.float64)
        else:
            with torch.no_grad():
                mu = actor(torch.from_numpy(obs)).numpy().astype(np.float64)
            action = np.clip(mu + noise.step() * half_range, low, high)
        env_action = action.reshape(act_shape).astype(env.action_space.dtype)
        next_obs, reward, terminated, truncated, _ = env.step(env_action)
        next_obs = _flat(next_obs)
        # the true s' is stored even at a truncation; only `terminated` stops the bootstrap
        buffer.add(obs, action, reward, next_obs, terminated)
        ep_return += float(reward)
        ep_length += 1
        obs = next_obs
        if terminated or truncated:
            run.episode(global_step, ep_return, ep_length)
            obs, _ = env.reset()
            obs = _flat(obs)
            ep_return, ep_length = 0.0, 0
            noise.reset()

        # learn: one critic update per environment step once the buffer is warm
        if global_step > cfg.learning_starts and buffer.size >= cfg.batch_size:
            b_obs, b_act, b_rew, b_next, b_term = buffer.sample(cfg.batch_size)
            with torch.no_grad():
                next_act = actor_target(b_next)
                if td3:
                    eps = torch.randn_like(next_act) * (cfg.target_noise * half_range_t)
                    clip = cfg.noise_clip * half_range_t
                    next_act = smoothed_target_action(next_act, eps, clip, low_t, high_t)
                y = bootstrap_target(b_rew, b_term, critic_target(b_next, next_act), cfg.gamma)
            q = critic(b_obs, b_act)  # (n_q, batch): each critic regresses on the same y
            loss_q = F.mse_loss(q, y.expand_as(q), reduction="none").mean(dim=1).sum()
            critic_opt.zero_grad()
            loss_q.backward()
            critic_opt.step()
            updates += 1
            critic_loss, q_mean = loss_q.item() / n_q, q.detach().mean().item()

            if updates % policy_delay == 0:
                # the actor ascends Q1(s, mu(s)); gradients go to the actor's parameters only
                loss_pi = -critic.q1(b_obs, actor(b_obs)).mean()
                actor_opt.zero_grad()
                loss_pi.backward(inputs=list(actor.parameters()))
                actor_opt.step()
                actor_loss = loss_pi.item()
                soft_update(actor_target, actor, cfg.tau)
                soft_update(critic_target, critic, cfg.tau)

        if global_step % cfg.log_every == 0 and updates > 0:
            run.log(global_step, critic_loss=critic_loss, actor_loss=actor_loss, q_mean=q_mean)
        run.advance(1)
    env.close()

    actor.eval()
    greedy = greedy_returns(actor, cfg.env, cfg.eval_episodes, cfg.seed + 10_000) if cfg.eval_episodes else []
    extra = {
        "greedy_mean_return": float(np.mean(greedy)) if greedy else float("nan"),
        "greedy_returns": greedy,
        "updates": updates,
    }
    state = {
        "actor": actor.state_dict(),
        "critic": critic.state_dict(),
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "action_low": low,
        "action_high": high,
        "hidden_sizes": list(cfg.hidden_sizes),
        "n_q": n_q,
    }
    return finish_run(run, agent=actor, state=state, extra=extra)
