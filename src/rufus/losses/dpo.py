"""Direct preference losses on sequence log-probabilities: DPO, conservative DPO, IPO, SLiC hinge,
and the reference-free ORPO and SimPO.

Inputs are SEQUENCE log-probabilities, one per (prompt, response): the sum over the response tokens
of log pi(y_t | x, y_<t) (`sequence_logprobs`-style: mask the prompt and padding, then sum), for the
policy being trained (pi_theta) and the frozen reference (pi_ref), on the chosen y_w and rejected
y_l response of each of B pairs. Every loss is a function of the log-ratio margin

    h = [log pi_theta(y_w) - log pi_ref(y_w)] - [log pi_theta(y_l) - log pi_ref(y_l)]      (B,)

and the batch loss is sum_b l_b / normalizer (default B, the mean). A trainer that splits one
optimiser batch into micro-batches passes the whole batch's pair count as `normalizer`, so the
micro-batch losses and gradients add up to the full batch's exactly.

Length: the sum over tokens is the DPO paper's log pi(y|x). TRL's IPO averages the token logprobs
over the response length instead; pass length-averaged logprobs to get that behaviour.

Reference-free (`orpo_loss`, `simpo_loss`; REFERENCE_FREE_LOSS_TYPES): no pi_ref at all. Both take
the policy's summed sequence log-probabilities and the response lengths |y| (tokens, eos included),
and work on the length-normalised log-probability m(y) = log pi_theta(y|x) / |y|, the mean token
log-probability. ORPO (Hong et al. 2024) adds the chosen response's NLL, -m(y_w), to an odds-ratio
term; SimPO (Meng et al. 2024) is the DPO sigmoid loss on beta m(y) with a target margin gamma.
The same `normalizer` rule holds: sum over the pairs / the whole batch's pair count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # dpo_loss: on the log-ratio to pi_ref
REFERENCE_FREE_LOSS_TYPES = ("orpo", "simpo")  # orpo_loss, simpo_loss: no pi_ref


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss on the log-ratio margin h (see the module docstring), per pair:

    sigmoid  l = -log sigmoid(beta h)
             DPO, Rafailov et al. 2023 ("Direct Preference Optimization"), eq. 7. log 2 at h = 0
             (policy == reference). With label_smoothing eps > 0 it is conservative DPO (cDPO;
             Mitchell 2023, "A note on DPO with noisy preferences"), the expected loss when each
             label is flipped with probability eps:
                 l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
             whose minimum is at sigmoid(beta h) = 1 - eps instead of h -> infinity.
    ipo      l = (h - 1 / (2 beta))^2
             IPO, Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from
             Human Preferences"), eq. 17, with beta in the role of tau. Regresses h onto 1/(2 beta)
             instead of pushing it to infinity, so it does not over-fit deterministic preferences.
    hinge    l = max(0, 1 - beta h)
             SLiC-HF, Zhao et al. 2023 ("SLiC-HF: Sequence Likelihood Calibration with Human
             Feedback"), the rank-calibration hinge of eq. 4 without its SFT regulariser, applied
             to the reference-normalised margin as in RSO (Liu et al. 2023, arXiv 2309.06657) and
             TRL's "hinge": beta * max(0, 1/beta - h), i.e. margin delta = 1/beta on h. 0 once
             beta h >= 1.

    policy_chosen   (B,)  log pi_theta(y_w | x), summed over response tokens, differentiable
    policy_rejected (B,)  log pi_theta(y_l | x)
    ref_chosen      (B,)  log pi_ref(y_w | x) (detached, moved to the policy's device: the reference is
                          frozen, and may be precomputed)
    ref_rejected    (B,)  log pi_ref(y_l | x)
    beta                  > 0; the KL strength of DPO (0.1 in the paper's dialogue runs, 0.5 TL;DR)
    label_smoothing       eps in [0, 0.5], only for loss_type "sigmoid"
    normalizer            loss = sum_b l_b / normalizer; default B (0 loss for no pairs)

    stats (detached, plain means over this call's pairs): the implicit rewards
    r_hat = beta log pi_theta / pi_ref (DPO Sec. 5) as
      rewards/chosen    mean beta (log pi_theta(y_w) - log pi_ref(y_w))
      rewards/rejected  mean beta (log pi_theta(y_l) - log pi_ref(y_l))
      rewards/margin    mean of their difference, beta h
      rewards/accuracy  fraction of pairs with reward chosen > rejected; a tie counts 0.5
    Computed in at least float32 (bf16 inputs are upcast), with logsigmoid (exact for large |h|).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    shapes = [tuple(x.shape) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    if len(set(shapes)) > 1 or len(shapes[0]) != 1:
        raise ValueError(
            "policy_chosen, policy_rejected, ref_chosen and ref_rejected must all be (B,), got "
            + ", ".join(str(s) for s in shapes)
        )
    policy_chosen = _upcast(policy_chosen)
    dtype = policy_chosen.dtype
    policy_rejected = policy_rejected.to(dtype)
    # the reference may be precomputed (a CPU float32 tensor): detach, then match device and dtype
    ref_chosen = ref_chosen.detach().to(device=policy_chosen.device, dtype=dtype)
    ref_rejected = ref_rejected.detach().to(device=policy_chosen.device, dtype=dtype)

    chosen_ratio = policy_chosen - ref_chosen  # (B,) log pi_theta(y_w) / pi_ref(y_w)
    rejected_ratio = policy_rejected - ref_rejected  # (B,) log pi_theta(y_l) / pi_ref(y_l)
    h = chosen_ratio - rejected_ratio  # (B,) log-ratio margin
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * h)  # (B,)
        if label_smoothing:
            per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    else:  # hinge
        per_pair = torch.relu(1.0 - beta * h)  # (B,)

    if normalizer is None:
        normalizer = max(h.numel(), 1)
    loss = per_pair.sum() / normalizer

    with torch.no_grad():
        # (B,) implicit rewards r_hat(x, y_w) and r_hat(x, y_l)
        stats = _reward_stats(beta * chosen_ratio, beta * rejected_ratio, dtype)
    return loss, stats


# log odds are capped where the mean token probability is within about 1e-6 of 1 (m >= -1e-6):
# log P/(1 - P) -> +inf as P -> 1, and its derivative 1 / (1 - P) with it. The cap is log(1e6) = 13.8.
_MAX_MEAN_LOGPROB = -1e-6


def log_odds(mean_logprobs: torch.Tensor) -> torch.Tensor:
    """log odds(y) = log P - log(1 - P) with P = exp(m), m = the mean token log-probability (<= 0).

    ORPO (Hong et al. 2024, arXiv 2403.07691), Sec. 4.1: odds(y|x) = P(y|x) / (1 - P(y|x)), with
    log P(y|x) the mean token log-likelihood of y (length-normalised). Computed as
    m - log(-expm1(m)), exact for m near 0 where 1 - exp(m) would cancel, and for very negative m
    (expm1 -> -1, log odds -> m). m is clamped to at most -1e-6 (log odds <= 13.8) so that P = 1 in
    floating point gives a finite value and gradient (zero past the cap) instead of inf / nan."""
    m = mean_logprobs.clamp(max=_MAX_MEAN_LOGPROB)
    return m - torch.log(-torch.expm1(m))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float = 0.1,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO, odds-ratio preference optimisation (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", arXiv 2403.07691), Sec. 4, per pair:

        m_w = log pi_theta(y_w|x) / |y_w|,  m_l = log pi_theta(y_l|x) / |y_l|   mean token log-probs
        l = L_SFT + lam * L_OR                                  eq. 6 (inside the expectation)
        L_SFT = -m_w                                            the chosen response's causal-LM NLL per token
        L_OR  = -log sigmoid(log odds(y_w) - log odds(y_l))     eq. 7, log odds as `log_odds`

    No reference model: the SFT term keeps the policy on the chosen responses, the odds ratio pushes
    the rejected ones down. lam is the paper's lambda (0.1 in its runs; TRL calls it beta).

    The NLL is each chosen response's mean token NLL, averaged over the pairs (eq. 6 is the expected
    per-example loss L_SFT + lam L_OR, L_SFT the per-token NLL of the example). So both terms share the
    pair-count `normalizer` and micro-batches add up to the whole batch exactly, with no second
    normaliser. (TRL and the paper's code take the NLL as the mean over all chosen tokens of the batch
    instead, which weights long responses more.)

    policy_chosen    (B,)  log pi_theta(y_w | x), summed over response tokens, differentiable
    policy_rejected  (B,)  log pi_theta(y_l | x)
    chosen_lengths   (B,)  |y_w|, response tokens counted in policy_chosen (floored at 1)
    rejected_lengths (B,)  |y_l|
    lam                    > 0, weight of the odds-ratio term
    normalizer             loss = sum_b l_b / normalizer; default B (0 loss for no pairs)

    stats (detached, plain means over this call's pairs): the implicit reward is the log odds,
      rewards/chosen    mean log odds(y_w)
      rewards/rejected  mean log odds(y_l)
      rewards/margin    mean log odds ratio log odds(y_w) - log odds(y_l)
      rewards/accuracy  fraction of pairs with margin > 0; a tie counts 0.5
      orpo/nll          mean L_SFT, the chosen responses' NLL per token
      orpo/or_loss      mean L_OR, the odds-ratio term before lam
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    m_w, m_l, dtype = _mean_logprobs(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
    log_odds_w, log_odds_l = log_odds(m_w), log_odds(m_l)  # (B,)
    ratio = log_odds_w - log_odds_l  # (B,) log odds ratio
    nll = -m_w  # (B,) L_SFT
    odds_ratio_loss = -F.logsigmoid(ratio)  # (B,) L_OR
    per_pair = nll + lam * odds_ratio_loss  # (B,)
    if normalizer is None:
        normalizer = max(ratio.numel(), 1)
    loss = per_pair.sum() / normalizer
    with torch.no_grad():
        stats = _reward_stats(log_odds_w, log_odds_l, dtype)
        stats["orpo/nll"] = _mean(nll)
        stats["orpo/or_loss"] = _mean(odds_ratio_loss)
    return loss, stats


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO, simple preference optimisation (Meng et al. 2024, "SimPO: Simple Preference
    Optimization with a Reference-Free Reward", arXiv 2405.14734), per pair:

        r(y) = beta / |y| * log pi_theta(y|x)          eq. 4: the length-normalised implicit reward
        l = -log sigmoid(r(y_w) - r(y_l) - gamma)       eq. 6: Bradley-Terry with a target margin gamma

    No reference model; the reward is the policy's own mean token log-probability, so it matches the
    quantity generation ranks by and does not favour long responses. The paper uses beta 2.0-2.5 and
    tunes gamma with beta (its code's gamma/beta ratio, about 0.25-0.5). At r(y_w) = r(y_l) the loss
    is -log sigmoid(-gamma) = log(1 + e^gamma), log 2 at gamma = 0 (DPO's sigmoid loss on
    length-normalised log-probs with no reference).

    policy_chosen    (B,)  log pi_theta(y_w | x), summed over response tokens, differentiable
    policy_rejected  (B,)  log pi_theta(y_l | x)
    chosen_lengths   (B,)  |y_w|, response tokens counted in policy_chosen (floored at 1)
    rejected_lengths (B,)  |y_l|
    beta                   > 0, the reward scale
    gamma                  >= 0, the target reward margin
    normalizer             loss = sum_b l_b / normalizer; default B (0 loss for no pairs)

    stats (detached, plain means over this call's pairs), the implicit reward r(y):
      rewards/chosen, rewards/rejected   mean r(y_w), r(y_l)
      rewards/margin                     mean r(y_w) - r(y_l) (gamma not subtracted)
      rewards/accuracy                   fraction of pairs with r(y_w) > r(y_l); a tie counts 0.5
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    m_w, m_l, dtype = _mean_logprobs(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
    reward_w, reward_l = beta * m_w, beta * m_l  # (B,) r(y_w), r(y_l)
    per_pair = -F.logsigmoid(reward_w - reward_l - gamma)  # (B,)
    if normalizer is None:
        normalizer = max(per_pair.numel(), 1)
    loss = per_pair.sum() / normalizer
    with torch.no_grad():
        stats = _reward_stats(reward_w, reward_l, dtype)
    return loss, stats


def _mean_logprobs(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths):
    """Check four (B,) tensors; (B,) m_w, (B,) m_l = summed log-probs / lengths, at least float32,
    and the dtype."""
    shapes = [tuple(x.shape) for x in (policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)]
    if len(set(shapes)) > 1 or len(shapes[0]) != 1:
        raise ValueError(
            "policy_chosen, policy_rejected, chosen_lengths and rejected_lengths must all be (B,), got "
            + ", ".join(str(s) for s in shapes)
        )
    policy_chosen = _upcast(policy_chosen)
    dtype, device = policy_chosen.dtype, policy_chosen.device
    # a response has at least its eos; the floor only keeps an empty row from dividing by zero
    n_w = torch.as_tensor(chosen_lengths, device=device).to(dtype).clamp(min=1)
    n_l = torch.as_tensor(rejected_lengths, device=device).to(dtype).clamp(min=1)
    return policy_chosen / n_w, policy_rejected.to(dtype) / n_l, dtype


def _reward_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """rewards/chosen, rejected, margin, accuracy (ties 0.5) of (B,) implicit rewards, detached."""
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    gap = chosen_reward - rejected_reward
    wins = (gap > 0).to(dtype) + 0.5 * (gap == 0).to(dtype)
    return {
        "rewards/chosen": _mean(chosen_reward),
        "rewards/rejected": _mean(rejected_reward),
        "rewards/margin": _mean(gap),
        "rewards/accuracy": _mean(wins),
    }


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0, not nan, over no elements."""
    return x.sum() / max(x.numel(), 1)
