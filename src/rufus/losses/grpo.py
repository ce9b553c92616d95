"""GRPO-family policy loss: PPO's clipped surrogate with one advantage per sequence, a k3 KL penalty
to the reference inside the loss, and the aggregation that tells GRPO, DAPO and Dr. GRPO apart.

Tensors are per response token, (B, A), with `mask` (B, A) 1 on valid tokens; B counts every
sampled response (prompts x group size G). The advantages come from `advantages.group_advantages`
(GRPO: z-score within each group; Dr. GRPO: mean-centred only) or `rloo_advantages`.
"""

from __future__ import annotations

import torch

from rufus.losses.aggregation import aggregate, masked_mean
from rufus.losses.kl import kl_penalty
from rufus.losses.ppo import policy_loss


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "token",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective, negated (Shao et al. 2024, "DeepSeekMath", eq. 3, with the KL estimate of eq. 4):

        ratio_t = pi_theta(y_t) / pi_old(y_t)
        l_t     = -min(ratio_t A, clip(ratio_t, 1 - clip, 1 + clip_high) A) + kl_coef * k3_t
        k3_t    = pi_ref(y_t) / pi_theta(y_t) - log(pi_ref(y_t) / pi_theta(y_t)) - 1      (>= 0)

    with A the sequence's advantage on every one of its tokens, and loss = aggregate(l, mask,
    aggregation, normalizer). The clipped part is `losses.ppo.policy_loss` (clip_high > clip is DAPO's
    clip-higher, Yu et al. 2025: 0.2 / 0.28); k3 is `losses.kl.kl_penalty(..., "k3")`, differentiated
    through logprobs (its gradient is that of the forward KL(pi_ref || pi_theta); see losses/kl.py).

    aggregation (every mode is linear, so the KL term is aggregated the same way as the surrogate):
      "sequence"  mean over each response's tokens, then mean over responses: GRPO as written,
                  1/G sum_i 1/|o_i| sum_t. A long response's tokens weigh less than a short one's.
                  For micro-batches pass normalizer = number of responses in the optimiser batch.
      "token"     sum over all valid tokens / their number: DAPO's token-level loss (Yu et al. 2025,
                  Sec. 3.3), every token weighs the same. For micro-batches pass normalizer = number of
                  valid tokens in the whole optimiser batch.
      "constant"  sum over all valid tokens / a constant normalizer (required): Dr. GRPO (Liu et al.
                  2025, "Understanding R1-Zero-Like Training", Sec. 3), e.g. normalizer =
                  max_new_tokens * number of responses, so neither a response's length nor the
                  batch's token count rescales the gradient.

    logprobs     (B, A)         log pi_theta(y_t), differentiable
    old_logprobs (B, A)         log pi_old(y_t) from the rollout (detached)
    ref_logprobs (B, A) | None  log pi_ref(y_t) of the frozen reference (detached); may be None
                                when kl_coef == 0 (then the kl stat is 0)
    advantages   (B,) | (B, A)  one advantage per response, broadcast over its tokens, or per token
    mask         (B, A)         1 on valid response tokens

    Masked positions are neutralised before any arithmetic, so garbage (inf, nan) in padding moves
    neither the loss nor any gradient.

    stats (detached, means over valid tokens whatever the aggregation; 0 with no valid token):
      clipfrac, approx_kl, ratio_mean, ratio_max   as losses.ppo.policy_loss (approx_kl is to pi_old)
      kl                                           mean k3 to pi_ref; 0 when ref_logprobs is None
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if ref_logprobs is None and kl_coef != 0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (pass them, or set kl_coef=0)")
    if advantages.dim() == 1 and logprobs.dim() == 2 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)  # (B,) -> (B, A)
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be (B,) or (B, A) = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    loss, stats = policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip=clip,
        clip_high=clip_high,
        aggregation=aggregation,
        normalizer=normalizer,
    )
    valid = mask.bool()
    if ref_logprobs is None:
        stats["kl"] = loss.new_zeros(()).detach()
        return loss, stats
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"ref_logprobs must have logprobs' shape {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}"
        )
    zero = logprobs.new_zeros(())
    # 0 - 0 on padding: k3 = 0 there, and where() passes no gradient to the padded logprobs
    kl = kl_penalty(
        torch.where(valid, logprobs, zero), torch.where(valid, ref_logprobs.detach(), zero), "k3"
    )  # (B, A) k3_t, float32 or float64
    kl = kl.to(loss.dtype)
    if kl_coef != 0:
        loss = loss + kl_coef * aggregate(kl, valid, aggregation, normalizer)
    stats["kl"] = masked_mean(kl.detach(), valid)
    return loss, stats
