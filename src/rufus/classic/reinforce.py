"""REINFORCE with a baseline: Monte Carlo policy gradient on one gymnasium environment with
discrete actions (Williams 1992, "Simple Statistical Gradient-Following Algorithms for
Connectionist Reinforcement Learning"; Sutton & Barto 2018, Sec. 13.3-13.4).

Collect `episodes_per_update` whole episodes with the current policy, then take one gradient step on

    L_pi = -(1 / n) sum_{episodes, t} log pi_theta(a_t | s_t) * (G_t - b(s_t))  -  ent_coef * H[pi]
    G_t  = sum_{k >= t} gamma^(k - t) r_k                                       (reward-to-go)

over the n steps of the batch. Using the reward-to-go G_t instead of the whole episode's return,
and subtracting a baseline b that does not depend on the action, keeps the gradient unbiased and
lowers its variance. `baseline`:
    value  b(s_t) = V_phi(s_t), a value network fitted to G_t with 0.5 (V_phi(s_t) - G_t)^2
    mean   b = the mean of G_t over the batch's steps
    none   b = 0 (Williams' plain estimator)
`normalize_advantages` divides G_t - b by its standard deviation over the batch (a step size that
does not grow with the returns; the centring stays the baseline's).

Shared code: G_t is `rufus.advantages.reinforce_pp_returns` (the REINFORCE++ returns of the
language-model trainers, i.e. `gae` with V = 0 and lambda = 1) over the batch's episodes laid out
as padded rows (episode, step) with a mask, and the value baseline's loss is
`rufus.losses.ppo.value_loss` without clipping.
"""

from __future__ import annotations

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
    make_env,
    start_run,
)
from rufus.config import ConfigError, as_config, opt
from rufus.losses import ppo as ppo_losses


@dataclass
class ReinforceConfig(ClassicArgs):
    env: str = opt("CartPole-v1", "gymnasium environment id (Discrete actions, Box observations)")
    total_steps: int = opt(100_000, "environment steps in all (an episode the budget cuts short is dropped)", ge=1)
    episodes_per_update: int = opt(4, "whole episodes collected for each gradient step", ge=1)
    gamma: float = opt(0.99, "discount of the reward-to-go", ge=0, le=1)
    baseline: Literal["value", "mean", "none"] = opt(
        "value", "b(s): value = a learned value network, mean = the batch's mean return-to-go, none = 0"
    )
    normalize_advantages: bool = opt(True, "divide G_t - b by its standard deviation over the batch")
    lr: float = opt(3e-3, "Adam learning rate of the policy", gt=0)
    value_lr: float = opt(1e-2, "Adam learning rate of the value baseline (baseline=value)", gt=0)
    ent_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    hidden: int = opt(64, "width of the two tanh hidden layers of the policy (and value) network", ge=1)
    eval_episodes: int = opt(5, "greedy (argmax) episodes run at the end for greedy_mean_return", ge=0)


def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    """inp -> hidden -> tanh -> hidden -> tanh -> out."""
    return nn.Sequential(
        nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)
    )


def check_config(cfg: ReinforceConfig) -> None:
    """ConfigError naming the key for a value the run cannot use (each key's range is checked with
    the config)."""
    if cfg.baseline not in ("value", "mean", "none"):
        raise ConfigError(f"baseline: {cfg.baseline!r} is not one of value, mean, none")


def env_dims(env, env_id: str) -> tuple[int, int]:
    """(flat observation size, number of actions); ConfigError unless Box observations, Discrete actions."""
    import gymnasium as gym

    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ConfigError(f"env: {env_id} needs a Discrete action space for REINFORCE here, got {env.action_space}")
    if not isinstance(env.observation_space, gym.spaces.Box):
        raise ConfigError(f"env: {env_id} needs a Box observation space, got {env.observation_space}")
    return int(np.prod(env.observation_space.shape)), int(env.action_space.n)


def train_reinforce(config) -> ClassicResult:
    cfg = as_config(ReinforceConfig, config)
    check_config(cfg)
    run = start_run(cfg, "reinforce")
    env = make_env(cfg.env, cfg.seed)
    obs_dim, n_actions = env_dims(env, cfg.env)
    policy = mlp(obs_dim, n_actions, cfg.hidden)
    value = mlp(obs_dim, 1, cfg.hidden) if cfg.baseline == "value" else None
    groups = [{"params": policy.parameters(), "lr": cfg.lr}]
    if value is not None:
        groups.append({"params": value.parameters(), "lr": cfg.value_lr})
    optimizer = torch.optim.Adam(groups)

    global_step, next_log = 0, cfg.log_every
    obs, _ = env.reset(seed=cfg.seed)
    while global_step < cfg.total_steps:
        # 1. collect whole episodes (a budget cut mid-episode drops that episode)
        ep_obs, ep_actions, ep_rewards = [], [], []
        for _ in range(cfg.episodes_per_update):
            o, a, r = [], [], []
            done = False
            while not done and global_step < cfg.total_steps:
                obs_t = torch.as_tensor(obs, dtype=torch.float32).reshape(obs_dim)
                with torch.no_grad():
                    action = int(Categorical(logits=policy(obs_t)).sample())
                obs, reward, terminated, truncated, _ = env.step(action)
                global_step += 1
                run.advance(1)
                o.append(obs_t)
                a.append(action)
                r.append(float(reward))
                done = terminated or truncated
            if not done:
                break
            run.episode(global_step, sum(r), len(r))
            ep_obs.append(torch.stack(o))
            ep_actions.append(torch.tensor(a))
            ep_rewards.append(torch.tensor(r))
            obs, _ = env.reset()
        if not ep_obs:
            break

        # 2. reward-to-go with the shared helper: rows = episodes, padded to the longest, with a mask
        E, L = len(ep_rewards), max(len(r) for r in ep_rewards)
        rewards = torch.zeros(E, L)
        mask = torch.zeros(E, L)
        for i, r in enumerate(ep_rewards):
            rewards[i, : len(r)] = r
            mask[i, : len(r)] = 1.0
        returns = adv_fns.reinforce_pp_returns(rewards, mask, gamma=cfg.gamma)  # (E, L) G_t
        g = returns[mask.bool()]  # (n,) the valid steps, episode after episode
        b_obs, b_actions = torch.cat(ep_obs), torch.cat(ep_actions)

        # 3. one gradient step on the policy (and the value baseline)
        dist = Categorical(logits=policy(b_obs))
        logprobs = dist.log_prob(b_actions)  # (n,)
        entropy = dist.entropy().mean()
        v_loss = torch.zeros(())
        if cfg.baseline == "value":
            v = value(b_obs).squeeze(-1)  # (n,)
            ones = torch.ones(1, len(g))
            v_loss, _ = ppo_losses.value_loss(v[None], v.detach()[None], g[None], ones, clip=None)
            advantages = g - v.detach()
        elif cfg.baseline == "mean":
            advantages = g - g.mean()
        else:
            advantages = g
        if cfg.normalize_advantages and len(advantages) > 1:
            advantages = advantages / (advantages.std() + 1e-8)
        pg_loss = -(logprobs * advantages).mean()
        loss = pg_loss - cfg.ent_coef * entropy + v_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        if global_step >= next_log or global_step >= cfg.total_steps:
            next_log = global_step + cfg.log_every
            run.log(
                global_step,
                policy_loss=pg_loss.item(),
                value_loss=v_loss.item(),
                entropy=entropy.item(),
                batch_return=float(np.mean([r.sum().item() for r in ep_rewards])),
            )
    env.close()

    greedy = greedy_returns(policy, cfg.env, cfg.seed + 10_000, cfg.eval_episodes)
    state = {
        "policy": policy.state_dict(),
        "value": value.state_dict() if value is not None else None,
        "obs_dim": obs_dim,
        "n_actions": n_actions,
        "hidden": cfg.hidden,
        "baseline": cfg.baseline,
    }
    agent = nn.ModuleDict({"policy": policy, **({"value": value} if value is not None else {})})
    extra = {"greedy_mean_return": float(np.mean(greedy)) if greedy else float("nan"), "greedy_returns": greedy}
    return finish_run(run, agent=agent, state=state, extra=extra)
