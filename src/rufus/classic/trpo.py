"""Trust Region Policy Optimization on vectorised gymnasium environments, discrete or continuous actions
(Schulman, Levine, Moritz, Jordan, Abbeel 2015, "Trust Region Policy Optimization", arXiv 1502.05477).

Each iteration collects `num_steps` steps from each of `num_envs` environments with pi_old, then

  1. GAE(gamma, lambda) advantages from the shared `rufus.advantages.gae` (Schulman et al. 2016,
     who pair it with TRPO), whitened over the batch; an episode the time limit cut off is
     bootstrapped with gamma V(its last state) (`bootstrap_truncated`; CartPole's 500-step limit is
     not a failure, and treating it as one unsettles a policy that has learnt to balance);
  2. one natural-gradient step of the policy (`rufus.losses.trpo`), its bound max_kl shrinking
     linearly to 0 over the run (`anneal_max_kl`): g = grad of the surrogate
     L = mean ratio_t A_t at theta_old; x = F^-1 g by `cg_iters` steps of conjugate gradient on
     Fisher-vector products of the mean KL(pi_old || pi_theta) over the batch's states (exact, from
     the stored distributions; `damping` added); the full step sqrt(2 max_kl / x^T F x) x; a
     backtracking line search that keeps the first fraction 1, 1/2, 1/4, ... whose surrogate
     improves and whose mean KL is within `max_kl` (none: the policy stays);
  3. the value function fitted separately: `vf_iters` epochs of Adam on 0.5 (V(s) - R)^2 over
     shuffled minibatches, R = A + V_old (the GAE returns).

Logged per iteration: surrogate_gain and kl of the accepted step, line_search_steps (backtracks;
max_backtracks when none was accepted), step_accepted, cg_iters, value_loss, entropy,
explained_variance; and every episode's return.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import kl_divergence
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from rufus import advantages as adv_fns
from rufus.classic.common import (
    ClassicArgs,
    ClassicResult,
    finish_run,
    make_vec_env,
    start_run,
    vector_episode_stats,
)
from rufus.classic.policy import Policy, policy_returns, spaces, value_net
from rufus.config import ConfigError, as_config, opt
from rufus.losses import ppo as ppo_losses
from rufus.losses import trpo


@dataclass
class TRPOConfig(ClassicArgs):
    env: str = opt("CartPole-v1", "gymnasium environment id (Discrete or Box actions, Box observations)")
    total_steps: int = opt(200_000, "environment steps in all, over every environment (whole rollouts)", ge=1)
    num_envs: int = opt(4, "parallel environments (SyncVectorEnv)", ge=1)
    num_steps: int = opt(512, "steps per environment in each rollout; batch = num_envs * num_steps", ge=1)
    gamma: float = opt(0.99, "discount factor", ge=0, le=1)
    lam: float = opt(0.97, "GAE lambda", ge=0, le=1)
    max_kl: float = opt(0.01, "delta: the bound on the mean KL(pi_old || pi) of a step", gt=0)
    anneal_max_kl: bool = opt(
        True,
        "shrink the bound linearly to 0 over the run, as PPO anneals its learning rate: TRPO steps to "
        "the bound whatever the gradient, so a solved policy would keep drifting by max_kl",
    )
    damping: float = opt(0.1, "added to the Fisher matrix (F + damping I) for a stable solve", ge=0)
    cg_iters: int = opt(10, "conjugate-gradient iterations for x = F^-1 g", ge=1)
    max_backtracks: int = opt(10, "line-search halvings before the step is given up", ge=1)
    vf_lr: float = opt(1e-3, "Adam learning rate of the value function", gt=0)
    vf_iters: int = opt(5, "epochs of value-function fitting per iteration", ge=1)
    vf_minibatches: int = opt(8, "minibatches per value epoch; must divide num_envs * num_steps", ge=1)
    norm_adv: bool = opt(True, "whiten the advantages over the batch")
    hidden: int = opt(64, "width of the two tanh hidden layers of the policy and of the value function", ge=1)
    bootstrap_truncated: bool = opt(
        True,
        "an episode cut off by the time limit (truncated, not terminated) gets gamma V(its last state) "
        "added to its last reward, as if it went on (Pardo et al. 2018, 'Time Limits in RL')",
    )
    normalize_reward: bool = opt(
        False,
        "divide rewards by a running std of the discounted return (gymnasium's NormalizeReward; "
        "for Pendulum's -16..0 rewards); episode returns are logged unscaled",
    )
    eval_episodes: int = opt(5, "greedy episodes run at the end for greedy_mean_return", ge=0)


def check_config(cfg: TRPOConfig) -> None:
    batch = cfg.num_envs * cfg.num_steps
    if batch % cfg.vf_minibatches:
        raise ConfigError(f"vf_minibatches: {cfg.vf_minibatches} does not divide num_envs * num_steps = {batch}")
    if cfg.total_steps < batch:
        raise ConfigError(f"total_steps: {cfg.total_steps} is less than one rollout (num_envs * num_steps = {batch})")


def train_trpo(config) -> ClassicResult:
    cfg = as_config(TRPOConfig, config)
    check_config(cfg)
    run = start_run(cfg, "trpo")
    envs = make_vec_env(cfg.env, cfg.num_envs, cfg.seed)
    if cfg.normalize_reward:  # outside the episode statistics, so the logged returns are the env's own
        import gymnasium as gym

        envs = gym.wrappers.vector.NormalizeReward(envs, gamma=cfg.gamma)
    obs_dim, action_space = spaces(envs, cfg.env, "TRPO")
    value = value_net(obs_dim, cfg.hidden)
    policy = Policy(obs_dim, action_space, cfg.hidden)
    vf_optimizer = torch.optim.Adam(value.parameters(), lr=cfg.vf_lr, eps=1e-5)
    params = [p for p in policy.parameters()]

    N, T = cfg.num_envs, cfg.num_steps
    batch_size = N * T
    num_iterations = cfg.total_steps // batch_size
    act_shape = () if policy.discrete else (policy.act_dim,)
    obs_buf = torch.zeros(T, N, obs_dim)
    actions = torch.zeros(T, N, *act_shape, dtype=torch.long if policy.discrete else torch.float32)
    logprobs, rewards, dones, values = (torch.zeros(T, N) for _ in range(4))
    dist_params = None  # (T, N, k): what fixes pi_old(. | s_t), for the exact KL

    obs_np, _ = envs.reset(seed=cfg.seed)
    next_obs = torch.as_tensor(obs_np, dtype=torch.float32).reshape(N, obs_dim)
    global_step, next_log = 0, cfg.log_every
    for iteration in range(1, num_iterations + 1):
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
                values[t] = value(next_obs).squeeze(-1)
            actions[t] = action
            obs_np, reward, terminated, truncated, infos = envs.step(policy.env_action(action))
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            dones[t] = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
            cut = np.flatnonzero(np.logical_and(truncated, np.logical_not(terminated)))
            if cfg.bootstrap_truncated and len(cut):  # the time limit ended it, not the task
                last = torch.as_tensor(np.stack([infos["final_obs"][i] for i in cut]), dtype=torch.float32)
                with torch.no_grad():
                    rewards[t, cut] += cfg.gamma * value(last.reshape(len(cut), obs_dim)).squeeze(-1)
            next_obs = torch.as_tensor(obs_np, dtype=torch.float32).reshape(N, obs_dim)
            for ret, length in vector_episode_stats(infos):
                run.episode(global_step, ret, length)
            run.advance(N)

        # GAE with the shared function: rows = environments, columns = time steps
        with torch.no_grad():
            bootstrap = value(next_obs).squeeze(-1)
        advantages, returns = adv_fns.gae(
            rewards.T, values.T, torch.ones(N, T), gamma=cfg.gamma, lam=cfg.lam, dones=dones.T, bootstrap=bootstrap
        )
        b_obs = obs_buf.reshape(batch_size, obs_dim)
        b_actions = actions.reshape(batch_size, *act_shape)
        b_logprobs = logprobs.reshape(batch_size)
        b_values = values.reshape(batch_size)
        b_old = dist_params.reshape(batch_size, -1)
        b_adv = advantages.T.reshape(batch_size)
        b_returns = returns.T.reshape(batch_size)
        if cfg.norm_adv:
            b_adv = adv_fns.whiten(b_adv[None], torch.ones(1, batch_size))[0]

        # 2. the natural-gradient step, accepted by the line search
        bound = cfg.max_kl * (1.0 - (iteration - 1) / num_iterations) if cfg.anneal_max_kl else cfg.max_kl
        step = natural_step(cfg, policy, params, b_obs, b_actions, b_logprobs, b_old, b_adv, bound)

        # 3. the value function, fitted on its own
        mb = batch_size // cfg.vf_minibatches
        v_losses = []
        for _ in range(cfg.vf_iters):
            perm = torch.randperm(batch_size)
            for start in range(0, batch_size, mb):
                idx = perm[start : start + mb]
                v_loss = 0.5 * ((value(b_obs[idx]).squeeze(-1) - b_returns[idx]) ** 2).mean()
                vf_optimizer.zero_grad()
                v_loss.backward()
                vf_optimizer.step()
                v_losses.append(v_loss.item())

        if global_step >= next_log or iteration == num_iterations:
            next_log = global_step + cfg.log_every
            with torch.no_grad():
                entropy = policy.dist(b_obs).entropy().mean().item()
            ev = ppo_losses.explained_variance(b_values[None], b_returns[None], torch.ones(1, batch_size))
            run.log(global_step, **step, value_loss=float(np.mean(v_losses)), entropy=entropy, explained_variance=ev)
    envs.close()

    greedy = policy_returns(policy, cfg.env, cfg.seed + 10_000, cfg.eval_episodes)
    state = {"policy": policy.state_dict(), "value": value.state_dict(), "obs_dim": obs_dim, "hidden": cfg.hidden}
    extra = {"greedy_mean_return": float(np.mean(greedy)) if greedy else float("nan"), "greedy_returns": greedy}
    return finish_run(run, agent=nn.ModuleDict({"policy": policy, "value": value}), state=state, extra=extra)


def natural_step(cfg, policy: Policy, params, obs, actions, old_logprobs, old_params, adv, max_kl: float) -> dict:
    """Steps 1-4 of `rufus.losses.trpo` on one batch under the bound `max_kl`; the policy's parameters
    end at the accepted point (or where they were). Returns the step's statistics."""
    old_dist = policy.from_params(old_params)

    def mean_kl() -> torch.Tensor:  # KL(pi_old || pi_theta) averaged over the batch's states
        return kl_divergence(old_dist, policy.dist(obs)).mean()

    def surr() -> torch.Tensor:
        return trpo.surrogate(policy.dist(obs).log_prob(actions), old_logprobs, adv)

    loss = surr()
    g = trpo.flat_grad(loss, params)
    fvp = trpo.fisher_vector_product(mean_kl, params, cfg.damping)
    x, used = trpo.conjugate_gradient(fvp, g, iters=cfg.cg_iters)
    full = trpo.max_step(x, fvp(x), max_kl)
    theta_old = parameters_to_vector(params).detach()

    def evaluate(theta: torch.Tensor) -> tuple[float, float]:
        vector_to_parameters(theta, params)
        with torch.no_grad():
            return surr().item(), mean_kl().item()

    theta, info = trpo.line_search(evaluate, theta_old, full, loss.item(), max_kl, max_backtracks=cfg.max_backtracks)
    vector_to_parameters(theta, params)
    return {
        "surrogate_gain": info["surrogate_gain"],
        "kl": info["kl"],
        "line_search_steps": info["backtracks"],
        "step_accepted": float(info["accepted"]),
        "cg_iters": used,
        "expected_gain": float(g @ full),
        "max_kl": max_kl,
    }
