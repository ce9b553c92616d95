"""Trust region policy optimisation: the surrogate, the natural-gradient direction and the line search.

Schulman, Levine, Moritz, Jordan, Abbeel 2015, "Trust Region Policy Optimization" (arXiv 1502.05477).
Each update maximises the importance-weighted advantage under a bound on the mean KL to the policy
that collected the data (eq. 14, sample-based):

    maximise_theta  L(theta) = mean_t [ pi_theta(a_t | s_t) / pi_old(a_t | s_t) * A_t ]
    subject to      KL_bar(theta) = mean_t KL(pi_old(. | s_t) || pi_theta(. | s_t)) <= delta

Appendix C's practical algorithm, which these functions implement:
  1. g = grad L at theta_old (the policy gradient);
  2. the search direction x ~ F^-1 g by conjugate gradient, where F is the Fisher information, the
     Hessian of KL_bar at theta_old, reached only through Fisher-vector products
     F v = grad (grad KL_bar . v) (a Hessian-vector product: no matrix is ever formed);
  3. the largest step along x that meets the quadratic model of the bound, beta = sqrt(2 delta / x^T F x);
  4. a backtracking line search from theta_old + beta x, halving the step until the surrogate
     improves and the exact KL_bar <= delta (else no step at all).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """L = mean_t exp(log pi_theta(a_t) - log pi_old(a_t)) A_t (eq. 14's objective; 0 gradient
    through old_logprobs and advantages). At theta = theta_old its value is mean A, its gradient the
    policy gradient mean_t A_t grad log pi_theta(a_t)."""
    ratio = torch.exp(logprobs - old_logprobs.detach())
    return (ratio * advantages.detach()).mean()


def flat_grad(output: torch.Tensor, params: list[torch.Tensor], *, create_graph: bool = False) -> torch.Tensor:
    """d output / d params as one flat vector (zeros for parameters the output does not use)."""
    grads = torch.autograd.grad(output, params, create_graph=create_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def fisher_vector_product(
    kl_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], damping: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (F + damping I) v, with F the Hessian of kl_fn() (the mean KL(pi_old || pi_theta),
    detached old side) at the current parameters: grad (grad KL . v), two backward passes, no matrix.
    At theta = theta_old the KL's gradient is 0 and its Hessian is the Fisher information of pi."""
    kl = kl_fn()
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad((grad_kl * v.detach()).sum(), params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])
        return flat + damping * v

    return fvp


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10, tol: float = 1e-10
) -> tuple[torch.Tensor, int]:
    """x with A x ~ b for a symmetric positive-definite A given only as `matvec` (Hestenes & Stiefel
    1952; Nocedal & Wright, Algorithm 5.2), starting from x = 0: at most `iters` products, stopping
    once the squared residual r^T r < tol. Returns (x, iterations used). Exact in n steps for an
    n x n matrix (in exact arithmetic)."""
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x
    p = r.clone()  # search direction
    rr = r @ r
    used = 0
    for used in range(1, iters + 1):
        if rr < tol:
            used -= 1
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, used


def max_step(direction: torch.Tensor, f_direction: torch.Tensor, max_kl: float) -> torch.Tensor:
    """The full step beta x with beta = sqrt(2 delta / x^T F x): where the quadratic model
    0.5 s^T F s of the KL reaches delta (Appendix C). `f_direction` is F x."""
    shs = 0.5 * (direction @ f_direction)
    return direction * torch.sqrt(max_kl / shs.clamp(min=1e-12))


def line_search(
    evaluate: Callable[[torch.Tensor], tuple[float, float]],
    old_params: torch.Tensor,
    full_step: torch.Tensor,
    old_surrogate: float,
    max_kl: float,
    *,
    max_backtracks: int = 10,
    shrink: float = 0.5,
) -> tuple[torch.Tensor, dict]:
    """Backtracking along `full_step`: try theta_old + shrink^k full_step, k = 0, 1, ..., and accept
    the first with surrogate > old_surrogate and mean KL <= max_kl. `evaluate(theta)` returns
    (surrogate, mean KL) at the flat parameters theta. No acceptable step: theta_old, unchanged.

    Returns (parameters, {"accepted", "backtracks" (k of the accepted step, or max_backtracks),
    "surrogate_gain", "kl", "step_fraction"}), the last three of the accepted step (0 without one)."""
    for k in range(max_backtracks):
        fraction = shrink**k
        theta = old_params + fraction * full_step
        new_surrogate, kl = evaluate(theta)
        if kl <= max_kl and new_surrogate > old_surrogate:
            gain = new_surrogate - old_surrogate
            return theta, {
                "accepted": True,
                "backtracks": k,
                "surrogate_gain": gain,
                "kl": kl,
                "step_fraction": fraction,
            }
    return old_params.clone(), {
        "accepted": False,
        "backtracks": max_backtracks,
        "surrogate_gain": 0.0,
        "kl": 0.0,
        "step_fraction": 0.0,
    }
