"""KTO loss against hand-derived values, a naive per-row loop, the detached and clamped reference
point, the weights, and the batch-split property (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7)."""

import math

import pytest
import torch

from rufus.losses.kto import kl_estimate, kto_loss, weight_advice


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def mask(*flags):
    return torch.tensor(flags, dtype=torch.bool)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- hand-derived values -----------------------------------------------------------------------------


def test_at_the_reference_point_every_value_is_half_its_weight():
    # r = log pi - log pi_ref = -3.0 - (-3.5) = 0.5 (desirable) and -5.0 - (-5.5) = 0.5 (undesirable);
    # z0 = 0.5 = r, so v = lambda sigmoid(0) = lambda / 2 whatever beta:
    #   desirable, lambda_D = 2: 2 - 1 = 1;  undesirable, lambda_U = 1: 1 - 0.5 = 0.5;  mean 0.75.
    policy = t(-3.0, -5.0, grad=True)
    loss, stats = kto_loss(
        policy, t(-3.5, -5.5), mask(True, False), t(0.5), beta=0.1, desirable_weight=2.0, undesirable_weight=1.0
    )
    assert loss.item() == pytest.approx(0.75, abs=1e-12)
    # gradients: l_D = lambda_D sigmoid(-beta (r - z0)), dl/dr = -lambda_D beta sigmoid'(0) = -2 * 0.1 / 4
    # = -0.05, over B = 2 rows: -0.025. l_U = lambda_U sigmoid(beta (r - z0)): +1 * 0.1 / 4 / 2 = +0.0125.
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.0125], abs=1e-12)
    # implicit rewards beta r = 0.1 * 0.5 = 0.05 in both classes; one row of each; z0 as given
    assert stats["rewards/desirable"].item() == pytest.approx(0.05, abs=1e-12)
    assert stats["rewards/undesirable"].item() == pytest.approx(0.05, abs=1e-12)
    assert stats["count/desirable"].item() == 1 and stats["count/undesirable"].item() == 1
    assert stats["kl"].item() == 0.5


def test_policy_equal_to_reference_starts_at_half_the_weight():
    # pi == pi_ref: r = 0 and z0 = 0, so each row's loss is lambda - lambda / 2 = lambda / 2:
    # default weights 1: 0.5 per row; lambda_D = 1.2, lambda_U = 1 on rows D, U, U: (0.6 + 0.5 + 0.5) / 3
    same = t(-4.0, -6.0, -2.0)
    loss, _ = kto_loss(same, same, mask(True, False, False), 0.0, beta=0.1)
    assert loss.item() == pytest.approx(0.5, abs=1e-12)
    loss, _ = kto_loss(same, same, mask(True, False, False), 0.0, beta=0.1, desirable_weight=1.2)
    assert loss.item() == pytest.approx(1.6 / 3, abs=1e-12)


def test_values_off_the_reference_point_by_hand():
    # beta = 0.5, z0 = 0, r = 2:
    #   desirable:   v = sigmoid(0.5 * (2 - 0)) = sigmoid(1) = 0.7310586, loss 1 - v = 0.2689414
    #   undesirable: v = sigmoid(0.5 * (0 - 2)) = sigmoid(-1) = 0.2689414, loss 0.7310586
    for flag, want in ((True, 0.2689414), (False, 0.7310586)):
        loss, _ = kto_loss(t(-1.0), t(-3.0), mask(flag), 0.0, beta=0.5)
        assert loss.item() == pytest.approx(want, abs=1e-7)
    # a reference point z0 = 2 moves the desirable row back to sigmoid(0): loss 0.5
    loss, _ = kto_loss(t(-1.0), t(-3.0), mask(True), 2.0, beta=0.5)
    assert loss.item() == pytest.approx(0.5, abs=1e-12)
    # weights scale each class: lambda_U = 3 on the undesirable row: 3 * 0.7310586 = 2.1931758
    loss, _ = kto_loss(t(-1.0), t(-3.0), mask(False), 0.0, beta=0.5, undesirable_weight=3.0)
    assert loss.item() == pytest.approx(3 * 0.7310586, abs=1e-6)


def test_a_negative_kl_estimate_is_clamped_at_zero():
    # z0 = max(0, -0.3) = 0: desirable r = 2, beta = 0.5 gives 1 - sigmoid(1) = 0.2689414, as with z0 = 0.
    # Unclamped it would be 1 - sigmoid(0.5 * 2.3) = 1 - sigmoid(1.15) = 0.2404891.
    loss, stats = kto_loss(t(-1.0), t(-3.0), mask(True), t(-0.3), beta=0.5)
    assert loss.item() == pytest.approx(1 - sigmoid(1.0), abs=1e-12)
    assert loss.item() != pytest.approx(1 - sigmoid(1.15), abs=1e-3)
    assert stats["kl"].item() == 0.0


def test_the_reference_point_carries_no_gradient():
    # z0 computed from the same rows, differentiably: kto_loss detaches it, so the gradient is the one
    # for a constant z0, and the tensor z0 came from gets none through it.
    policy = t(-1.0, -2.0, -4.0, grad=True)
    ref = t(-1.5, -2.5, -3.0)
    desirable = mask(True, False, True)
    z0 = (policy - ref).mean() + 1.0  # (0.5 + 0.5 - 1) / 3 + 1 = 1.0, attached to policy
    loss, _ = kto_loss(policy, ref, desirable, z0, beta=0.2)
    (grad,) = torch.autograd.grad(loss, policy)
    constant = policy.detach().clone().requires_grad_(True)
    loss_c, _ = kto_loss(constant, ref, desirable, 1.0, beta=0.2)
    loss_c.backward()
    assert loss.item() == pytest.approx(loss_c.item(), abs=1e-15)
    assert grad.tolist() == pytest.approx(constant.grad.tolist(), abs=1e-15)
    # and the gradient of a kl leaf stays None
    kl = t(0.3, grad=True)
    loss, _ = kto_loss(t(-1.0, grad=True), t(-1.0), mask(True), kl, beta=0.1)
    loss.backward()
    assert kl.grad is None


def test_kl_estimate_is_the_detached_mean_log_ratio_and_shares_add_up():
    # log-ratios 0.5, 0.5, -1.0: sum 0, mean 0; over 0.2, 0.4 with normalizer 4: 0.6 / 4 = 0.15
    assert kl_estimate(t(-1.0, -2.0, -3.0), t(-1.5, -2.5, -2.0)).item() == pytest.approx(0.0, abs=1e-12)
    est = kl_estimate(t(-0.8, -0.6, grad=True), t(-1.0, -1.0), normalizer=4)
    assert est.item() == pytest.approx(0.15, abs=1e-12) and not est.requires_grad
    # two processes' shares of four rows, each divided by 4, add up to the mean over all four
    p, r = t(-1.0, -2.0, -0.5, -3.0), t(-1.2, -1.0, -0.9, -3.1)
    whole = kl_estimate(p, r)
    parts = kl_estimate(p[:2], r[:2], normalizer=4) + kl_estimate(p[2:], r[2:], normalizer=4)
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
    # (0.2 - 1.0 + 0.4 + 0.1) / 4 = -0.075: negative here; kto_loss clamps it, not the estimate
    assert whole.item() == pytest.approx(-0.075, abs=1e-12)


# --- against a naive loop, and the batch split --------------------------------------------------------


def test_matches_a_naive_per_row_loop():
    g = torch.Generator().manual_seed(0)
    policy = -5 * torch.rand(9, generator=g, dtype=torch.float64)
    ref = -5 * torch.rand(9, generator=g, dtype=torch.float64)
    desirable = torch.rand(9, generator=g) > 0.4
    beta, z0, lam_d, lam_u = 0.3, 0.7, 1.3, 0.9
    total = 0.0
    for p, q, d in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
        r = p - q
        if d:
            total += lam_d - lam_d * sigmoid(beta * (r - z0))
        else:
            total += lam_u - lam_u * sigmoid(beta * (z0 - r))
    loss, stats = kto_loss(policy, ref, desirable, z0, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    assert loss.item() == pytest.approx(total / 9, abs=1e-12)
    rewards = [beta * (p - q) for p, q in zip(policy.tolist(), ref.tolist())]
    want_d = [x for x, d in zip(rewards, desirable.tolist()) if d]
    want_u = [x for x, d in zip(rewards, desirable.tolist()) if not d]
    assert stats["rewards/desirable"].item() == pytest.approx(sum(want_d) / len(want_d), abs=1e-12)
    assert stats["rewards/undesirable"].item() == pytest.approx(sum(want_u) / len(want_u), abs=1e-12)


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_micro_batches_add_up_to_the_whole_batch(parts):
    # the same z0 and normalizer = 8 rows: the parts' losses and gradients sum to the whole batch's
    g = torch.Generator().manual_seed(1)
    base = -4 * torch.rand(8, generator=g, dtype=torch.float64)
    ref = -4 * torch.rand(8, generator=g, dtype=torch.float64)
    desirable = mask(True, False, True, True, False, False, True, False)
    kw = dict(beta=0.1, desirable_weight=1.2, undesirable_weight=0.8)
    whole_p = base.clone().requires_grad_(True)
    whole, _ = kto_loss(whole_p, ref, desirable, 0.25, **kw)
    whole.backward()
    split_p = base.clone().requires_grad_(True)
    total = 0.0
    size = 8 // parts
    for k in range(parts):
        sl = slice(k * size, (k + 1) * size)
        loss, _ = kto_loss(split_p[sl], ref[sl], desirable[sl], 0.25, **kw, normalizer=8)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(whole.item(), abs=1e-12)
    assert split_p.grad.tolist() == pytest.approx(whole_p.grad.tolist(), abs=1e-12)


def test_bf16_inputs_are_upcast_and_an_empty_class_reads_zero():
    policy = torch.tensor([-2.0, -3.0], dtype=torch.bfloat16)
    loss, stats = kto_loss(policy, policy, mask(True, True), 0.0)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.5)
    assert stats["rewards/undesirable"].item() == 0.0 and stats["count/undesirable"].item() == 0


def test_bad_arguments_are_refused():
    one = t(-1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(one, one, mask(True), 0.0, beta=0.0)
    with pytest.raises(ValueError, match="weight"):
        kto_loss(one, one, mask(True), 0.0, undesirable_weight=0.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        kto_loss(t(-1.0, -2.0), one, mask(True), 0.0)
    with pytest.raises(ValueError, match="one number"):
        kto_loss(one, one, mask(True), t(0.1, 0.2))


# --- the weight rule ------------------------------------------------------------------------------------


def test_weight_advice_by_hand():
    # in range: 1 * 12 / (1 * 10) = 1.2; 1 (equal counts); 4 / 3 (4 desirable, 3 undesirable)
    assert weight_advice(12, 10, 1.0, 1.0) is None
    assert weight_advice(10, 10, 1.0, 1.0) is None
    assert weight_advice(4, 3, 1.0, 1.0) is None
    # 40 desirable, 10 undesirable: ratio 4. lambda_D = q * 1 * 10 / 40 for q in [1, 4/3]: 0.25 to 0.333,
    # the nearer end 0.333; lambda_U = 1 * 40 / (q * 10): 3 to 4
    text = weight_advice(40, 10, 1.0, 1.0)
    assert "= 4," in text and "between 0.25 and 0.333" in text and "kto.desirable_weight=0.333" in text
    assert "kto.undesirable_weight between 3 and 4" in text
    # 10 desirable, 40 undesirable: ratio 0.25 < 1. lambda_D from 4 to 5.33 (suggest 4); lambda_U 0.1875-0.25
    text = weight_advice(10, 40, 1.0, 1.0)
    assert "= 0.25," in text and "between 4 and 5.33" in text and "kto.desirable_weight=4)" in text
    assert "between 0.188 and 0.25" in text
    # weights count: equal counts with lambda_U = 1.5 gives 1 / 1.5 = 0.667
    assert "= 0.667," in weight_advice(10, 10, 1.0, 1.5)
    assert "no desirable" in weight_advice(0, 5, 1.0, 1.0)
    assert "no undesirable" in weight_advice(5, 0, 1.0, 1.0)
