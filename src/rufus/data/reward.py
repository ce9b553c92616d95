"""Tokenisation for reward models: one (prompt, response) encoding, comparisons, graded rows, collator.

`encode_for_reward` is the one place that decides how a reward model sees a (prompt, response) pair,
used when training it and again when it scores policy samples, so the two can never drift apart:

- plain strings: the prompt as generation sees it (`encode_prompt`: the tokenizer's special tokens,
  e.g. bos, added once), then the response tokenised on its own, then eos. Tokenising the two parts
  separately matches how a policy produces the response; merging across the boundary would give
  token sequences the reward model never sees at scoring time.
- conversations (a message-list prompt; the response a string or a list of assistant turns): the
  whole conversation rendered by the chat template and tokenised without adding special tokens (the
  template writes its own), ending with eos.

Every sequence ends with eos, and the reward is read at each sequence's last real token (Huang et al.
2024, "N+ implementation details", D12: the reward at the EOS token), which the collator's
attention mask locates even when the pad token is the eos token.

`tokenize_comparisons` turns preference or ranking records into one group per prompt,
``{"responses": [ids_0, ..., ids_{K-1}], "scores": [s_0, ..., s_{K-1}]}`` (higher = better; a
preference row is ``[chosen, rejected]`` with scores ``[1.0, 0.0]``), so a trainer scores all K
responses of a prompt in one forward pass and takes all their pairs (InstructGPT, Sec. 3.5). A group
whose data carries margins also has ``"gaps"``, numbers whose differences are the margins of its pairs:
``[margin, 0.0]`` for a preference row with a ``margin``, the scores of a ranking row that gave them.
`tokenize_graded` turns graded records into ``{"ids": [...], "score": s}`` for a pointwise warm-up.
Rows longer than the limits follow the same reject / drop / truncate policy as SFT
(`rufus.data.sft.LengthPolicy`); for comparisons it applies to a whole prompt: one response over the
limit drops (or truncates) the group, so a prompt never loses part of its ranking.
"""

from __future__ import annotations

import logging
from typing import Any

from rufus.data.encoding import (
    Encoded,
    Prompt,
    Response,
    check_eos,
    encode_response,
    tokenizer_name,
    warn_rows,
)
from rufus.data.errors import DataError
from rufus.data.loading import Records
from rufus.data.sft import LengthPolicy

logger = logging.getLogger(__name__)


def encode_for_reward(tokenizer, prompt: Prompt, response: Response) -> list[int]:
    """Token ids of (prompt, response) as a reward model reads them; ends with eos (module docstring).

    `prompt` is a string or a message list; `response` a string, or (with a message-list prompt) a
    string or a list of assistant turns. A generated response can be passed as its decoded text.
    """
    return encode_response(tokenizer, prompt, response).ids


def tokenize_comparisons(
    records: Records,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "reject",
    key: str = "data.train",
) -> list[dict[str, list]]:
    """Tokenise validated preference or ranking records into one group per prompt (module docstring).

    `max_length` bounds prompt + response, `max_prompt_length` (optional, < max_length) the prompt;
    `truncation` is "reject" (stop, naming the row, the field and the lengths), "drop" (skip the
    row, one warning) or "truncate" (cut the prompt from the left, the response from the right; note
    this cuts the eos the reward is read at, so prefer a larger max_length for reward data). `key` is
    the config key the data came from, named in every message.

    Ranking rows whose responses all have the same score rank nothing and are skipped with one
    warning. Two responses with different scores whose token ids are equal (a tokenizer that
    normalises their difference away) are an error: no model could learn that comparison.
    """
    policy = LengthPolicy(max_length, max_prompt_length, truncation, key=key, noun="response")
    kind = records.kind or ("ranking" if "responses" in records.dataset.column_names else "preference")
    if kind not in ("preference", "ranking"):
        raise ValueError(
            f"tokenize_comparisons needs preference or ranking records, but {records.source} was loaded as {kind!r}"
        )
    check_eos(tokenizer)

    groups, dropped, tied, collided, truncated = [], [], [], [], 0
    for i, row in enumerate(records.dataset):
        where = f"{key}: {records.where(i)}"
        gaps = None
        if kind == "preference":
            fields, responses, scores = ["chosen", "rejected"], [row["chosen"], row["rejected"]], [1.0, 0.0]
            if row.get("margin") is not None:
                gaps = [float(row["margin"]), 0.0]
        else:
            responses, scores = row["responses"], [float(s) for s in row["scores"]]
            fields = [f"responses[{j}]" for j in range(len(responses))]
            if not row.get("ranked_by_order", True):
                gaps = scores
            if len(set(scores)) == 1:
                tied.append(records.where(i))
                continue
        encoded = [encode_response(tokenizer, row["prompt"], r, where, f) for r, f in zip(responses, fields)]
        clash = _same_ids(encoded, scores)
        if clash:
            j, k = clash
            raise DataError(
                f"tokenizes to the same {len(encoded[k].ids)} ids as '{fields[j]}' (tokenizer "
                f"{tokenizer_name(tokenizer)!r} normalises their difference away), so the comparison cannot be "
                "learned",
                where=where,
                field=fields[k],
            )
        over = [j for j, enc in enumerate(encoded) if policy.too_long(enc)]
        if over:
            if truncation == "reject":
                raise policy.error(encoded[over[0]], where, "prompt", fields[over[0]])
            if truncation == "drop":
                dropped.append(records.where(i))
                continue
            cut = [policy.cut(enc, tokenizer.bos_token_id) for enc in encoded]
            for enc, original, field in zip(cut, encoded, fields):
                policy.check_left(enc, original, where, field)
            if _same_ids(cut, scores):
                collided.append(records.where(i))
            encoded = cut
            truncated += 1
        group = {"responses": [enc.ids for enc in encoded], "scores": scores}
        if gaps is not None:
            group["gaps"] = gaps
        groups.append(group)

    total = len(records.dataset)
    if not groups and tied:
        raise DataError(
            f"no row has responses with different scores ({len(tied)} of {total} rows tie all their "
            f"responses{f', {len(dropped)} are too long' if dropped else ''}); nothing to train on",
            where=f"{key}: {records.source}",
        )
    warn_rows(key, tied, total, "skipped {n} of {total} rows whose responses all have equal scores")
    warn_rows(
        key,
        collided,
        total,
        "{n} of {total} rows have two responses with different scores that are identical after "
        f"truncation to {policy.limits}; those comparisons teach nothing",
    )
    policy.report(dropped, truncated, kept=len(groups), records=records, log=logger)
    return groups


def tokenize_graded(
    records: Records,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "reject",
    score_range: tuple[float, float] | None = None,
    key: str = "data.train",
) -> list[dict[str, Any]]:
    """Tokenise validated graded records into ``[{"ids": [...], "score": float}]`` for a pointwise loss.

    Each (prompt, completion) is encoded by `encode_for_reward`, so the warm-up sees exactly what the
    pairwise stage and later scoring see. Length policy as `tokenize_comparisons`. `score_range`
    (low, high), e.g. (0, 1) for a bce warm-up, rejects rows whose score lies outside it, naming the
    row and the 'score' field.
    """
    policy = LengthPolicy(max_length, max_prompt_length, truncation, key=key, noun="completion")
    if records.kind and records.kind != "graded":
        raise ValueError(f"tokenize_graded needs graded records, but {records.source} was loaded as {records.kind!r}")
    check_eos(tokenizer)
    examples, dropped, truncated = [], [], 0
    for i, row in enumerate(records.dataset):
        where = f"{key}: {records.where(i)}"
        score = float(row["score"])
        if score_range is not None and not score_range[0] <= score <= score_range[1]:
            raise DataError(
                f"{score:g} is outside [{score_range[0]:g}, {score_range[1]:g}], the range this loss accepts",
                where=where,
                field="score",
            )
        enc = encode_response(tokenizer, row["prompt"], row["completion"], where, "completion")
        if policy.too_long(enc):
            if truncation == "reject":
                raise policy.error(enc, where, "prompt", "completion")
            if truncation == "drop":
                dropped.append(records.where(i))
                continue
            cut = policy.cut(enc, tokenizer.bos_token_id)
            policy.check_left(cut, enc, where, "completion")
            enc = cut
            truncated += 1
        examples.append({"ids": enc.ids, "score": score})
    policy.report(dropped, truncated, kept=len(examples), records=records, log=logger)
    return examples


class RewardCollator:
    """Pad a list of token id lists into a batch of LongTensors for a reward model.

    Returns ``input_ids`` (N, T) padded with `pad_token_id`, ``attention_mask`` (N, T) with 1 on real
    tokens, and ``position_ids`` (N, T) = cumsum(attention_mask) - 1 clamped at 0: each sequence's
    real tokens sit at positions 0..n-1 whichever side it is padded on, so a left-padded row gives the
    same scores as the unpadded one (Huang et al. 2023, "N implementation details", detail 3). The mask
    comes from the lengths, never from comparing ids with the pad id, so pad == eos is safe.
    `padding_side` is "right" (training; the default) or "left"; T is the longest sequence, rounded up
    to `pad_to_multiple_of`.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError(
                "RewardCollator needs a pad_token_id; the tokenizer has none (set tokenizer.pad_token, "
                "e.g. to a dedicated '<pad>' token or to its eos token)"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = (
            pad_token_id,
            padding_side,
            pad_to_multiple_of,
        )

    def __call__(self, sequences: list[list[int]]) -> dict[str, Any]:
        import torch

        if not sequences:
            raise ValueError("RewardCollator got no sequences")
        for n, ids in enumerate(sequences):
            if len(ids) == 0:
                raise ValueError(f"sequence {n} is empty; a reward model needs at least one token to read")
        longest = max(len(ids) for ids in sequences)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(sequences), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (N, T)
        attention_mask = torch.zeros(shape, dtype=torch.long)  # (N, T) 1 = real token
        for b, ids in enumerate(sequences):
            span = slice(0, len(ids)) if self.padding_side == "right" else slice(longest - len(ids), longest)
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, span] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T) 0..n-1 on real tokens
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


# --- helpers --------------------------------------------------------------------------------------


def _same_ids(encoded: list[Encoded], scores: list[float]) -> tuple[int, int] | None:
    """The first (j, k) of responses with different scores but equal ids, or None."""
    seen: dict[tuple[int, ...], int] = {}
    for k, enc in enumerate(encoded):
        j = seen.setdefault(tuple(enc.ids), k)
        if j != k and scores[j] != scores[k]:
            return j, k
    return None
