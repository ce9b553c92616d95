"""DPO / cDPO / IPO / hinge and the reference-free ORPO / SimPO losses against hand-derived values,
a naive per-pair loop, and the batch-split property (DPO, Rafailov et al. 2023, arXiv 2305.18290,
eq. 7; IPO, Azar et al. 2023, arXiv 2310.12036, eq. 17; SLiC-HF hinge, Zhao et al. 2023, arXiv
2305.10425, eq. 4; ORPO, Hong et al. 2024, arXiv 2403.07691, eqs. 6-7; SimPO, Meng et al. 2024,
arXiv 2405.14734, eq. 6)."""

import math

import pytest
import torch

from rufus.losses.dpo import dpo_loss, log_odds, orpo_loss, simpo_loss

LOG2 = math.log(2.0)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def _pairs(h, grad=False):
    """One pair per margin h: chosen log-ratio h, rejected log-ratio 0 (reference logps arbitrary)."""
    h = torch.as_tensor(h, dtype=torch.float64)
    ref_c, ref_r = torch.full_like(h, -3.0), torch.full_like(h, -4.0)
    pc = (ref_c + h).clone().requires_grad_(grad)
    pr = ref_r.clone().requires_grad_(grad)
    return pc, pr, ref_c, ref_r


# --- at the reference (h = 0) ----------------------------------------------------------------------


def test_sigmoid_at_reference_is_log2_with_half_beta_gradients():
    # h = 0: -log sigmoid(0) = log 2 = 0.693147, whatever beta.
    # d/d pc of -log sigmoid(beta h) = -beta (1 - sigmoid(beta h)) = -beta / 2 at h = 0, and h has
    # +pc, -pr: d/d pr = +beta / 2. beta = 0.1: -0.05 and +0.05 (one pair, mean divides by 1).
    pc, pr, rc, rr = t(-7.0, grad=True), t(-9.0, grad=True), t(-7.0), t(-9.0)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-12) and abs(loss.item() - 0.693147) < 1e-6
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.05, abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.05, abs=1e-12)
    # the implicit rewards are all 0 and the pair is a tie: accuracy 0.5
    assert stats["rewards/chosen"].item() == 0.0 and stats["rewards/margin"].item() == 0.0
    assert stats["rewards/accuracy"].item() == 0.5


@pytest.mark.parametrize(
    "loss_type,beta,expected",
    [
        ("sigmoid", 0.1, LOG2),  # -log sigmoid(0) = log 2
        ("sigmoid", 2.0, LOG2),
        ("ipo", 0.1, 25.0),  # (0 - 1 / (2 * 0.1))^2 = 5^2 = 25
        ("ipo", 0.5, 1.0),  # (0 - 1 / 1)^2 = 1
        ("hinge", 0.1, 1.0),  # max(0, 1 - 0.1 * 0) = 1
        ("hinge", 3.0, 1.0),
    ],
)
def test_each_loss_type_at_the_reference(loss_type, beta, expected):
    loss, _ = dpo_loss(*_pairs([0.0, 0.0]), beta=beta, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


# --- hand values away from h = 0 ---------------------------------------------------------------------


def test_label_smoothing_by_hand_and_its_minimum():
    # beta = 1, h = 2, eps = 0.1 (cDPO):
    #   -(0.9) log sigmoid(2) - 0.1 log sigmoid(-2) = 0.9 * log(1 + e^-2) + 0.1 * log(1 + e^2)
    #   = 0.9 * 0.126928 + 0.1 * 2.126928 = 0.114235 + 0.212693 = 0.326928
    loss, _ = dpo_loss(*_pairs([2.0]), beta=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log1p(math.exp(-2)) + 0.1 * math.log1p(math.exp(2)), abs=1e-12)
    assert abs(loss.item() - 0.326928) < 1e-6
    # eps = 0 is plain DPO: log(1 + e^-2) = 0.126928
    plain, _ = dpo_loss(*_pairs([2.0]), beta=1.0)
    assert plain.item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-12)
    # d l / d h = -beta (1 - eps) (1 - s) + beta eps s with s = sigmoid(beta h): zero at s = 1 - eps,
    # i.e. beta h = logit(0.9) = log 9 = 2.197225 (plain DPO would push h to infinity)
    pc, pr, rc, rr = _pairs([math.log(9.0) / 0.5], grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    loss.backward()
    assert abs(pc.grad.item()) < 1e-12
    # eps = 0.5: a coin-flip label; the loss is symmetric in h: l(h) = l(-h)
    a, _ = dpo_loss(*_pairs([1.3]), beta=1.0, label_smoothing=0.5)
    b, _ = dpo_loss(*_pairs([-1.3]), beta=1.0, label_smoothing=0.5)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_ipo_minimum_is_at_half_over_beta():
    # beta = 0.25: target margin 1 / (2 * 0.25) = 2. l(2) = 0 with zero gradient; l(3) = (3 - 2)^2 = 1,
    # l(0) = 4; gradient d l / d pc = 2 (h - 2) = 2 at h = 3.
    pc, pr, rc, rr = _pairs([2.0], grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and abs(pc.grad.item()) < 1e-12
    pc, pr, rc, rr = _pairs([3.0], grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert pc.grad.item() == pytest.approx(2.0) and pr.grad.item() == pytest.approx(-2.0)
    # gradient descent on h alone lands on 2 (a quadratic: h <- h - lr * 2 (h - 2) contracts by 0.8)
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for _ in range(200):
        loss, _ = dpo_loss(
            h, torch.zeros(1, dtype=torch.float64), torch.zeros(1), torch.zeros(1), beta=0.25, loss_type="ipo"
        )
        (g,) = torch.autograd.grad(loss, h)
        h = (h - 0.1 * g).detach().requires_grad_(True)
    assert h.item() == pytest.approx(2.0, abs=1e-12)


def test_hinge_is_zero_beyond_the_margin():
    # beta = 0.5: l = max(0, 1 - 0.5 h)
    #   h = -2: 2;  h = 1: 0.5;  h = 2: 0 (exactly at the margin);  h = 3: 0
    # mean over the 4 pairs = (2 + 0.5 + 0 + 0) / 4 = 0.625
    # gradient d l / d pc = -0.5 / 4 = -0.125 inside the margin (h = -2, 1), 0 at and beyond it
    pc, pr, rc, rr = _pairs([-2.0, 1.0, 2.0, 3.0], grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    assert loss.item() == pytest.approx(0.625, abs=1e-12)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-0.125, -0.125, 0.0, 0.0])


def test_stats_by_hand():
    # beta = 0.5, three pairs:
    #   pair 0: pc - rc = -1 - (-2) = 1,  pr - rr = -3 - (-2) = -1  -> rewards (0.5, -0.5), margin 1, win
    #   pair 1: pc - rc = -2 - (-2) = 0,  pr - rr = -1 - (-2) = 1   -> rewards (0, 0.5), margin -0.5, loss
    #   pair 2: pc - rc = 0,              pr - rr = 0               -> rewards (0, 0),   margin 0, tie
    # rewards/chosen = (0.5 + 0 + 0) / 3 = 0.166667; rewards/rejected = (-0.5 + 0.5 + 0) / 3 = 0
    # rewards/margin = (1 - 0.5 + 0) / 3 = 0.166667; rewards/accuracy = (1 + 0 + 0.5) / 3 = 0.5
    # loss: h = (2, -1, 0), beta h = (1, -0.5, 0):
    #   (-log sigmoid(1) - log sigmoid(-0.5) + log 2) / 3 = (0.313262 + 0.974077 + 0.693147) / 3 = 0.660162
    pc, pr = t(-1.0, -2.0, -5.0, grad=True), t(-3.0, -1.0, -6.0, grad=True)
    rc, rr = t(-2.0, -2.0, -5.0), t(-2.0, -2.0, -6.0)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert abs(loss.item() - 0.660162) < 1e-6
    assert stats["rewards/chosen"].item() == pytest.approx(1 / 6, abs=1e-12)
    assert stats["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["rewards/margin"].item() == pytest.approx(1 / 6, abs=1e-12)
    assert stats["rewards/accuracy"].item() == pytest.approx(0.5, abs=1e-12)
    assert set(stats) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
    assert not any(v.requires_grad for v in stats.values())


# --- against a naive loop ------------------------------------------------------------------------------


def _naive(pc, pr, rc, rr, beta, loss_type, eps):
    """Per pair in python floats, then the mean."""
    total = 0.0
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            # log sigmoid(x) = -log(1 + e^-x), log sigmoid(-x) = -log(1 + e^x) (log(1 - sigmoid) would
            # lose digits for large x)
            total += (1 - eps) * math.log1p(math.exp(-beta * h)) + eps * math.log1p(math.exp(beta * h))
        elif loss_type == "ipo":
            total += (h - 1 / (2 * beta)) ** 2
        else:
            total += max(0.0, 1 - beta * h)
    return total / len(pc)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_matches_naive_loop(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    for beta in (0.1, 0.5, 2.0):
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
        assert loss.item() == pytest.approx(_naive(pc, pr, rc, rr, beta, loss_type, eps), abs=1e-12)


# --- reduction, dtypes, errors ------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_two_halves_with_the_global_normalizer_add_up_to_the_full_batch(loss_type):
    # gradient accumulation: loss(half 1, normalizer 8) + loss(half 2, normalizer 8) == loss(all 8),
    # and so are the gradients
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-5 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    full, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type)
    full_grad = torch.autograd.grad(full, (pc, pr))
    a, _ = dpo_loss(pc[:3], pr[:3], rc[:3], rr[:3], beta=0.3, loss_type=loss_type, normalizer=8)
    b, _ = dpo_loss(pc[3:], pr[3:], rc[3:], rr[3:], beta=0.3, loss_type=loss_type, normalizer=8)
    split_grad = torch.autograd.grad(a + b, (pc, pr))
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    for x, y in zip(full_grad, split_grad):
        assert torch.allclose(x, y, atol=1e-12)


def test_reference_is_detached_and_bf16_is_upcast():
    pc, pr = t(-1.0, grad=True), t(-2.0, grad=True)
    rc, rr = t(-1.5, grad=True), t(-1.5, grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None
    loss, stats = dpo_loss(*(x.detach().bfloat16() for x in (pc, pr, rc, rr)))
    assert loss.dtype == torch.float32 and stats["rewards/margin"].dtype == torch.float32
    # -log sigmoid(0.1 * 1) = log(1 + e^-0.1) = 0.644397
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)


def test_empty_batch_gives_zero_not_nan():
    empty = torch.zeros(0)
    loss, stats = dpo_loss(empty, empty, empty, empty)
    assert loss.item() == 0.0 and stats["rewards/accuracy"].item() == 0.0


def test_errors():
    x = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="choose one of sigmoid, ipo, hinge"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="only, not 'ipo'"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="must all be \\(B,\\)"):
        dpo_loss(x, x, x, t(-1.0))
    with pytest.raises(ValueError, match="must all be \\(B,\\)"):
        dpo_loss(x[None], x[None], x[None], x[None])


# --- reference-free: ORPO (Hong et al. 2024, arXiv 2403.07691) and SimPO (Meng et al. 2024, arXiv 2405.14734)


def test_orpo_by_hand():
    # P_w = 0.4 over |y_w| = 3 tokens, P_l = 0.2 over |y_l| = 5 (P = exp(mean token log-prob)), so the
    # summed log-probs are 3 log 0.4 and 5 log 0.2.
    #   odds(y_w) = 0.4 / 0.6 = 2/3, odds(y_l) = 0.2 / 0.8 = 1/4, odds ratio = 8/3
    #   L_OR = -log sigmoid(log 8/3) = -log((8/3) / (1 + 8/3)) = -log(8/11) = log 1.375 = 0.318454
    #   L_SFT = -log 0.4 = 0.916291;  lam = 0.1: l = 0.916291 + 0.1 * 0.318454 = 0.948136
    pc, pr = t(3 * math.log(0.4), grad=True), t(5 * math.log(0.2), grad=True)
    loss, stats = orpo_loss(pc, pr, torch.tensor([3]), torch.tensor([5]), lam=0.1)
    assert abs(stats["orpo/or_loss"].item() - 0.318454) < 1e-6
    assert stats["orpo/or_loss"].item() == pytest.approx(math.log(11 / 8), abs=1e-12)
    assert stats["orpo/nll"].item() == pytest.approx(-math.log(0.4), abs=1e-12)
    assert abs(loss.item() - 0.948136) < 1e-6
    # the implicit reward is the log odds: log 2/3 = -0.405465, log 1/4 = -1.386294, margin log 8/3
    assert stats["rewards/chosen"].item() == pytest.approx(math.log(2 / 3), abs=1e-12)
    assert stats["rewards/rejected"].item() == pytest.approx(math.log(1 / 4), abs=1e-12)
    assert stats["rewards/margin"].item() == pytest.approx(math.log(8 / 3), abs=1e-12)
    assert stats["rewards/accuracy"].item() == 1.0
    # gradients: d L_OR / d log odds(y_w) = -(1 - sigmoid(log 8/3)) = -3/11, d log odds / d m =
    # 1 / (1 - e^m) (1/0.6 at P = 0.4, 1/0.8 at P = 0.2), d m / d sum = 1 / |y|; d L_SFT / d m_w = -1:
    #   d l / d pc = (1/3) (-1 + 0.1 * (-3/11) / 0.6) = (1/3) (-1 - 0.5/11) = -0.348485
    #   d l / d pr = (1/5) * 0.1 * (3/11) / 0.8 = 0.00681818
    loss.backward()
    assert pc.grad.item() == pytest.approx((-1 - 0.05 / 1.1) / 3, abs=1e-12) and abs(pc.grad.item() + 0.348485) < 1e-6
    assert pr.grad.item() == pytest.approx(0.1 * 3 / 11 / 0.8 / 5, abs=1e-12)
    assert abs(pr.grad.item() - 0.00681818) < 1e-8


def test_simpo_by_hand():
    # beta = 2, mean log-probs m_w = -4/4 = -1.0 and m_l = -2.4/2 = -1.2 (margin 0.2), gamma = 0.3:
    #   l = -log sigmoid(2 * 0.2 - 0.3) = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397
    pc, pr = t(-4.0, grad=True), t(-2.4, grad=True)
    loss, stats = simpo_loss(pc, pr, torch.tensor([4]), torch.tensor([2]), beta=2.0, gamma=0.3)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-12) and abs(loss.item() - 0.644397) < 1e-6
    # rewards beta m: -2.0 and -2.4, margin 0.4 (gamma is not part of the reward), a win
    assert stats["rewards/chosen"].item() == pytest.approx(-2.0, abs=1e-12)
    assert stats["rewards/rejected"].item() == pytest.approx(-2.4, abs=1e-12)
    assert stats["rewards/margin"].item() == pytest.approx(0.4, abs=1e-12)
    assert stats["rewards/accuracy"].item() == 1.0
    assert set(stats) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
    # d l / d pc = -sigmoid(-0.1) * beta / |y_w| = -0.475021 * 2 / 4 = -0.237510;
    # d l / d pr = +sigmoid(-0.1) * 2 / 2 = 0.475021
    loss.backward()
    s = 1 / (1 + math.exp(0.1))
    assert pc.grad.item() == pytest.approx(-s / 2, abs=1e-12) and abs(pc.grad.item() + 0.237510) < 1e-6
    assert pr.grad.item() == pytest.approx(s, abs=1e-12) and abs(pr.grad.item() - 0.475021) < 1e-6
    # equal mean log-probs: -log sigmoid(-gamma) = log(1 + e^0.3) = 0.854355; gamma = 0: log 2
    tie, stats = simpo_loss(t(-3.0), t(-6.0), torch.tensor([3]), torch.tensor([6]), beta=2.0, gamma=0.3)
    assert abs(tie.item() - 0.854355) < 1e-6 and stats["rewards/accuracy"].item() == 0.5
    zero, _ = simpo_loss(t(-3.0), t(-6.0), torch.tensor([3]), torch.tensor([6]), beta=2.0, gamma=0.0)
    assert zero.item() == pytest.approx(LOG2, abs=1e-12)


def test_reference_free_losses_normalise_by_length():
    # a response twice as long at the same per-token log-prob has twice the summed log-prob but the
    # same mean: ORPO and SimPO see a tie (DPO's summed log-probs would prefer the short one)
    for fn in (orpo_loss, simpo_loss):
        _, stats = fn(t(-2.0), t(-4.0), torch.tensor([2]), torch.tensor([4]))
        assert stats["rewards/margin"].item() == 0.0 and stats["rewards/accuracy"].item() == 0.5, fn


def test_log_odds_is_finite_near_probability_one_and_exact_elsewhere():
    # m -> 0 (P -> 1): log(P / (1 - P)) -> inf; capped at m = -1e-6: -1e-6 - log(1 - e^-1e-6) = 13.8155
    m = t(0.0, -1e-12, -1e-7, -1e-3, -1.0, -50.0, -800.0)
    got = log_odds(m)
    assert torch.isfinite(got).all()
    cap = -1e-6 - math.log(-math.expm1(-1e-6))
    assert abs(cap - 13.8155) < 1e-4
    assert got[:3].tolist() == pytest.approx([cap] * 3, abs=1e-9)
    # -1e-3: log(e^-0.001 / (1 - e^-0.001)) = log(0.999000 / 0.000999500) = 6.907255
    assert abs(got[3].item() - 6.907255) < 1e-6
    assert got[4].item() == pytest.approx(-1.0 - math.log(1 - math.exp(-1.0)), abs=1e-12)  # -0.541325
    # very unlikely: 1 - P = 1, log odds = m (log1p-free: e^-800 underflows to 0 and nothing breaks)
    assert got[5].item() == pytest.approx(-50.0, abs=1e-12) and got[6].item() == -800.0
    # float32 too (the trainer's dtype)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-8, -100.0]))).all()


@pytest.mark.parametrize("fn", ["orpo", "simpo"])
def test_reference_free_losses_finite_when_a_response_is_certain(fn):
    # both responses with log-prob 0 (P = 1), or a huge negative one: finite loss and gradients
    loss_fn = {"orpo": orpo_loss, "simpo": simpo_loss}[fn]
    pc, pr = t(0.0, 0.0, -1e-9, grad=True), t(0.0, -1e4, 0.0, grad=True)
    n = torch.tensor([3, 3, 3])
    loss, stats = loss_fn(pc, pr, n, n)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    if fn == "orpo":
        # pair 0: both capped, odds ratio 1: L_OR = log 2, L_SFT = 0
        one, _ = orpo_loss(t(0.0), t(0.0), torch.tensor([3]), torch.tensor([3]), lam=1.0)
        assert one.item() == pytest.approx(LOG2, abs=1e-9)


def _naive_orpo(pc, pr, nc, nr, lam):
    """Per pair in python floats: odds = P / (1 - P) with P = exp(mean log-prob), then the mean."""
    total = 0.0
    for a, b, n, k in zip(pc.tolist(), pr.tolist(), nc.tolist(), nr.tolist()):
        p_w, p_l = math.exp(a / n), math.exp(b / k)
        ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
        total += -a / n + lam * math.log1p(math.exp(-ratio))
    return total / len(pc)


def _naive_simpo(pc, pr, nc, nr, beta, gamma):
    total = 0.0
    for a, b, n, k in zip(pc.tolist(), pr.tolist(), nc.tolist(), nr.tolist()):
        total += math.log1p(math.exp(-(beta * a / n - beta * b / k - gamma)))
    return total / len(pc)


def _random_pairs(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 12, (n,), generator=g)
    nr = torch.randint(1, 12, (n,), generator=g)
    # mean token log-probs in (-3, -0.01): summed log-probs scale with the length
    pc = -(0.01 + 3 * torch.rand(n, generator=g, dtype=torch.float64)) * nc
    pr = -(0.01 + 3 * torch.rand(n, generator=g, dtype=torch.float64)) * nr
    return pc, pr, nc, nr


def test_reference_free_losses_match_naive_loops_and_gradcheck():
    pc, pr, nc, nr = _random_pairs(2)
    for lam in (0.1, 0.5, 2.0):
        loss, _ = orpo_loss(pc, pr, nc, nr, lam=lam)
        assert loss.item() == pytest.approx(_naive_orpo(pc, pr, nc, nr, lam), abs=1e-12)
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4), (0.1, 0.0)):
        loss, _ = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma)
        assert loss.item() == pytest.approx(_naive_simpo(pc, pr, nc, nr, beta, gamma), abs=1e-12)
    # analytic gradients against finite differences (double precision)
    x, y = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, nc, nr, lam=0.3)[0], (x, y))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, nc, nr, beta=2.0, gamma=0.5)[0], (x, y))


@pytest.mark.parametrize("fn", ["orpo", "simpo"])
def test_reference_free_halves_with_the_global_normalizer_add_up_to_the_full_batch(fn):
    # ORPO's NLL is a per-pair mean token NLL, so it shares the pair normalizer with the odds-ratio term
    loss_fn = {"orpo": orpo_loss, "simpo": simpo_loss}[fn]
    pc, pr, nc, nr = _random_pairs(3, n=8)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    full, full_stats = loss_fn(pc, pr, nc, nr)
    full_grad = torch.autograd.grad(full, (pc, pr))
    a, sa = loss_fn(pc[:3], pr[:3], nc[:3], nr[:3], normalizer=8)
    b, sb = loss_fn(pc[3:], pr[3:], nc[3:], nr[3:], normalizer=8)
    split_grad = torch.autograd.grad(a + b, (pc, pr))
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    for x, y in zip(full_grad, split_grad):
        assert torch.allclose(x, y, atol=1e-12)
    # the stats are plain means: weighted by each part's share they give the full batch's
    for k in full_stats:
        assert (3 * sa[k] + 5 * sb[k]).item() / 8 == pytest.approx(full_stats[k].item(), abs=1e-12), k


def test_reference_free_losses_upcast_bf16_handle_empty_batches_and_check_arguments():
    n = torch.tensor([2])
    for fn in (orpo_loss, simpo_loss):
        loss, stats = fn(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-3.0], dtype=torch.bfloat16), n, n)
        assert loss.dtype == torch.float32 and stats["rewards/margin"].dtype == torch.float32
        empty = torch.zeros(0)
        loss, stats = fn(empty, empty, empty, empty)
        assert loss.item() == 0.0 and stats["rewards/accuracy"].item() == 0.0
        with pytest.raises(ValueError, match="must all be \\(B,\\)"):
            fn(t(-1.0, -2.0), t(-1.0, -2.0), n, n)
    x = t(-1.0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        orpo_loss(x, x, n, n, lam=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        simpo_loss(x, x, n, n, beta=-1.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        simpo_loss(x, x, n, n, gamma=-0.1)
