"""Teacher-forced forward passes over (prompt, response) sequences: logprobs, entropy, values."""

from __future__ import annotations

import torch

from rufus.losses.sft import token_logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from each row's first real token, so left padding changes nothing
    (N implementation details #3). Padding positions get 0; they are masked anyway."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, temperature: float = 1.0
) -> torch.Tensor:
    """(B, A, V) the logits that predicted each response token, divided by the sampling temperature
    (N implementation details #10: the logprobs must be those of the distribution sampled from)."""
    return response_outputs(model, input_ids, attention_mask, prompt_length, temperature)[1]


def response_outputs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, temperature: float = 1.0
):
    """(the model's whole output, (B, A, V) response logits as `response_logits`): for a model whose
    output carries more than logits (a shared actor-critic's values)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    logits = out.logits[:, prompt_length - 1 : -1]  # position P-1+t predicts response token t
    if temperature != 1.0 and temperature > 0:
        logits = logits / temperature
    return out, logits


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
):
    """(B, A) log pi(y_t | x, y_<t) of the response tokens; with_entropy also returns (B, A) H_t."""
    logits = response_logits(model, input_ids, attention_mask, prompt_length, temperature)
    logprobs = token_logprobs(logits, input_ids[:, prompt_length:])
    if not with_entropy:
        return logprobs
    from rufus.losses.ppo import entropy_from_logits

    return logprobs, entropy_from_logits(logits)


@torch.no_grad()
def batched_logprobs(model, input_ids, attention_mask, prompt_length, temperature, micro_batch: int):
    """`response_logprobs` without gradients, in chunks of `micro_batch` rows (bounded memory).

    Trainers use the same chunking as their first update pass, so the recomputed logprobs match
    these bit for bit and the first PPO ratio is exactly 1.
    """
    parts = [
        response_logprobs(
            model, input_ids[i : i + micro_batch], attention_mask[i : i + micro_batch], prompt_length, temperature
        )
        for i in range(0, input_ids.shape[0], micro_batch)
    ]
    return torch.cat(parts)


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """(N,) log pi(y|x) = sum_t log pi(y_t | x, y_<t) over each row's response tokens.

    `batch`: input_ids and attention_mask (N, T), labels (N, T) with -100 on the prompt and the
    padding (what `data.dpo.PairCollator` and `data.sft.SFTCollator` make)."""
    from rufus.losses.sft import IGNORE_INDEX

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]  # (N, T-1) position t predicts token t+1; -100 on prompt and padding
    logprobs = token_logprobs(logits[:, :-1], labels)  # (N, T-1) log pi(y_t | x, y_<t)
    return torch.where(labels != IGNORE_INDEX, logprobs, 0.0).sum(-1)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(N,) |y|: the number of response tokens `sequence_logprobs` sums over for each row of
    `labels` (N, T), -100 on the prompt and the padding. Position 0 is never predicted, so it is not
    counted (as there). The length normaliser of ORPO's and SimPO's mean token log-probability."""
    from rufus.losses.sft import IGNORE_INDEX

    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)
