"""PPO losses against hand-derived values and gradients, a naive loop, masking and batch splitting."""

import math

import pytest
import torch

from rufus.losses.ppo import entropy_from_logits, explained_variance, policy_loss, value_loss


def _logprobs_with_ratio(ratio, old):
    """(logprobs as a leaf with grad, old_logprobs) such that exp(logprobs - old) = ratio."""
    old = torch.as_tensor(old, dtype=torch.float64)
    lp = (old + torch.as_tensor(ratio, dtype=torch.float64).log()).detach().requires_grad_(True)
    return lp, old


# --- policy loss ----------------------------------------------------------------------------------


def test_policy_loss_clip_cases_by_hand():
    # clip 0.2 -> [0.8, 1.2]; per token l = max(-A r, -A clip(r)); d l / d logprob = d l / d r * r
    # row 0, A = +2, ratios 1.1 / 1.5 / 0.5:
    #   r 1.1 inside:      max(-2.2, -2.2) = -2.2, grad -A r = -2.2
    #   r 1.5 above:       max(-3.0, -2.4) = -2.4 (clipped, grad 0)
    #   r 0.5 below:       max(-1.0, -1.6) = -1.0 (unclipped: A > 0 never clips below), grad -1.0
    # row 1, A = -1, same ratios:
    #   r 1.1 inside:      max(1.1, 1.1) = 1.1, grad 1.1
    #   r 1.5 above:       max(1.5, 1.2) = 1.5 (unclipped: A < 0 never clips above), grad 1.5
    #   r 0.5 below:       max(0.5, 0.8) = 0.8 (clipped, grad 0)
    # token mean = (-2.2 - 2.4 - 1.0 + 1.1 + 1.5 + 0.8) / 6 = -2.2 / 6 = -0.366667; grads / 6
    # clipfrac = 2 / 6; approx_kl = mean of (r - 1) - ln r = 0.0046898, 0.0945349, 0.1931472 (twice)
    #   = 0.2923719 / 3 = 0.0974573; ratio_mean = 3.1 / 3 = 1.033333; ratio_max = 1.5
    ratios = [[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]]
    lp, old = _logprobs_with_ratio(ratios, [[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.5]])
    adv = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 3)
    loss, stats = policy_loss(lp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-2.2 / 6, abs=1e-12)
    loss.backward()
    expected_grad = torch.tensor([[-2.2, 0.0, -1.0], [1.1, 1.5, 0.0]], dtype=torch.float64) / 6
    assert torch.allclose(lp.grad, expected_grad, atol=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.0974573, abs=1e-7)
    assert stats["ratio_mean"].item() == pytest.approx(3.1 / 3, abs=1e-12)
    assert stats["ratio_max"].item() == pytest.approx(1.5, abs=1e-12)
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_clip_high_is_asymmetric():
    # clip 0.2, clip_high 0.28 -> range [0.8, 1.28]
    #   A = +1, r 1.25: max(-1.25, -1.25) = -1.25 (inside; symmetric 0.2 would clip to -1.2)
    #   A = +1, r 1.3:  max(-1.3, -1.28) = -1.28 (clipped)
    #   A = -1, r 0.75: max(0.75, 0.8) = 0.8 (the low side still clips at 0.8)
    # mean = (-1.25 - 1.28 + 0.8) / 3 = -1.73 / 3 = -0.576667; clipfrac 2/3
    lp, old = _logprobs_with_ratio([[1.25, 1.3, 0.75]], [[-1.0, -1.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, stats = policy_loss(lp, old, adv, torch.ones(1, 3), clip=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.73 / 3, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    symmetric, _ = policy_loss(lp, old, adv, torch.ones(1, 3), clip=0.2)
    # symmetric: (-1.2 - 1.2 + 0.8) / 3 = -0.533333
    assert symmetric.item() == pytest.approx(-1.6 / 3, abs=1e-12)


def test_policy_loss_first_step_invariants():
    # ratio == 1 (logprobs == old_logprobs): l = max(-A, -A) = -A, so loss = -mean(A);
    # clipfrac 0, approx_kl 0 exactly, ratio_mean = ratio_max = 1 (Huang et al. 2022, "The 37
    # Implementation Details of PPO", ICLR blog track: ratio must be exactly 1 on the first minibatch)
    torch.manual_seed(0)
    old = -torch.rand(4, 6) * 3
    adv = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    loss, stats = policy_loss(old.clone(), old, adv, mask)
    assert loss.item() == pytest.approx(-adv[mask.bool()].mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0


def test_policy_loss_matches_naive_loop():
    torch.manual_seed(1)
    old = -torch.rand(3, 5, dtype=torch.float64) * 3
    lp = old + 0.4 * torch.randn(3, 5, dtype=torch.float64)
    adv = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, clip=0.2)
    total, n, clipped, kl = 0.0, 0, 0, 0.0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                r = math.exp(lp[b, t].item() - old[b, t].item())
                a = adv[b, t].item()
                l1, l2 = -a * r, -a * min(max(r, 0.8), 1.2)
                total += max(l1, l2)
                clipped += l2 > l1
                kl += (r - 1) - math.log(r)
                n += 1
    assert loss.item() == pytest.approx(total / n, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(clipped / n, abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(kl / n, abs=1e-12)


def test_policy_loss_masked_positions_change_nothing():
    # junk (huge or nan) logprobs / advantages on padding: same loss, same stats, same finite gradient
    torch.manual_seed(2)
    old = -torch.rand(3, 4) * 3
    lp0 = old + 0.3 * torch.randn(3, 4)
    adv = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    pad = ~mask.bool()

    def run(lp_values, old_values, adv_values):
        lp = lp_values.clone().requires_grad_(True)
        loss, stats = policy_loss(lp, old_values, adv_values, mask)
        loss.backward()
        return loss, stats, lp.grad

    ref = run(lp0, old, adv)
    junk = run(
        torch.where(pad, torch.full_like(lp0, 500.0), lp0),
        torch.where(pad, torch.full_like(old, -1e9), old),
        torch.where(pad, torch.full_like(adv, float("nan")), adv),
    )
    assert junk[0].item() == ref[0].item()
    assert all(junk[1][k].item() == ref[1][k].item() for k in ref[1])
    assert torch.isfinite(junk[2]).all() and torch.equal(junk[2], ref[2])
    assert (ref[2][pad] == 0).all()


def test_policy_loss_token_vs_sequence_aggregation():
    # ratio 1 so l = -A. row 0: A = (1, 2, 3) all valid; row 1: A = (6, junk, junk), 1 valid token
    #   token:    -(1 + 2 + 3 + 6) / 4 = -3
    #   sequence: -((1 + 2 + 3) / 3 + 6) / 2 = -(2 + 6) / 2 = -4
    #   sum with normalizer 8: -12 / 8 = -1.5
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert policy_loss(old, old, adv, mask, aggregation="token")[0].item() == pytest.approx(-3.0)
    assert policy_loss(old, old, adv, mask, aggregation="sequence")[0].item() == pytest.approx(-4.0)
    assert policy_loss(old, old, adv, mask, aggregation="constant", normalizer=8)[0].item() == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        policy_loss(old, old, adv, mask, aggregation="mean")


def test_policy_loss_micro_batches_with_global_normalizer_give_the_full_gradient():
    torch.manual_seed(3)
    w = torch.randn(5, requires_grad=True)
    feats = torch.randn(4, 6, 5)
    old = (feats @ w).detach() + 0.2 * torch.randn(4, 6)
    adv = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[0, 1:] = 0
    mask[2, 3:] = 0
    full, _ = policy_loss(feats @ w, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, w)
    n = mask.sum()
    g_split, total = torch.zeros_like(w), 0.0
    for part in ([0], [1, 2], [3]):
        loss, _ = policy_loss(feats[part] @ w, old[part], adv[part], mask[part], normalizer=n)
        g_split += torch.autograd.grad(loss, w)[0]
        total += loss.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(g_split, g_full, atol=1e-6)


def test_policy_loss_validation_and_empty_mask():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shapes must match"):
        policy_loss(x, x, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip ranges must be >= 0"):
        policy_loss(x, x, x, torch.ones(2, 3), clip=-0.1)
    loss, stats = policy_loss(x + 1.0, x, torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    # bf16 inputs are computed in float32
    loss, _ = policy_loss(x.bfloat16(), x.bfloat16(), x.bfloat16(), torch.ones(2, 3))
    assert loss.dtype == torch.float32


# --- value loss -----------------------------------------------------------------------------------


def _value_case():
    # token 1: V 1.0, V_old 0.5, R 1.2: V - V_old = 0.5 -> clipped to 0.2, V_clip 0.7
    #   (V - R)^2 = 0.04, (V_clip - R)^2 = 0.25 -> max 0.25 (clipped term wins), l = 0.125, grad 0
    # token 2: V 0.6, V_old 0.5, R 1.0: inside, both 0.16, l = 0.08, grad V - R = -0.4
    # token 3: V 1.0, V_old 0.5, R 0.0: V_clip 0.7, (V - R)^2 = 1.0 > 0.49 -> l = 0.5, grad V - R = 1.0
    values = torch.tensor([[1.0, 0.6, 1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    returns = torch.tensor([[1.2, 1.0, 0.0]], dtype=torch.float64)
    return values, old, returns, torch.ones(1, 3)


def test_value_loss_clipped_by_hand():
    # mean = (0.125 + 0.08 + 0.5) / 3 = 0.705 / 3 = 0.235; grads (0, -0.4, 1.0) / 3; clipfrac 1/3
    # stats: values mean (1 + 0.6 + 1) / 3 = 0.866667, returns mean 2.2 / 3 = 0.733333
    values, old, returns, mask = _value_case()
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.235, abs=1e-12)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.4, 1.0]], dtype=torch.float64) / 3, atol=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["values"].item() == pytest.approx(2.6 / 3)
    assert stats["returns"].item() == pytest.approx(2.2 / 3)


def test_value_loss_unclipped_by_hand():
    # clip None: 0.5 (0.04 + 0.16 + 1.0) / 3 = 0.2; grads (V - R) / 3 = (-0.2, -0.4, 1.0) / 3; clipfrac 0
    values, old, returns, mask = _value_case()
    loss, stats = value_loss(values, old, returns, mask, clip=None)
    assert loss.item() == pytest.approx(0.2, abs=1e-12)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[-0.2, -0.4, 1.0]], dtype=torch.float64) / 3, atol=1e-12)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_masked_positions_and_sequence_aggregation():
    # add a second row with one valid token: V 2, V_old 2, R 0 -> l = 0.5 * 4 = 2; padding is junk
    #   token:    (0.125 + 0.08 + 0.5 + 2) / 4 = 2.705 / 4 = 0.67625
    #   sequence: (0.235 + 2) / 2 = 1.1175
    nan = float("nan")
    values = torch.tensor([[1.0, 0.6, 1.0], [2.0, nan, 1e9]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5], [2.0, -1e9, nan]], dtype=torch.float64)
    returns = torch.tensor([[1.2, 1.0, 0.0], [0.0, nan, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = value_loss(values, old, returns, mask)
    assert loss.item() == pytest.approx(0.67625, abs=1e-12)
    loss.backward()
    assert torch.isfinite(values.grad).all() and (values.grad[1, 1:] == 0).all()
    assert value_loss(values, old, returns, mask, aggregation="sequence")[0].item() == pytest.approx(1.1175)
    assert stats["values"].item() == pytest.approx(4.6 / 4)


# --- entropy and explained variance ---------------------------------------------------------------


def test_entropy_by_hand():
    # uniform over V = 7: log 7 = 1.945910
    # logits (0, ln 3): p = (1/4, 3/4): H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    # one-hot-ish logits (60, 0, 0): H ~ 2 * 61 e^-60 ~ 1e-24, i.e. 0
    # -inf logits (masked vocabulary) count as p = 0: (0, 0, -inf) -> ln 2
    h = entropy_from_logits(torch.zeros(2, 3, 7))
    assert h.shape == (2, 3) and torch.allclose(h, torch.full((2, 3), math.log(7)))
    h = entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64))
    assert h.item() == pytest.approx(0.562335, abs=1e-6)
    assert entropy_from_logits(torch.tensor([[[60.0, 0.0, 0.0]]])).item() < 1e-6
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(math.log(2), abs=1e-6)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_naive_loop_and_is_float32_for_bf16():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 5) * 4
    h = entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t].double(), -1).tolist()
            assert h[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)
    big = entropy_from_logits((logits * 1000).bfloat16())  # no overflow for huge logits
    assert big.dtype == torch.float32 and torch.isfinite(big).all()


def test_explained_variance_by_hand():
    # valid R = (1, 2, 3, 4), V = (1, 2, 3, 3); padding is junk
    #   Var R = ((1.5^2 + 0.5^2) * 2) / 4 = 1.25 (biased)
    #   R - V = (0, 0, 0, 1): mean 0.25, Var = (3 * 0.0625 + 0.5625) / 4 = 0.1875
    #   EV = 1 - 0.1875 / 1.25 = 0.85
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, -50.0], [3.0, 3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85, abs=1e-6)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # predicting the mean of R (2.5) everywhere explains nothing: 1 - 1.25 / 1.25 = 0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0, abs=1e-6)
    # Var R == 0 (constant returns, or no valid token): undefined -> nan
    assert math.isnan(explained_variance(values, torch.ones(2, 3), mask))
    assert math.isnan(explained_variance(values, returns, torch.zeros(2, 3)))
