"""The Rollout record: one batch of prompts, sampled responses and everything computed about them.

Shapes: B prompts in the batch, P prompt positions (left-padded), A response positions
(right-padded), T = P + A. "Response tokens" are the positions where `response_mask` is 1: from
the first sampled token up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    prompts: list  # B prompts as given (strings or chat message lists)
    completions: list[str]  # B decoded responses (special tokens removed)
    input_ids: torch.Tensor  # (B, T) prompt (left-padded) followed by response (right-padded)
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt tokens and on response tokens
    prompt_length: int  # P: response token t sits at input position P + t
    response_mask: torch.Tensor  # (B, A) 1 on response tokens up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool: the response ended with EOS within max_new_tokens
    logprobs: torch.Tensor | None = None  # (B, A) log pi_old(y_t | x, y_<t), temperature-scaled logits
    ref_logprobs: torch.Tensor | None = None  # (B, A) log pi_ref(y_t | x, y_<t)
    values: torch.Tensor | None = None  # (B, A) V(x, y_<t): the critic's estimate before emitting y_t
    scores: torch.Tensor | None = None  # (B,) sequence-level score from the reward sources
    kl: torch.Tensor | None = None  # (B, A) per-token KL estimate, log pi_old - log pi_ref for k1
    rewards: torch.Tensor | None = None  # (B, A) r_t = -beta * kl_t, plus the score on the last token
    advantages: torch.Tensor | None = None  # (B, A) A_t (GAE), whitened
    returns: torch.Tensor | None = None  # (B, A) R_t = A_t + V_t (value targets, before whitening)
    extra: dict = field(default_factory=dict)  # dataset columns passed on to reward functions

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, A) the sampled tokens y_t (pad after the end)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def response_length(self) -> torch.Tensor:
        """(B,) number of response tokens (EOS included)."""
        return self.response_mask.sum(-1)

    def last_token_index(self) -> torch.Tensor:
        """(B,) index in [0, A) of each response's last token (where the score is added)."""
        return (self.response_length - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> Rollout:
        """The same record with every tensor on `device`."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return Rollout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})

    @staticmethod
    def concat(parts: list[Rollout], pad_token_id: int) -> Rollout:
        """One Rollout of several, rows in order: prompts left-padded to the longest P, every other
        per-sample field concatenated (fields None in any part stay None)."""
        P = max(p.prompt_length for p in parts)
        out = {}
        for name in Rollout.__dataclass_fields__:
            values = [getattr(p, name) for p in parts]
            if name == "prompt_length":
                out[name] = P
            elif name in ("input_ids", "attention_mask"):
                fill = pad_token_id if name == "input_ids" else 0
                out[name] = torch.cat(
                    [torch.nn.functional.pad(v, (P - p.prompt_length, 0), value=fill) for v, p in zip(values, parts)]
                )
            elif any(v is None for v in values):
                out[name] = None
            elif isinstance(values[0], torch.Tensor):
                out[name] = torch.cat(values)
            elif isinstance(values[0], list):
                out[name] = [x for v in values for x in v]
            elif isinstance(values[0], dict):
                out[name] = {k: [x for v in values for x in v[k]] for k in values[0]}
            else:
                out[name] = values[0]
        return Rollout(**out)

    def chunks(self, size: int) -> list[Rollout]:
        """Consecutive slices of `size` rows (the last may be shorter): a trainer's micro-batches."""
        B = self.input_ids.shape[0]
        return [self.select(torch.arange(i, min(i + size, B))) for i in range(0, B, size)]

    def select(self, idx: torch.Tensor | list[int]) -> Rollout:
        """The rows `idx` of every per-sample field (for minibatches)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[name] = value[idx.to(value.device)]
            elif isinstance(value, list):
                out[name] = [value[i] for i in idx.tolist()]
            elif isinstance(value, dict):
                out[name] = {k: [v[i] for i in idx.tolist()] for k, v in value.items()}
            else:
                out[name] = value
        return Rollout(**out)
