"""PPO losses over response tokens: the clipped policy surrogate, the KL-penalised one, the clipped
value loss, and the entropy and explained-variance diagnostics.

Tensors are per response token, (B, A), with `mask` (B, A) 1 on valid tokens. Masked positions are
neutralised *before* any arithmetic (log-ratio and errors set to 0 there), so padding holding
garbage, even inf or nan, changes neither the loss nor any gradient. The per-token losses are reduced
with `aggregate(x, mask, aggregation, normalizer)`: "token" (mean over all valid tokens), "sequence"
(mean per sequence, then over sequences) or "constant" (sum / a fixed `normalizer`); for gradient
accumulation give "token" the whole optimiser batch's token count as `normalizer` and the
micro-batch losses add up to the full batch's.

Rollout quantities (old_logprobs, advantages, old_values, returns) are detached here: they are
constants of the update. Stats are detached tensors (no device sync inside the update loop).
"""

from __future__ import annotations

import math

import torch

from rufus.losses.aggregation import aggregate, masked_mean, masked_var


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "token",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, negated (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7):

        ratio_t = pi_theta(y_t) / pi_old(y_t) = exp(logprobs - old_logprobs)
        l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip_high))

    and loss = aggregate(l, mask, aggregation, normalizer). `clip_high` defaults to `clip`; a larger
    one is DAPO's clip-higher (Yu et al. 2025: clip 0.2, clip_high 0.28), which lets unlikely tokens
    with A > 0 grow further.

    logprobs     (B, A)  log pi_theta(y_t), differentiable
    old_logprobs (B, A)  log pi_old(y_t) from the rollout
    advantages   (B, A)  A_t (e.g. whitened GAE)
    mask         (B, A)  1 on valid response tokens

    stats (detached, over valid tokens; all 0 when there are none):
      clipfrac    fraction of valid tokens where the clipped term is strictly the larger, i.e. the
                  clip binds and the token's gradient is 0: A > 0 and ratio > 1 + clip_high, or
                  A < 0 and ratio < 1 - clip. (openai/baselines counts |ratio - 1| > clip whatever
                  the sign of A, including tokens whose unclipped branch is taken and still gets a
                  gradient; ours, like TRL's, counts only the tokens the clip actually silences.)
      approx_kl   masked mean of k3 = (ratio - 1) - log ratio, the low-variance unbiased estimate of
                  KL(pi_old || pi_theta) (Schulman 2020; detail 12 of "The 37 Implementation Details
                  of PPO"); 0 exactly when ratio == 1
      ratio_mean, ratio_max
    """
    _same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip < 0 or (clip_high is not None and clip_high < 0):
        raise ValueError(f"clip ranges must be >= 0, got clip={clip}, clip_high={clip_high}")
    high = clip if clip_high is None else clip_high
    valid = mask.bool()
    logprobs = _upcast(logprobs)
    zero = logprobs.new_zeros(())
    old_logprobs = old_logprobs.detach().to(logprobs.dtype)
    advantages = torch.where(valid, advantages.detach().to(logprobs.dtype), zero)  # (B, A)

    log_ratio = torch.where(valid, logprobs - old_logprobs, zero)  # (B, A) 0 (ratio 1) on padding
    ratio = torch.exp(log_ratio)  # (B, A) pi_theta / pi_old
    unclipped = -advantages * ratio  # (B, A)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)  # (B, A)
    per_token = torch.maximum(unclipped, clipped)  # (B, A)
    loss = aggregate(per_token, valid, aggregation, normalizer)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), valid),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": _masked_max(ratio, valid),
        }
    return loss, stats


def kl_penalty_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    kl: torch.Tensor | None = None,
    aggregation: str = "token",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KL-penalised surrogate, negated (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", Sec. 4, eq. 8): instead of clipping the ratio,

        l_t = -ratio_t A_t + beta KL_t,     ratio_t = pi_theta(y_t) / pi_old(y_t)

    with KL_t the KL(pi_old || pi_theta) at the state of token t, and loss = aggregate(l, mask, ...).
    beta adapts between updates (`rufus.kl_control.adapt_penalty`). This KL is to the policy that
    sampled the batch, not to the reference: the reference's KL stays in the reward.

    `kl` (B, A), differentiable: the exact per-state KL where the trainer has both distributions (the
    classic agents: `torch.distributions.kl_divergence(pi_old, pi_theta)`). None (a language model,
    whose old distribution over the vocabulary is not kept): the sampled k2 = 0.5 (log pi_theta(y_t)
    - log pi_old(y_t))^2 (Schulman 2020, "Approximating KL divergence"), y_t drawn from pi_old. Its
    gradient is 0 at theta_old for every sample and its Hessian there is the Fisher information, the
    exact KL's, so it is the KL's quadratic model (TRPO's) with no sampling noise in the first
    derivative. k1 = log pi_old - log pi_theta has the exact gradient only in expectation: per sample
    it is a likelihood push on the sampled token (-grad log pi_theta(y_t)) that a growing beta
    amplifies instead of holding the policy back (seen on the tiny model: beta doubling to 1e8
    while the measured KL stayed put).

    stats as `policy_loss` (clipfrac 0: nothing is clipped), plus
      kl_penalty   masked mean of the KL_t that entered the loss
    """
    _same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    valid = mask.bool()
    logprobs = _upcast(logprobs)
    zero = logprobs.new_zeros(())
    old_logprobs = old_logprobs.detach().to(logprobs.dtype)
    advantages = torch.where(valid, advantages.detach().to(logprobs.dtype), zero)  # (B, A)
    log_ratio = torch.where(valid, logprobs - old_logprobs, zero)  # (B, A)
    ratio = torch.exp(log_ratio)
    if kl is None:
        kl_t = 0.5 * log_ratio**2  # (B, A) k2: 0.5 (log pi_theta - log pi_old)^2
    else:
        _same_shape(logprobs=logprobs, kl=kl)
        kl_t = torch.where(valid, _upcast(kl), zero)
    per_token = -advantages * ratio + beta * kl_t  # (B, A)
    loss = aggregate(per_token, valid, aggregation, normalizer)
    with torch.no_grad():
        stats = {
            "clipfrac": torch.zeros((), dtype=ratio.dtype, device=ratio.device),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": _masked_max(ratio, valid),
            "kl_penalty": masked_mean(kl_t, valid),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    aggregation: str = "token",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of openai/baselines ppo2 (detail 9 of "The 37 Implementation Details of
    PPO"; detail 19 of "The N Implementation Details of RLHF with PPO"):

        V_clip_t = V_old_t + clip(V_t - V_old_t, -c, c)
        l_t      = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    With clip None it is the plain 0.5 * (V_t - R_t)^2. loss = aggregate(l, mask, aggregation,
    normalizer). The 0.5 makes the gradient V - R; scale the whole term with the trainer's vf_coef.

    values     (B, A)  V(s_t) of the critic being trained, differentiable
    old_values (B, A)  V_old(s_t) from the rollout
    returns    (B, A)  R_t = A_t + V_old(s_t) (from `gae`)
    mask       (B, A)  1 on valid response tokens

    stats (detached, over valid tokens; 0 when there are none): clipfrac (fraction where the clipped
    term is strictly the larger, so the token's gradient is 0; always 0 when clip is None),
    values (mean V), returns (mean R).
    """
    _same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    valid = mask.bool()
    values = _upcast(values)
    zero = values.new_zeros(())
    old_values = torch.where(valid, old_values.detach().to(values.dtype), zero)
    returns = torch.where(valid, returns.detach().to(values.dtype), zero)
    error = torch.where(valid, values - returns, zero)  # (B, A) V - R, 0 on padding
    unclipped = error**2  # (B, A)
    if clip is None:
        per_token = 0.5 * unclipped
        clipfrac = masked_mean(torch.zeros_like(unclipped), valid)
    else:
        if clip < 0:
            raise ValueError(f"value clip must be >= 0 or None, got {clip}")
        delta = torch.where(valid, values - old_values, zero)  # (B, A) V - V_old
        clipped = (old_values + torch.clamp(delta, -clip, clip) - returns) ** 2  # (B, A)
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), valid)
    loss = aggregate(per_token, valid, aggregation, normalizer)
    stats = {
        "clipfrac": clipfrac.detach(),
        "values": masked_mean(values.detach(), valid),
        "returns": masked_mean(returns, valid),
    }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v of softmax(logits) at each position, in float32 (float64 stays).

    logits  (B, A, V)  next-token scores of pi_theta (already divided by the sampling temperature)
    returns (B, A)     entropy in nats: log V for uniform logits, 0 for a one-hot

    Uses log_softmax (no overflow for large logits) and treats p log p as 0 where p == 0, so
    vocabulary entries masked with -inf give finite values and gradients (no 0 * -inf = nan).
    Memory: one float32 copy of (B, A, V); chunk over A for very large vocabularies.
    """
    logits = _upcast(logits)
    logp = torch.log_softmax(logits, dim=-1)  # (B, A, V)
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p * safe_logp).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the valid tokens, as a python float (a device sync; for logging).

    1: V predicts R perfectly; 0: no better than predicting the mean of R; < 0: worse than that.
    Both variances are biased (divide by n; the ratio is the same either way). When Var[R] == 0
    (no valid token, one, or all returns equal) the ratio is undefined and the result is nan, as in
    openai/baselines' and CleanRL's `explained_variance`, so a plot shows a gap, not a fake value.

    values, returns, mask (B, A).
    """
    _same_shape(values=values, returns=returns, mask=mask)
    valid = mask.bool()
    values, returns = _upcast(values.detach()), _upcast(returns.detach())
    var_returns = masked_var(returns, valid).item()
    if var_returns == 0:
        return math.nan
    return 1.0 - masked_var(returns - values, valid).item() / var_returns


# --- shared pieces --------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of x over the valid positions; 0 when there are none (like masked_mean)."""
    if x.numel() == 0:
        return x.new_zeros(())
    lowest = torch.full((), -math.inf, dtype=x.dtype, device=x.device)
    best = torch.where(mask, x, lowest).max()
    return torch.where(mask.any(), best, torch.zeros_like(best))


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes must match (B, A): {listed}")
