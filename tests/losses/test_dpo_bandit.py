"""Acceptance oracle: DPO on exact Bradley-Terry preferences reaches the KL-regularised optimum.

A one-token "response" over a 3-token vocabulary (a worked bandit, values computed below):
pi_ref = (0.5, 0.3, 0.2), reward r = (1, 0, 2), beta = 0.5. The optimum of E_pi[r] - beta KL(pi || pi_ref)
is the exponential tilt (DPO App. A.1):

    pi*(y) = pi_ref(y) exp(r(y) / beta) / Z
    weights: 0.5 e^2 = 3.694528, 0.3 e^0 = 0.3, 0.2 e^4 = 10.919630; Z = 14.914158
    pi* = (0.247720, 0.020115, 0.732165)

Preference data: every pair {a, b} of actions, labelled a > b with the exact Bradley-Terry
probability p_ab = sigmoid(r_a - r_b). The expected DPO loss (Rafailov et al. 2023, eq. 7) is

    L(theta) = sum_{a<b} [ p_ab l(a beats b) + (1 - p_ab) l(b beats a) ],
    l(w beats l) = -log sigmoid(beta [log pi(w)/pi_ref(w) - log pi(l)/pi_ref(l)])

Why it converges to pi*: d L / d h_ab = 0 where sigmoid(beta h_ab) = p_ab = sigmoid(r_a - r_b), i.e.
beta log(pi(a)/pi_ref(a)) - beta log(pi(b)/pi_ref(b)) = r_a - r_b for every pair, so
beta log(pi/pi_ref) = r + const: the tilt. (With 3 pairs and 2 free logits the system is consistent.)
"""

import math

import pytest
import torch

from rufus.losses.dpo import dpo_loss

PI_REF = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
R = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
BETA = 0.5
PI_STAR = torch.tensor([0.247720, 0.020115, 0.732165], dtype=torch.float64)  # 6 decimals, by hand above
PAIRS = [(0, 1), (0, 2), (1, 2)]


@pytest.fixture
def one_thread():
    """Hundreds of tiny ops: intra-op threads only add synchronisation. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _exact_tilt() -> torch.Tensor:
    w = PI_REF * torch.exp(R / BETA)
    return w / w.sum()


def _expected_dpo_loss(theta: torch.Tensor) -> torch.Tensor:
    """sum over pairs of p_ab l(a beats b) + (1 - p_ab) l(b beats a), each l from dpo_loss on one pair
    of sequence log-probs (a single token, so the token logprob is the sequence logprob)."""
    logpi = torch.log_softmax(theta, -1)  # (3,) log pi_theta(y)
    logref = PI_REF.log()  # (3,) log pi_ref(y)
    total = logpi.new_zeros(())
    for a, b in PAIRS:
        p = torch.sigmoid(R[a] - R[b])  # P(a > b) under Bradley-Terry in r
        a_wins, _ = dpo_loss(logpi[[a]], logpi[[b]], logref[[a]], logref[[b]], beta=BETA)
        b_wins, _ = dpo_loss(logpi[[b]], logpi[[a]], logref[[b]], logref[[a]], beta=BETA)
        total = total + p * a_wins + (1 - p) * b_wins
    return total


def test_worked_example_numbers():
    assert torch.allclose(_exact_tilt(), PI_STAR, atol=1e-6)
    # p_01 = sigmoid(1) = 0.731059, p_02 = sigmoid(-1) = 0.268941, p_12 = sigmoid(-2) = 0.119203
    assert [torch.sigmoid(R[a] - R[b]).item() for a, b in PAIRS] == pytest.approx(
        [0.731059, 0.268941, 0.119203], abs=1e-6
    )


def test_dpo_converges_to_the_tilted_optimum(one_thread):
    # Full-batch gradient descent on the logits theta, started at pi_theta = pi_ref.
    # A cautious schedule (lr 0.5 for thousands of steps) also gets there; on the exact expected loss a
    # larger step is stable and much faster. Observed max |pi - pi*_exact| at lr 2.0: 8e-4 after 25 steps,
    # 3e-6 after 50, 3e-11 after 100, 4e-16 after 150 (at lr 0.5: 7.6e-6 after 200 steps).
    # Plain theta <- theta - lr * grad by hand (torch.optim's first step imports torch._dynamo, which
    # alone takes seconds on a busy machine).
    theta = PI_REF.log().clone()
    for _ in range(150):
        theta.requires_grad_(True)
        (grad,) = torch.autograd.grad(_expected_dpo_loss(theta), theta)
        theta = (theta - 2.0 * grad).detach()
    pi = torch.softmax(theta, -1)
    error = (pi - PI_STAR).abs().max().item()
    assert error < 0.03  # the acceptance criterion; observed 4.8e-7, which is PI_STAR's own rounding
    assert (pi - _exact_tilt()).abs().max().item() < 1e-10  # observed 4e-16
    # at the optimum every pair's implicit reward margin equals the true reward gap:
    # beta log(pi(a)/pi_ref(a)) - beta log(pi(b)/pi_ref(b)) = r_a - r_b
    implicit = BETA * (pi / PI_REF).log()
    for a, b in PAIRS:
        assert (implicit[a] - implicit[b]).item() == pytest.approx((R[a] - R[b]).item(), abs=1e-7)


def test_expected_loss_is_stationary_at_pi_star_and_equals_cdpo():
    # At theta = log pi*, the gradient of the expected loss is 0.
    theta = _exact_tilt().log().requires_grad_(True)
    (grad,) = torch.autograd.grad(_expected_dpo_loss(theta), theta)
    assert grad.abs().max().item() < 1e-12
    # The expected loss over BT labels is conservative DPO: with the higher-reward action as
    # "chosen" and label_smoothing eps = 1 - p = P(label flipped), dpo_loss gives
    # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), the same sum term by term.
    theta = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    logpi, logref = torch.log_softmax(theta, -1), PI_REF.log()
    cdpo = 0.0
    for a, b in PAIRS:
        win, lose = (a, b) if R[a] > R[b] else (b, a)
        eps = 1 - torch.sigmoid(R[win] - R[lose]).item()
        loss, _ = dpo_loss(logpi[[win]], logpi[[lose]], logref[[win]], logref[[lose]], beta=BETA, label_smoothing=eps)
        cdpo += loss.item()
    assert cdpo == pytest.approx(_expected_dpo_loss(theta).item(), abs=1e-12)
    # and at pi_ref (h = 0 for every pair) each pair costs log 2: 3 log 2 = 2.079442
    assert _expected_dpo_loss(PI_REF.log()).item() == pytest.approx(3 * math.log(2), abs=1e-12)
