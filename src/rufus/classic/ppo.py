"""Proximal Policy Optimization on vectorised gymnasium environments, with discrete actions
(Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; the settings are those of
Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization", for CartPole).

Each iteration collects `num_steps` steps from each of `num_envs` environments with the current
policy pi_old, then takes `update_epochs` passes over the batch in `num_minibatches` shuffled
minibatches, minimising

    L = L_clip - ent_coef * H[pi_theta] + vf_coef * L_V

    L_clip = mean_t max(-A_t r_t, -A_t clip(r_t, 1 - clip_coef, 1 + clip_coef)),
             r_t = pi_theta(a_t | s_t) / pi_old(a_t | s_t)                     (paper, eq. 7)
    L_V    = mean_t 0.5 max((V(s_t) - R_t)^2, (V_old(s_t) + clip(V(s_t) - V_old(s_t), -c, c) - R_t)^2)

A_t and R_t = A_t + V_old(s_t) come from GAE(gamma, lambda) (Schulman et al. 2016), A_t whitened per
minibatch. With `objective=kl_penalty` the policy term is the paper's other surrogate (Sec. 4, eq. 8),

    L_KLPEN = mean_t [-r_t A_t + beta KL(pi_old(. | s_t) || pi_theta(. | s_t))]

with the exact KL of the two action distributions (`rufus.losses.ppo.kl_penalty_policy_loss`), and
after each iteration's epochs beta doubles when the batch's mean KL exceeds 1.5 kl_target and halves
below kl_target / 1.5 (`rufus.kl_control.adapt_penalty`). Discrete actions sample a categorical,
Box actions a diagonal Gaussian with a state-independent log sigma (`rufus.classic.policy`).

The point of this file is that the update is the language-model trainer's: the losses are
`rufus.losses.ppo.policy_loss` and `value_loss`, and the advantages `rufus.advantages.gae` (rows =
environments, columns = time steps, `dones` where an episode ended, `bootstrap` = V of the state
after the segment), applied to a minibatch laid out as one "sequence" (1, N) with a mask of ones.
So CartPole reaching 500 checks the same code that trains the language models.

The 37 details used here: vectorised environments (1), orthogonal initialisation with gain sqrt(2)
on the hidden layers, 0.01 on the policy head and 1 on the value head (2), Adam with eps 1e-5 (3),
linear learning-rate annealing (4), GAE (5), shuffled minibatches (6), advantage normalisation per
minibatch (7), the clipped surrogate (8), value clipping (9), the entropy bonus (10), global gradient
clipping at 0.5 (11), approx_kl and clipfrac as diagnostics (12), separate actor and critic 64-64
tanh networks (13). As in CleanRL, an episode cut off by the time limit counts as terminated (its
value is not bootstrapped), which detail 5 discusses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import kl_divergence

from rufus import advantages as adv_fns  # looked up at call time (tests can spy on them)
from rufus.classic.common import (
    ClassicArgs,
    ClassicResult,
    finish_run,
    make_vec_env,
    start_run,
    vector_episode_stats,
)
from rufus.classic.policy import Policy, layer_init, policy_returns, spaces, value_net  # noqa: F401 (layer_init: API)
from rufus.config import ConfigError, as_config, opt
from rufus.kl_control import PenaltyController
from rufus.losses import ppo as ppo_losses


@dataclass
class PPOConfig(ClassicArgs):
    env: str = opt("CartPole-v1", "gymnasium environment id (Discrete actions, Box observations)")
    total_steps: int = opt(
        500_000, "environment steps in all, over every environment (whole rollouts: rounded down)", ge=1
    )
    num_envs: int = opt(4, "parallel environments (SyncVectorEnv)", ge=1)
    num_steps: int = opt(128, "steps per environment in each rollout; batch = num_envs * num_steps", ge=1)
    num_minibatches: int = opt(4, "minibatches per epoch; must divide num_envs * num_steps", ge=1)
    update_epochs: int = opt(4, "passes over each rollout batch", ge=1)
    lr: float = opt(2.5e-4, "Adam learning rate (eps 1e-5)", gt=0)
    anneal_lr: bool = opt(True, "anneal the learning rate linearly to 0 over the run")
    gamma: float = opt(0.99, "discount factor", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    clip_coef: float = opt(0.2, "surrogate clip range epsilon (also the value clip range)", gt=0)
    clip_vloss: bool = opt(True, "clip the value loss around the rollout's values")
    norm_adv: bool = opt(True, "whiten the advantages of each minibatch")
    ent_coef: float = opt(0.01, "entropy bonus coefficient", ge=0)
    vf_coef: float = opt(0.5, "value loss coefficient", ge=0)
    max_grad_norm: float = opt(0.5, "global gradient norm clip", gt=0)
    target_kl: float | None = opt(None, "stop an iteration's epochs once approx_kl exceeds this (None: never)", gt=0)
    hidden: int = opt(64, "width of the two tanh hidden layers of the actor and of the critic", ge=1)
    normalize_reward: bool = opt(
        False,
        "divide rewards by a running std of the discounted return (gymnasium's NormalizeReward; "
        "for Pendulum's -16..0 rewards); episode returns are logged unscaled",
    )
    eval_episodes: int = opt(5, "greedy (argmax / mean action) episodes run at the end for greedy_mean_return", ge=0)
    objective: Literal["clip", "kl_penalty"] = opt(
        "clip", "clip = the clipped surrogate (eq. 7); kl_penalty = ratio * A - beta * KL(pi_old, pi) (Sec. 4)"
    )
    kl_target: float = opt(0.01, "kl_penalty: the KL per update beta steers toward (the paper's d_targ)", gt=0)
    kl_beta: float = opt(1.0, "kl_penalty: beta's starting value", gt=0)
    kl_factor: float = opt(
        2.0, "kl_penalty: beta is multiplied or divided by this outside [target/1.5, target*1.5]", gt=1
    )


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs: obs -> 64 -> tanh -> 64 -> tanh -> logits (or a Gaussian's
    mean) / V(s). `action_space`: a gymnasium space, or an int n for Discrete(n)."""

    def __init__(self, obs_dim: int, action_space, hidden: int = 64):
        super().__init__()
        if isinstance(action_space, int):
            import gymnasium as gym

            action_space = gym.spaces.Discrete(action_space)
        self.critic = value_net(obs_dim, hidden)
        self.actor = Policy(obs_dim, action_space, hidden)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s), (N,)."""
        return self.critic(obs).squeeze(-1)

    def dist(self, obs: torch.Tensor):
        """pi(. | s): categorical over discrete actions, or a diagonal Gaussian."""
        return self.actor.dist(obs)


def check_config(cfg: PPOConfig) -> None:
    """ConfigError naming the key for values the run cannot use together (each key's own range is
    checked with the config)."""
    batch = cfg.num_envs * cfg.num_steps
    if batch % cfg.num_minibatches:
        raise ConfigError(
            f"num_minibatches: {cfg.num_minibatches} does not divide the batch num_envs * num_steps = {batch}"
        )
    if cfg.total_steps < batch:
        raise ConfigError(f"total_steps: {cfg.total_steps} is less than one rollout (num_envs * num_steps = {batch})")


def train_ppo(config) -> ClassicResult:
    cfg = as_config(PPOConfig, config)
    check_config(cfg)
    run = start_run(cfg, "ppo")
    envs = make_vec_env(cfg.env, cfg.num_envs, cfg.seed)
    if cfg.normalize_reward:  # outside the episode statistics, so the logged returns are the env's own
        import gymnasium as gym

        envs = gym.wrappers.vector.NormalizeReward(envs, gamma=cfg.gamma)
    obs_dim, action_space = spaces(envs, cfg.env, "PPO")
    agent = ActorCritic(obs_dim, action_space, cfg.hidden)
    policy = agent.actor
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    penalty = PenaltyController(cfg.kl_beta, cfg.kl_target, cfg.kl_factor) if cfg.objective == "kl_penalty" else None

    N, T = cfg.num_envs, cfg.num_steps
    batch_size = N * T
    minibatch_size = batch_size // cfg.num_minibatches
    num_iterations = cfg.total_steps // batch_size
    # rollout storage, (T, N): time steps by environments
    act_shape = () if policy.discrete else (policy.act_dim,)
    obs_buf = torch.zeros(T, N, obs_dim)
    actions = torch.zeros(T, N, *act_shape, dtype=torch.long if policy.discrete else torch.float32)
    dist_params = None  # (T, N, k): what fixes pi_old(. | s_t) (the penalty's exact KL)
    logprobs = torch.zeros(T, N)
    rewards = torch.zeros(T, N)
    dones = torch.zeros(T, N)
    values = torch.zeros(T, N)
    mb_mask = torch.ones(1, minibatch_size)  # a minibatch is one "sequence" of minibatch_size valid steps

    obs_np, _ = envs.reset(seed=cfg.seed)
    next_obs = torch.as_tensor(obs_np, dtype=torch.float32).reshape(N, obs_dim)
    global_step, next_log = 0, cfg.log_every
    for iteration in range(1, num_iterations + 1):
        if cfg.anneal_lr:  # detail 4: lr goes linearly from cfg.lr to 0 over the iterations
            optimizer.param_groups[0]["lr"] = cfg.lr * (1.0 - (iteration - 1) / num_iterations)

        # 1. rollout with pi_old
        for t in range(T):
            global_step += N
            obs_buf[t] = next_obs
            with torch.no_grad():
                p = policy.params(next_obs)
                if dist_params is None:
                    dist_params = torch.zeros(T, N, p.shape[-1])
                dist_params[t] = p
                dist = policy.from_params(p)
                action = dist.sample()
                logprobs[t] = dist.log_prob(action)
                values[t] = agent.value(next_obs)
            actions[t] = action
            obs_np, reward, terminated, truncated, infos = envs.step(policy.env_action(action))
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            dones[t] = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
            next_obs = torch.as_tensor(obs_np, dtype=torch.float32).reshape(N, obs_dim)
            for ret, length in vector_episode_stats(infos):
                run.episode(global_step, ret, length)
            run.advance(N)

        # 2. GAE with the shared function: rows = environments, columns = time steps
        with torch.no_grad():
            bootstrap = agent.value(next_obs)  # (N,) V of the state after the segment
        advantages, returns = adv_fns.gae(
            rewards.T, values.T, torch.ones(N, T), gamma=cfg.gamma, lam=cfg.lam, dones=dones.T, bootstrap=bootstrap
        )  # each (N, T)

        # flatten the batch, in (time, environment) order
        b_obs = obs_buf.reshape(batch_size, obs_dim)
        b_actions = actions.reshape(batch_size, *act_shape)
        b_old = dist_params.reshape(batch_size, -1)
        b_logprobs = logprobs.reshape(batch_size)
        b_values = values.reshape(batch_size)
        b_advantages = advantages.T.reshape(batch_size)
        b_returns = returns.T.reshape(batch_size)

        # 3. update_epochs passes of shuffled minibatches through the shared PPO losses
        stats = {
            "policy_loss": [],
            "value_loss": [],
            "entropy": [],
            "approx_kl": [],
            "clipfrac": [],
            "value_clipfrac": [],
        }
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(batch_size)
            for start in range(0, batch_size, minibatch_size):
                idx = perm[start : start + minibatch_size]
                dist = agent.dist(b_obs[idx])
                new_logprobs = dist.log_prob(b_actions[idx])
                entropy = dist.entropy().mean()
                new_values = agent.value(b_obs[idx])
                mb_adv = b_advantages[idx][None]  # (1, M)
                if cfg.norm_adv:  # detail 7
                    mb_adv = adv_fns.whiten(mb_adv, mb_mask)
                if penalty is None:
                    pg_loss, pg_stats = ppo_losses.policy_loss(
                        new_logprobs[None],
                        b_logprobs[idx][None],
                        mb_adv,
                        mb_mask,
                        clip=cfg.clip_coef,
                        aggregation="token",
                    )
                else:  # Sec. 4: the exact KL of the two action distributions at each state
                    kl = kl_divergence(policy.from_params(b_old[idx]), dist)
                    pg_loss, pg_stats = ppo_losses.kl_penalty_policy_loss(
                        new_logprobs[None],
                        b_logprobs[idx][None],
                        mb_adv,
                        mb_mask,
                        beta=penalty.value,
                        kl=kl[None],
                        aggregation="token",
                    )
                v_loss, v_stats = ppo_losses.value_loss(
                    new_values[None],
                    b_values[idx][None],
                    b_returns[idx][None],
                    mb_mask,
                    clip=cfg.clip_coef if cfg.clip_vloss else None,
                    aggregation="token",
                )
                loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()

                stats["policy_loss"].append(pg_loss.item())
                stats["value_loss"].append(v_loss.item())
                stats["entropy"].append(entropy.item())
                stats["approx_kl"].append(pg_stats["approx_kl"].item())
                stats["clipfrac"].append(pg_stats["clipfrac"].item())
                stats["value_clipfrac"].append(v_stats["clipfrac"].item())
            if cfg.target_kl is not None and stats["approx_kl"][-1] > cfg.target_kl:
                break
        extra = {}
        if penalty is not None:  # beta for the next iteration, from this update's mean KL(pi_old || pi)
            with torch.no_grad():
                measured = kl_divergence(policy.from_params(b_old), policy.dist(b_obs)).mean().item()
            extra = {"kl_beta": penalty.value, "kl": measured}
            penalty.update(measured)

        if global_step >= next_log or iteration == num_iterations:
            next_log = global_step + cfg.log_every
            ev = ppo_losses.explained_variance(b_values[None], b_returns[None], torch.ones(1, batch_size))
            run.log(
                global_step,
                **{k: float(np.mean(v)) for k, v in stats.items()},
                explained_variance=ev,
                lr=optimizer.param_groups[0]["lr"],
                **extra,
            )
    envs.close()

    greedy = policy_returns(policy, cfg.env, cfg.seed + 10_000, cfg.eval_episodes)
    state = {
        "actor": agent.actor.state_dict(),
        "critic": agent.critic.state_dict(),
        "obs_dim": obs_dim,
        "hidden": cfg.hidden,
        **({"n_actions": policy.act_dim} if policy.discrete else {"action_dim": policy.act_dim}),
    }
    extra = {"greedy_mean_return": float(np.mean(greedy)) if greedy else float("nan"), "greedy_returns": greedy}
    return finish_run(run, agent=agent, state=state, extra=extra)
