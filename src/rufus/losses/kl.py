"""Per-token estimators of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

With y_t ~ pi_theta and log_ratio_t = log pi_theta(y_t) - log pi_ref(y_t), Schulman's three
estimators ("Approximating KL divergence", http://joschu.net/blog/kl-approx.html; with his x ~ q,
r = p/q, q = pi_theta, p = pi_ref, so log r = -log_ratio) are

    k1 = -log r              = log_ratio                          unbiased, high variance, can be < 0
    k2 = (log r)^2 / 2       = log_ratio^2 / 2                    biased (low for small KL), >= 0
    k3 = (r - 1) - log r     = exp(-log_ratio) - 1 + log_ratio    unbiased, >= 0, low variance

Where each one goes:
- k1 is the per-token penalty in the reward of PPO-RLHF (Ziegler et al. 2019, Sec. 2.2; Ouyang et al.
  2022, eq. 2): r_t = -beta * k1_t, plus the score at the last token. Its sum over a response is the
  sequence log-ratio log pi_theta(y|x) / pi_ref(y|x).
- k3 is GRPO's KL term inside the loss (Shao et al. 2024, eq. 4), differentiated through logprobs.

Gradient caveat (Tang and Munos 2025, "On a few pitfalls in KL divergence gradient estimation for
RL", arXiv 2506.09477; checked in tests/losses/test_kl.py): with the samples held fixed, the
gradient of E[k1] is 0, of E[k2] is grad KL(pi_theta || pi_ref), and of E[k3] is
grad KL(pi_ref || pi_theta) (the *forward* KL). Only the value estimates are of the reverse KL.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) (Schulman 2020, "Approximating KL divergence").

    logprobs      (B, A)  log pi_theta(y_t | x, y_<t) of the sampled tokens y_t ~ pi_theta
    ref_logprobs  (B, A)  log pi_ref(y_t | x, y_<t) of the same tokens
    estimator             "k1" (log_ratio), "k2" (log_ratio^2 / 2) or "k3" (exp(-log_ratio) - 1 + log_ratio)
    returns       (B, A)  per-token estimates, in at least float32; differentiable in both inputs

    No mask: the caller zeroes or masks padding (the estimates there are whatever the inputs make
    them). k3 uses expm1 so that it stays accurate (and >= 0) for tiny log-ratios; it is not clamped,
    so a log_ratio below about -88 overflows float32 to inf, which is the honest value.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have the same shape, got {tuple(logprobs.shape)} "
            f"and {tuple(ref_logprobs.shape)}"
        )
    log_ratio = _upcast(logprobs) - _upcast(ref_logprobs)  # (B, A) log pi_theta - log pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(-log_ratio) + log_ratio  # (pi_ref / pi_theta - 1) - log(pi_ref / pi_theta)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()
