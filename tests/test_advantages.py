"""GAE and whitening: hand-derived values, a naive per-row loop, the GAE identities (Schulman et al.
2016, arXiv 1506.02438, Sec. 3: lambda = 1 gives the reward-to-go minus the value, lambda = 0 the TD
residual), whitening with the biased variance over valid tokens only (Huang et al. 2023, "The N
Implementation Details of RLHF with PPO", detail 18), and masked positions never moving anything."""

import math

import pytest
import torch

from rufus.advantages import gae, kl_penalized_rewards, whiten, whiten_global


def _ragged(b: int, a: int, seed: int):
    """Random rewards / values with prefix masks of lengths a, a-1, ..., (at least 1), one row empty."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, a, generator=g, dtype=torch.float64)
    values = torch.randn(b, a, generator=g, dtype=torch.float64)
    lengths = [max(a - i, 1) for i in range(b)]
    lengths[-1] = 0
    mask = torch.zeros(b, a, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return rewards, values, mask, lengths


def _naive_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE one row at a time: A_t = sum_l (gamma lam)^l delta_{t+l}, V_T = 0 (eq. 16)."""
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        r = rewards[b, :n].tolist()
        v = values[b, :n].tolist() + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return adv


# --- gae ------------------------------------------------------------------------------------------


def test_gae_hand_values():
    # row 0: rewards (1, 2), values (0.5, 1.0), gamma 0.9, lambda 0.5, both tokens valid
    #   delta_1 = 2 + 0.9 * 0 - 1.0 = 1.0                      A_1 = 1.0
    #   delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4                    A_0 = 1.4 + 0.9 * 0.5 * 1.0 = 1.85
    #   returns = A + V = (2.35, 2.0)
    # row 1: only the first token valid; padding holds junk (99, nan) that must not leak in
    #   delta_0 = 3 + 0.9 * 0 - 1 = 2 = A_0, return 3; padding -> 0
    rewards = torch.tensor([[1.0, 2.0], [3.0, 99.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0], [1.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[1.85, 1.0], [2.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(ret, torch.tensor([[2.35, 2.0], [3.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)])
def test_gae_matches_naive_loop_on_ragged_batches(gamma, lam):
    rewards, values, mask, lengths = _ragged(6, 7, seed=3)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = _naive_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(ret, torch.where(mask, expected + values, torch.zeros(())), atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_lambda_one_gamma_one_is_reward_to_go():
    # lambda = gamma = 1: the deltas telescope, A_t + V_t = sum_{s >= t} r_s (Monte Carlo return)
    rewards, values, mask, lengths = _ragged(5, 6, seed=4)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            to_go = rewards[b, t:n].sum().item()
            assert (adv[b, t] + values[b, t]).item() == pytest.approx(to_go, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(to_go, abs=1e-12)


def test_gae_lambda_zero_is_td_residual():
    # lambda = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last valid token
    rewards, values, mask, lengths = _ragged(5, 6, seed=5)
    gamma = 0.9
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            assert adv[b, t].item() == pytest.approx(delta, abs=1e-12)


def test_gae_returns_are_advantages_plus_values_and_padding_is_inert():
    rewards, values, mask, _ = _ragged(4, 5, seed=6)
    adv, ret = gae(rewards, values, mask)
    assert torch.allclose(ret, torch.where(mask, adv + values, torch.zeros(())), atol=1e-12)
    junk_r = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    junk_v = torch.where(mask, values, torch.full_like(values, float("inf")))
    adv2, ret2 = gae(junk_r, junk_v, mask)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_skips_holes_in_the_mask():
    # A hole (e.g. a tool-output token) is skipped: tokens 0 and 2 form the trajectory.
    # rewards (1, junk, 2), values (0.5, junk, 1.0), gamma 0.9, lambda 0.5 -> as the 2-token row of
    # test_gae_hand_values: A = (1.85, 0, 1.0)
    rewards = torch.tensor([[1.0, 50.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, -7.0, 1.0]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[1.85, 0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(ret, torch.tensor([[2.35, 0.0, 2.0]], dtype=torch.float64))


def test_gae_shape_errors_and_dtype():
    with pytest.raises(ValueError, match="must all be \\(B, A\\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    adv, ret = gae(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3), torch.ones(2, 3))
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32


# --- whiten ---------------------------------------------------------------------------------------


def test_whiten_hand_values_biased_variance():
    # valid values 1, 2, 4 (the 10 and -3 are padding): mean 7/3,
    # biased var = ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3 = 42/27 = 1.555556, std = 1.247219
    #   (1 - 7/3) / 1.247219 = -1.069045, (2 - 7/3) / 1.247219 = -0.267261, (4 - 7/3) / 1.247219 = 1.336306
    # (the unbiased variance 42/18 would give -0.872872, ... instead)
    x = torch.tensor([[1.0, 2.0, 10.0], [4.0, -3.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = whiten(x, mask, eps=0.0)
    expected = torch.tensor([[-1.069045, -0.267261, 0.0], [1.336306, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(w, expected, atol=1e-6)
    # shift_mean=False adds the mean back: -1.069045 + 7/3 = 1.264289, 2.066072, 3.669639
    w2 = whiten(x, mask, shift_mean=False, eps=0.0)
    expected2 = torch.tensor([[1.264289, 2.066072, 0.0], [3.669639, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(w2, expected2, atol=1e-6)


def test_whiten_statistics_over_valid_tokens_only():
    rewards, _, mask, _ = _ragged(6, 9, seed=7)
    x = rewards * 3 + 5
    w = whiten(x, mask)
    valid = w[mask]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-7)  # biased: exactly ~1
    assert (w[~mask] == 0).all()
    # shift_mean=False keeps the mean, unit std
    w2 = whiten(x, mask, shift_mean=False)
    assert w2[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-12)
    assert w2[mask].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-7)
    # padding values do not move anything
    junk = torch.where(mask, x, torch.full_like(x, 1e9))
    assert torch.equal(whiten(junk, mask), w)


def test_whiten_without_mask_and_degenerate_inputs():
    x = torch.tensor([1.0, 3.0])  # mean 2, biased std 1 -> (-1, 1)
    assert torch.allclose(whiten(x, eps=0.0), torch.tensor([-1.0, 1.0]))
    # all equal: 0 / sqrt(0 + eps) = 0, no nan; no valid token: all 0
    assert torch.equal(whiten(torch.full((2, 3), 4.0)), torch.zeros(2, 3))
    out = whiten(torch.randn(2, 3), torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3)) and not math.isnan(out.sum().item())


def test_gae_with_episode_ends_and_a_bootstrap_value_hand_values():
    """Classic-RL layout: one environment, 3 steps, the episode ends at t = 1, the segment stops
    mid-episode after t = 2 with V(s_3) = 2. gamma 0.9, lam 0.8, r = 1, V = 0.5 everywhere:
      t=2: delta = 1 + 0.9 * 2 - 0.5 = 2.3;               A_2 = 2.3
      t=1: episode ends: delta = 1 + 0 - 0.5 = 0.5;       A_1 = 0.5
      t=0: delta = 1 + 0.9 * 0.5 - 0.5 = 0.95;            A_0 = 0.95 + 0.9 * 0.8 * 0.5 = 1.31
    """
    rewards = torch.ones(1, 3)
    values = torch.full((1, 3), 0.5)
    adv, ret = gae(
        rewards,
        values,
        torch.ones(1, 3),
        gamma=0.9,
        lam=0.8,
        dones=torch.tensor([[0.0, 1.0, 0.0]]),
        bootstrap=torch.tensor([2.0]),
    )
    assert torch.allclose(adv, torch.tensor([[1.31, 0.5, 2.3]]))
    assert torch.allclose(ret, adv + 0.5)


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_with_dones_matches_a_naive_loop(gamma, lam):
    """Against the textbook loop over (envs, time) with 'episode ended at t' flags and a bootstrap."""
    g = torch.Generator().manual_seed(3)
    B, T = 4, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    dones = (torch.rand(B, T, generator=g) < 0.25).float()
    boot = torch.randn(B, generator=g)
    expected = torch.zeros(B, T)
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            next_value = boot[b] if t == T - 1 else values[b, t + 1]
            alive = 1.0 - dones[b, t]
            delta = rewards[b, t] + gamma * next_value * alive - values[b, t]
            last = delta + gamma * lam * alive * last
            expected[b, t] = last
    adv, ret = gae(rewards, values, torch.ones(B, T), gamma=gamma, lam=lam, dones=dones, bootstrap=boot)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, expected + values, atol=1e-5)


def test_kl_penalized_rewards_by_hand():
    # beta 0.5; KL (2, 3): [0.2, -0.4, 0] (third token padding), [1.0, 0.0, 0.6]; scores 1.0 and -2.0.
    # row 0: -0.5 * [0.2, -0.4, 0] = [-0.1, 0.2, 0], last valid token 1: 0.2 + 1.0 = 1.2
    # row 1: -0.5 * [1.0, 0.0, 0.6] = [-0.5, 0, -0.3], last valid token 2: -0.3 - 2.0 = -2.3
    kl = torch.tensor([[0.2, -0.4, 0.0], [1.0, 0.0, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = kl_penalized_rewards(torch.tensor([1.0, -2.0], dtype=torch.float64), kl, mask, 0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 1.2, 0.0], [-0.5, 0.0, -2.3]], dtype=torch.float64))
    # summed over a response: score - beta * sum_t KL_t, the sequence reward
    torch.testing.assert_close(rewards.sum(-1), torch.tensor([1.0 - 0.5 * -0.2, -2.0 - 0.5 * 1.6], dtype=torch.float64))


def test_kl_penalized_rewards_naive_loop_and_errors():
    g = torch.Generator().manual_seed(0)
    kl = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lengths = [6, 1, 3, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    kl = kl * mask
    scores = torch.randn(4, generator=g, dtype=torch.float64)
    got = kl_penalized_rewards(scores, kl, mask, 0.1)
    for i, n in enumerate(lengths):
        for t in range(6):
            want = -0.1 * kl[i, t].item() + (scores[i].item() if t == n - 1 else 0.0)
            assert got[i, t].item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="scores must be"):
        kl_penalized_rewards(scores[:3], kl, mask, 0.1)


def test_whiten_global_equals_whiten_and_does_not_depend_on_the_split():
    # x = [1, 2, 3, 10 (masked)]: mean 2, biased variance 2/3, so whitened (x - 2) / sqrt(2/3)
    x = torch.tensor([[1.0, 2.0], [3.0, 10.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    one = whiten_global(x, mask, lambda t: t, eps=0.0)
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(one, torch.tensor([[-1 / s, 0.0], [1 / s, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(one, whiten(x, mask, eps=0.0))
    kept = whiten_global(x, mask, lambda t: t, shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept, whiten(x, mask, shift_mean=False, eps=0.0))
    # two "processes" holding one row each: the summed statistics give the whole batch's result
    halves = [(x[:1], mask[:1]), (x[1:], mask[1:])]

    def all_reduce_sum(t):  # what every process would receive: the sum of both processes' sums
        m = [h[1].to(t.dtype) for h in halves]
        return sum(torch.stack([(h[0] * mi).sum(), (h[0] * h[0] * mi).sum(), mi.sum()]) for h, mi in zip(halves, m))

    split = torch.cat([whiten_global(h[0], h[1], all_reduce_sum, eps=0.0) for h in halves])
    torch.testing.assert_close(split, one)
