"""Reward-model losses against hand-derived values, a naive reference loop, and batch-split invariance."""

import math

import pytest
import torch

from rufus.losses.reward import (
    centering_loss,
    pairwise_hinge_loss,
    pairwise_logistic_loss,
    pointwise_loss,
    preference_metrics,
    ranking_pair_weights,
    ranking_pairs,
)

LOG2 = math.log(2.0)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# --- pairwise logistic (Bradley-Terry) -------------------------------------------------------------


def test_logistic_equal_scores_is_log2_with_half_gradients():
    # -log sigmoid(0) = log 2; d/dx -log sigmoid(x) = -(1 - sigmoid(x)) = -1/2 at x = 0, and
    # x = r_c - r_r, so d/dr_c = -1/2 and d/dr_r = +1/2 (one pair: the mean divides by 1).
    chosen, rejected = t(0.3, grad=True), t(0.3, grad=True)
    loss, stats = pairwise_logistic_loss(chosen, rejected)
    assert loss.item() == pytest.approx(LOG2, abs=1e-12)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)
    assert stats["accuracy"].item() == 0.5  # a tie counts half
    assert stats["margin"].item() == 0.0 and not stats["margin"].requires_grad


def test_logistic_margin_cases():
    # gap 1, margin 1: -log sigmoid(1 - 1) = log 2 = 0.693147
    loss, _ = pairwise_logistic_loss(t(2.0), t(1.0), margin=1.0)
    assert loss.item() == pytest.approx(LOG2, abs=1e-12)
    # gap 2, margin 0: -log sigmoid(2) = log(1 + e^-2) = 0.126928
    loss, _ = pairwise_logistic_loss(t(2.0), t(0.0), margin=0.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-12)
    assert abs(loss.item() - 0.126928) < 1e-6
    # both pairs at once with a per-pair margin tensor: mean of the two = (0.693147 + 0.126928) / 2
    loss, stats = pairwise_logistic_loss(t(2.0, 2.0), t(1.0, 0.0), margin=t(1.0, 0.0))
    assert loss.item() == pytest.approx((LOG2 + math.log1p(math.exp(-2.0))) / 2, abs=1e-12)
    assert stats["margin"].item() == pytest.approx(1.5)  # raw mean gap (1 + 2) / 2, not minus m
    with pytest.raises(ValueError, match="margin must be a float or a \\(2,\\) tensor"):
        pairwise_logistic_loss(t(2.0, 2.0), t(1.0, 0.0), margin=t(1.0, 0.0, 3.0))


def test_logistic_is_stable_for_large_gaps():
    # -log sigmoid(-100) = 100 + log(1 + e^-100) = 100 (exactly, in float64); log(sigmoid(x)) would give inf
    loss, _ = pairwise_logistic_loss(torch.tensor([0.0]), torch.tensor([100.0]))
    assert loss.item() == pytest.approx(100.0)
    loss, _ = pairwise_logistic_loss(torch.tensor([100.0]), torch.tensor([0.0]))
    assert 0 <= loss.item() < 1e-40


def test_logistic_matches_naive_loop():
    torch.manual_seed(0)
    p = 13
    chosen, rejected = torch.randn(p, dtype=torch.float64) * 3, torch.randn(p, dtype=torch.float64) * 3
    margin, weights = torch.rand(p, dtype=torch.float64), torch.rand(p, dtype=torch.float64)
    loss, stats = pairwise_logistic_loss(chosen, rejected, margin=margin, weights=weights)
    total = norm = wins = 0.0
    for i in range(p):
        x = chosen[i].item() - rejected[i].item() - margin[i].item()
        total += weights[i].item() * -math.log(1.0 / (1.0 + math.exp(-x)))
        norm += weights[i].item()
        wins += 1.0 if chosen[i] > rejected[i] else 0.0
    assert loss.item() == pytest.approx(total / norm, rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(wins / p)
    assert stats["chosen"].item() == pytest.approx(chosen.mean().item())
    assert stats["rejected"].item() == pytest.approx(rejected.mean().item())


def test_scores_are_upcast_and_shapes_checked():
    loss, stats = pairwise_logistic_loss(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and abs(loss.item() - LOG2) < 1e-6
    with pytest.raises(ValueError, match=r"must both be \(P,\), got \(3,\) and \(2,\)"):
        pairwise_logistic_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"weights must be \(3,\)"):
        pairwise_logistic_loss(torch.zeros(3), torch.zeros(3), weights=torch.ones(2))


def test_no_pairs_give_zero_not_nan():
    empty = torch.zeros(0, requires_grad=True)
    for fn in (pairwise_logistic_loss, pairwise_hinge_loss):
        loss, stats = fn(empty, empty.detach(), weights=torch.zeros(0))
        assert loss.item() == 0.0 and stats["accuracy"].item() == 0.0
        loss.backward()  # still part of the graph


# --- hinge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gap, expected_loss, expected_grad",
    [
        (0.25, 0.75, -1.0),  # inside the margin: 1 - 0.25; d/dr_c (m - r_c + r_r) = -1
        (-2.0, 3.0, -1.0),  # wrong order: 1 + 2
        (1.0, 0.0, 0.0),  # exactly at the margin: max(0, 0) = 0, relu's subgradient at 0 is 0
        (3.0, 0.0, 0.0),  # beyond: separated pairs are left alone
    ],
)
def test_hinge_cases(gap, expected_loss, expected_grad):
    chosen, rejected = t(gap, grad=True), t(0.0, grad=True)
    loss, _ = pairwise_hinge_loss(chosen, rejected, margin=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss)
    assert chosen.grad.item() == expected_grad and rejected.grad.item() == -expected_grad


def test_hinge_per_pair_margin_and_mean():
    # gaps (0.5, 0.5) with margins (1, 2): losses 0.5 and 1.5, mean 1.0
    loss, _ = pairwise_hinge_loss(t(1.0, 1.0), t(0.5, 0.5), margin=t(1.0, 2.0))
    assert loss.item() == pytest.approx(1.0)


# --- K-wise rankings -----------------------------------------------------------------------------


def test_ranking_pairs_k4_distinct():
    scores = [0.1, 3.0, -2.0, 1.5]
    pairs = ranking_pairs(scores)
    assert len(pairs) == 6 == math.comb(4, 2)
    assert all(scores[b] > scores[w] for b, w in pairs)
    assert {frozenset(p) for p in pairs} == {frozenset((i, j)) for i in range(4) for j in range(i + 1, 4)}
    # order is index order (i < j), flipped when j scores higher
    assert pairs == [(1, 0), (0, 2), (3, 0), (1, 2), (1, 3), (3, 2)]


def test_ranking_pairs_ties_give_fewer():
    # responses 1 and 3 tie: C(4, 2) - 1 = 5 pairs; all tied: none
    assert ranking_pairs([0.5, 2.0, -1.0, 2.0]) == [(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)]
    assert ranking_pairs([1.0, 1.0, 1.0]) == []
    assert ranking_pairs([3, 2, 1, 0]) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # ints, by order
    with pytest.raises(ValueError, match="score 1 is nan"):
        ranking_pairs([1.0, float("nan")])


def test_ranking_pair_weights_make_each_prompt_weigh_one():
    w = ranking_pair_weights([6, 1])
    assert w.tolist() == pytest.approx([1 / 6] * 6 + [1.0])
    assert w[:6].sum().item() == pytest.approx(1.0) and w[6:].sum().item() == 1.0
    assert ranking_pair_weights([2, 0, 1]).tolist() == [0.5, 0.5, 1.0]  # a pairless prompt adds nothing
    assert ranking_pair_weights([]).numel() == 0


def test_instructgpt_k4_loss_is_mean_over_prompts_of_mean_pair_loss():
    # prompt A: K=4 distinct scores (0, 1, 2, 3) -> 6 pairs, each weighted 1/6; prompt B: one pair
    # at equal scores -> log 2, weight 1. Default normalizer = sum of weights = 2 prompts.
    # A's pair gaps: (1,0)=1 (2,0)=2 (3,0)=3 (2,1)=1 (3,1)=2 (3,2)=1 -> mean loss
    #   (3 log(1+e^-1) + 2 log(1+e^-2) + log(1+e^-3)) / 6
    scores_a = [0.0, 1.0, 2.0, 3.0]
    pairs = ranking_pairs(scores_a)
    r = torch.tensor(scores_a + [5.0, 5.0], dtype=torch.float64)  # flat scores: A then B
    better = [b for b, _ in pairs] + [4]
    worse = [w for _, w in pairs] + [5]
    weights = ranking_pair_weights([len(pairs), 1], dtype=torch.float64)
    loss, _ = pairwise_logistic_loss(r[better], r[worse], weights=weights)
    mean_a = (3 * math.log1p(math.exp(-1)) + 2 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-3))) / 6
    assert loss.item() == pytest.approx((mean_a + LOG2) / 2, rel=1e-12)


def test_split_batches_with_global_normalizer_give_full_loss_and_gradient():
    # Three prompts with 6, 1 and 3 pairs, scores from a shared linear "model" w. Computing the loss
    # in two micro-batches, each divided by the global number of prompts (3), must add up to the
    # full loss and gradient; a per-chunk mean would weight the chunks wrongly.
    torch.manual_seed(1)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, 5, dtype=torch.float64)  # features of 4 + 2 + 3 responses
    groups = [(0, [0.0, 1.0, 2.0, 3.0]), (4, [1.0, 0.0]), (6, [2.0, 0.0, 1.0])]

    def pairs_of(gs):
        better, worse, counts = [], [], []
        for offset, scores in gs:
            ps = ranking_pairs(scores)
            better += [offset + b for b, _ in ps]
            worse += [offset + v for _, v in ps]
            counts.append(len(ps))
        return better, worse, ranking_pair_weights(counts, dtype=torch.float64)

    for fn in (pairwise_logistic_loss, pairwise_hinge_loss):
        r = x @ w
        b, v, weights = pairs_of(groups)
        full, _ = fn(r[b], r[v], weights=weights)
        (g_full,) = torch.autograd.grad(full, w)
        total, g_split = 0.0, torch.zeros_like(w)
        for chunk in (groups[:1], groups[1:]):
            r = x @ w
            b, v, weights = pairs_of(chunk)
            loss, _ = fn(r[b], r[v], weights=weights, normalizer=len(groups))
            g_split += torch.autograd.grad(loss, w)[0]
            total += loss.item()
        assert total == pytest.approx(full.item(), rel=1e-12)
        assert torch.allclose(g_split, g_full, atol=1e-12)


# --- pointwise warm-up ---------------------------------------------------------------------------


def test_pointwise_bce_by_hand():
    # s=0, t=1: -log sigmoid(0) = log 2
    # s=ln 3, t=1/2: sigmoid(ln 3) = 3/4, so -(1/2 log 3/4 + 1/2 log 1/4) = 1/2 log(16/3) = 0.836988
    loss, stats = pointwise_loss(t(0.0, math.log(3.0)), t(1.0, 0.5), kind="bce")
    assert loss.item() == pytest.approx((LOG2 + 0.5 * math.log(16 / 3)) / 2, rel=1e-12)
    # abs_error: |1/2 - 1| = 1/2 and |3/4 - 1/2| = 1/4, mean 3/8
    assert stats["abs_error"].item() == pytest.approx(0.375)
    assert stats["target"].item() == pytest.approx(0.75)


def test_pointwise_bce_gradient_is_sigmoid_minus_target():
    # d/ds BCE(s, t) = sigmoid(s) - t: at s = ln 3, t = 1/2 that is 3/4 - 1/2 = 1/4 (one item)
    s = t(math.log(3.0), grad=True)
    loss, _ = pointwise_loss(s, t(0.5))
    loss.backward()
    assert s.grad.item() == pytest.approx(0.25)


def test_pointwise_mse_by_hand_and_normalizer():
    # (1 - 0.5)^2 = 0.25, (3 - 1)^2 = 4: mean 2.125; with normalizer 5: 4.25 / 5 = 0.85
    loss, stats = pointwise_loss(t(1.0, 3.0), t(0.5, 1.0), kind="mse")
    assert loss.item() == pytest.approx(2.125)
    assert stats["abs_error"].item() == pytest.approx(1.25) and stats["score"].item() == 2.0
    loss, _ = pointwise_loss(t(1.0, 3.0), t(0.5, 1.0), kind="mse", normalizer=5)
    assert loss.item() == pytest.approx(0.85)
    with pytest.raises(ValueError, match="unknown pointwise loss 'l1'; choose bce or mse"):
        pointwise_loss(t(1.0), t(1.0), kind="l1")


# --- centering -----------------------------------------------------------------------------------


def test_centering_by_hand():
    # mean(r^2) of (1, -2, 3) = (1 + 4 + 9) / 3 = 14/3; d/dr_i = 2 r_i / 3
    r = t(1.0, -2.0, 3.0, grad=True)
    loss, stats = centering_loss(r)
    loss.backward()
    assert loss.item() == pytest.approx(14 / 3)
    assert r.grad.tolist() == pytest.approx([2 / 3, -4 / 3, 2.0])
    assert stats["mean"].item() == pytest.approx(2 / 3) and stats["mean_square"].item() == pytest.approx(14 / 3)
    loss, _ = centering_loss(t(1.0, -2.0, 3.0), normalizer=7)
    assert loss.item() == pytest.approx(2.0)


def test_centering_relates_to_trl_pair_form():
    # For pairs, mean over both responses of r^2 = (r_c + r_r)^2 / 4 + (r_c - r_r)^2 / 4 per pair;
    # with r_c=3, r_r=1: (9 + 1) / 2 = 5 = 16/4 + 4/4. Passing chosen + rejected gives TRL's term (16).
    chosen, rejected = t(3.0, -1.0), t(1.0, 0.5)
    ours, _ = centering_loss(torch.cat([chosen, rejected]))
    trl, _ = centering_loss(chosen + rejected)
    gap_sq = ((chosen - rejected) ** 2).mean()
    assert ours.item() == pytest.approx(trl.item() / 4 + gap_sq.item() / 4)
    assert centering_loss(t(3.0) + t(1.0))[0].item() == 16.0


# --- evaluation metrics --------------------------------------------------------------------------


def test_preference_metrics_by_hand():
    # gaps d = (2, -1, 0, 3). accuracy = (1 + 0 + 0.5 + 1) / 4 = 0.625; margin = 4 / 4 = 1.
    # confidence sigmoid(|d|) = 0.880797, 0.731059, 0.5, 0.952574; with 10 bins of width 0.05 over
    # [0.5, 1] they fall in bins 7, 4, 0, 9 (one pair each), correct = 1, 0, 0.5, 1, so
    # ECE = (|1 - 0.880797| + |0 - 0.731059| + |0.5 - 0.5| + |1 - 0.952574|) / 4
    #     = (0.119203 + 0.731059 + 0 + 0.047426) / 4 = 0.224422
    # loss = (log(1+e^-2) + log(1+e) + log 2 + log(1+e^-3)) / 4
    m = preference_metrics(t(2.0, 0.0, 1.0, 3.0), t(0.0, 1.0, 1.0, 0.0))
    assert m["accuracy"] == 0.625 and m["margin"] == 1.0
    assert m["ece"] == pytest.approx(0.224422, abs=1e-6)
    expected_loss = (math.log1p(math.exp(-2)) + math.log1p(math.e) + LOG2 + math.log1p(math.exp(-3))) / 4
    assert m["loss"] == pytest.approx(expected_loss)
    assert all(isinstance(v, float) for v in m.values())


def test_ece_averages_within_a_bin_before_the_absolute_value():
    # gaps (1, -1): both confidence 0.731059 (bin 4), one right one wrong: accuracy_bin 0.5, so
    # ECE = |0.5 - 0.731059| = 0.231059 (not the mean of per-pair errors, (0.268941 + 0.731059) / 2 = 0.5)
    m = preference_metrics(t(1.0, 0.0), t(0.0, 1.0))
    assert m["ece"] == pytest.approx(0.231059, abs=1e-6) and m["accuracy"] == 0.5
    # two bins: 2 bins of width 0.25; gaps (0.5, 4): conf 0.622459 (bin 0), 0.982014 (bin 1), both right:
    # ECE = 1/2 (1 - 0.622459) + 1/2 (1 - 0.982014) = 0.197763
    m = preference_metrics(t(0.5, 4.0), t(0.0, 0.0), num_bins=2)
    assert m["ece"] == pytest.approx(0.197763, abs=1e-6)


def test_all_ties_are_calibrated():
    m = preference_metrics(torch.zeros(5), torch.zeros(5))
    assert m == {"accuracy": 0.5, "margin": 0.0, "loss": pytest.approx(LOG2), "ece": 0.0}
    with pytest.raises(ValueError, match="at least one pair"):
        preference_metrics(torch.zeros(0), torch.zeros(0))
