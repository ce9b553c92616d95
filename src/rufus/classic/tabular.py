"""Tabular reinforcement learning: Q-learning, SARSA, and Monte Carlo vs TD(0) prediction.

Equation numbers are those of Sutton & Barto, *Reinforcement Learning: An Introduction*, 2nd ed. (2018).

Control (learn Q(s, a) and act epsilon-greedily on it) on gymnasium's toy-text environments, whose
observations and actions are both `Discrete` (FrozenLake-v1, FrozenLake8x8-v1, CliffWalking-v1,
Taxi-v4; Taxi-v3 and CliffWalking-v0 are deprecated in gymnasium 1.x):

    SARSA (on-policy, eq. 6.7)       Q(S,A) <- Q(S,A) + alpha * [R + gamma * Q(S',A') - Q(S,A)]
    Q-learning (off-policy, eq. 6.8) Q(S,A) <- Q(S,A) + alpha * [R + gamma * max_a Q(S',a) - Q(S,A)]

where A' is the action the epsilon-greedy policy actually takes next. Only *termination* stops the
bootstrap (Q of a terminal state is 0); an episode cut by a time limit (`truncated`) still
bootstraps from S'. Epsilon falls linearly from `epsilon_start` to `epsilon_end` over the first
`exploration_fraction * total_steps` steps, then stays; set the two equal for a constant epsilon
(CliffWalking's Example 6.6 uses a constant 0.1). Greedy choices break ties uniformly at random
while learning (the table starts at zero, and "always the first action" would walk FrozenLake's
agent into the same wall for ever); the final greedy policy breaks them by lowest action index.

Prediction (estimate V_pi of the uniform random policy, sections 6.1-6.2, Example 6.2):

    constant-alpha MC (eq. 6.1)      V(S_t) <- V(S_t) + alpha * [G_t - V(S_t)]           every visit
    TD(0) (eq. 6.2)                  V(S_t) <- V(S_t) + alpha * [R_{t+1} + gamma * V(S_{t+1}) - V(S_t)]

on any environment above or on the random walk of Example 6.2 (`env=RandomWalk-5`, or
`RandomWalk-<n>` for n states), built here as a small gymnasium.Env. The true values come from
solving the Bellman equation (4.4) of the random policy with the environment's model `P`
(1/6 ... 5/6 on RandomWalk-5), and each episode logs the RMS error of the estimate against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch

from rufus.classic.common import ClassicArgs, ClassicResult, finish_run, make_env, start_run
from rufus.config import ConfigError, as_config, opt

# --- configs --------------------------------------------------------------------------------------


@dataclass
class TabularConfig(ClassicArgs):
    """Keys of `q_learning` and `sarsa` (the same set for both)."""

    env: str = opt("FrozenLake-v1", "gymnasium environment id with Discrete observations and actions")
    total_steps: int = opt(150_000, "environment steps in all (enough for slippery FrozenLake at alpha 0.03)", ge=1)
    alpha: float = opt(
        0.03, "step size of the update (small: larger ones leave FrozenLake's near-tied actions noisy)", gt=0, le=1
    )
    gamma: float = opt(0.99, "discount factor", ge=0, le=1)
    epsilon_start: float = opt(1.0, "exploration rate at step 0", ge=0, le=1)
    epsilon_end: float = opt(
        0.05, "exploration rate after the decay (equal to epsilon_start: constant epsilon)", ge=0, le=1
    )
    exploration_fraction: float = opt(0.5, "fraction of total_steps over which epsilon falls linearly", gt=0, le=1)
    slippery: bool | None = opt(None, "is_slippery of FrozenLake / CliffWalking (None: the env's default)")
    eval_episodes: int = opt(1000, "greedy episodes at the end for extra['greedy_success_rate'] (0 = none)", ge=0)


@dataclass
class PredictionConfig(ClassicArgs):
    """Keys of `td_prediction`: estimate V of the uniform random policy by TD(0) or constant-alpha MC."""

    env: str = opt("RandomWalk-5", "RandomWalk-<n> (S&B Example 6.2) or a gymnasium id with Discrete spaces")
    total_steps: int = opt(100_000, "at most this many environment steps (the run stops at `episodes` first)", ge=1)
    method: Literal["td0", "mc"] = opt("td0", "td0 = TD(0), eq. 6.2; mc = every-visit constant-alpha MC, eq. 6.1")
    alpha: float = opt(0.1, "constant step size", gt=0, le=1)
    gamma: float = opt(1.0, "discount factor", ge=0, le=1)
    episodes: int = opt(100, "episodes to run", ge=1)
    v_init: float = opt(0.5, "initial value of every non-terminal state (Example 6.2 uses 0.5)")
    slippery: bool | None = opt(None, "is_slippery of FrozenLake / CliffWalking (None: the env's default)")
    log_every: int = opt(1, "environment steps between rows of RMS error (a row at most once per episode)", ge=1)


# --- the random walk of Example 6.2 ---------------------------------------------------------------


class RandomWalkEnv(gym.Env):
    """States 0 .. n+1 in a row; 0 and n+1 are terminal, the walk starts in the middle.

    Action 0 moves left, 1 moves right; the uniform random policy makes it S&B's random walk
    (A..E are states 1..5 when n = 5). Reward +1 on entering the right end, else 0, so with gamma = 1
    the true value of state i is i / (n + 1). `P` is the model in gymnasium's toy-text form:
    P[s][a] = [(probability, next state, reward, terminated)].
    """

    metadata = {"render_modes": []}

    def __init__(self, n: int = 5):
        if n < 1 or n % 2 == 0:
            raise ValueError(f"RandomWalk needs an odd number of states, got {n}")
        self.n = n
        self.observation_space = gym.spaces.Discrete(n + 2)
        self.action_space = gym.spaces.Discrete(2)
        self.P = {
            s: {
                a: [
                    (
                        1.0,
                        s + (1 if a else -1),
                        float(s + (1 if a else -1) == n + 1),
                        s + (1 if a else -1) in (0, n + 1),
                    )
                ]
                for a in (0, 1)
            }
            for s in range(1, n + 1)
        }
        for end in (0, n + 1):
            self.P[end] = {a: [(1.0, end, 0.0, True)] for a in (0, 1)}
        self.s = (n + 1) // 2

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = (self.n + 1) // 2
        return self.s, {}

    def step(self, action):
        _, self.s, reward, terminated = self.P[self.s][int(action)][0]
        return self.s, reward, terminated, False, {}


def make_tabular_env(env_id: str, seed: int, slippery: bool | None = None) -> gym.Env:
    """RandomWalk-<n>, or a gymnasium env checked to have Discrete observations and actions."""
    m = re.fullmatch(r"RandomWalk-(\d+)", env_id)
    if m:
        try:
            env = RandomWalkEnv(int(m.group(1)))
        except ValueError as e:
            raise ConfigError(f"env: {e}") from None
        env.action_space.seed(seed)
    else:
        kwargs = {} if slippery is None else {"is_slippery": slippery}
        try:
            env = make_env(env_id, seed, **kwargs)
        except TypeError as e:
            raise ConfigError(f"slippery: {env_id} takes no is_slippery ({e})") from None
    if not isinstance(env.observation_space, gym.spaces.Discrete):
        raise ConfigError(f"env: tabular agents need a Discrete observation space, got {env.observation_space}")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ConfigError(f"env: tabular agents need a Discrete action space, got {env.action_space}")
    return env


# --- control: SARSA and Q-learning ----------------------------------------------------------------


def q_learning_update(
    q: np.ndarray, s: int, a: int, r: float, s_next: int, terminated: bool, alpha: float, gamma: float
) -> float:
    """Q(S,A) <- Q(S,A) + alpha * [R + gamma * max_a Q(S',a) - Q(S,A)]   (S&B eq. 6.8). Returns the TD error."""
    target = r + (0.0 if terminated else gamma * q[s_next].max())
    delta = target - q[s, a]
    q[s, a] += alpha * delta
    return float(delta)


def sarsa_update(
    q: np.ndarray, s: int, a: int, r: float, s_next: int, a_next: int, terminated: bool, alpha: float, gamma: float
) -> float:
    """Q(S,A) <- Q(S,A) + alpha * [R + gamma * Q(S',A') - Q(S,A)]   (S&B eq. 6.7). Returns the TD error."""
    target = r + (0.0 if terminated else gamma * q[s_next, a_next])
    delta = target - q[s, a]
    q[s, a] += alpha * delta
    return float(delta)


def epsilon_greedy(q_row: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
    """A uniformly random action with probability epsilon, else a greedy one (ties broken at random)."""
    if rng.random() < epsilon:
        return int(rng.integers(len(q_row)))
    best = np.flatnonzero(q_row == q_row.max())
    return int(best[0] if len(best) == 1 else best[rng.integers(len(best))])


def linear_epsilon(step: int, cfg: TabularConfig) -> float:
    """epsilon_start -> epsilon_end linearly over exploration_fraction * total_steps, then flat."""
    frac = min(1.0, step / max(1.0, cfg.exploration_fraction * cfg.total_steps))
    return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


def train_q_learning(config) -> ClassicResult:
    """Tabular Q-learning, off-policy TD control (S&B section 6.5, eq. 6.8):

        Q(S,A) <- Q(S,A) + alpha * [R + gamma * max_a Q(S',a) - Q(S,A)]

    The target values S' by its best action whatever the behaviour does next, so Q approaches q*
    (the greedy policy's values) while the agent explores epsilon-greedily.
    """
    return _train_control(as_config(TabularConfig, config), "q_learning")


def train_sarsa(config) -> ClassicResult:
    """Tabular SARSA, on-policy TD control (S&B section 6.4, eq. 6.7):

        Q(S,A) <- Q(S,A) + alpha * [R + gamma * Q(S',A') - Q(S,A)],   A' ~ epsilon-greedy(Q(S', .))

    The target uses the action actually taken next, so Q approaches the values of the
    epsilon-greedy policy itself, exploration's mistakes included (Example 6.6: the safe path).
    """
    return _train_control(as_config(TabularConfig, config), "sarsa")


def _train_control(cfg: TabularConfig, algo: str) -> ClassicResult:
    """The loop both control algorithms share; they differ only in the update and when A' is chosen."""
    env = make_tabular_env(cfg.env, cfg.seed, cfg.slippery)
    run = start_run(cfg, algo)
    rng = np.random.default_rng(cfg.seed)
    q = np.zeros((env.observation_space.n, env.action_space.n))

    obs, _ = env.reset(seed=cfg.seed)
    epsilon = linear_epsilon(0, cfg)
    action = epsilon_greedy(q[obs], epsilon, rng)
    ep_return, ep_length, abs_td = 0.0, 0, []
    for global_step in range(1, cfg.total_steps + 1):
        next_obs, reward, terminated, truncated, _ = env.step(action)
        ep_return, ep_length = ep_return + float(reward), ep_length + 1
        epsilon = linear_epsilon(global_step, cfg)
        if algo == "sarsa":  # choose A' first: the target uses it, and the agent then takes it
            next_action = epsilon_greedy(q[next_obs], epsilon, rng)
            delta = sarsa_update(q, obs, action, reward, next_obs, next_action, terminated, cfg.alpha, cfg.gamma)
        else:  # update first, then choose the next action from the updated table
            delta = q_learning_update(q, obs, action, reward, next_obs, terminated, cfg.alpha, cfg.gamma)
            next_action = epsilon_greedy(q[next_obs], epsilon, rng)
        abs_td.append(abs(delta))

        if terminated or truncated:
            run.episode(global_step, ep_return, ep_length)
            ep_return, ep_length = 0.0, 0
            next_obs, _ = env.reset()
            next_action = epsilon_greedy(q[next_obs], epsilon, rng)
        obs, action = next_obs, next_action
        if global_step % cfg.log_every == 0:
            run.log(global_step, epsilon=epsilon, abs_td_error=float(np.mean(abs_td)))
            abs_td = []
        run.advance(1)
    env.close()

    extra = evaluate_greedy(q, cfg.env, cfg.eval_episodes, cfg.seed + 1, cfg.slippery)
    path = greedy_path(q, cfg.env, slippery=cfg.slippery, seed=cfg.seed)
    extra.update(greedy_path=path, greedy_path_length=len(path) - 1)
    if cfg.env.startswith("CliffWalking"):
        extra["cliff_edge_cells"] = cliff_edge_cells(path)
    return finish_run(run, agent=q, state={"q_table": torch.tensor(q)}, extra=extra)


# --- the greedy policy ----------------------------------------------------------------------------


def _reached_goal(env_id: str, terminated: bool, reward: float) -> bool:
    """FrozenLake and Taxi end in their goal with a positive reward (a hole also terminates, with 0);
    CliffWalking-v1 terminates only in its goal (the cliff sends the agent back to the start)."""
    return terminated and (reward > 0 or env_id.startswith("CliffWalking"))


def evaluate_greedy(q: np.ndarray, env_id: str, episodes: int, seed: int, slippery: bool | None = None) -> dict:
    """Run the greedy policy argmax_a Q(s, a) (ties: lowest index) for `episodes` episodes.

    Returns greedy_success_rate (the fraction that reached the goal, see `_reached_goal`) and
    greedy_mean_return. Episodes stop at the env's time limit, or after 4 * (number of states)
    steps on envs without one, so a greedy policy going round in circles still ends.
    """
    if episodes <= 0:
        return {}
    env = make_tabular_env(env_id, seed, slippery)
    cap = _step_cap(env)
    greedy = q.argmax(axis=1)
    successes, returns = 0, []
    obs, _ = env.reset(seed=seed)
    for _ in range(episodes):
        total, steps, terminated, reward = 0.0, 0, False, 0.0
        while True:
            obs, reward, terminated, truncated, _ = env.step(int(greedy[obs]))
            total, steps = total + float(reward), steps + 1
            if terminated or truncated or steps >= cap:
                break
        successes += _reached_goal(env_id, terminated, reward)
        returns.append(total)
        obs, _ = env.reset()
    env.close()
    return {"greedy_success_rate": successes / episodes, "greedy_mean_return": float(np.mean(returns))}


def _step_cap(env: gym.Env) -> int:
    limit = env.spec.max_episode_steps if env.spec is not None else None
    return int(limit) if limit else 4 * int(env.observation_space.n)


def greedy_path(
    q_table, env_id: str, slippery: bool | None = None, seed: int = 0, max_steps: int | None = None
) -> list[int]:
    """The states one rollout of the greedy policy visits, start and last state included.

    Deterministic for a deterministic env (CliffWalking, non-slippery FrozenLake): ties go to the
    lowest action index and the env is reset with `seed`. Stops at the end of the episode or after
    `max_steps` moves (default: the env's time limit, or 4 * (number of states)).
    """
    q = np.asarray(q_table.detach().cpu() if isinstance(q_table, torch.Tensor) else q_table)
    env = make_tabular_env(env_id, seed, slippery)
    cap = max_steps if max_steps is not None else _step_cap(env)
    obs, _ = env.reset(seed=seed)
    path = [int(obs)]
    for _ in range(cap):
        obs, _, terminated, truncated, _ = env.step(int(q[obs].argmax()))
        path.append(int(obs))
        if terminated or truncated:
            break
    env.close()
    return path


def cliff_edge_cells(path: list[int]) -> int:
    """How many states of a CliffWalking path (state = row * 12 + col) lie right beside the cliff:
    row 2, columns 1 .. 10. The shortest path (13 moves) has 10; a path along the top rows, 0."""
    return sum(1 for s in path if s // 12 == 2 and 1 <= s % 12 <= 10)


# --- prediction: constant-alpha MC and TD(0) ------------------------------------------------------


def td0_update(v: np.ndarray, s: int, r: float, s_next: int, terminated: bool, alpha: float, gamma: float) -> float:
    """V(S) <- V(S) + alpha * [R + gamma * V(S') - V(S)]   (S&B eq. 6.2). Returns the TD error."""
    delta = r + (0.0 if terminated else gamma * v[s_next]) - v[s]
    v[s] += alpha * delta
    return float(delta)


def mc_update(v: np.ndarray, states: list[int], rewards: list[float], alpha: float, gamma: float) -> None:
    """Every-visit constant-alpha MC (S&B eq. 6.1): after the episode, for t = T-1 .. 0,
    G <- R_{t+1} + gamma * G and V(S_t) <- V(S_t) + alpha * [G - V(S_t)]."""
    g = 0.0
    for s, r in zip(reversed(states), reversed(rewards)):
        g = r + gamma * g
        v[s] += alpha * (g - v[s])


def true_values(env: gym.Env, gamma: float) -> tuple[np.ndarray, np.ndarray] | None:
    """V of the uniform random policy from the env's model P (S&B eq. 4.4, solved as a linear system),
    and a mask of the states the agent acts in (the start state and those a non-terminal transition
    enters; V of terminal states is 0). None if the env has no model or the system is singular."""
    model = getattr(env.unwrapped, "P", None)
    if model is None:
        return None
    n_s, n_a = env.observation_space.n, env.action_space.n
    start, _ = env.reset(seed=0)
    acting = np.zeros(n_s, dtype=bool)
    acting[int(start)] = True
    m, b = np.zeros((n_s, n_s)), np.zeros(n_s)
    for s in range(n_s):
        for a in range(n_a):
            for p, s2, r, done in model[s][a]:
                b[s] += p * r / n_a
                if not done:
                    m[s, int(s2)] += p / n_a
                    if p > 0:
                        acting[int(s2)] = True
    idx = np.flatnonzero(acting)  # transitions out of this set all terminate, so the system is closed
    try:
        v_acting = np.linalg.solve(np.eye(len(idx)) - gamma * m[np.ix_(idx, idx)], b[idx])
    except np.linalg.LinAlgError:
        return None
    v = np.zeros(n_s)
    v[idx] = v_acting
    return v, acting


def train_prediction(config) -> ClassicResult:
    """Estimate V_pi of the uniform random policy by TD(0) or constant-alpha MC (S&B sections 6.1-6.2, Example 6.2).

        td0: after every step        V(S_t) <- V(S_t) + alpha * [R_{t+1} + gamma * V(S_{t+1}) - V(S_t)]   (eq. 6.2)
        mc:  after every episode     V(S_t) <- V(S_t) + alpha * [G_t - V(S_t)], every visit             (eq. 6.1)

    Runs `episodes` episodes (or total_steps steps, whichever ends first). Non-terminal states start
    at v_init, terminal ones at 0. After every episode (at most one row per log_every steps) it logs
    rms_error, the root mean square error over the states the agent acts in against `true_values`;
    extra holds value_table, true_values, initial_rms_error, rms_error and rms_curve (one per episode).
    An episode cut by a time limit gives MC a truncated return; TD(0) bootstraps through it.
    """
    cfg = as_config(PredictionConfig, config)
    if cfg.method not in ("td0", "mc"):
        raise ConfigError(f"method: {cfg.method!r} is not one of td0, mc")
    env = make_tabular_env(cfg.env, cfg.seed, cfg.slippery)
    run = start_run(cfg, f"{cfg.method}_prediction")
    run.bar.reset(total=cfg.episodes)  # this run is counted in episodes
    run.bar.unit = "episode"
    rng = np.random.default_rng(cfg.seed)
    n_actions = env.action_space.n

    truth = true_values(env, cfg.gamma)
    v = np.full(env.observation_space.n, cfg.v_init)
    if truth is not None:
        v[~truth[1]] = 0.0  # terminal (and unreachable) states: V = 0

    def rms() -> float:
        if truth is None:
            return float("nan")
        target, acting = truth
        return float(np.sqrt(np.mean((v[acting] - target[acting]) ** 2)))

    initial_rms, curve = rms(), []
    global_step, last_row = 0, 0
    obs, _ = env.reset(seed=cfg.seed)
    for episode in range(1, cfg.episodes + 1):
        states, rewards, done = [], [], False
        while not done and global_step < cfg.total_steps:
            action = int(rng.integers(n_actions))  # the fixed policy: uniform random
            next_obs, reward, terminated, truncated, _ = env.step(action)
            global_step += 1
            states.append(int(obs))
            rewards.append(float(reward))
            if cfg.method == "td0":
                td0_update(v, obs, float(reward), next_obs, terminated, cfg.alpha, cfg.gamma)
            obs, done = next_obs, terminated or truncated
        if cfg.method == "mc":
            mc_update(v, states, rewards, cfg.alpha, cfg.gamma)
        if not done:  # total_steps ran out mid-episode
            break
        run.episode(global_step, sum(rewards), len(rewards))
        run.advance(1)
        curve.append(rms())
        if global_step - last_row >= cfg.log_every:
            run.log(global_step, episode=episode, rms_error=curve[-1])
            last_row = global_step
        obs, _ = env.reset()
    env.close()

    extra = {
        "rms_error": rms(),
        "initial_rms_error": initial_rms,
        "rms_curve": curve,
        "value_table": v.tolist(),
        "true_values": None if truth is None else truth[0].tolist(),
        "episodes_run": len(curve),
    }
    return finish_run(run, agent=v, state={"v_table": torch.tensor(v), "method": cfg.method}, extra=extra)
