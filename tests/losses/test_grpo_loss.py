"""GRPO policy loss: hand values for the three aggregations on a ragged batch, the k3 KL term,
asymmetric (DAPO clip-higher) clipping, a naive per-token loop, and batch splitting."""

import math

import pytest
import torch

from rufus.losses.grpo import grpo_policy_loss

NAN = float("nan")


def _ragged_case():
    """B = 2 responses, A = 3 positions; response 0 has 3 valid tokens, response 1 has 1.

    advantages (per sequence): A_0 = +1, A_1 = -2
    ratios pi_theta / pi_old:   row 0 (1, 1.5, 0.5),  row 1 (1.5, pad, pad)
    log pi_theta - log pi_ref:  row 0 (0, log 2, -log 2),  row 1 (log 2, pad, pad)
    padding holds nan / inf, which must not reach the loss or the gradients.
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, -1.0, -1.0]], dtype=torch.float64)
    log_ratio = torch.tensor([[0.0, math.log(1.5), math.log(0.5)], [math.log(1.5), 0.0, 0.0]], dtype=torch.float64)
    logprobs = old + log_ratio
    logprobs[1, 1:] = NAN
    to_ref = torch.tensor([[0.0, math.log(2), -math.log(2)], [math.log(2), 0.0, 0.0]], dtype=torch.float64)
    ref = logprobs - to_ref
    ref[1, 1:] = float("inf")
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return logprobs.requires_grad_(True), old, ref, advantages, mask


# Per-token clipped surrogate, clip 0.2: l = max(-A r, -A clip(r, 0.8, 1.2))
#   (0,0): A=+1, r=1.0 -> max(-1.0, -1.0) = -1.0
#   (0,1): A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2   (clip binds: clipfrac counts it)
#   (0,2): A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5
#   (1,0): A=-2, r=1.5 -> max( 3.0,  2.4) =  3.0
# sum over valid tokens = -1 - 1.2 - 0.5 + 3 = 0.3
#   token    (DAPO):      0.3 / 4 tokens                       = 0.075
#   sequence (GRPO):      mean(-2.7 / 3, 3.0 / 1) = (-0.9 + 3) / 2 = 1.05
#   sum      (Dr. GRPO):  0.3 / (max_new_tokens 3 * 2 responses) = 0.05
# The three differ because the rows have different lengths.
# k3 = exp(-d) - 1 + d per token, d = log pi_theta - log pi_ref:
#   d = 0: 0;  d = log 2: 0.5 - 1 + 0.693147 = 0.193147;  d = -log 2: 2 - 1 - 0.693147 = 0.306853
#   token mean = (0 + 0.193147 + 0.306853 + 0.193147) / 4 = 0.693147 / 4 = 0.173287
#   sequence  = mean((0 + 0.193147 + 0.306853) / 3, 0.193147) = (0.166667 + 0.193147) / 2 = 0.179907
#   sum / 6   = 0.693147 / 6 = 0.115525
K3_LOG2 = 0.5 - 1 + math.log(2)
K3_MLOG2 = 2 - 1 - math.log(2)


@pytest.mark.parametrize(
    "aggregation,normalizer,surrogate,kl",
    [
        ("token", None, 0.075, (K3_LOG2 + K3_MLOG2 + K3_LOG2) / 4),
        ("sequence", None, 1.05, ((K3_LOG2 + K3_MLOG2) / 3 + K3_LOG2) / 2),
        ("constant", 6.0, 0.05, (K3_LOG2 + K3_MLOG2 + K3_LOG2) / 6),
    ],
)
def test_aggregations_by_hand(aggregation, normalizer, surrogate, kl):
    logprobs, old, ref, adv, mask = _ragged_case()
    loss, stats = grpo_policy_loss(logprobs, old, None, adv, mask, aggregation=aggregation, normalizer=normalizer)
    assert loss.item() == pytest.approx(surrogate, abs=1e-12)
    assert stats["kl"].item() == 0.0  # no reference given
    assert stats["clipfrac"].item() == pytest.approx(0.25)  # 1 of 4 valid tokens
    # with the KL term: loss = surrogate + 0.1 * (the same aggregation of k3)
    loss, stats = grpo_policy_loss(
        logprobs, old, ref, adv, mask, kl_coef=0.1, aggregation=aggregation, normalizer=normalizer
    )
    assert loss.item() == pytest.approx(surrogate + 0.1 * kl, abs=1e-12)
    # the kl stat is the token mean of k3 whatever the aggregation: 0.173287
    assert stats["kl"].item() == pytest.approx(math.log(2) / 4, abs=1e-12)
    assert abs(stats["kl"].item() - 0.173287) < 1e-6
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and (logprobs.grad[~mask] == 0).all()


def test_three_aggregations_differ_on_ragged_masks_and_agree_on_full_ones():
    logprobs, old, ref, adv, mask = _ragged_case()
    values = [
        grpo_policy_loss(logprobs, old, ref, adv, mask, aggregation=a, normalizer=n)[0].item()
        for a, n in (("token", None), ("sequence", None), ("constant", 6.0))
    ]
    assert len({round(v, 9) for v in values}) == 3
    # every row full length (4 tokens each): token mean == sequence mean == sum / (4 * 2)
    g = torch.Generator().manual_seed(0)
    lp, op = (
        torch.randn(2, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 4, generator=g, dtype=torch.float64),
    )
    full = torch.ones(2, 4, dtype=torch.bool)
    values = [
        grpo_policy_loss(lp, op, None, adv, full, aggregation=a, normalizer=n)[0].item()
        for a, n in (("token", None), ("sequence", None), ("constant", 8.0))
    ]
    assert values == pytest.approx([values[0]] * 3, abs=1e-12)


def test_kl_coef_zero_ignores_the_reference():
    logprobs, old, ref, adv, mask = _ragged_case()
    with_ref, stats_ref = grpo_policy_loss(logprobs, old, ref, adv, mask, kl_coef=0.0)
    without, stats_none = grpo_policy_loss(logprobs, old, None, adv, mask)
    assert with_ref.item() == without.item() == pytest.approx(0.075, abs=1e-12)
    # the kl stat is still reported when the reference is there (for logging), 0 when it is not
    assert stats_ref["kl"].item() == pytest.approx(math.log(2) / 4) and stats_none["kl"].item() == 0.0
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_policy_loss(logprobs, old, None, adv, mask, kl_coef=0.04)


def test_asymmetric_clip_higher():
    # clip_high 0.28: token (0,1) with A > 0 and r = 1.5 is clipped at 1.28 instead of 1.2:
    #   max(-1.5, -1.28) = -1.28; sum = -1 - 1.28 - 0.5 + 3 = 0.22, token mean 0.055.
    # The low side is unchanged: (0,2) r = 0.5 with A > 0 is not clipped (its unclipped term is
    # larger), and (1,0) with A < 0 and r = 1.5 > 1 keeps its unclipped 3.0.
    logprobs, old, _, adv, mask = _ragged_case()
    loss, stats = grpo_policy_loss(logprobs, old, None, adv, mask, clip=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(0.055, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(0.25)
    # a larger clip_high lets that token through: clip_high 0.6 > 0.5 -> -1.5; sum 0.0
    loss, stats = grpo_policy_loss(logprobs, old, None, adv, mask, clip=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and stats["clipfrac"].item() == 0.0
    # and a negative-advantage token below 1 - clip is clipped by clip (low), not clip_high:
    #   A = -1, r = 0.5: max(0.5, 0.8) = 0.8 with clip 0.2, whatever clip_high
    lp, op = torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1)
    for high in (0.28, 5.0):
        loss, _ = grpo_policy_loss(lp, op, None, torch.tensor([-1.0]), torch.ones(1, 1), clip_high=high)
        assert loss.item() == pytest.approx(0.8, abs=1e-6)


def test_first_step_gradient_and_per_token_advantages():
    # ratio == 1 (logprobs == old): no clipping, l_t = -A r_t, d l / d logprob_t = -A r_t / n = -A / n
    # for token aggregation (n = 4 valid tokens): row 0 -> -1/4, row 1 token 0 -> +2/4
    _, old, _, adv, mask = _ragged_case()
    logprobs = old.clone().requires_grad_(True)
    loss, stats = grpo_policy_loss(logprobs, old, None, adv, mask)
    loss.backward()
    expected = torch.tensor([[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logprobs.grad, expected, atol=1e-12)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    # (B, A) advantages equal to the broadcast (B,) ones give the same loss
    per_token = adv[:, None].expand(2, 3).clone()
    same, _ = grpo_policy_loss(old, old, None, per_token, mask)
    assert same.item() == pytest.approx(loss.item(), abs=1e-15)


def _naive(logprobs, old, ref, adv, lengths, kl_coef, aggregation, normalizer, clip=0.2, clip_high=0.28):
    """Token by token in python floats: GRPO eq. 3 with k3 (eq. 4)."""
    logprobs, old, ref, adv = logprobs.tolist(), old.tolist(), ref.tolist(), adv.tolist()
    per_seq, total, count = [], 0.0, 0
    for b, n in enumerate(lengths):
        row = 0.0
        for t in range(n):
            r = math.exp(logprobs[b][t] - old[b][t])
            a = adv[b]
            loss_t = -min(r * a, min(max(r, 1 - clip), 1 + clip_high) * a)
            if ref is not None:
                d = logprobs[b][t] - ref[b][t]
                loss_t += kl_coef * (math.exp(-d) - 1 + d)
            row += loss_t
        total += row
        count += n
        per_seq.append(row / n if n else 0.0)
    if aggregation == "token":
        return total / count
    if aggregation == "sequence":
        return sum(per_seq) / len(per_seq)
    return total / normalizer


@pytest.mark.parametrize("aggregation,normalizer", [("token", None), ("sequence", None), ("constant", 40.0)])
@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_matches_naive_loop_with_gradients(aggregation, normalizer, kl_coef):
    g = torch.Generator().manual_seed(7)
    b, a = 5, 8
    old = -torch.rand(b, a, generator=g, dtype=torch.float64) * 3
    logprobs = (old + 0.4 * torch.randn(b, a, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(b, a, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = [8, 5, 1, 3, 7]
    mask = torch.tensor([[t < n for t in range(a)] for n in lengths])
    loss, _ = grpo_policy_loss(
        logprobs,
        old,
        ref,
        adv,
        mask,
        clip=0.2,
        clip_high=0.28,
        kl_coef=kl_coef,
        aggregation=aggregation,
        normalizer=normalizer,
    )

    def naive(lp):
        return _naive(lp, old, ref, adv, lengths, kl_coef, aggregation, normalizer)

    assert loss.item() == pytest.approx(naive(logprobs), abs=1e-12)
    # gradients by central finite differences on the naive loop, for a few valid tokens
    (grad,) = torch.autograd.grad(loss, logprobs)
    for i, j in [(0, 0), (1, 4), (2, 0), (4, 6)]:
        h = 1e-6
        up, down = logprobs.detach().clone(), logprobs.detach().clone()
        up[i, j] += h
        down[i, j] -= h
        numeric = (naive(up) - naive(down)) / (2 * h)
        assert grad[i, j].item() == pytest.approx(numeric, abs=1e-6)


@pytest.mark.parametrize("aggregation", ["token", "constant"])
def test_two_halves_with_the_global_normalizer_add_up(aggregation):
    # gradient accumulation: pass the whole batch's token count (token) or a constant (sum)
    logprobs, old, ref, adv, mask = _ragged_case()
    norm = 4.0 if aggregation == "token" else 6.0  # 4 valid tokens in the batch; Dr. GRPO 3 * 2
    full, _ = grpo_policy_loss(logprobs, old, ref, adv, mask, kl_coef=0.1, aggregation=aggregation, normalizer=norm)
    parts = [
        grpo_policy_loss(
            logprobs[s],
            old[s],
            ref[s],
            adv[s],
            mask[s],
            kl_coef=0.1,
            aggregation=aggregation,
            normalizer=norm,
        )[0]
        for s in (slice(0, 1), slice(1, 2))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(torch.autograd.grad(full, logprobs)[0], torch.autograd.grad(parts[0] + parts[1], logprobs)[0])


def test_errors():
    logprobs, old, ref, adv, mask = _ragged_case()
    with pytest.raises(ValueError, match="advantages must be \\(B,\\) or \\(B, A\\)"):
        grpo_policy_loss(logprobs, old, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="ref_logprobs must have"):
        grpo_policy_loss(logprobs, old, ref[:, :2], adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        grpo_policy_loss(logprobs, old, ref, adv, mask, kl_coef=-1.0)
    with pytest.raises(ValueError, match="needs a normalizer"):
        grpo_policy_loss(logprobs, old, None, adv, mask, aggregation="constant")
