"""Advantage estimation and whitening over response tokens.

Tensors are per response token, (B, A): B sequences, A response positions, with `mask` (B, A) 1 on
the valid response tokens (padding 0). Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import torch

from rufus.losses.aggregation import masked_mean, masked_var


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid positions, with the BIASED variance.

    This is OpenAI's `whiten` in lm-human-preferences (Ziegler et al. 2019; detail 18 of Huang et al.
    2023, "The N Implementation Details of RLHF with PPO"): tf.nn.moments gives the biased variance
    (divide by n), where torch.var divides by n - 1 by default, which changes the result on small
    minibatches. `shift_mean=False` adds the mean back (only the scale changes), as OpenAI does for
    rewards; advantages are whitened with the mean removed (N+ details, D25).

    x     (B, A)  values to whiten (any shape, in fact)
    mask  (B, A)  1 / True where x counts; None = every position
    returns (B, A), in at least float32, 0 outside the mask. Statistics use the valid positions
    only, so padding never moves them. With no valid position the result is all 0.
    """
    x = _upcast(x)
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask must have x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    mean = masked_mean(x, mask)  # () over valid positions
    var = masked_var(x, mask, unbiased=False)  # () biased, as tf.nn.moments
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16), as a backward recursion over time:

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        (V after the last valid token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}          (A after the last valid token = 0)
        returns_t = A_t + V(s_t)                           (the value target, TD(lambda) return)

    rewards (B, A)  r_t per response token (RLHF: -beta * kl_t everywhere, plus the score at the last
                    valid token)
    values  (B, A)  V(s_t) of the rollout's critic (pass them detached: targets are constants)
    mask    (B, A)  1 on valid response tokens; padding 0
    returns (advantages, returns), each (B, A) in at least float32, 0 outside the mask.

    The sequence ends at its last valid token (terminal: no bootstrap, as an LM response ends at EOS
    or the length limit; detail 5 of "The 37 Implementation Details of PPO" likewise ignores
    truncation). Masked positions are *skipped*, not treated as zero-reward steps: rewards and values
    there are ignored, and the recursion carries V and A of the next valid token across them. For the
    usual mask (valid tokens first, then padding) this is exactly the recursion above; for a mask with
    holes (e.g. tool output inside a multi-turn response) the valid tokens form one trajectory, as in
    verl's multi-turn GAE. Vectorised over the batch; one reverse loop over the A positions.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and mask must all be (B, A), got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    rewards = _upcast(rewards)
    values = _upcast(values).to(rewards.dtype)
    valid = mask.bool()
    zero = rewards.new_zeros(())
    rewards = torch.where(valid, rewards, zero)  # garbage (even nan) on padding cannot leak in
    values = torch.where(valid, values, zero)

    advantages = torch.zeros_like(rewards)  # (B, A)
    next_value = rewards.new_zeros(rewards.shape[0])  # (B,) V of the next valid token, 0 past the end
    next_adv = rewards.new_zeros(rewards.shape[0])  # (B,) A of the next valid token, 0 past the end
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,) TD residual
        adv = delta + gamma * lam * next_adv  # (B,)
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv, zero)
        next_value = torch.where(m, values[:, t], next_value)  # skip masked positions
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()
