"""DQN: the TD target and Huber loss by hand, the replay ring buffer, short runs that learn, and
(slow) the defaults solving CartPole-v1."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from rufus.classic.common import load_agent
from rufus.classic.dqn import (
    DQNConfig,
    QNetwork,
    ReplayBuffer,
    dqn_loss,
    linear_epsilon,
    td_targets,
    train_dqn,
    update_target,
)
from rufus.config import ConfigError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLPs gain nothing from intra-op threads, and on busy cores they slow down badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TableQ(nn.Module):
    """Q(s, .) = row s of a fixed table, for one-hot observations s."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, obs):
        return obs @ self.table


def _onehot(idx, n=3):
    return torch.eye(n)[torch.tensor(idx)]


# --- the update rule by hand --------------------------------------------------------------------------


def test_td_targets_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.5])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    next_q_target = torch.tensor([[2.0, 4.0], [10.0, 3.0], [-1.0, -2.0]])
    # row 0: 1 + 0.9 * max(2, 4)   = 1 + 3.6 = 4.6
    # row 1: terminated, no bootstrap: 1
    # row 2: 0.5 + 0.9 * max(-1, -2) = 0.5 - 0.9 = -0.4
    y = td_targets(rewards, terminated, next_q_target, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([4.6, 1.0, -0.4]))

    # double DQN: the online net picks the action, the target net values it
    next_q_online = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # row 0: online picks a=0 -> Q_target = 2   -> 1 + 0.9 * 2    = 2.8
    # row 1: terminated -> 1
    # row 2: online picks a=1 -> Q_target = -2  -> 0.5 + 0.9 * -2 = -1.3
    y = td_targets(rewards, terminated, next_q_target, 0.9, next_q_online)
    torch.testing.assert_close(y, torch.tensor([2.8, 1.0, -1.3]))


def test_dqn_loss_by_hand_terminated_vs_truncated():
    # 3 states, 2 actions. Online and target tables differ so we can tell which one is used where.
    online = TableQ([[1.0, 2.0], [0.0, 3.0], [5.0, 5.0]])
    target = TableQ([[0.0, 1.0], [4.0, 2.0], [10.0, 0.0]])
    # transitions (s, a, r, s', terminated):
    #   0: (0, 1, 1.0, 1, 0)  a plain step          y = 1 + 0.5 * max(4, 2)  = 3;  Q(0,1) = 2; d = -1
    #   1: (1, 0, 1.0, 2, 1)  terminated: no bootstrap   y = 1;                 Q(1,0) = 0; d = -1
    #   2: (1, 1, 1.0, 2, 0)  truncated by a time limit is stored as terminated=0, so it
    #                         bootstraps: y = 1 + 0.5 * max(10, 0) = 6;        Q(1,1) = 3; d = -3
    #   3: (2, 0, 0.0, 0, 0)  y = 0 + 0.5 * max(0, 1) = 0.5;                  Q(2,0) = 5; d = 4.5
    batch = {
        "obs": _onehot([0, 1, 1, 2]),
        "actions": torch.tensor([1, 0, 1, 0]),
        "rewards": torch.tensor([1.0, 1.0, 1.0, 0.0]),
        "next_obs": _onehot([1, 2, 2, 0]),
        "terminated": torch.tensor([0.0, 1.0, 0.0, 0.0]),
    }
    # Huber (delta 1): 0.5 d^2 for |d| <= 1, else |d| - 0.5
    #   -> 0.5, 0.5, 2.5, 4.0; mean = 7.5 / 4 = 1.875
    loss, q_taken = dqn_loss(online, target, batch, gamma=0.5, loss="huber")
    torch.testing.assert_close(q_taken.detach(), torch.tensor([2.0, 0.0, 3.0, 5.0]))
    assert loss.item() == pytest.approx(1.875)

    # the gradient flows into the online net only, through Q(s, a): dL/dQ = clip(d, -1, 1) / 4
    loss.backward()
    expected = torch.zeros(3, 2)
    expected[0, 1], expected[1, 0], expected[1, 1], expected[2, 0] = -0.25, -0.25, -0.25, 0.25
    torch.testing.assert_close(online.table.grad, expected)
    assert target.table.grad is None

    # squared error (the default): d^2 -> 1, 1, 9, 20.25; mean = 31.25 / 4 = 7.8125; dL/dQ = 2 d / 4
    online.table.grad = None
    loss, _ = dqn_loss(online, target, batch, gamma=0.5)
    assert loss.item() == pytest.approx(7.8125)
    loss.backward()
    expected[0, 1], expected[1, 0], expected[1, 1], expected[2, 0] = -0.5, -0.5, -1.5, 2.25
    torch.testing.assert_close(online.table.grad, expected)

    # had transition 2 been treated as terminated, its target would be 1: d = 2 (Huber 1.5, squared 4)
    batch["terminated"][2] = 1.0
    loss, _ = dqn_loss(online, target, batch, gamma=0.5, loss="huber")
    assert loss.item() == pytest.approx((0.5 + 0.5 + 1.5 + 4.0) / 4)
    loss, _ = dqn_loss(online, target, batch, gamma=0.5, loss="mse")
    assert loss.item() == pytest.approx((1 + 1 + 4 + 20.25) / 4)


def test_target_updates_hard_and_soft():
    online, target = TableQ([[1.0, 2.0]]), TableQ([[3.0, 6.0]])
    update_target(target, online, tau=0.25)  # 0.25 * online + 0.75 * target
    torch.testing.assert_close(target.table.data, torch.tensor([[2.5, 5.0]]))
    update_target(target, online, tau=1.0)
    torch.testing.assert_close(target.table.data, online.table.data)


def test_linear_epsilon():
    assert linear_epsilon(0, 1.0, 0.05, 100) == 1.0
    assert linear_epsilon(50, 1.0, 0.0, 100) == pytest.approx(0.5)
    assert linear_epsilon(100, 1.0, 0.05, 100) == pytest.approx(0.05)
    assert linear_epsilon(10_000, 1.0, 0.05, 100) == pytest.approx(0.05)
    assert linear_epsilon(0, 1.0, 0.05, 0) == 0.05


def test_replay_buffer_wraps_around():
    buf = ReplayBuffer(capacity=4, obs_dim=2, seed=0)
    for i in range(6):  # transitions 0..5; 4 and 5 overwrite slots 0 and 1
        buf.add(np.array([i, -i]), action=i % 2, reward=float(i), next_obs=np.array([i + 1, 0]), terminated=i == 5)
    assert len(buf) == 4 and buf.pos == 2
    np.testing.assert_array_equal(buf.rewards, [4.0, 5.0, 2.0, 3.0])
    np.testing.assert_array_equal(buf.obs[:, 0], [4, 5, 2, 3])
    np.testing.assert_array_equal(buf.next_obs[:, 0], [5, 6, 3, 4])
    np.testing.assert_array_equal(buf.actions, [0, 1, 0, 1])
    np.testing.assert_array_equal(buf.terminated, [0, 1, 0, 0])
    batch = buf.sample(64)
    assert batch["obs"].shape == (64, 2) and batch["actions"].dtype == torch.int64
    assert set(batch["rewards"].tolist()) == {2.0, 3.0, 4.0, 5.0}  # only live transitions, 0 and 1 are gone
    # each sampled row is one whole transition
    torch.testing.assert_close(batch["obs"][:, 0], batch["rewards"])
    torch.testing.assert_close(batch["next_obs"][:, 0], batch["rewards"] + 1)


def test_buffer_not_full_samples_only_filled_slots():
    buf = ReplayBuffer(capacity=100, obs_dim=1, seed=1)
    for i in range(3):
        buf.add(np.array([i]), 0, float(i), np.array([i]), False)
    assert set(buf.sample(50)["rewards"].tolist()) <= {0.0, 1.0, 2.0}


def test_q_network_shapes():
    net = QNetwork(4, 2, [8, 8])
    assert net(torch.zeros(5, 4)).shape == (5, 2)


# --- config errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ({"tau": 0.0}, "tau"),
        ({"gamma": 1.5}, "gamma"),
        ({"batch_size": 0}, "batch_size"),
        ({"hidden_sizes": []}, "hidden_sizes"),
        ({"epsilon_end": -0.1}, "epsilon_end"),
        ({"loss": "l1"}, "loss"),
        ({"env": "Pendulum-v1"}, "env"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        train_dqn({"output_dir": str(tmp_path / "run"), "progress": False, "total_steps": 10, **override})


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tau'"):
        train_dqn({"output_dir": str(tmp_path / "run"), "progress": False, "taux": 0.5})


# --- short runs ----------------------------------------------------------------------------------

# A short schedule that learns CartPole quickly (not to the end): epsilon falls over 1200 steps,
# a gradient step every 2 env steps at a higher learning rate, a smaller network.
SHORT = {
    "env": "CartPole-v1",
    "total_steps": 4000,
    "learning_starts": 500,
    "exploration_fraction": 0.3,
    "train_every": 2,
    "lr": 1e-3,
    "target_update_every": 250,
    "batch_size": 64,
    "hidden_sizes": [64, 64],
    "log_every": 500,
    "eval_episodes": 5,
    "progress": False,
}


def test_short_run_writes_outputs(tmp_path):
    out = tmp_path / "dqn"
    result = train_dqn({**SHORT, "total_steps": 1500, "seed": 0, "output_dir": str(out)})
    assert result.algo == "dqn" and result.env == "CartPole-v1"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    episodes = [r for r in rows if "episodic_return" in r]
    assert episodes and all("global_step" in r and "episodic_length" in r for r in episodes)
    assert [r["global_step"] for r in episodes] == sorted(r["global_step"] for r in episodes)
    assert len(episodes) == len(result.episodes)
    stats = [r for r in rows if "loss" in r]
    assert stats and all({"q_mean", "epsilon", "global_step"} <= set(r) for r in stats)
    assert all(np.isfinite(r["loss"]) for r in stats)
    assert (out / "config.yaml").exists()
    assert (out / "plots" / "episodic_return.png").stat().st_size > 0

    saved = load_agent(result.agent_path)
    assert saved["algo"] == "dqn" and saved["env"] == "CartPole-v1"
    net = QNetwork(saved["obs_dim"], saved["n_actions"], saved["hidden_sizes"])
    net.load_state_dict(saved["q_network"])
    obs = torch.randn(3, 4)
    torch.testing.assert_close(net(obs), result.agent(obs))
    assert "greedy_mean_return" in result.extra and len(result.extra["greedy_returns"]) == 5


def test_same_seed_same_run(tmp_path):
    cfg = {**SHORT, "total_steps": 800, "eval_episodes": 0}
    a = train_dqn({**cfg, "output_dir": str(tmp_path / "a")})
    b = train_dqn({**cfg, "output_dir": str(tmp_path / "b")})
    assert a.episodes == b.episodes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_short_run_learns(tmp_path, seed):
    # A random policy averages about 22 on CartPole-v1 (the first 20 episodes here: 19-25). After
    # 4k steps the last 10 episodes (epsilon 0.05) averaged 129-183 and the greedy policy 160-422
    # over seeds 0-10; ask for well under that, and well over random.
    result = train_dqn({**SHORT, "seed": seed, "output_dir": str(tmp_path / "run")})
    first = np.mean([r for _, r in result.episodes[:20]])
    last = result.mean_return(10)
    assert last > 80 and last > 3 * first, (first, last)
    assert result.extra["greedy_mean_return"] > 80


def test_double_dqn_soft_updates_huber_run(tmp_path):
    result = train_dqn(
        {
            **SHORT,
            "total_steps": 1000,
            "double_dqn": True,
            "tau": 0.05,
            "target_update_every": 1,
            "max_grad_norm": 10.0,
            "loss": "huber",
            "eval_episodes": 0,
            "output_dir": str(tmp_path / "run"),
        }
    )
    assert result.episodes and "greedy_mean_return" not in result.extra


# --- slow: the defaults solve CartPole ----------------------------------------------------------


@pytest.mark.slow
def test_defaults_solve_cartpole(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: run with -m slow")
    start = time.time()
    result = train_dqn({"output_dir": str(tmp_path / "run"), "progress": False})
    cfg = DQNConfig()
    print(
        f"\nDQN defaults on {cfg.env}: {cfg.total_steps} steps, mean of last 20 episodes "
        f"{result.mean_return(20):.1f}, greedy {result.extra['greedy_mean_return']:.1f}, "
        f"{time.time() - start:.0f} s"
    )
    assert result.mean_return(20) >= 400
