"""Advantage actor-critic (A2C): the synchronous version of A3C (Mnih et al. 2016, "Asynchronous
Methods for Deep Reinforcement Learning"), on vectorised gymnasium environments with discrete
actions. The defaults are those of Stable-Baselines3's A2C (RMSprop, 8 environments, 5 steps).

Each update collects `n_steps` steps from each of `num_envs` environments, then takes one gradient
step on

    L = -(1 / n) sum_t log pi_theta(a_t | s_t) A_t  -  ent_coef * H[pi_theta]  +  vf_coef * L_V
    L_V = (1 / n) sum_t 0.5 (V(s_t) - R_t)^2

with the n-step return and advantage (Mnih et al. 2016, Algorithm S3)

    R_t = r_t + gamma r_{t+1} + ... + gamma^(k-1) r_{t+k-1} + gamma^k V(s_{t+k}),   A_t = R_t - V(s_t)

where t + k is the end of the segment (bootstrapped with V of the next state) or of the episode
(no bootstrap). That is GAE with lambda = 1, so R_t and A_t come from the shared
`rufus.advantages.gae` (rows = environments, columns = time steps, `dones` where an episode ended,
`bootstrap` = V after the segment); `gae_lambda` < 1 gives GAE-weighted advantages instead. The value
loss is the shared `rufus.losses.ppo.value_loss` without clipping. As in CleanRL's PPO, an episode cut
off by the time limit counts as terminated (not bootstrapped).

Actor and critic are separate 64-64 tanh MLPs with orthogonal initialisation, trained by one
optimiser (RMSprop with alpha 0.99, eps 1e-5, as SB3; or Adam) with global gradient clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from rufus import advantages as adv_fns
from rufus.classic.common import (
    ClassicArgs,
    ClassicResult,
    finish_run,
    greedy_returns,
    make_vec_env,
    start_run,
    vector_episode_stats,
)
from rufus.config import ConfigError, as_config, opt
from rufus.losses import ppo as ppo_losses


@dataclass
class A2CConfig(ClassicArgs):
    env: str = opt("CartPole-v1", "gymnasium environment id (Discrete actions, Box observations)")
    total_steps: int = opt(
        200_000, "environment steps in all, over every environment (whole updates: rounded down)", ge=1
    )
    num_envs: int = opt(8, "parallel environments (SyncVectorEnv)", ge=1)
    n_steps: int = opt(5, "steps per environment between updates (the n of the n-step return)", ge=1)
    gamma: float = opt(0.99, "discount factor", ge=0, le=1)
    gae_lambda: float = opt(1.0, "GAE lambda; 1 = the plain n-step advantage of A2C", ge=0, le=1)
    optimizer: Literal["rmsprop", "adam"] = opt("rmsprop", "rmsprop (alpha 0.99, eps 1e-5) or adam (eps 1e-5)")
    lr: float = opt(7e-4, "learning rate", gt=0)
    anneal_lr: bool = opt(False, "anneal the learning rate linearly to 0 over the run")
    ent_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    vf_coef: float = opt(0.5, "value loss coefficient", ge=0)
    max_grad_norm: float = opt(0.5, "global gradient norm clip", gt=0)
    normalize_advantages: bool = opt(False, "whiten the advantages of each update's batch")
    hidden: int = opt(64, "width of the two tanh hidden layers of the actor and of the critic", ge=1)
    eval_episodes: int = opt(5, "greedy (argmax) episodes run at the end for greedy_mean_return", ge=0)


def layer_init(layer: nn.Linear, std: float = math.sqrt(2)) -> nn.Linear:
    """Orthogonal weights with gain `std`, zero bias."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs: obs -> hidden -> tanh -> hidden -> tanh -> logits / V(s)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, n_actions), std=0.01),
        )

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s), (N,)."""
        return self.critic(obs).squeeze(-1)

    def dist(self, obs: torch.Tensor) -> Categorical:
        """pi(. | s) over the discrete actions."""
        return Categorical(logits=self.actor(obs))


def check_config(cfg: A2CConfig) -> None:
    """ConfigError naming the key for values the run cannot use together (each key's own range is
    checked with the config)."""
    if cfg.total_steps < cfg.num_envs * cfg.n_steps:
        raise ConfigError(
            f"total_steps: {cfg.total_steps} is less than one update "
            f"(num_envs * n_steps = {cfg.num_envs * cfg.n_steps})"
        )
    if cfg.optimizer not in ("rmsprop", "adam"):
        raise ConfigError(f"optimizer: {cfg.optimizer!r} is not one of rmsprop, adam")


def env_dims(env, env_id: str) -> tuple[int, int]:
    """(flat observation size, number of actions); ConfigError unless Box observations, Discrete actions."""
    import gymnasium as gym

    obs_space, act_space = env.single_observation_space, env.single_action_space
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(f"env: {env_id} needs a Discrete action space for A2C here, got {act_space}")
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError(f"env: {env_id} needs a Box observation space, got {obs_space}")
    return int(np.prod(obs_space.shape)), int(act_space.n)


def train_a2c(config) -> ClassicResult:
    cfg = as_config(A2CConfig, config)
    check_config(cfg)
    run = start_run(cfg, "a2c")
    envs = make_vec_env(cfg.env, cfg.num_envs, cfg.seed)
    obs_dim, n_actions = env_dims(envs, cfg.env)
    agent = ActorCritic(obs_dim, n_actions, cfg.hidden)
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(agent.parameters(), lr=cfg.lr, alpha=0.99, eps=1e-5)
    else:
        optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)

    N, T = cfg.num_envs, cfg.n_steps
    batch_size = N * T
    num_updates = cfg.total_steps // batch_size
    obs_buf = torch.zeros(T, N, obs_dim)  # (time, environment)
    actions = torch.zeros(T, N, dtype=torch.long)
    rewards = torch.zeros(T, N)
    dones = torch.zeros(T, N)
    mask = torch.ones(N, T)

    obs_np, _ = envs.reset(seed=cfg.seed)
    next_obs = torch.as_tensor(obs_np, dtype=torch.float32).reshape(N, obs_dim)
    global_step, next_log = 0, cfg.log_every
    for update in range(1, num_updates + 1):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1.0 - (update - 1) / num_updates)

        # 1. n_steps from every environment with the current policy
        for t in range(T):
            global_step += N
            obs_buf[t] = next_obs
            with torch.no_grad():
                actions[t] = agent.dist(next_obs).sample()
            obs_np, reward, terminated, truncated, infos = envs.step(actions[t].numpy())
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            dones[t] = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
            next_obs = torch.as_tensor(obs_np, dtype=torch.float32).reshape(N, obs_dim)
            for ret, length in vector_episode_stats(infos):
                run.episode(global_step, ret, length)
            run.advance(N)

        # 2. evaluate the segment, then n-step returns / advantages with the shared gae (lambda = 1)
        b_obs = obs_buf.reshape(batch_size, obs_dim)
        dist = agent.dist(b_obs)
        logprobs = dist.log_prob(actions.reshape(batch_size)).reshape(T, N)
        entropy = dist.entropy().mean()
        values = agent.value(b_obs).reshape(T, N)
        with torch.no_grad():
            bootstrap = agent.value(next_obs)  # (N,)
        advantages, returns = adv_fns.gae(
            rewards.T, values.detach().T, mask, gamma=cfg.gamma, lam=cfg.gae_lambda, dones=dones.T, bootstrap=bootstrap
        )  # each (N, T)
        if cfg.normalize_advantages:
            advantages = adv_fns.whiten(advantages, mask)

        # 3. one gradient step on actor and critic
        pg_loss = -(logprobs.T * advantages).mean()
        v_loss, _ = ppo_losses.value_loss(values.T, values.detach().T, returns, mask, clip=None)
        loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
        optimizer.step()

        if global_step >= next_log or update == num_updates:
            next_log = global_step + cfg.log_every
            ev = ppo_losses.explained_variance(values.detach().T, returns, mask)
            run.log(
                global_step,
                policy_loss=pg_loss.item(),
                value_loss=v_loss.item(),
                entropy=entropy.item(),
                explained_variance=ev,
                lr=optimizer.param_groups[0]["lr"],
            )
    envs.close()

    greedy = greedy_returns(agent.actor, cfg.env, cfg.seed + 10_000, cfg.eval_episodes)
    state = {
        "actor": agent.actor.state_dict(),
        "critic": agent.critic.state_dict(),
        "obs_dim": obs_dim,
        "n_actions": n_actions,
        "hidden": cfg.hidden,
    }
    extra = {"greedy_mean_return": float(np.mean(greedy)) if greedy else float("nan"), "greedy_returns": greedy}
    return finish_run(run, agent=agent, state=state, extra=extra)
