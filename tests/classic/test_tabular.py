"""Tabular Q-learning, SARSA, and MC / TD(0) prediction (rufus.classic.tabular).

The default tests are small (a few thousand steps each); the textbook results (FrozenLake's greedy
success with the default config, CliffWalking's safe vs optimal path) are `slow`.
"""

import numpy as np
import pytest
import torch

from rufus.classic.common import load_agent
from rufus.classic.tabular import (
    PredictionConfig,
    TabularConfig,
    cliff_edge_cells,
    greedy_path,
    linear_epsilon,
    make_tabular_env,
    mc_update,
    q_learning_update,
    sarsa_update,
    td0_update,
    train_prediction,
    train_q_learning,
    train_sarsa,
    true_values,
)
from rufus.config import ConfigError
from rufus.report.metrics import read_metrics


@pytest.fixture
def slow_only(request):
    """Skip unless the run selects slow tests (-m slow), whatever the project's default marker filter."""
    markexpr = request.config.option.markexpr or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("slow: run with -m slow")


def small(tmp_path, name, **kw):
    return {"output_dir": str(tmp_path / name), "progress": False, **kw}


# --- the update rules, by hand --------------------------------------------------------------------


def test_q_learning_update_by_hand():
    q = np.zeros((3, 2))
    q[0, 1] = 0.5
    q[1] = [2.0, 4.0]
    # Q(0,1) + alpha * (r + gamma * max_a Q(1,a) - Q(0,1)) = 0.5 + 0.1 * (1 + 0.9 * 4 - 0.5) = 0.5 + 0.41 = 0.91
    delta = q_learning_update(q, 0, 1, 1.0, 1, False, alpha=0.1, gamma=0.9)
    assert q[0, 1] == pytest.approx(0.91)
    assert delta == pytest.approx(4.1)
    # terminated: no bootstrap. 0.91 + 0.5 * (1 - 0.91) = 0.955
    q_learning_update(q, 0, 1, 1.0, 1, True, alpha=0.5, gamma=0.9)
    assert q[0, 1] == pytest.approx(0.955)


def test_sarsa_update_by_hand():
    q = np.zeros((3, 2))
    q[0, 1] = 0.5
    q[1] = [2.0, 4.0]
    # SARSA uses the action taken next (A' = 0), not the max:
    # 0.5 + 0.1 * (1 + 0.9 * 2 - 0.5) = 0.5 + 0.23 = 0.73
    sarsa_update(q, 0, 1, 1.0, 1, 0, False, alpha=0.1, gamma=0.9)
    assert q[0, 1] == pytest.approx(0.73)


def test_td0_and_mc_updates_by_hand():
    v = np.array([0.0, 0.5, 0.5, 0.0])
    # TD(0): V(1) + alpha * (r + gamma * V(2) - V(1)) = 0.5 + 0.1 * (0 + 1 * 0.5 - 0.5) = 0.5 (no change)
    td0_update(v, 1, 0.0, 2, False, alpha=0.1, gamma=1.0)
    assert v[1] == pytest.approx(0.5)
    # into the terminal state with reward 1: 0.5 + 0.1 * (1 - 0.5) = 0.55
    td0_update(v, 2, 1.0, 3, True, alpha=0.1, gamma=1.0)
    assert v[2] == pytest.approx(0.55)
    # every-visit MC on the episode 1 -> 2 -> 1 -> end, rewards 0, 0, 1, gamma = 1: G = 1 at every visit.
    # Backwards: V(1) = 0.5 + 0.1 * 0.5 = 0.55, V(2) = 0.55 + 0.1 * 0.45 = 0.595, V(1) = 0.55 + 0.1 * 0.45 = 0.595
    v = np.array([0.0, 0.5, 0.55, 0.0])
    mc_update(v, [1, 2, 1], [0.0, 0.0, 1.0], alpha=0.1, gamma=1.0)
    assert v[1] == pytest.approx(0.595) and v[2] == pytest.approx(0.595)


def test_one_step_run_matches_the_formula(tmp_path):
    # CliffWalking starts in 36 with Q = 0; the first step gives r = -1 (or -100 straight into the
    # cliff), so the only non-zero entry is Q(36, A) = 0 + alpha * (r + gamma * 0 - 0) = 0.1 * r.
    res = train_q_learning(small(tmp_path, "one", env="CliffWalking-v1", total_steps=1, alpha=0.1, eval_episodes=0))
    q = res.agent
    (s,), (a,) = np.nonzero(q)
    assert s == 36
    assert q[s, a] == pytest.approx(0.1 * (-100.0 if a == 1 else -1.0))


def test_linear_epsilon():
    cfg = TabularConfig(total_steps=1000, epsilon_start=1.0, epsilon_end=0.1, exploration_fraction=0.5)
    assert linear_epsilon(0, cfg) == pytest.approx(1.0)
    assert linear_epsilon(250, cfg) == pytest.approx(0.55)
    assert linear_epsilon(500, cfg) == pytest.approx(0.1)
    assert linear_epsilon(1000, cfg) == pytest.approx(0.1)
    constant = TabularConfig(total_steps=1000, epsilon_start=0.1, epsilon_end=0.1)
    assert all(linear_epsilon(t, constant) == pytest.approx(0.1) for t in (0, 300, 1000))


# --- short runs -----------------------------------------------------------------------------------


def test_q_learning_solves_nonslippery_frozenlake_and_writes_outputs(tmp_path):
    res = train_q_learning(small(tmp_path, "q", slippery=False, total_steps=3000, log_every=500, eval_episodes=20))
    assert res.extra["greedy_success_rate"] == 1.0
    assert res.extra["greedy_mean_return"] == 1.0
    assert res.extra["greedy_path"][0] == 0 and res.extra["greedy_path"][-1] == 15
    assert res.extra["greedy_path_length"] == 6  # the shortest way round the holes

    rows = read_metrics(res.output_dir / "metrics.jsonl")
    episode_rows = [r for r in rows if "episodic_return" in r]
    assert len(episode_rows) == len(res.episodes) > 0
    assert all("global_step" in r and "episodic_length" in r for r in episode_rows)
    assert [r["global_step"] for r in episode_rows] == [s for s, _ in res.episodes]
    eps_rows = [r for r in rows if "epsilon" in r]
    assert [r["global_step"] for r in eps_rows] == list(range(500, 3001, 500))
    assert eps_rows[-1]["epsilon"] == pytest.approx(0.05)

    saved = load_agent(res.agent_path)
    assert saved["algo"] == "q_learning" and saved["env"] == "FrozenLake-v1"
    assert torch.equal(saved["q_table"], torch.tensor(res.agent))
    assert saved["q_table"].shape == (16, 4)
    assert (res.output_dir / "plots" / "episodic_return.png").exists()
    assert (res.output_dir / "config.yaml").exists()


def test_sarsa_solves_nonslippery_frozenlake(tmp_path):
    res = train_sarsa(small(tmp_path, "s", slippery=False, total_steps=3000, eval_episodes=20))
    assert res.algo == "sarsa"
    assert res.extra["greedy_success_rate"] == 1.0
    assert load_agent(res.agent_path)["q_table"].shape == (16, 4)


def test_taxi_runs(tmp_path):
    res = train_q_learning(small(tmp_path, "taxi", env="Taxi-v4", total_steps=2000, alpha=0.5, eval_episodes=2))
    assert res.agent.shape == (500, 6)
    assert len(res.episodes) >= 1
    assert "greedy_mean_return" in res.extra


def test_registry_finds_the_tabular_agents():
    from rufus.classic import load

    assert load("q_learning") == (TabularConfig, train_q_learning)
    assert load("sarsa") == (TabularConfig, train_sarsa)
    assert load("td_prediction") == (PredictionConfig, train_prediction)


# --- prediction -----------------------------------------------------------------------------------


def test_random_walk_true_values():
    env = make_tabular_env("RandomWalk-5", 0)
    v, acting = true_values(env, gamma=1.0)
    assert np.flatnonzero(acting).tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(v, [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 0], atol=1e-12)


@pytest.mark.parametrize("method,alpha,bound", [("td0", 0.1, 0.15), ("mc", 0.02, 0.2)])
def test_prediction_on_random_walk_reduces_rms_error(tmp_path, method, alpha, bound):
    res = train_prediction(small(tmp_path, method, method=method, alpha=alpha, episodes=100))
    # V = 0.5 everywhere to start: RMS error sqrt(mean((0.5 - i/6)^2 for i = 1..5)) = sqrt(1/18) = 0.2357
    assert res.extra["initial_rms_error"] == pytest.approx(np.sqrt(1 / 18))
    assert res.extra["rms_error"] < bound < res.extra["initial_rms_error"]
    assert res.extra["episodes_run"] == len(res.episodes) == 100
    assert len(res.extra["rms_curve"]) == 100
    rows = read_metrics(res.output_dir / "metrics.jsonl")
    assert sum("episodic_return" in r for r in rows) == 100
    rms_rows = [r for r in rows if "rms_error" in r and "episode" in r]
    assert len(rms_rows) == 100 and rms_rows[-1]["rms_error"] == pytest.approx(res.extra["rms_error"])
    saved = load_agent(res.agent_path)
    assert saved["v_table"].shape == (7,) and saved["method"] == method


def test_prediction_on_frozenlake(tmp_path):
    res = train_prediction(small(tmp_path, "fl", env="FrozenLake-v1", v_init=0.0, alpha=0.05, episodes=300))
    assert res.extra["true_values"] is not None
    assert res.extra["rms_error"] < res.extra["initial_rms_error"]


# --- greedy paths ---------------------------------------------------------------------------------


def test_greedy_path_along_the_cliff_by_hand():
    # CliffWalking actions: 0 up, 1 right, 2 down, 3 left. Up from the start, right along row 2, down into the goal.
    q = np.zeros((48, 4))
    q[36, 0] = 1.0
    q[24:35, 1] = 1.0
    q[35, 2] = 1.0
    path = greedy_path(q, "CliffWalking-v1")
    assert path == [36] + list(range(24, 36)) + [47]
    assert len(path) - 1 == 13 and cliff_edge_cells(path) == 10
    # the same along the top row is safe
    q = np.zeros((48, 4))
    q[[36, 24, 12], 0] = 1.0
    q[0:11, 1] = 1.0
    q[[11, 23, 35], 2] = 1.0
    path = greedy_path(torch.tensor(q), "CliffWalking-v1")
    assert path[-1] == 47 and len(path) - 1 == 17 and cliff_edge_cells(path) == 0


# --- config errors --------------------------------------------------------------------------------


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="env: tabular agents need a Discrete observation space, got Box"):
        train_q_learning(small(tmp_path, "cp", env="CartPole-v1"))
    with pytest.raises(ConfigError, match="alpha"):
        train_sarsa(small(tmp_path, "a", alpha=0.0))
    with pytest.raises(ConfigError, match="epsilon_end"):
        train_q_learning(small(tmp_path, "e", epsilon_end=1.5))
    with pytest.raises(ConfigError, match="slippery"):
        train_q_learning(small(tmp_path, "t", env="Taxi-v4", slippery=True))
    with pytest.raises(ConfigError, match="method"):
        train_prediction(small(tmp_path, "m", method="td1"))
    with pytest.raises(ConfigError, match="env"):
        train_prediction(small(tmp_path, "rw", env="RandomWalk-4"))
    with pytest.raises(ConfigError, match="env"):
        train_q_learning(small(tmp_path, "nope", env="NoSuchEnv-v9"))


# --- the textbook results (slow) ------------------------------------------------------------------


@pytest.mark.slow
def test_q_learning_defaults_on_slippery_frozenlake(tmp_path, slow_only):
    res = train_q_learning(small(tmp_path, "fl"))
    assert TabularConfig().env == "FrozenLake-v1"
    # the best policy reaches the goal within FrozenLake's 100 steps with probability 0.74
    assert res.extra["greedy_success_rate"] >= 0.70
    print(f"\nFrozenLake-v1 slippery, Q-learning defaults: greedy success {res.extra['greedy_success_rate']:.3f}")


@pytest.mark.slow
def test_cliff_walking_sarsa_safe_q_learning_optimal(tmp_path, slow_only):
    # S&B Example 6.6: constant epsilon = 0.1, undiscounted.
    cfg = dict(
        env="CliffWalking-v1",
        total_steps=30_000,
        alpha=0.2,
        gamma=1.0,
        epsilon_start=0.1,
        epsilon_end=0.1,
        eval_episodes=1,
    )
    q = train_q_learning(small(tmp_path, "q", **cfg))
    s = train_sarsa(small(tmp_path, "s", **cfg))
    # Q-learning's greedy path runs along the cliff edge: the shortest path, 13 moves, 10 cells beside the cliff
    assert q.extra["greedy_path"][-1] == 47
    assert q.extra["greedy_path_length"] == 13 and q.extra["cliff_edge_cells"] == 10
    # SARSA's keeps away from it (rows 0-1 in the middle), a longer path to the goal
    assert s.extra["greedy_path"][-1] == 47
    assert s.extra["cliff_edge_cells"] == 0 and s.extra["greedy_path_length"] > 13
    # and, exploring, SARSA falls less: its online return is higher (Figure 6.4: about -25 vs -50)
    assert s.mean_return(200) > q.mean_return(200)
    print(
        f"\nCliffWalking: Q-learning path {q.extra['greedy_path_length']} moves, online {q.mean_return(200):.1f}; "
        f"SARSA path {s.extra['greedy_path_length']} moves, online {s.mean_return(200):.1f}"
    )
