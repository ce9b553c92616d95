"""placement=ray: PPO and GRPO with their roles in Ray actor groups (2 processes each; GRPO's rollout
engine a Ray actor of its own) make the updates of the same run with placement=local on 2 processes:
the same metrics and final weights. Killing a role's
process ends the run with an error naming the role, and resume=true continues to the same weights.
Everything the local cluster starts listens on 127.0.0.1 only.

The Ray cluster is started once for the module (and stopped at its end); Rufus joins it."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray", reason="placement=ray needs the ray extra")

from rufus.report.metrics import read_metrics  # noqa: E402
from tests.helpers import arithmetic_prompts, run_cli, write_jsonl  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess]

TOLERANCE = 1e-5  # float32 on CPU: other processes, other summation orders (seen: below 1e-6)
IGNORED = ("time/", "tokens_per_s")  # wall-clock figures


@pytest.fixture(scope="module")
def cluster():
    import ray

    from rufus.distributed.ray import start_local_cluster

    start_local_cluster(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model):
    """A reward model saved as `rufus rm` saves one (its head stored, so every process loads the same)."""
    from rufus.models.loading import load_tokenizer, save_model
    from rufus.models.reward import load_reward_model

    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    return save_model(load_reward_model(str(tiny_model), tokenizer=tok), tok, tmp_path_factory.mktemp("rm") / "rm")


def settings(tmp_path, model, rm, **over) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(16))
    helpers = str(__import__("tests.helpers", fromlist=["x"]).__file__)
    cfg = {
        "model": str(model),
        "data": {"train": str(prompts), "max_length": 64},
        # a reward model (the reward role) and a function (called by the controller), weighted
        "reward": {"model": [str(rm)], "function": [f"{helpers}:digit_fraction"], "weights": [0.5, 1.0]},
        "generation": {"max_new_tokens": 6},
        "batch_size": 4,
        "max_steps": 3,
        "lr": 3e-3,
        "dtype": "float32",
        "progress": False,
        "seed": 3,
        "save_every": 1,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def as_args(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            out += as_args(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            out.append(f"{prefix}{key}=[{','.join(map(str, value))}]")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def run_local(command: str, cfg: dict, out, tmp_path) -> None:
    """The same run with placement=local on 2 processes (one gloo group on 127.0.0.1)."""
    run_cli(command, as_args({**cfg, "output_dir": str(out)}), 2, tmp_path)


def assert_same_metrics(a_dir, b_dir) -> None:
    a, b = read_metrics(a_dir / "metrics.jsonl"), read_metrics(b_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(IGNORED)}
        assert keys == {k for k in rb if not k.startswith(IGNORED)}
        for k in keys:
            if ra[k] is None or rb[k] is None:
                assert ra[k] is rb[k], k
            else:
                assert math.isclose(ra[k], rb[k], rel_tol=1e-4, abs_tol=1e-5), (ra["step"], k, ra[k], rb[k])


def assert_same_weights(a_file, b_file, tol: float = TOLERANCE) -> None:
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst


def no_named_actors(ray, wait: float = 20.0) -> bool:
    """Whether every named Ray actor is gone (a killed actor leaves the list within moments)."""
    end = time.monotonic() + wait
    while ray.util.list_named_actors() and time.monotonic() < end:
        time.sleep(0.1)
    return not ray.util.list_named_actors()


def test_a_local_cluster_listens_on_loopback_only(cluster):
    import psutil

    @cluster.remote(num_cpus=1)
    class Probe:
        def pid(self):
            import os

            return os.getpid()

    probe = Probe.remote()
    assert cluster.get(probe.pid.remote()) > 0
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(proc.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
    assert any(name.startswith(("gcs_server", "raylet")) for name, _ in found), found  # the servers were seen
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in found), found  # (IPv4-mapped too)
    cluster.kill(probe)


def test_ppo_on_ray_makes_the_local_runs_updates(cluster, tmp_path, tiny_model, rm_dir):
    from rufus.trainers.ppo import train_ppo

    cfg = settings(tmp_path, tiny_model, rm_dir, ppo={"epochs": 2, "minibatches": 2})
    run_local("ppo", cfg, tmp_path / "local", tmp_path)
    ray_cfg = {**cfg, "output_dir": str(tmp_path / "ray"), "placement": "ray", "ray": {"processes": 2}}
    result = train_ppo(ray_cfg)
    assert result.final_dir == tmp_path / "ray" / "final"
    assert_same_metrics(tmp_path / "local", tmp_path / "ray")
    assert_same_weights(tmp_path / "local" / "final" / "model.safetensors", result.final_dir / "model.safetensors")
    assert_same_weights(
        tmp_path / "local" / "final_critic" / "model.safetensors",
        tmp_path / "ray" / "final_critic" / "model.safetensors",
    )
    start = load_file(tiny_model / "model.safetensors")
    trained = load_file(result.final_dir / "model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained
    assert no_named_actors(cluster)  # the roles are gone with the run


def test_grpo_on_ray_makes_the_local_runs_updates(cluster, tmp_path, tiny_model, rm_dir):
    from rufus.trainers.grpo import train_grpo

    cfg = settings(tmp_path, tiny_model, rm_dir, grpo={"group_size": 4, "epochs": 2}, kl={"coef": 0.05})
    run_local("grpo", cfg, tmp_path / "local", tmp_path)
    ray_cfg = {
        **cfg,
        "output_dir": str(tmp_path / "ray"),
        "placement": "ray",
        # the rollout engine as a Ray actor of its own: it samples each process's share with that process's
        # seed and gets the policy's weights after each update, so the samples stay the local run's
        "ray": {"processes": 2, "colocate": "none", "engines": 1},
    }
    result = train_grpo(ray_cfg)
    assert_same_metrics(tmp_path / "local", tmp_path / "ray")
    assert_same_weights(tmp_path / "local" / "final" / "model.safetensors", result.final_dir / "model.safetensors")


def test_a_killed_role_ends_the_run_naming_it_and_resume_continues(cluster, tmp_path, tiny_model, rm_dir):
    from rufus.distributed.ray import RoleFailed
    from rufus.trainers.ppo import train_ppo

    placement = {"processes": 2, "colocate": "actor_ref,critic_reward"}
    cfg = settings(tmp_path, tiny_model, rm_dir, max_steps=4, placement="ray", ray=placement)
    whole = train_ppo({**cfg, "output_dir": str(tmp_path / "whole")})

    out = tmp_path / "cut"
    failure: list[BaseException] = []

    def run():
        try:
            train_ppo({**cfg, "output_dir": str(out)})
        except BaseException as e:  # noqa: BLE001 - the test reads it
            failure.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-0000002").exists() and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (critic,) = [a for a in cluster.util.list_named_actors() if a.endswith("-critic-1")]
    cluster.kill(cluster.get_actor(critic))
    thread.join(timeout=300)
    assert failure and isinstance(failure[0], RoleFailed), failure
    message = str(failure[0])
    assert "critic role" in message and "process 1 of 2" in message and "resume=true" in message
    assert not (out / "final").exists()
    assert no_named_actors(cluster)  # the other roles were stopped too

    resumed = train_ppo({**cfg, "output_dir": str(out), "resume": True})
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_same_weights(whole.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors", 1e-6)
    assert_same_weights(
        whole.output_dir / "final_critic" / "model.safetensors", out / "final_critic" / "model.safetensors", 1e-6
    )
