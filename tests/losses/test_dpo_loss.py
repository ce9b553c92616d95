"""DPO / cDPO / IPO / hinge losses against hand-derived values, a naive per-pair loop, and the
batch-split property (DPO, Rafailov et al. 2023, arXiv 2305.18290, eq. 7; IPO, Azar et al. 2023,
arXiv 2310.12036, eq. 17; SLiC-HF hinge, Zhao et al. 2023, arXiv 2305.10425, eq. 4)."""

import math

import pytest
import torch

from rufus.losses.dpo import dpo_loss

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
