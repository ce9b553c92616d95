"""The pure parts of Ray placement (no cluster): colocation sets from `ray.colocate`, per-rank arguments,
the whole batch from the processes' rollouts, whitening as the local processes add it up, and the
configuration errors a placed run gives before it starts anything."""

from __future__ import annotations

import pytest
import torch

from rufus.advantages import whiten_global
from rufus.distributed.ray import Same, _pick, colocation_sets
from rufus.rollout.record import Rollout

PPO = ["actor", "critic", "reference", "reward"]


def test_colocation_sets():
    assert colocation_sets("all", PPO) == [PPO]
    assert colocation_sets("none", PPO) == [["actor"], ["critic"], ["reference"], ["reward"]]
    assert colocation_sets("actor_ref,critic_reward", PPO) == [["actor", "reference"], ["critic", "reward"]]
    # roles a set leaves out go alone; names of roles the run lacks are dropped (GRPO: no critic)
    assert colocation_sets("actor_ref", PPO) == [["actor", "reference"], ["critic"], ["reward"]]
    assert colocation_sets("actor_ref,critic_reward", ["actor", "reference"]) == [["actor", "reference"]]
    with pytest.raises(ValueError, match="not a set of roles"):
        colocation_sets("actor_judge", PPO)
    with pytest.raises(ValueError, match="in two sets"):
        colocation_sets("actor_ref,ref_critic", PPO)


def test_per_rank_arguments():
    assert [_pick([10, 20], r, 2) for r in (0, 1)] == [10, 20]
    assert [_pick(Same([10, 20]), r, 2) for r in (0, 1)] == [[10, 20], [10, 20]]
    assert _pick(7, 1, 2) == 7 and _pick([1, 2, 3], 0, 2) == [1, 2, 3]


def part(prompt_ids: list[list[int]], responses: list[list[int]], pad: int = 0) -> Rollout:
    P, A = max(map(len, prompt_ids)), max(map(len, responses))
    ids = torch.tensor([[pad] * (P - len(p)) + p + r + [pad] * (A - len(r)) for p, r in zip(prompt_ids, responses)])
    mask = torch.tensor(
        [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (A - len(r)) for p, r in zip(prompt_ids, responses)]
    )
    rmask = torch.tensor([[1] * len(r) + [0] * (A - len(r)) for r in responses])
    return Rollout(
        prompts=[str(p) for p in prompt_ids],
        completions=[str(r) for r in responses],
        input_ids=ids,
        attention_mask=mask,
        prompt_length=P,
        response_mask=rmask,
        has_eos=torch.tensor([len(r) == 1 for r in responses]),
        extra={"k": [len(p) for p in prompt_ids]},
    )


def test_the_whole_batch_from_the_processes_rollouts():
    a = part([[5, 6, 7]], [[8, 9]])
    b = part([[3]], [[4, 1]])
    b.scores = torch.tensor([2.0])
    a.scores = torch.tensor([1.0])
    whole = Rollout.concat([a, b], pad_token_id=0)
    assert whole.prompt_length == 3
    assert whole.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 0, 3, 4, 1]]
    assert whole.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert whole.response_mask.tolist() == [[1, 1], [1, 1]]
    assert whole.scores.tolist() == [1.0, 2.0] and whole.logprobs is None
    assert whole.prompts == ["[5, 6, 7]", "[3]"] and whole.extra == {"k": [3, 1]}


def test_whitening_over_shares_equals_the_processes_all_reduce():
    from rufus.trainers.placed import _whiten

    torch.manual_seed(0)
    x, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()
    parts = [part([[1]] * 2, [[1, 2, 3, 4]] * 2), part([[1]] * 4, [[1, 2, 3, 4]] * 4)]
    # two "processes" of 2 and 4 rows, each adding the other's partial sums as an all-reduce would
    partial = [
        torch.stack([(xs * ms).sum(), (xs * xs * ms).sum(), ms.sum()])
        for xs, ms in ((x[:2], mask[:2]), (x[2:], mask[2:]))
    ]
    total = partial[0] + partial[1]
    want = torch.cat([whiten_global(x[:2], mask[:2], lambda t: total), whiten_global(x[2:], mask[2:], lambda t: total)])
    assert torch.equal(_whiten(x, mask, parts), want)
    # and both are the one-process whitening of the whole batch, to rounding
    assert torch.allclose(want, whiten_global(x, mask, lambda t: t), atol=1e-6)


def test_a_placed_run_refuses_what_it_cannot_place(tiny_model, tmp_path):
    from rufus.config import ConfigError
    from rufus.trainers.ppo import train_ppo
    from tests.helpers import arithmetic_prompts, digit_fraction, write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_prompts(8))
    cfg = {"model": str(tiny_model), "data": {"train": str(prompts)}, "placement": "ray", "batch_size": 4}
    with pytest.raises(ConfigError, match="critic.shared: not yet with placement=ray"):
        train_ppo({**cfg, "output_dir": str(tmp_path / "a"), "critic": {"shared": True}}, reward_fn=digit_fraction)
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="ray.colocate: 'actor_judge'"):
        train_ppo(
            {**cfg, "output_dir": str(tmp_path / "b"), "ray": {"colocate": "actor_judge"}}, reward_fn=digit_fraction
        )
    with pytest.raises(ConfigError, match="ray.processes=3"):
        train_ppo({**cfg, "output_dir": str(tmp_path / "c"), "ray": {"processes": 3}}, reward_fn=digit_fraction)
