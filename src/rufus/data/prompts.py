"""Prompt-only data for RL: token ids of each prompt as generation will see them."""

from __future__ import annotations

import logging

from rufus.data.errors import DataError
from rufus.data.loading import Records
from rufus.data.sft import encode_prompt

log = logging.getLogger(__name__)


def tokenize_prompts(
    records: Records, tokenizer, *, max_prompt_length: int, truncation: str = "reject", key: str = "data.train"
) -> list[dict]:
    """[{"prompt": as given, "ids": [...], "extra": {other columns}}] for validated "prompt" records.

    Prompts longer than `max_prompt_length` are rejected (an error naming the row), dropped, or
    cut from the left (keeping the end nearest the response, and a leading bos), per `truncation`.
    """
    section = key.rsplit(".", 1)[0]
    out, dropped, cut = [], [], 0
    bos = tokenizer.bos_token_id
    for i, row in enumerate(records.dataset):
        ids = encode_prompt(tokenizer, row["prompt"])
        if len(ids) > max_prompt_length:
            where = f"{key}: {records.where(i)}"
            if truncation == "reject":
                raise DataError(
                    f"prompt is {len(ids)} tokens, limit {section}.max_prompt_length={max_prompt_length} "
                    f"(set {section}.truncation=drop or truncate to allow it)",
                    where=where,
                    field="prompt",
                )
            if truncation == "drop":
                dropped.append(where)
                continue
            keep_bos = bos is not None and ids[0] == bos
            ids = ([bos] if keep_bos else []) + ids[len(ids) - max_prompt_length + keep_bos :]
            cut += 1
        extra = {k: v for k, v in row.items() if k != "prompt"}
        out.append({"prompt": row["prompt"], "ids": ids, "extra": extra})
    if dropped:
        log.warning(
            "%s: dropped %d prompts longer than %d tokens (first: %s)",
            key,
            len(dropped),
            max_prompt_length,
            "; ".join(dropped[:3]),
        )
    if cut:
        log.warning("%s: cut %d prompts to their last %d tokens", key, cut, max_prompt_length)
    if not out:
        raise DataError(f"no prompts left (all {len(records)} longer than {max_prompt_length} tokens)", where=key)
    return out
