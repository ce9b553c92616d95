"""Classic policy-gradient agents (REINFORCE, A2C, PPO) on CartPole-v1.

The point of classic PPO is that it runs the language-model trainer's code: the spies check that it
calls the shared `policy_loss`, `value_loss` and `gae` with the classic layout, and the learning tests
check that those functions, driven this way, solve a control problem. The short runs take a few
seconds each; `-m slow` runs PPO's defaults to CartPole's 475 threshold (about 5 minutes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rufus.advantages
import rufus.losses.ppo
from rufus.classic import load
from rufus.classic.common import load_agent
from rufus.config import ConfigError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLPs: intra-op threads only add synchronisation on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def slow_selected(request):
    """Skip unless the run selects slow tests (-m slow): these take minutes."""
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("slow: run with -m slow")


def train(algo: str, tmp_path, **config):
    _, fn = load(algo)
    return fn({"output_dir": str(tmp_path / algo), "progress": False, "eval_episodes": 2, **config})


def episode_rows(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "episodic_return" in r]


def check_artifacts(result, total_steps: int) -> None:
    """metrics.jsonl episode rows with global_step, a loadable agent.pt, the return plot."""
    rows = episode_rows(result.output_dir / "metrics.jsonl")
    assert len(rows) == len(result.episodes) > 0
    steps = [r["global_step"] for r in rows]
    assert steps == sorted(steps) and 0 < steps[0] and steps[-1] <= total_steps
    assert all(r["episodic_length"] >= 1 for r in rows)
    saved = load_agent(result.agent_path)
    assert saved["algo"] == result.algo and saved["env"] == "CartPole-v1"
    assert (result.output_dir / "plots" / "episodic_return.png").stat().st_size > 0
    assert np.isfinite(result.extra["greedy_mean_return"])


def learned(result) -> tuple[float, float]:
    """(mean return of the first 10 episodes, mean of the last 20)."""
    first = float(np.mean([r for _, r in result.episodes[:10]]))
    return first, result.mean_return(20)


# --- PPO ------------------------------------------------------------------------------------------


def test_ppo_calls_the_shared_losses_and_gae(tmp_path, monkeypatch):
    calls = {"gae": [], "policy_loss": [], "value_loss": []}

    def spy(name, module):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731 (buffers are reused)
            calls[name].append(([copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy("gae", rufus.advantages)
    spy("policy_loss", rufus.losses.ppo)
    spy("value_loss", rufus.losses.ppo)
    envs, steps, minibatches, epochs, iterations = 2, 64, 4, 2, 3
    result = train(
        "ppo",
        tmp_path,
        total_steps=envs * steps * iterations,
        num_envs=envs,
        num_steps=steps,
        num_minibatches=minibatches,
        update_epochs=epochs,
    )

    assert len(calls["gae"]) == iterations
    ended = 0
    for args, kwargs in calls["gae"]:
        rewards, values, mask = args
        assert rewards.shape == values.shape == mask.shape == (envs, steps)  # rows = environments
        assert kwargs["gamma"] == 0.99 and kwargs["lam"] == 0.95
        assert kwargs["dones"].shape == (envs, steps) and kwargs["bootstrap"].shape == (envs,)
        ended += int(kwargs["dones"].sum())
    assert ended == len(result.episodes)  # a done for every finished episode, nowhere else

    size = envs * steps // minibatches
    assert len(calls["policy_loss"]) == len(calls["value_loss"]) == iterations * epochs * minibatches
    for args, kwargs in calls["policy_loss"]:
        logprobs, old_logprobs, advantages, mask = args
        assert logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape == (1, size)
        assert kwargs["clip"] == 0.2
        assert advantages.mean().abs() < 1e-4 and (advantages.std(unbiased=False) - 1).abs() < 1e-3  # whitened
    for args, kwargs in calls["value_loss"]:
        assert args[0].shape == (1, size) and kwargs["clip"] == 0.2
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in rows if "policy_loss" in r]
    assert stats and {"value_loss", "entropy", "approx_kl", "clipfrac", "global_step"} <= set(stats[-1])


def test_ppo_learns_cartpole(tmp_path):
    # 20k steps (the learning rate annealed over them): seeds 0-3 reach last-20 means of 63-91 from
    # first episodes of 17-21 (random play: about 22)
    result = train("ppo", tmp_path, total_steps=20_000, seed=0)
    first, last = learned(result)
    assert last >= 45 and last >= 2.5 * first, (first, last)
    check_artifacts(result, 20_000)
    saved = load_agent(result.agent_path)
    from rufus.classic.ppo import ActorCritic

    agent = ActorCritic(saved["obs_dim"], saved["n_actions"], saved["hidden"])
    agent.actor.load_state_dict(saved["actor"])
    agent.critic.load_state_dict(saved["critic"])
    obs = torch.zeros(3, saved["obs_dim"])
    assert torch.allclose(agent.actor(obs), result.agent.actor(obs))


def test_ppo_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="num_minibatches"):
        train("ppo", tmp_path, num_envs=2, num_steps=10, num_minibatches=3)
    with pytest.raises(ConfigError, match="^env: .*Box observation"):
        train("ppo", tmp_path, env="FrozenLake-v1", total_steps=1024)
    with pytest.raises(ConfigError, match="lam"):
        train("ppo", tmp_path, lam=1.5)


@pytest.mark.slow
def test_ppo_defaults_solve_cartpole(tmp_path, slow_selected):
    # The 37-details CartPole settings (CleanRL reports about 490). Seeds 0-2 (3.5-5 min each on 2
    # busy cores): the last-20 mean first reaches 475 at 187k, 143k and 217k steps and ends at 487.4,
    # 474.5 and 483.6 (the policy still samples; a stray 151 can pull one window under 475); greedy
    # play scores 500 in every case.
    result = train("ppo", tmp_path, eval_episodes=5)
    steps, returns = np.array(result.episodes).T
    rolling = np.convolve(returns, np.ones(20) / 20, mode="valid")  # mean of each 20 consecutive episodes
    assert steps[-1] <= 500_000
    assert rolling.max() >= 475, rolling.max()  # solved within the 500k steps
    assert result.mean_return(20) >= 475, result.mean_return(20)  # seed 0: 487.4
    assert result.extra["greedy_mean_return"] >= 475


@pytest.mark.slow
def test_a2c_and_reinforce_defaults_learn_cartpole(tmp_path, slow_selected):
    # seeds 0-2: A2C (200k steps, about 40 s) ends at 500 every time; REINFORCE (100k, about 30 s) at
    # 476.1, 451.2 and 444.5; greedy play 500 for both
    a2c = train("a2c", tmp_path, eval_episodes=5)
    assert a2c.mean_return(20) >= 450, a2c.mean_return(20)
    reinforce = train("reinforce", tmp_path, eval_episodes=5)
    assert reinforce.mean_return(20) >= 400, reinforce.mean_return(20)


# --- REINFORCE ------------------------------------------------------------------------------------


def test_reinforce_learns_cartpole(tmp_path):
    # seeds 0-3 after 8k steps: last-20 means of 100-150 from first episodes of 19-32
    result = train("reinforce", tmp_path, total_steps=8_000, seed=0)
    first, last = learned(result)
    assert last >= 60 and last >= 2.5 * first, (first, last)
    check_artifacts(result, 8_000)
    assert set(load_agent(result.agent_path)) >= {"policy", "value", "baseline"}


@pytest.mark.parametrize("baseline", ["mean", "none"])
def test_reinforce_baselines_run(tmp_path, baseline, monkeypatch):
    seen = []
    real = rufus.advantages.gae
    monkeypatch.setattr(rufus.advantages, "gae", lambda *a, **k: seen.append(k) or real(*a, **k))
    result = train("reinforce", tmp_path, total_steps=600, baseline=baseline, episodes_per_update=2)
    assert result.episodes and seen and all(k["lam"] == 1.0 for k in seen)  # reward-to-go via gae
    assert load_agent(result.agent_path)["value"] is None


def test_reinforce_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="baseline"):
        train("reinforce", tmp_path, baseline="median")
    with pytest.raises(ConfigError, match="^env: .*Discrete"):
        train("reinforce", tmp_path, env="Pendulum-v1")


# --- A2C ------------------------------------------------------------------------------------------


def test_a2c_learns_cartpole(tmp_path, monkeypatch):
    # seeds 0-3 after 10k steps: last-20 means of 152-183 from first episodes of 16-20
    seen = []
    real = rufus.advantages.gae
    monkeypatch.setattr(rufus.advantages, "gae", lambda *a, **k: seen.append((a[0].shape, k["lam"])) or real(*a, **k))
    result = train("a2c", tmp_path, total_steps=10_000, seed=0)
    first, last = learned(result)
    assert last >= 60 and last >= 2.5 * first, (first, last)
    assert set(seen) == {((8, 5), 1.0)}  # n-step returns: gae with lambda 1 over (envs, n_steps)
    check_artifacts(result, 10_000)


def test_a2c_adam_and_config_errors(tmp_path):
    result = train("a2c", tmp_path, total_steps=400, optimizer="adam", num_envs=2, n_steps=10)
    assert result.episodes
    with pytest.raises(ConfigError, match="optimizer"):
        train("a2c", tmp_path, optimizer="sgd")
    with pytest.raises(ConfigError, match="n_steps"):
        train("a2c", tmp_path, n_steps=0)
