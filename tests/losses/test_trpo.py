"""TRPO's pieces: conjugate gradient, the Fisher-vector product against an explicit Hessian, the
step size and the line search; PPO's KL-penalised surrogate and its adaptive beta."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rufus.kl_control import PenaltyController, adapt_penalty
from rufus.losses.ppo import kl_penalty_policy_loss
from rufus.losses.trpo import conjugate_gradient, fisher_vector_product, line_search, max_step, surrogate


def test_conjugate_gradient_solves_a_two_by_two_system_in_two_steps():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # A^-1 = [[3, -1], [-1, 4]] / 11, so x = [3 - 2, -1 + 8] / 11 = [1/11, 7/11]
    x, used = conjugate_gradient(lambda v: A @ v, b, iters=10)
    assert x.tolist() == pytest.approx([1 / 11, 7 / 11], abs=1e-12)
    assert used == 2  # exact after n = 2 products; the third check finds r = 0


def test_conjugate_gradient_on_a_random_spd_system_reaches_the_tolerance():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = M @ M.T + 30 * torch.eye(30, dtype=torch.float64)  # well conditioned, symmetric positive definite
    b = torch.randn(30, generator=g, dtype=torch.float64)
    x, _ = conjugate_gradient(lambda v: A @ v, b, iters=30, tol=1e-20)
    assert torch.linalg.norm(A @ x - b) < 1e-8
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-10)
    few, used = conjugate_gradient(lambda v: A @ v, b, iters=3)  # the iteration budget holds
    assert used == 3 and torch.linalg.norm(A @ few - b) > 1e-6


def _tiny_policy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_fisher_vector_product_equals_the_explicit_hessian_of_the_kl():
    net = _tiny_policy()
    params = list(net.parameters())
    states = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        old = torch.log_softmax(net(states), -1)  # pi_old, fixed

    def kl_of(logits):  # mean over states of KL(pi_old || pi_theta)
        new = torch.log_softmax(logits, -1)
        return (old.exp() * (old - new)).sum(-1).mean()

    # the explicit Hessian over the flat parameter vector, built with torch.func
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def kl_flat(flat):
        parts = torch.split(flat, sizes)
        tensors = {n: t.reshape(s) for (n, _), t, s in zip(net.named_parameters(), parts, shapes)}
        return kl_of(torch.func.functional_call(net, tensors, (states,)))

    H = torch.autograd.functional.hessian(kl_flat, flat0)  # (n, n)
    fvp = fisher_vector_product(lambda: kl_of(net(states)), params, damping=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(flat0.numel(), generator=g, dtype=torch.float64)
        assert torch.allclose(fvp(v), H @ v, atol=1e-10)
    damped = fisher_vector_product(lambda: kl_of(net(states)), params, damping=0.1)
    assert torch.allclose(damped(v), H @ v + 0.1 * v, atol=1e-10)


def test_the_full_step_meets_the_quadratic_model_of_the_bound():
    F = torch.tensor([[2.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    x = torch.tensor([1.0, 1.0], dtype=torch.float64)
    step = max_step(x, F @ x, max_kl=0.01)
    # x^T F x = 10, beta = sqrt(2 * 0.01 / 10); the model 0.5 s^T F s = delta exactly
    assert (0.5 * step @ F @ step).item() == pytest.approx(0.01, rel=1e-12)
    assert step.tolist() == pytest.approx([math.sqrt(0.002)] * 2, rel=1e-12)


def test_line_search_backtracks_to_the_first_step_within_the_bound_and_rejects_a_worse_surrogate():
    old = torch.zeros(2, dtype=torch.float64)
    full = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def kl_and_gain(theta):  # surrogate rises along the step; KL = theta_0^2
        return float(theta[0]), float(theta[0] ** 2)

    theta, info = line_search(kl_and_gain, old, full, old_surrogate=0.0, max_kl=0.3)
    # fractions 1 (KL 1), 0.5 (KL 0.25 <= 0.3): accepted after one backtrack
    assert info["accepted"] and info["backtracks"] == 1 and info["kl"] == pytest.approx(0.25)
    assert theta.tolist() == [0.5, 0.0] and info["surrogate_gain"] == pytest.approx(0.5)

    def worse(theta):  # every fraction of the step lowers the surrogate, though the KL is small
        return -float(theta[0]), 0.0

    theta, info = line_search(worse, old, full, old_surrogate=0.0, max_kl=0.3, max_backtracks=6)
    assert not info["accepted"] and info["backtracks"] == 6 and torch.equal(theta, old)


def test_surrogate_is_the_mean_weighted_advantage_and_its_gradient_the_policy_gradient():
    logits = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.log_softmax(logits.detach(), -1)[:, 0]
    new = torch.log_softmax(logits, -1)[:, 0]
    loss = surrogate(new, old, torch.tensor([2.0]))
    assert loss.item() == pytest.approx(2.0)  # ratio 1 times A
    loss.backward()
    # A grad log pi(0) = 2 (e_0 - pi) = 2 (0.5, -0.5)
    assert logits.grad.tolist() == [[pytest.approx(1.0), pytest.approx(-1.0)]]


def test_kl_penalty_gradient_on_a_two_action_policy_by_hand():
    # pi_old = softmax(0, 0) = (1/2, 1/2); pi_theta = softmax(ln 2, 0) = (2/3, 1/3); action 0, A = 1, beta = 2
    theta = torch.tensor([math.log(2.0), 0.0], dtype=torch.float64, requires_grad=True)
    old = torch.log_softmax(torch.zeros(2, dtype=torch.float64), -1)
    new = torch.log_softmax(theta, -1)
    exact_kl = (old.exp() * (old - new)).sum()
    loss, stats = kl_penalty_policy_loss(
        new[0].reshape(1, 1),
        old[0].reshape(1, 1),
        torch.ones(1, 1),
        torch.ones(1, 1),
        beta=2.0,
        kl=exact_kl.reshape(1, 1),
    )
    loss.backward()
    # ratio = (2/3) / (1/2) = 4/3; grad ratio = ratio (e_0 - pi_theta) = 4/3 (1/3, -1/3) = (4/9, -4/9)
    # grad KL(pi_old || pi_theta) = pi_theta - pi_old = (1/6, -1/6)
    # grad loss = -A grad ratio + beta grad KL = (-4/9 + 1/3, 4/9 - 1/3) = (-1/9, 1/9)
    assert theta.grad.tolist() == pytest.approx([-1 / 9, 1 / 9], abs=1e-12)
    assert loss.item() == pytest.approx(-4 / 3 + 2 * exact_kl.item(), abs=1e-12)
    assert stats["kl_penalty"].item() == pytest.approx(exact_kl.item())


def test_the_sampled_penalty_is_flat_at_pi_old_and_near_the_exact_kl_gradient_close_to_it():
    # k2 = 0.5 (log pi_theta(a) - log pi_old(a))^2 for a ~ pi_old = (1/2, 1/2): each action weighted 1/2
    def k2_grad(theta0: float) -> list[float]:
        theta = torch.tensor([theta0, 0.0], dtype=torch.float64, requires_grad=True)
        old = torch.log_softmax(torch.zeros(2, dtype=torch.float64), -1)
        new = torch.log_softmax(theta, -1)
        loss, _ = kl_penalty_policy_loss(
            new.reshape(1, 2), old.reshape(1, 2), torch.zeros(1, 2), torch.ones(1, 2), beta=1.0
        )
        loss.backward()
        return theta.grad.tolist()

    assert k2_grad(0.0) == [0.0, 0.0]  # at theta_old: zero for every sample, not just on average
    # at theta = (ln 2, 0), by hand: 1/2 [log(4/3) (1/3, -1/3) + log(2/3) (-2/3, 2/3)] = (0.183102, -0.183102);
    # the exact grad KL(pi_old || pi_theta) = pi_theta - pi_old = (1/6, -1/6): the same to first order
    assert k2_grad(math.log(2.0)) == pytest.approx([0.183102, -0.183102], abs=1e-6)
    # closer to pi_old the two agree ever better: theta = (eps, 0), exact gradient (sigmoid(eps) - 1/2) (1, -1)
    eps = 1e-3
    exact = 1 / (1 + math.exp(-eps)) - 0.5
    assert k2_grad(eps)[0] == pytest.approx(exact, rel=1e-3)


def test_penalty_loss_equals_the_surrogate_at_beta_zero_and_respects_the_mask():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    lp_padded = lp.clone()
    lp_padded[0, 3] = float("nan")  # padding holding garbage changes nothing
    loss, _ = kl_penalty_policy_loss(lp_padded, old, adv, mask, beta=0.0)
    want = (-adv * torch.exp(lp - old))[mask.bool()].mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)


def test_adaptive_beta_moves_the_right_way_on_both_sides_of_the_band():
    target = 0.01
    assert adapt_penalty(1.0, 0.02, target) == 2.0  # above 1.5 x target: doubled
    assert adapt_penalty(1.0, 0.005, target) == 0.5  # below target / 1.5: halved
    for inside in (0.0067, 0.01, 0.0149, 0.015, target / 1.5):  # in the band (its edges included)
        assert adapt_penalty(1.0, inside, target) == 1.0, inside
    assert adapt_penalty(1.0, 0.1, target, factor=3.0, band=2.0) == 3.0
    with pytest.raises(ValueError, match="non-finite"):
        adapt_penalty(1.0, float("nan"), target)
    controller = PenaltyController(1.0, target)
    trajectory = [controller.update(kl) for kl in (0.05, 0.05, 0.012, 0.001, 0.009)]
    assert trajectory == [2.0, 4.0, 4.0, 2.0, 2.0]
    again = PenaltyController(1.0, target)
    again.load_state_dict(controller.state_dict())
    assert again.value == 2.0
