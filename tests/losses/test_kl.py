"""KL estimators k1 / k2 / k3 (Schulman 2020, "Approximating KL divergence"): hand values, exact
expectations on a small categorical, Monte Carlo bias on Gaussians, and what their gradients are."""

import math

import pytest
import torch

from rufus.losses.kl import kl_penalty


def test_hand_values():
    # log_ratio = log pi_theta - log pi_ref = 0.5:
    #   k1 = 0.5
    #   k2 = 0.5 * 0.5^2 = 0.125
    #   k3 = e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    # log_ratio = -1: k1 = -1, k2 = 0.5, k3 = e^1 - 1 - 1 = 0.7182818
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    assert torch.allclose(kl_penalty(logprobs, ref, "k1"), torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    assert torch.allclose(kl_penalty(logprobs, ref, "k2"), torch.tensor([[0.125, 0.5]], dtype=torch.float64))
    k3 = kl_penalty(logprobs, ref, "k3")
    assert k3[0, 0].item() == pytest.approx(0.1065307, abs=1e-7)
    assert k3[0, 1].item() == pytest.approx(math.e - 2, abs=1e-12)
    assert torch.equal(kl_penalty(logprobs, ref), kl_penalty(logprobs, ref, "k1"))  # default k1


def test_naive_loop_and_bf16_upcast():
    torch.manual_seed(0)
    lp, ref = -torch.rand(3, 5) * 4, -torch.rand(3, 5) * 4
    out = {e: kl_penalty(lp, ref, e) for e in ("k1", "k2", "k3")}
    for b in range(3):
        for t in range(5):
            d = lp[b, t].item() - ref[b, t].item()
            assert out["k1"][b, t].item() == pytest.approx(d, abs=1e-6)
            assert out["k2"][b, t].item() == pytest.approx(0.5 * d * d, abs=1e-6)
            assert out["k3"][b, t].item() == pytest.approx(math.exp(-d) - 1 + d, abs=1e-6)
    assert kl_penalty(lp.bfloat16(), ref.bfloat16(), "k3").dtype == torch.float32


def test_unknown_estimator_and_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(x, torch.zeros(2, 4))


def test_k3_and_k2_are_nonnegative_and_zero_at_equality():
    # k3 = e^-d - 1 + d >= 0 since e^x >= 1 + x; k3 is exactly 0 at d = 0, even for tiny d (expm1)
    d = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    zero = torch.zeros_like(d)
    assert (kl_penalty(d, zero, "k3") >= 0).all() and (kl_penalty(d, zero, "k2") >= 0).all()
    tiny = torch.tensor([1e-9, -1e-9, 0.0])
    k3 = kl_penalty(tiny, torch.zeros(3), "k3")
    assert (k3 >= 0).all() and k3[2].item() == 0.0


def test_exact_expectation_on_a_categorical():
    # Sum over the support instead of sampling: with y ~ q = pi_theta, E_q[k1] = E_q[k3] = KL(q || p)
    # exactly (E_q[p/q] = 1), while k2 is biased.
    # q = (0.5, 0.3, 0.2), p = (0.2, 0.3, 0.5):
    #   KL(q || p) = 0.5 ln 2.5 + 0.3 ln 1 + 0.2 ln 0.4 = 0.458145 - 0.183258 = 0.274887
    #   E_q[k2] = 0.5 (0.5 ln(2.5)^2 + 0.2 ln(0.4)^2) = 0.5 (0.419794 + 0.167918) = 0.293856
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = 0.5 * math.log(2.5) + 0.2 * math.log(0.4)
    assert kl == pytest.approx(0.274887, abs=1e-6)
    expect = {e: (q * kl_penalty(q.log(), p.log(), e)).sum().item() for e in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(kl, abs=1e-12)
    assert expect["k3"] == pytest.approx(kl, abs=1e-12)
    assert expect["k2"] == pytest.approx(0.293856, abs=1e-6)


def _gaussian_samples(mu_p: float, n: int):
    # x ~ q = N(0, 1) plays pi_theta, p = N(mu_p, 1) plays pi_ref; KL(q || p) = mu_p^2 / 2.
    # log q(x) - log p(x) = ((x - mu_p)^2 - x^2) / 2 = mu_p^2 / 2 - mu_p x (the constants cancel).
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return -0.5 * x**2, -0.5 * (x - mu_p) ** 2


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_monte_carlo_unbiased(estimator):
    # q = N(0,1), p = N(0.1,1): KL = 0.005 (Schulman 2020, "Approximating KL divergence", measures
    # std/KL = 20 for k1, 1.42 for k3, so 1M samples give a standard error of 1e-4 and 7e-6).
    lq, lp = _gaussian_samples(0.1, 1_000_000)
    k = kl_penalty(lq, lp, estimator)
    se = k.std().item() / math.sqrt(k.numel())
    assert abs(k.mean().item() - 0.005) < 3 * se
    # the documented spread, so the test is about the estimator and not a lucky seed
    assert k.std().item() / 0.005 == pytest.approx(20.0 if estimator == "k1" else 1.42, rel=0.05)


def test_monte_carlo_k2_bias_at_kl_half():
    # q = N(0,1), p = N(1,1): KL = 0.5. log_ratio = 0.5 - x, so
    # E[k2] = 0.5 E[(x - 0.5)^2] = 0.5 (Var x + 0.25) = 0.625: biased up by 0.125 = 0.25 KL.
    # k1 and k3 stay unbiased (k3 = e^{x - 0.5} - 1 + 0.5 - x: E = e^0 - 1 + 0.5 = 0.5).
    lq, lp = _gaussian_samples(1.0, 1_000_000)
    for estimator, expected in (("k1", 0.5), ("k2", 0.625), ("k3", 0.5)):
        k = kl_penalty(lq, lp, estimator)
        se = k.std().item() / math.sqrt(k.numel())
        assert abs(k.mean().item() - expected) < 3 * se, estimator
    k2 = kl_penalty(lq, lp, "k2").mean().item()
    assert (k2 - 0.5) / 0.5 == pytest.approx(0.25, abs=0.01)


def test_gradients_with_samples_held_fixed():
    # Gradient caveat (Tang and Munos 2025, arXiv 2506.09477). q = softmax(theta) = pi_theta,
    # p = pi_ref fixed; weight each outcome by q detached (the "samples") and differentiate through
    # logprobs only:
    #   grad E[k1] = sum_y q grad log q = 0
    #   grad E[k2] = sum_y q (log q - log p) grad log q = grad KL(q || p)   (the reverse KL we want)
    #   grad E[k3] = sum_y q (1 - p/q) grad log q = -sum_y p grad log q = grad KL(p || q)  (forward KL)
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)

    def grad_of(f):
        (g,) = torch.autograd.grad(f(), theta)
        return g

    def surrogate(e):
        logq = torch.log_softmax(theta, -1)
        return lambda: (logq.detach().exp() * kl_penalty(logq, p.log(), e)).sum()

    def reverse_kl():
        logq = torch.log_softmax(theta, -1)
        return (logq.exp() * (logq - p.log())).sum()

    def forward_kl():
        return (p * (p.log() - torch.log_softmax(theta, -1))).sum()

    assert torch.allclose(grad_of(surrogate("k1")), torch.zeros(4, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(grad_of(surrogate("k2")), grad_of(reverse_kl), atol=1e-12)
    assert torch.allclose(grad_of(surrogate("k3")), grad_of(forward_kl), atol=1e-12)
    assert not torch.allclose(grad_of(reverse_kl), grad_of(forward_kl), atol=1e-3)
