"""Direct preference losses on sequence log-probabilities: DPO, conservative DPO, IPO and SLiC hinge.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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
        chosen_reward = beta * chosen_ratio  # (B,) implicit reward r_hat(x, y_w)
        rejected_reward = beta * rejected_ratio  # (B,) r_hat(x, y_l)
        gap = chosen_reward - rejected_reward
        wins = (gap > 0).to(dtype) + 0.5 * (gap == 0).to(dtype)
        stats = {
            "rewards/chosen": _mean(chosen_reward),
            "rewards/rejected": _mean(rejected_reward),
            "rewards/margin": _mean(gap),
            "rewards/accuracy": _mean(wins),
        }
    return loss, stats


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0, not nan, over no elements."""
    return x.sum() / max(x.numel(), 1)
