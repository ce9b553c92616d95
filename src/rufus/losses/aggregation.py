"""Masked reductions used by every loss, with the reduction spelled out at the call site.

Which tokens count and what a loss is divided by decide whether gradient accumulation and batch
splitting change the result; these helpers make that choice an explicit argument.
"""

from __future__ import annotations

from typing import Literal

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is true (mask may be bool or 0/1 of x's shape)."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true; 0 where nothing is selected."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of `x` over the masked positions (biased by default, as OpenAI's whitening)."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    var = masked_sum((x - mean) ** 2, mask) / count.clamp(min=1)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def aggregate(
    x: torch.Tensor,
    mask: torch.Tensor,
    mode: Literal["token", "sequence", "constant"] = "token",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token values `x` (B, A) over the valid tokens `mask` (B, A) to a scalar.

    The modes are the names of GRPO's `grpo.loss_aggregation` (and of the papers behind them):
    token:    sum over all valid tokens / number of valid tokens (each token weighs the same; DAPO).
              With `normalizer`: / normalizer, the valid tokens of the whole optimiser batch, so that
              splitting a batch into micro-batches leaves the gradient unchanged
    sequence: mean over each sequence's valid tokens, then mean over sequences (GRPO as written).
              With `normalizer`: the per-sequence means summed / normalizer, the optimiser batch's
              number of sequences
    constant: sum over all valid tokens / `normalizer`, a constant that depends on neither a
              response's length nor the batch's token count (required; Dr. GRPO: max_new_tokens x
              responses; RLOO: the number of responses, so log pi(y|x) sums over its tokens)
    """
    if mode == "token":
        return masked_mean(x, mask) if normalizer is None else masked_sum(x, mask) / normalizer
    if mode == "sequence":
        per_seq = masked_mean(x, mask, dim=-1)
        if normalizer is None:
            return per_seq.mean()
        return per_seq.sum() / normalizer
    if mode == "constant":
        if normalizer is None:
            raise ValueError("aggregate(mode='constant') needs a normalizer")
        return masked_sum(x, mask) / normalizer
    raise ValueError(f"unknown aggregation mode {mode!r}; choose token, sequence or constant")
