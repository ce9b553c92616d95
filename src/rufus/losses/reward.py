"""Reward-model losses: pairwise (Bradley-Terry, hinge), K-wise rankings as weighted pairs, a pointwise
warm-up, reward centering, and evaluation metrics.

Scores are the reward model's scalar outputs r(x, y), one per (prompt, response) sequence. A batch of
comparisons is P pairs: ``chosen`` (P,) = r(x, y_c) and ``rejected`` (P,) = r(x, y_r), the better and
the worse response of each pair. A K-way ranking of one prompt becomes its C(K, 2) pairs
(`ranking_pairs`), all taken from one forward pass over the K responses and weighted 1/C(K, 2)
(`ranking_pair_weights`), as in InstructGPT:

    flat scores (N,) of all responses of the batch's prompts, prompt g's K_g responses at offset o_g
    pairs = [(o_g + b, o_g + w) for each prompt g, for (b, w) in ranking_pairs(scores_g)]
    loss, stats = pairwise_logistic_loss(r[better], r[worse], weights=ranking_pair_weights(counts),
                                         normalizer=number of prompts in the whole optimiser batch)

Every loss is ``sum_i w_i * l_i / normalizer``. The normalizer defaults to this call's ``sum_i w_i``
(a weighted mean); a trainer that splits one optimiser batch into micro-batches passes the whole
batch's total instead, so the micro-batch losses and gradients add up to the full batch's exactly.
Losses are computed in at least float32 (bf16 scores are upcast). Stats are detached tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def pairwise_logistic_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss, l_p = -log sigmoid(r_c - r_r - m_p)   (Ouyang et al. 2022, eq. 1).

    Without a margin this is the negative log-likelihood of the preferences under
    P(y_c > y_r) = sigmoid(r_c - r_r); it is log 2 when the two scores are equal. The margin m_p
    (Touvron et al. 2023, Llama 2, eq. 2) asks for a score gap of at least about m_p on pairs
    labelled as clearly different: a float for every pair, or a (P,) tensor per pair.

    chosen, rejected (P,)  scores r(x, y_c), r(x, y_r)
    weights          (P,)  per-pair weights w_p (default 1), e.g. `ranking_pair_weights`
    normalizer             loss = sum_p w_p l_p / normalizer; default sum_p w_p (0 loss for no pairs)

    Computed as -logsigmoid, which is exact for large gaps of either sign (log(sigmoid(x)) underflows).
    stats: accuracy (fraction with r_c > r_r, ties 0.5), margin (mean r_c - r_r: the raw gap, not
    minus m), chosen, rejected (mean scores); plain means over this call's pairs, unweighted.
    """
    chosen, rejected = _pair_scores(chosen, rejected)
    gap = chosen - rejected  # (P,) r_c - r_r
    if margin is not None:
        gap = gap - _per_pair(margin, gap, "margin")
    per_pair = -F.logsigmoid(gap)  # (P,) l_p
    return _weighted(per_pair, weights, normalizer), _pair_stats(chosen, rejected)


def pairwise_hinge_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: float | torch.Tensor = 1.0,
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Margin ranking (hinge) loss, l_p = max(0, m_p - (r_c - r_r)).

    The pairwise ranking loss of Herbrich et al. 2000 / RankSVM (Joachims 2002), as in
    ``torch.nn.MarginRankingLoss``: zero once the chosen score leads by at least m_p, gradient
    -1 (for r_c) and +1 (for r_r) inside the margin, and 0 exactly at it (torch's relu subgradient).
    Unlike the logistic loss it stops pushing a pair once it is separated, so scores stay bounded.

    Arguments, reduction and stats as `pairwise_logistic_loss`; `margin` m is a float or a (P,) tensor.
    """
    chosen, rejected = _pair_scores(chosen, rejected)
    gap = chosen - rejected  # (P,)
    per_pair = torch.relu(_per_pair(margin, gap, "margin") - gap)  # (P,) l_p
    return _weighted(per_pair, weights, normalizer), _pair_stats(chosen, rejected)


def ranking_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs among one prompt's K responses; higher score = better.

    InstructGPT (Ouyang et al. 2022, Sec. 3.5) turns a ranking of K responses into its C(K, 2)
    comparisons. Tied responses give no pair, so K responses with ties give fewer than C(K, 2).
    Pairs come in index order: (i, j) with i < j first, flipped when j scores higher.
    """
    values = [float(s) for s in scores]
    for k, s in enumerate(values):
        if not math.isfinite(s):
            raise ValueError(f"score {k} is {s}; ranking scores must be finite")
    pairs = []
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            if values[i] > values[j]:
                pairs.append((i, j))
            elif values[j] > values[i]:
                pairs.append((j, i))
    return pairs


def ranking_pair_weights(
    pairs_per_prompt: Sequence[int], *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """(sum of counts,) weights 1/n_g for each of prompt g's n_g pairs, prompts in order.

    InstructGPT's K-wise loss (Ouyang et al. 2022, eq. 1) is
    loss = -1/C(K,2) E_{(x, y_w, y_l)} [log sigmoid(r(x, y_w) - r(x, y_l))]: every prompt's pairs
    share a total weight of 1, so a prompt with many responses (K=9: 36 pairs) does not count 36
    times as much as one with two, and the correlated pairs of one prompt do not over-fit (Sec. 3.5).
    With no ties n_g = C(K_g, 2). The default normalizer (sum of weights) is then the number of
    prompts, and the loss the mean over prompts of each prompt's mean pair loss. A prompt with no
    pairs adds nothing.
    """
    weights = []
    for g, n in enumerate(pairs_per_prompt):
        if n < 0:
            raise ValueError(f"prompt {g} has a negative pair count ({n})")
        weights += [1.0 / n] * n if n else []
    return torch.tensor(weights, dtype=dtype, device=device)


def pointwise_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: Literal["bce", "mse"] = "bce",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Regression of scores onto graded targets, for a warm-up before (or beside) the pairwise loss.

    bce: l_i = -[t_i log sigmoid(s_i) + (1 - t_i) log sigmoid(-s_i)], targets t in [0, 1]: the
         Bradley-Terry likelihood (Ouyang et al. 2022, eq. 1) of y_i against a fixed reference of
         score 0, with a soft label t_i (t=1: always preferred, 0.5: a tie). Its minimum is at
         sigmoid(s) = t, so scores land on the same logit scale the pairwise loss uses.
    mse: l_i = (s_i - t_i)^2, for grades on any scale (e.g. 1-10 ratings); the scores then live on
         the grades' scale, so choose targets the pairwise stage can continue from.

    scores, targets (N,); loss = sum_i l_i / normalizer, default N. Targets for bce are not range
    checked here (that would sync with the device): check them when loading (`tokenize_graded`'s
    `score_range`). stats: score, target (means), abs_error (mean |prediction - target|, where the
    prediction is sigmoid(s) for bce and s for mse).
    """
    if scores.shape != targets.shape or scores.dim() != 1:
        raise ValueError(f"scores and targets must both be (N,), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    scores = _upcast(scores)
    targets = targets.to(scores.dtype)
    if kind == "bce":
        per_item = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")  # (N,)
        prediction = torch.sigmoid(scores)
    elif kind == "mse":
        per_item = (scores - targets) ** 2  # (N,)
        prediction = scores
    else:
        raise ValueError(f"unknown pointwise loss {kind!r}; choose bce or mse")
    loss = _weighted(per_item, None, normalizer)
    stats = {
        "score": _mean(scores.detach()),
        "target": _mean(targets.detach()),
        "abs_error": _mean((prediction - targets).abs().detach()),
    }
    return loss, stats


def centering_loss(
    scores: torch.Tensor, *, normalizer: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward centering, c = sum_i r_i^2 / normalizer (default N: mean(r^2)), added as coef * c.

    The Bradley-Terry loss only sees score differences, so the reward's offset drifts freely during
    training; Eisenstein et al. 2023 ("Helping or Herding?", reward ensembles) add an auxiliary
    squared term that keeps rewards near 0. TRL's ``center_rewards_coefficient`` implements it per
    pair as eta * mean_p (r_c + r_r)^2.

    We choose mean(r^2) over every scored response. For one pair it decomposes as
        (r_c^2 + r_r^2) / 2 = ((r_c + r_r) / 2)^2 + ((r_c - r_r) / 2)^2 = (r_c + r_r)^2 / 4 + gap^2 / 4,
    i.e. TRL's centering term (at a quarter of the weight: coef 4*eta matches TRL's eta) plus a
    small L2 pull on the gap. Why this one: it is a plain sum over responses, so it works unchanged
    for K-way rankings with any K and for graded (unpaired) data, and splits across micro-batches
    with a global normalizer; and the gap term bounds the scale on separable data, where the
    logistic loss alone drives gaps to infinity (at coef 0.01 it is negligible below gaps of ~5).
    To get TRL's pure offset term instead, call this with ``scores = chosen + rejected`` (P,).

    stats: mean (mean score), mean_square (mean r^2), both of this call's scores.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got {tuple(scores.shape)}")
    scores = _upcast(scores)
    loss = _weighted(scores**2, None, normalizer)
    detached = scores.detach()
    return loss, {"mean": _mean(detached), "mean_square": _mean(detached**2)}


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, num_bins: int = 10) -> dict[str, float]:
    """Evaluation of scored comparisons: accuracy, margin, ece and loss, as python floats.

    accuracy  fraction of pairs with r_c > r_r; a tie counts 0.5 (a coin flip)
    margin    mean r_c - r_r
    loss      mean -log sigmoid(r_c - r_r), the held-out Bradley-Terry NLL (eq. 1 of Ouyang et al.)
    ece       expected calibration error of the Bradley-Terry probabilities (Naeini et al. 2015;
              Guo et al. 2017, Sec. 2). Each pair's predicted winner is the higher-scored response, with
              confidence sigmoid(|r_c - r_r|) in [0.5, 1]; it is correct when r_c > r_r. With
              `num_bins` equal-width bins over [0.5, 1],
                  ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|.
              A tie (confidence 0.5) counts as half correct, as in accuracy, so a model that scores
              every pair equal is perfectly calibrated (ECE 0) rather than maximally wrong.

    chosen, rejected (P,), P >= 1. Computed in float64 on the tensors' device.
    """
    chosen, rejected = _pair_scores(chosen, rejected)
    if chosen.numel() == 0:
        raise ValueError("preference_metrics needs at least one pair")
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    gap = (chosen - rejected).detach().double()  # (P,)
    correct = (gap > 0).double() + 0.5 * (gap == 0).double()  # (P,) 1, 0.5 or 0
    confidence = torch.sigmoid(gap.abs())  # (P,) in [0.5, 1]
    bins = ((confidence - 0.5) * (2 * num_bins)).floor().long().clamp(0, num_bins - 1)  # (P,)
    n = gap.numel()
    ece = gap.new_zeros(())
    for b in range(num_bins):
        in_bin = bins == b
        count = in_bin.sum()
        if count > 0:
            ece = ece + count.double() / n * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return {
        "accuracy": correct.mean().item(),
        "margin": gap.mean().item(),
        "loss": (-F.logsigmoid(gap)).mean().item(),
        "ece": ece.item(),
    }


# --- shared pieces --------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 scores -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()


def _pair_scores(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen and rejected must both be (P,), got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    return _upcast(chosen), _upcast(rejected)


def _per_pair(value: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor | float:
    """A float, or a scalar or (P,) tensor matched to `like` (P,)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.dim() > 0 and value.shape != like.shape:
        raise ValueError(f"{name} must be a float or a ({like.numel()},) tensor, got shape {tuple(value.shape)}")
    return value.to(device=like.device, dtype=like.dtype)


def _weighted(
    per_item: torch.Tensor, weights: torch.Tensor | None, normalizer: float | torch.Tensor | None
) -> torch.Tensor:
    """sum_i w_i l_i / normalizer; the default normalizer sum_i w_i is replaced by 1 when it is 0 (no
    items), giving a loss of 0 instead of nan without a device sync."""
    if weights is not None:
        if weights.shape != per_item.shape:
            raise ValueError(f"weights must be ({per_item.numel()},), got shape {tuple(weights.shape)}")
        weights = weights.to(device=per_item.device, dtype=per_item.dtype)
        total, default = (weights * per_item).sum(), weights.sum()
    else:
        total, default = per_item.sum(), per_item.new_tensor(float(per_item.numel()))
    if normalizer is None:
        normalizer = torch.where(default == 0, torch.ones_like(default), default)
    return total / normalizer


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0, not nan, over no elements."""
    return x.sum() / max(x.numel(), 1)


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    gap = chosen - rejected
    wins = (gap > 0).to(gap.dtype) + 0.5 * (gap == 0).to(gap.dtype)
    return {
        "accuracy": _mean(wins),
        "margin": _mean(gap),
        "chosen": _mean(chosen),
        "rejected": _mean(rejected),
    }
