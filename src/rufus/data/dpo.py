"""Preference pairs tokenised for a policy (DPO): both responses as the policy itself would produce them.

A pair becomes ``{"chosen": {"input_ids", "labels"}, "rejected": {"input_ids", "labels"}}``, each
side the prompt followed by its response, labels = input ids on the response tokens and -100 on the
prompt (the SFT layout, so `PairCollator` reuses `SFTCollator`). The encoding is
`rufus.data.reward.encode_for_reward`'s: the prompt as generation sees it, then the response
tokenised on its own, ending with eos (plain strings), or the conversation rendered by the chat
template with the assistant turns after the prompt labelled (message lists). One encoding for reward
models and policies means a DPO policy and a reward model trained on the same file read the same
tokens.

Rows longer than the limits follow the reject / drop / truncate policy of SFT
(`rufus.data.sft.LengthPolicy`) for the pair as a whole: one response over the limit drops (or
truncates) both. A pair whose two responses tokenise to the same ids is an error before truncation
(the tokenizer normalised their difference away) and is dropped with a warning after it (the cut
removed the difference); either way it would teach nothing, its DPO gradient being zero.
"""

from __future__ import annotations

import logging

from rufus.data.encoding import Encoded, check_eos, encode_response, tokenizer_name, warn_rows
from rufus.data.errors import DataError
from rufus.data.loading import Records
from rufus.data.sft import IGNORE_INDEX, LengthPolicy, SFTCollator

logger = logging.getLogger(__name__)


def tokenize_pairs(
    records: Records,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "reject",
    key: str = "data.train",
) -> list[dict]:
    """Tokenise validated preference records into ``[{"chosen": {...}, "rejected": {...}}]`` (module docstring).

    `max_length` bounds prompt + response, `max_prompt_length` (optional, < max_length) the prompt;
    `truncation` is "reject" (stop, naming the row, the field and the lengths), "drop" or "truncate".
    `key` is the config key the data came from, named in every message.
    """
    policy = LengthPolicy(max_length, max_prompt_length, truncation, key=key, noun="response")
    if records.kind and records.kind != "preference":
        raise ValueError(
            f"tokenize_pairs needs preference records, but {records.source} was loaded as {records.kind!r}"
        )
    check_eos(tokenizer)
    pairs, dropped, collided, truncated = [], [], [], 0
    for i, row in enumerate(records.dataset):
        where = f"{key}: {records.where(i)}"
        chosen = encode_response(tokenizer, row["prompt"], row["chosen"], where, "chosen")
        rejected = encode_response(tokenizer, row["prompt"], row["rejected"], where, "rejected")
        if chosen.ids == rejected.ids:
            raise DataError(
                f"tokenizes to the same {len(chosen.ids)} ids as 'chosen' (tokenizer {tokenizer_name(tokenizer)!r} "
                "normalises their difference away), so the preference cannot be learned",
                where=where,
                field="rejected",
            )
        over = [f for f, enc in (("chosen", chosen), ("rejected", rejected)) if policy.too_long(enc)]
        if over:
            if truncation == "reject":
                raise policy.error(chosen if over[0] == "chosen" else rejected, where, "prompt", over[0])
            if truncation == "drop":
                dropped.append(records.where(i))
                continue
            cut_c, cut_r = policy.cut(chosen, tokenizer.bos_token_id), policy.cut(rejected, tokenizer.bos_token_id)
            policy.check_left(cut_c, chosen, where, "chosen")
            policy.check_left(cut_r, rejected, where, "rejected")
            truncated += 1
            if cut_c.ids == cut_r.ids:
                collided.append(records.where(i))
                continue
            chosen, rejected = cut_c, cut_r
        pairs.append({"chosen": _example(chosen), "rejected": _example(rejected)})
    warn_rows(
        key,
        collided,
        len(records.dataset),
        f"dropped {{n}} of {{total}} rows whose chosen and rejected are identical after truncation to {policy.limits}",
    )
    if not pairs and collided:
        raise DataError("no pairs left after truncation", where=f"{key}: {records.source}")
    policy.report(dropped, truncated, kept=len(pairs), records=records, log=logger)
    return pairs


def load_pairs_or_prompts(
    path: str, tokenizer, *, split: str = "train", key: str = "data.train", options=None, **limits
):
    """(records, tokenised pairs) for preference data; (records, None) for a prompt-only file.

    The file gives pairs when it can (a published preference data set, or rows with 'chosen' /
    'rejected', whose errors are reported as such); a file of prompts only is read as prompts (DPO's
    rounds are then all online). `options`: how the file is written (`rufus.data.readers.ReadOptions`);
    `limits`: max_length, max_prompt_length, truncation, as `tokenize_pairs`.
    """
    from rufus.data.loading import load_records

    records = load_records(path, kind=("preference", "prompt"), split=split, key=key, options=options)
    if records.kind == "prompt":
        return records, None
    return records, tokenize_pairs(records, tokenizer, key=key, **limits)


def _example(enc: Encoded) -> dict[str, list[int]]:
    return {"input_ids": enc.ids, "labels": [t if keep else IGNORE_INDEX for t, keep in zip(enc.ids, enc.in_loss)]}


def pair_from_ids(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> dict:
    """A pair from token ids (e.g. two sampled responses), in the layout of `tokenize_pairs`."""
    prompt = [IGNORE_INDEX] * len(prompt_ids)
    return {
        "chosen": {"input_ids": prompt_ids + chosen_ids, "labels": prompt + chosen_ids},
        "rejected": {"input_ids": prompt_ids + rejected_ids, "labels": prompt + rejected_ids},
    }


def pairs_from_samples(
    prompts: list[dict], responses: list[list[int]], completions: list[str], scores: list[float]
) -> tuple[list[dict], int]:
    """Pairs from two sampled responses per prompt (online DPO): chosen = the higher score.

    Rows 2j and 2j+1 of `responses` (token ids, up to and including eos), `completions` (their text)
    and `scores` answer ``prompts[j]`` (``{"prompt", "ids"}``). A tie (equal scores, or the same
    response twice) makes no pair. Returns (pairs in the layout of `tokenize_pairs`, each with a
    ``"text"`` record of prompt, both completions and both scores; the number of ties).
    """
    pairs, ties = [], 0
    for j, p in enumerate(prompts):
        a, b = 2 * j, 2 * j + 1
        if scores[a] == scores[b] or responses[a] == responses[b]:
            ties += 1
            continue
        w, lo = (a, b) if scores[a] > scores[b] else (b, a)
        pair = pair_from_ids(p["ids"], responses[w], responses[lo])
        pair["text"] = {
            "prompt": p["prompt"],
            "chosen": completions[w],
            "rejected": completions[lo],
            "score_chosen": float(scores[w]),
            "score_rejected": float(scores[lo]),
        }
        pairs.append(pair)
    return pairs, ties


class PairCollator:
    """Right-pad B pairs into one batch of 2B rows, the chosen responses first, then the rejected.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each (2B, T), as `SFTCollator`; rows
    [0, B) are y_w and rows [B, 2B) are y_l of the same pairs, so one forward pass serves both.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.collate = SFTCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, pairs: list[dict]) -> dict:
        return self.collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
