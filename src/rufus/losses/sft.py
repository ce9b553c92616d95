"""Supervised fine-tuning loss: next-token negative log-likelihood on the labelled tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under `logits`, computed in float32.

    logits  (B, T, V)  scores for the next token at each position
    targets (B, T)     token ids (any value where the result is ignored, e.g. -100)
    returns (B, T)     log softmax(logits)[targets]
    """
    logits = logits.float()
    safe = targets.clamp(min=0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the labelled tokens, L = -(1/N) sum_t log p(y_t | y_<t).

    logits (B, T, V) model outputs for input_ids (B, T); labels (B, T) are the input ids with
    IGNORE_INDEX on positions that do not count (prompt, padding). Position t predicts label t+1.

    `num_tokens` is N, the number of labelled tokens the loss is averaged over. Left as None it is
    this batch's count; a trainer that splits one optimiser batch into micro-batches (gradient
    accumulation, several processes) passes the whole batch's count, so each micro-batch adds its
    exact share and the summed gradient equals the full batch's.

    stats: nll_sum (summed NLL of this batch's tokens), num_tokens; detached tensors, so that
    reading them does not force a device sync inside the loop.
    """
    shift_logits = logits[:, :-1]  # (B, T-1, V) prediction for the next token
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = mask.sum()
    denom = count.clamp(min=1) if num_tokens is None else num_tokens
    loss = nll / denom
    return loss, {"nll_sum": nll.detach(), "num_tokens": count}
