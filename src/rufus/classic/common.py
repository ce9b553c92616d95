"""What every classic agent shares: config keys, environments, episode logging, saving, the plot.

An agent's file reads:

    @dataclass
    class MyConfig(ClassicArgs):
        env: str = opt("CartPole-v1", "gymnasium environment id")
        total_steps: int = opt(100_000, "environment steps in all")
        lr: float = opt(2.5e-4, "...")

    def train_my(config) -> ClassicResult:
        cfg = as_config(MyConfig, config)           # rufus.config: a config object or a dict
        run = start_run(cfg, "my")                  # seeds, output_dir, config.yaml, metrics.jsonl
        env = make_env(cfg.env, cfg.seed)           # or make_vec_env(cfg.env, n, cfg.seed)
        ... loop: run.episode(global_step, ret, length) for each finished episode,
                  run.log(global_step, loss=...) now and then, run.advance(k) for the progress bar
        return finish_run(run, agent, {"q_table": ...})   # agent.pt, plots/episodic_return.png

metrics.jsonl gets one row per finished episode: {"step": global_step, "global_step": global_step,
"episodic_return": R, "episodic_length": L}, plus whatever rows the agent logs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rufus.config import ConfigError, opt, save_config
from rufus.report.metrics import MetricsLogger


@dataclass
class ClassicArgs:
    """Keys every classic agent takes (each agent's config adds its own)."""

    env: str = opt("CartPole-v1", "gymnasium environment id")
    seed: int = opt(0, "seed for the environment, the network and the exploration", ge=0)
    total_steps: int = opt(100_000, "environment steps in all (over all vectorised environments)", ge=1)
    output_dir: str | None = opt(
        None, "where metrics.jsonl, agent.pt and plots/ go (default runs/classic/<algo>-<env>)"
    )
    progress: bool = opt(True, "show a progress bar")
    log_every: int = opt(1000, "environment steps between rows of training statistics (losses, epsilon)", ge=1)
    threads: int = opt(
        1,
        "torch threads during the run (small networks: one thread is fastest; "
        "several threads on busy cores can be 30x slower)",
        ge=1,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class ClassicResult:
    output_dir: Path
    algo: str
    env: str
    episodes: list[tuple[int, float]]  # (global_step, episodic return) of every finished episode
    metrics: list[dict]
    agent: object = None  # the trained networks / tables
    agent_path: Path | None = None
    extra: dict = field(default_factory=dict)  # agent-specific results (e.g. greedy success rate)

    def mean_return(self, last: int = 20) -> float:
        """Mean episodic return over the last `last` finished episodes (nan if none finished)."""
        tail = [r for _, r in self.episodes[-last:]]
        return float(np.mean(tail)) if tail else float("nan")


class Run:
    """One agent's run: output directory, metrics, progress bar."""

    def __init__(self, cfg, algo: str):
        self.cfg, self.algo = cfg, algo
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)  # restored by finish_run
        self.output_dir = Path(cfg.output_dir or f"runs/classic/{algo}-{cfg.env}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.output_dir / "config.yaml")
        self.logger = MetricsLogger(self.output_dir)
        self.episodes: list[tuple[int, float]] = []
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=cfg.total_steps, desc=f"{algo} {cfg.env}", disable=not cfg.progress, unit="step", dynamic_ncols=True
        )

    def episode(self, global_step: int, episodic_return: float, episodic_length: int) -> None:
        """Record a finished episode (one metrics row)."""
        self.episodes.append((int(global_step), float(episodic_return)))
        self.logger.log(
            int(global_step),
            {
                "global_step": int(global_step),
                "episodic_return": float(episodic_return),
                "episodic_length": int(episodic_length),
            },
        )
        recent = [r for _, r in self.episodes[-20:]]
        self.bar.set_postfix(ret=f"{np.mean(recent):.1f}", refresh=False)

    def log(self, global_step: int, **metrics: float) -> None:
        """A row of training statistics at `global_step`."""
        self.logger.log(
            int(global_step), {"global_step": int(global_step), **{k: float(v) for k, v in metrics.items()}}
        )

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)


def start_run(cfg, algo: str) -> Run:
    """Seed everything, create output_dir (config.yaml, metrics.jsonl). (Each key's range is checked
    with the config, in `as_config`.)"""
    seed_everything(cfg.seed)
    return Run(cfg, algo)


def finish_run(run: Run, agent, state: dict, extra: dict | None = None) -> ClassicResult:
    """Save `state` (tensors, arrays, numbers) as agent.pt, plot the returns, close the run."""
    run.bar.close()
    torch.set_num_threads(run.previous_threads)
    path = run.output_dir / "agent.pt"
    torch.save({"algo": run.algo, "env": run.cfg.env, **state}, path)
    plot_returns(run.output_dir, run.episodes, f"{run.algo} on {run.cfg.env}")
    if extra:
        run.log(run.cfg.total_steps, **{k: v for k, v in extra.items() if isinstance(v, (int, float))})
    run.logger.close()
    return ClassicResult(
        run.output_dir, run.algo, run.cfg.env, run.episodes, run.logger.rows, agent, path, dict(extra or {})
    )


def load_agent(path: str | Path) -> dict:
    """What `finish_run` saved (agent.pt)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def plot_returns(output_dir: Path, episodes: list[tuple[int, float]], title: str, window: int = 20) -> Path | None:
    """plots/episodic_return.png: every episode's return against global step, and a moving mean."""
    if not episodes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, returns = np.array([s for s, _ in episodes]), np.array([r for _, r in episodes])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, returns, ".", alpha=0.3, markersize=3, label="episode")
    if len(returns) >= 2:
        w = min(window, len(returns))
        mean = np.convolve(returns, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], mean, label=f"mean of {w}")
    ax.set_xlabel("global step")
    ax.set_ylabel("episodic return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    out = Path(output_dir) / "plots" / "episodic_return.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- environments ---------------------------------------------------------------------------------


def make_env(env_id: str, seed: int, **kwargs):
    """One gymnasium environment, its spaces seeded; call env.reset(seed=seed) once to start."""
    import gymnasium as gym

    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise ConfigError(f"env: cannot make {env_id!r}: {e}") from e
    env.action_space.seed(seed)
    env.observation_space.seed(seed)
    return env


def make_vec_env(env_id: str, num_envs: int, seed: int, **kwargs):
    """`num_envs` copies in one synchronous vector env with the classic autoreset: the step that
    ends an episode returns the *next* episode's first observation (the last one is in
    infos["final_obs"]), and its episode statistics are in the infos (`vector_episode_stats`)."""
    import gymnasium as gym

    def thunk(i):
        return lambda: make_env(env_id, seed + i, **kwargs)

    envs = gym.vector.SyncVectorEnv(
        [thunk(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    envs.action_space.seed(seed)
    return envs


def vector_episode_stats(infos: dict) -> list[tuple[float, int]]:
    """(return, length) of each episode that ended at this step of a `make_vec_env` env."""
    if "episode" not in infos:
        return []
    ended = infos["episode"].get("_r", infos.get("_episode"))
    if ended is None:
        return []
    return [(float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])) for i in np.flatnonzero(ended)]


def greedy_returns(logits_fn, env_id: str, seed: int, episodes: int) -> list[float]:
    """Returns of `episodes` episodes taking argmax of `logits_fn(obs (1, d)) -> (1, n_actions)`,
    on a fresh environment (episode i reset with seed + i)."""
    return episode_returns(lambda obs: int(logits_fn(obs).argmax(-1)), env_id, seed, episodes)


def episode_returns(act, env_id: str, seed: int, episodes: int) -> list[float]:
    """Returns of `episodes` episodes taking `act(obs (1, d)) -> action` (no gradients), on a fresh
    environment (episode i reset with seed + i)."""
    env = make_env(env_id, seed)
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = act(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        out.append(total)
    env.close()
    return out
