"""Advantage estimation and whitening over response tokens, and the group baselines of the
critic-free methods (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO's dynamic sampling).

Tensors are per response token, (B, A): B sequences, A response positions, with `mask` (B, A) 1 on
the valid response tokens (padding 0); group functions take one scalar reward per sequence, (N,).
Everything here is a pure function of its inputs.
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
    dones: torch.Tensor | None = None,
    bootstrap: torch.Tensor | None = None,
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

    Classic RL (rows = parallel environments, columns = time steps of a rollout segment) adds:
    dones     (B, A)  1 where the episode ended *at* step t: nothing flows back from t + 1
                      (next V and next A count as 0 there), so one row holds several episodes
    bootstrap (B,)    V(s) of the state after the segment's last step, for a segment that stops in
                      the middle of an episode (None: 0, the sequence is terminal, as in RLHF)
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
    if bootstrap is not None:
        next_value = _upcast(bootstrap).to(rewards.dtype).reshape(rewards.shape[0]).clone()
    next_adv = rewards.new_zeros(rewards.shape[0])  # (B,) A of the next valid token, 0 past the end
    if dones is not None and dones.shape != rewards.shape:
        raise ValueError(f"dones must be (B, A) like rewards, got {tuple(dones.shape)}")
    for t in reversed(range(rewards.shape[1])):
        if dones is not None:  # the episode ended at t: no value or advantage from step t + 1
            ended = dones[:, t].bool()
            next_value = torch.where(ended, zero, next_value)
            next_adv = torch.where(ended, zero, next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,) TD residual
        adv = delta + gamma * lam * next_adv  # (B,)
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv, zero)
        next_value = torch.where(m, values[:, t], next_value)  # skip masked positions
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


# --- group baselines (GRPO, Dr. GRPO, RLOO, DAPO) and critic-free returns (REINFORCE++) ------------
#
# Sequence rewards come flat, (N,) with N = B * G: prompt b's G sampled responses at positions
# b*G .. b*G + G - 1 (what generating with num_return_sequences=G, or repeat_interleave over the
# prompts, gives). Each function returns per-sequence values (N,); the GRPO loss broadcasts them over
# the response tokens.


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative outcome advantages.

    scale=True   A_i = (r_i - mean_g r) / (std_g r + eps)
                 GRPO, Shao et al. 2024 ("DeepSeekMath"), Sec. 4.1.2 (outcome supervision).
    scale=False  A_i = r_i - mean_g r
                 Dr. GRPO, Liu et al. 2025 ("Understanding R1-Zero-Like Training", Sec. 3): dividing
                 by the std up-weights questions that are too easy or too hard (tiny std).

    std_g is the UNBIASED sample std (divide by G - 1), as torch.std's default, which TRL's
    GRPOTrainer, OpenRLHF and verl use; the paper writes std(r) without saying which. With it,
    the advantages of a group have sample std exactly std / (std + eps), just under 1. eps (TRL's
    1e-4) keeps near-constant groups finite.

    rewards  (N,)  one scalar per response, N = B * group_size, groups consecutive
    returns  (N,)  in at least float32; every group's advantages have mean 0 (to rounding). A group
                   whose rewards are all exactly equal (no signal; see `equal_reward_groups`) gets
                   exactly 0, never nan, with or without scale; G = 1 gives all 0.
    """
    grouped = _grouped(rewards, group_size)  # (B, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (B, 1)
    centred = grouped - mean  # (B, G)
    if scale:
        # unbiased variance written out, so that G = 1 gives 0 / max(0, 1) instead of nan
        var = (centred**2).sum(dim=1, keepdim=True) / max(group_size - 1, 1)  # (B, 1)
        centred = centred / (var.sqrt() + eps)
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    return torch.where(equal, centred.new_zeros(()), centred).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740, the
    RLOO estimator; the leave-one-out baseline of Kool et al. 2019, "Buy 4 REINFORCE Samples"):

        A_i = R_i - 1/(k-1) sum_{j != i} R_j  =  k/(k-1) (R_i - mean R)

    each sample's baseline is the mean of the other k - 1 samples of its prompt, so it does not
    depend on R_i and the estimator stays unbiased. The advantages of a group sum to 0. Computed as
    the right-hand form: the mean-centred `group_advantages` (scale=False) times k/(k-1).

    rewards  (N,)  sequence rewards R_i, N = B * k, groups of k consecutive. In RLHF R includes the
                   KL penalty: R = score - beta * sum_t (log pi_old - log pi_ref)
    k              samples per prompt, >= 2 (one sample has no leave-one-out baseline)
    returns  (N,)  in at least float32
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    return group_advantages(rewards, k, scale=False) * (k / (k - 1))


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token RLHF rewards: the KL penalty on every response token, the score on the last one.

        r_t = -beta * KL_t + 1[t = last valid token] * score

    The reward of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", eq. 2)
    and InstructGPT (Ouyang et al. 2022, eq. 2), spread over the tokens as in Stiennon et al. 2020:
    summed over a response it is score - beta * sum_t KL_t, the sequence reward. PPO feeds it to
    `gae`; REINFORCE++ to `reinforce_pp_returns`.

    scores  (B,)    the reward sources' score of each response
    kl      (B, A)  per-token KL estimate (e.g. log pi_old - log pi_ref), 0 outside the mask
    mask    (B, A)  1 on valid response tokens (valid tokens first, then padding)
    kl_coef         beta >= 0
    returns (B, A)  r_t; a response with no valid token gets its score at position 0
    """
    if kl.shape != mask.shape or kl.dim() != 2 or scores.shape != kl.shape[:1]:
        raise ValueError(
            "scores must be (B,) and kl, mask (B, A), got "
            f"{tuple(scores.shape)}, {tuple(kl.shape)} and {tuple(mask.shape)}"
        )
    rewards = -kl_coef * kl  # (B, A)
    last = (mask.long().sum(-1) - 1).clamp(min=0)  # (B,) index of each response's last valid token
    rewards[torch.arange(len(last), device=last.device), last] += scores.to(rewards.dtype)
    return rewards


def whiten_global(
    x: torch.Tensor, mask: torch.Tensor, all_reduce_sum, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """`whiten` over the valid positions of a batch split across processes (every process together).

    Each process holds its share of the batch; the mean and the biased variance come from the sums
    sum(x), sum(x^2) and the valid count, added over processes by `all_reduce_sum(t) -> t` (the
    identity on one process): var = E[x^2] - mean^2. The whole batch is whitened as one, so the
    number of processes does not change the result (the advantages of PPO and REINFORCE++ are
    normalised over the global batch).

    x     (B, A)  this process's values
    mask  (B, A)  1 where x counts
    returns (B, A), 0 outside the mask; shift_mean=False keeps the mean (scales only).
    """
    m = mask.to(x.dtype)
    sums = all_reduce_sum(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
    mean = sums[0] / sums[2].clamp(min=1)
    var = (sums[1] / sums[2].clamp(min=1) - mean**2).clamp(min=0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Critic-free discounted returns of REINFORCE++ (Hu et al. 2025, "REINFORCE++: A Simple and
    Efficient Approach for Aligning Large Language Models", arXiv 2501.03262):

        G_t = sum_{s >= t} gamma^(s - t) r_s        over the valid tokens of the response

    rewards (B, A)  per-token rewards r_t; REINFORCE++ uses r_t = 1[t = T] score - beta KL_t
    mask    (B, A)  1 on valid response tokens
    returns (B, A)  G_t in at least float32, 0 outside the mask

    This is `gae` with V = 0 and lambda = 1 (then delta_t = r_t and A_t = G_t), so masking follows
    gae: padding is skipped, never a zero-reward step, and the discount counts valid tokens. The
    paper's advantage is G_t normalised over the GLOBAL batch: the trainer applies `whiten_global`
    to the whole batch (not per minibatch, not per group).
    """
    if rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and mask must both be (B, A), got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    returns, _ = gae(rewards, torch.zeros_like(_upcast(rewards)), mask, gamma=gamma, lam=1.0)
    return returns


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: True for the groups whose group_size rewards are all exactly equal.

    Such a group has zero advantage under GRPO, Dr. GRPO and RLOO alike, so it contributes no
    gradient; DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2; accuracy 0 or 1) drops them and
    samples more prompts until the batch is full. Exact equality, as for 0/1 accuracy rewards;
    continuous rewards are rarely exactly equal. nan is never equal to anything (such a group is
    kept; check rewards for nan before).

    rewards (N,), N = B * group_size, groups consecutive; returns (B,) bool.
    """
    grouped = _grouped(rewards, group_size)  # (B, G)
    return (grouped == grouped[:, :1]).all(dim=1)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / group_size, group_size), upcast, with clear errors."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,) with groups laid out consecutively, got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size must be a positive divisor of the number of rewards ({rewards.numel()}), got {group_size}"
        )
    return _upcast(rewards).reshape(-1, group_size)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()
