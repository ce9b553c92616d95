"""GRPO and RLOO / REINFORCE++ trainers on a tiny LM with a programmatic reward."""

from __future__ import annotations

import pytest
import torch

from rufus.report.metrics import read_metrics
from rufus.trainers.grpo import train_grpo
from rufus.trainers.rloo import train_rloo
from tests.helpers import arithmetic_prompts, digit_fraction, with_overrides, write_jsonl


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", arithmetic_prompts())


def config(tiny_model, prompts, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(prompts), "max_length": 40},
        "generation": {"max_new_tokens": 8},
        "batch_size": 4,
        "lr": 2e-3,
        "max_steps": 30,
        "dtype": "float32",
        "progress": False,
        "seed": 0,
    }
    return with_overrides(cfg, over)


def early_late(rows, key="score/mean", n=5):
    values = [r[key] for r in rows]
    return sum(values[:n]) / n, sum(values[-n:]) / n


def test_grpo_raises_the_reward_with_bounded_kl(tiny_model, prompts, tmp_path):
    result = train_grpo(
        config(tiny_model, prompts, tmp_path / "grpo", lr=5e-3, max_steps=40, **{"grpo.group_size": 4, "kl.coef": 0.1}),
        reward_fn=digit_fraction,
    )
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    start, end = early_late(rows)
    assert end > start + 0.15, (start, end)
    assert max(r["kl/mean"] for r in rows) < 25.0  # nats per 8-token response
    assert all(r["policy/ratio_dev_first"] == 0.0 for r in rows)
    assert result.reference is not None


def test_grpo_without_kl_loads_no_reference_and_dr_grpo_and_dapo_options_take_effect(
    tiny_model, prompts, tmp_path, monkeypatch
):
    """kl.coef=0 loads no reference; scale_rewards=false (Dr. GRPO) centres without dividing by the std;
    loss_aggregation=constant divides by responses x max_new_tokens; clip_high reaches the loss;
    epochs x minibatches optimiser steps; drop_equal_groups masks out the groups with equal scores."""
    import rufus.advantages as advantages
    import rufus.losses.grpo as grpo_losses
    import rufus.models.loading as loading

    loads, scales, calls = [], [], []
    original_load, original_adv, original_loss = (
        loading.load_causal_lm,
        advantages.group_advantages,
        grpo_losses.grpo_policy_loss,
    )
    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: loads.append(a) or original_load(*a, **k))
    monkeypatch.setattr(
        advantages, "group_advantages", lambda r, g, **k: scales.append(k["scale"]) or original_adv(r, g, **k)
    )

    def loss_spy(logprobs, old, ref, adv, mask, **kw):
        calls.append({"adv": adv.detach().clone(), "mask": mask.clone(), **kw})
        return original_loss(logprobs, old, ref, adv, mask, **kw)

    monkeypatch.setattr(grpo_losses, "grpo_policy_loss", loss_spy)
    result = train_grpo(
        config(
            tiny_model,
            prompts,
            tmp_path / "dr",
            max_steps=6,
            **{
                "grpo.group_size": 4,
                "kl.coef": 0.0,
                "grpo.scale_rewards": False,
                "grpo.loss_aggregation": "constant",
                "grpo.clip_high": 0.28,
                "grpo.epochs": 2,
                "grpo.minibatches": 2,
                "grpo.drop_equal_groups": True,
            },
        ),
        reward_fn=digit_fraction,
    )
    assert result.reference is None
    assert len(loads) == 1  # the policy only
    rows = read_metrics(tmp_path / "dr" / "metrics.jsonl")
    assert all(r["kl/mean"] == 0.0 for r in rows)
    assert scales == [False] * 6  # Dr. GRPO: advantages centred only
    # 4 prompts x 4 samples in 2 minibatches of 8 responses: the constant normaliser is 8 x max_new_tokens 8
    assert calls and all(c["aggregation"] == "constant" and float(c["normalizer"]) == 8 * 8 for c in calls)
    assert all(c["clip_high"] == 0.28 and c["clip"] == 0.2 for c in calls)
    assert all(r["policy/updates"] == 2 * 2 for r in rows if "policy/updates" in r)
    # groups whose 4 scores are equal have advantage 0 and, dropped, no valid token
    equal = [r["groups/equal"] for r in rows]
    assert max(equal) > 0, equal
    dropped = [(c["adv"][i], c["mask"][i]) for c in calls for i in range(len(c["adv"])) if c["mask"][i].sum() == 0]
    assert dropped and all(float(a) == 0.0 for a, _ in dropped)


@pytest.mark.parametrize(
    "estimator, lr, steps", [("rloo", 1e-2, 40), ("reinforce_pp", 5e-3, 40), ("reinforce_pp_baseline", 5e-3, 60)]
)
def test_rloo_and_reinforce_pp_raise_the_reward(tiny_model, prompts, tmp_path, estimator, lr, steps):
    train_rloo(
        config(
            tiny_model,
            prompts,
            tmp_path / estimator,
            lr=lr,
            max_steps=steps,
            **{"rloo.group_size": 4, "rloo.advantage": estimator},
        ),
        reward_fn=digit_fraction,
    )
    rows = read_metrics(tmp_path / estimator / "metrics.jsonl")
    start, end = early_late(rows, "score/mean")
    assert end > start + 0.08 and end > 2.5 * start, (estimator, start, end)
    assert all(r["policy/ratio_dev_first"] == 0.0 for r in rows)
    assert torch.isfinite(torch.tensor([r["kl/mean"] for r in rows])).all()


def test_grpo_single_update_takes_pi_old_from_its_own_pass_with_the_same_result(
    tiny_model, prompts, tmp_path, monkeypatch
):
    """grpo.epochs = minibatches = 1: no separate pi_old forward pass; the run (weights, logged KL,
    loss) is the one where pi_old has a pass of its own."""
    import rufus.trainers.online as online

    calls = []
    original = online.old_and_ref_logprobs

    def spy(*args, with_old=True, **kwargs):
        calls.append(with_old)
        return original(*args, with_old=with_old, **kwargs)

    def separate_pass(*args, with_old=True, **kwargs):
        return original(*args, with_old=True, **kwargs)

    cfg = dict(max_steps=4, **{"grpo.group_size": 4, "kl.coef": 0.1})
    monkeypatch.setattr(online, "old_and_ref_logprobs", spy)
    fast = train_grpo(config(tiny_model, prompts, tmp_path / "fast", **cfg), reward_fn=digit_fraction)
    assert calls == [False] * 4
    monkeypatch.setattr(online, "old_and_ref_logprobs", separate_pass)
    plain = train_grpo(config(tiny_model, prompts, tmp_path / "plain", **cfg), reward_fn=digit_fraction)
    a, b = read_metrics(tmp_path / "fast" / "metrics.jsonl"), read_metrics(tmp_path / "plain" / "metrics.jsonl")
    for key in ("kl/mean", "policy/ref_kl", "policy/entropy", "reward/mean", "response/length"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert all(r["kl/mean"] != 0 for r in a[1:])  # the policy moved, so the logged KL is not trivially 0
    for (name, p), q in zip(fast.policy.named_parameters(), plain.policy.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_grad_accum_does_not_change_the_update(tiny_model, prompts, tmp_path):
    """The shared update loop divides by the minibatch's token count, not the micro-batch's: four
    micro-batches of 4 responses update the policy as one of 16 does."""
    cfg = {"max_steps": 2, "grpo.group_size": 4, "kl.coef": 0.1, "grpo.epochs": 2}
    one = train_grpo(config(tiny_model, prompts, tmp_path / "one", **cfg), reward_fn=digit_fraction)
    four = train_grpo(config(tiny_model, prompts, tmp_path / "four", grad_accum=4, **cfg), reward_fn=digit_fraction)
    moved = False
    base = type(one.policy).from_pretrained(tiny_model).state_dict()
    for (name, p), q in zip(one.policy.named_parameters(), four.policy.parameters(), strict=True):
        assert torch.allclose(p, q, atol=2e-5), name
        moved |= not torch.equal(p, base[name])
    assert moved


def test_a_batch_that_does_not_split_names_the_keys(tiny_model, prompts, tmp_path):
    from rufus.config import ConfigError
    from rufus.trainers.ppo import train_ppo

    match = (
        "batch_size: 4 prompts x grpo.group_size 3 = 12 responses do not split into 1 processes x grpo.minibatches 5"
    )
    with pytest.raises(ConfigError, match=match):
        train_grpo(config(tiny_model, prompts, tmp_path / "bad", **{"grpo.group_size": 3, "grpo.minibatches": 5}))
    with pytest.raises(ConfigError, match="batch_size: 4 does not split into 1 processes x ppo.minibatches 3"):
        train_ppo(config(tiny_model, prompts, tmp_path / "bad", **{"ppo.minibatches": 3}))
    assert not (tmp_path / "bad").exists()  # refused before anything was written
