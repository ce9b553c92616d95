"""Group baselines of the critic-free methods: GRPO / Dr. GRPO group advantages, RLOO, REINFORCE++
returns and DAPO's equal-reward groups, by hand and against naive loops. Sources: GRPO, Shao et al.
2024 (arXiv 2402.03300), Sec. 4.1.2; Dr. GRPO, Liu et al. 2025 (arXiv 2503.20783), Sec. 3; RLOO,
Ahmadian et al. 2024 (arXiv 2402.14740); REINFORCE++, Hu et al. 2025 (arXiv 2501.03262); DAPO,
Yu et al. 2025 (arXiv 2503.14476), Sec. 3.2."""

import math
import statistics

import pytest
import torch

from rufus.advantages import (
    equal_reward_groups,
    group_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    whiten,
)

# --- group_advantages ---------------------------------------------------------------------------


def test_grpo_group_by_hand():
    # group [1, 2, 3, 4]: mean 2.5, deviations (-1.5, -0.5, 0.5, 1.5)
    #   UNBIASED sample std = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3) = 1.290994
    #   A = deviations / (1.290994 + 1e-4) = (-1.161805, -0.387268, 0.387268, 1.161805)
    #   (the biased std sqrt(5/4) = 1.118034 would give 1.341521 for the last one)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), 4)
    assert adv.tolist() == pytest.approx([-1.161805, -0.387268, 0.387268, 1.161805], abs=1e-6)
    # mean 0 and sample std = 1.290994 / 1.291094 = 0.999923 (just under 1 because of eps)
    assert abs(adv.mean().item()) < 1e-15
    assert adv.std().item() == pytest.approx(math.sqrt(5 / 3) / (math.sqrt(5 / 3) + 1e-4), abs=1e-12)
    assert abs(adv.std().item() - 0.999923) < 1e-6
    # eps = 0: exactly unit sample std
    assert group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), 4, eps=0.0).std().item() == (
        pytest.approx(1.0, abs=1e-12)
    )


def test_dr_grpo_no_scale_by_hand():
    # mean-centring only: [1, 2, 3, 4] -> (-1.5, -0.5, 0.5, 1.5); [0, 0, 1] -> (-1/3, -1/3, 2/3)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4, scale=False)
    assert adv.tolist() == pytest.approx([-1.5, -0.5, 0.5, 1.5], abs=1e-7)
    adv = group_advantages(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 3, scale=False)
    assert adv.tolist() == pytest.approx([-1 / 3, -1 / 3, 2 / 3], abs=1e-15)


def test_equal_groups_give_exact_zero_not_nan():
    # a group of equal rewards has std 0: (r - mean) / (0 + eps) could be rounding noise / 1e-4
    # (0.1 * 3 / 3 != 0.1 in floating point); it must be exactly 0. With eps = 0 it would be 0/0 = nan.
    rewards = torch.tensor([0.1, 0.1, 0.1, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    for scale in (True, False):
        for eps in (1e-4, 0.0):
            adv = group_advantages(rewards, 3, scale=scale, eps=eps)
            assert torch.isfinite(adv).all()
            assert (adv[:6] == 0).all()
            assert adv[6:].abs().sum().item() > 0
    # group size 1: nothing to compare with, all 0 (torch.std of one value would be nan)
    assert (group_advantages(torch.tensor([3.0, -1.0]), 1) == 0).all()


def test_groups_are_consecutive_and_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 6, generator=g, dtype=torch.float64)
    for scale in (True, False):
        adv = group_advantages(rewards, 6, scale=scale)
        for b in range(5):
            group = rewards[b * 6 : (b + 1) * 6].tolist()
            mean, std = statistics.mean(group), statistics.stdev(group)  # stdev: sample (n - 1)
            for i, r in enumerate(group):
                expected = (r - mean) / (std + 1e-4) if scale else r - mean
                assert adv[b * 6 + i].item() == pytest.approx(expected, abs=1e-12)
            assert abs(adv[b * 6 : (b + 1) * 6].sum().item()) < 1e-12  # zero mean within the group


def test_group_advantages_dtype_and_errors():
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32  # ints / bf16 upcast
    assert group_advantages(torch.tensor([1.0, 0.0]).bfloat16(), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="positive divisor of the number of rewards \\(5\\)"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="must be \\(N,\\)"):
        group_advantages(torch.zeros(2, 2), 2)


# --- rloo_advantages ------------------------------------------------------------------------------


def test_rloo_by_hand():
    # k = 4, R = (1, 2, 3, 6), sum 12, mean 3:
    #   A_i = R_i - (12 - R_i) / 3: 1 - 11/3 = -8/3, 2 - 10/3 = -4/3, 3 - 9/3 = 0, 6 - 6/3 = 4
    #   = 4/3 (R_i - 3) = 4/3 (-2, -1, 0, 3)
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64), 4)
    assert adv.tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0], abs=1e-15)
    # k = 2: A = (R_1 - R_2, R_2 - R_1)
    adv = rloo_advantages(torch.tensor([0.5, 2.0], dtype=torch.float64), 2)
    assert adv.tolist() == pytest.approx([-1.5, 1.5], abs=1e-15)


def test_rloo_matches_leave_one_out_loop_and_identity():
    g = torch.Generator().manual_seed(1)
    k = 5
    rewards = torch.randn(4 * k, generator=g, dtype=torch.float64)
    adv = rloo_advantages(rewards, k)
    for b in range(4):
        group = rewards[b * k : (b + 1) * k].tolist()
        for i in range(k):
            others = [group[j] for j in range(k) if j != i]
            assert adv[b * k + i].item() == pytest.approx(group[i] - sum(others) / (k - 1), abs=1e-12)
            # A_i = k / (k - 1) (R_i - mean R)
            assert adv[b * k + i].item() == pytest.approx(k / (k - 1) * (group[i] - sum(group) / k), abs=1e-12)
        assert abs(adv[b * k : (b + 1) * k].sum().item()) < 1e-12


def test_rloo_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="positive divisor"):
        rloo_advantages(torch.zeros(5), 2)


# --- reinforce_pp_returns -------------------------------------------------------------------------


def test_reinforce_pp_returns_by_hand():
    # score 1 at the last valid token, a per-token KL penalty -0.1 at each token (r_t = 1[t=T] - 0.1):
    #   row 0 (3 valid): r = (-0.1, -0.1, 0.9); gamma 1:  G = (0.7, 0.8, 0.9)
    #                                        gamma 0.5: G_2 = 0.9, G_1 = -0.1 + 0.45 = 0.35,
    #                                                   G_0 = -0.1 + 0.175 = 0.075
    #   row 1 (1 valid, padding junk): G = (0.9, 0, 0)
    rewards = torch.tensor([[-0.1, -0.1, 0.9], [0.9, 99.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    g1 = reinforce_pp_returns(rewards, mask)
    assert torch.allclose(g1, torch.tensor([[0.7, 0.8, 0.9], [0.9, 0.0, 0.0]], dtype=torch.float64), atol=1e-15)
    g2 = reinforce_pp_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(g2, torch.tensor([[0.075, 0.35, 0.9], [0.9, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_returns_match_naive_loop(gamma):
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lengths = [6, 3, 1, 0]
    mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    returns = reinforce_pp_returns(rewards, mask, gamma=gamma)
    for b, n in enumerate(lengths):
        for t in range(6):
            expected = sum(gamma ** (s - t) * rewards[b, s].item() for s in range(t, n)) if t < n else 0.0
            assert returns[b, t].item() == pytest.approx(expected, abs=1e-12)
    # the trainer's next step: whiten over the global batch's valid tokens
    adv = whiten(returns, mask)
    assert abs(adv[mask].mean().item()) < 1e-12 and (adv[~mask] == 0).all()


def test_reinforce_pp_returns_errors():
    with pytest.raises(ValueError, match="must both be \\(B, A\\)"):
        reinforce_pp_returns(torch.zeros(2, 3), torch.ones(2, 2))


# --- equal_reward_groups ---------------------------------------------------------------------------


def test_equal_reward_groups():
    # groups of 3: all wrong, all right, mixed, all 0.5, one nan (never equal: kept)
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 1.0, float("nan"), 1.0])
    assert equal_reward_groups(rewards, 3).tolist() == [True, True, False, True, False]
    # a group of one is trivially equal; the zero advantage of such groups is what DAPO drops
    assert equal_reward_groups(torch.tensor([1.0, 2.0]), 1).tolist() == [True, True]
    adv = group_advantages(rewards[:12], 3)
    assert ((adv.view(4, 3) == 0).all(dim=1) == equal_reward_groups(rewards[:12], 3)).all()
    with pytest.raises(ValueError, match="positive divisor"):
        equal_reward_groups(rewards, 4)
