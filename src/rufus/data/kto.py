"""Unpaired feedback for KTO: single completions labelled desirable or undesirable, tokenised for a policy.

KTO (`rufus.losses.kto`) learns from one completion at a time and whether it was desirable. Three
kinds of file give such rows, read by `rufus.data.loading.load_records`:

- TRL's unpaired rows, ``prompt`` / ``completion`` / ``label`` (true = desirable), which the loader
  reads as graded rows scoring 1.0 (desirable) or 0.0 (undesirable);
- graded rows, ``prompt`` / ``completion`` / ``score``: with a threshold t
  (``kto.desirable_threshold``) a score above t is desirable, below t undesirable, and exactly t is
  left out (counted in the log); without one every score must be 1 or 0, and any other score is an
  error naming the row, the field and the key to set;
- preference pairs (``prompt`` / ``chosen`` / ``rejected``, or any published format that gives pairs):
  each pair gives its chosen completion as desirable and its rejected one as undesirable, as TRL's
  KTO trainer does. The two stay together (``pair``), so a held-out set of pairs measures the implicit
  reward's preference accuracy.

Each example is ``{"input_ids", "labels", "prompt_length", "desirable", "pair"}``: labels = input ids
on the completion (eos included) and -100 on the prompt, as `rufus.data.dpo` writes a pair's side,
with the same encoding (`rufus.data.encoding.encode_response`), so a KTO policy and a DPO policy
trained on one file read the same tokens. Rows over the length limits follow the reject / drop /
truncate policy of SFT (`rufus.data.sft.LengthPolicy`); a pair is kept or dropped whole.

The reference point z0 is estimated on MISMATCHED rows, the prompt of one example followed by the
completion of another (`mismatched`).
"""

from __future__ import annotations

import logging

from rufus.data.encoding import Encoded, check_eos, encode_response
from rufus.data.errors import DataError
from rufus.data.loading import Records
from rufus.data.sft import IGNORE_INDEX, LengthPolicy

logger = logging.getLogger(__name__)

TRAIN_KINDS = ("graded", "preference")  # unpaired / graded rows first; pairs when that is what the file holds
EVAL_KINDS = ("preference", "graded")  # held-out pairs give a preference accuracy, so they come first


def load_unpaired(
    path: str,
    tokenizer,
    *,
    kinds: tuple[str, ...] = TRAIN_KINDS,
    split: str = "train",
    key: str = "data.train",
    options=None,
    **kwargs,
) -> tuple[list[dict], str]:
    """(examples, kind of the file: "graded" or "preference") of the data at `path`.

    `options`: how the file is written (`rufus.data.readers.ReadOptions`); `kwargs`: those of
    `tokenize_unpaired` (limits, threshold).
    """
    from rufus.data.loading import load_records

    records = load_records(path, kind=kinds, split=split, key=key, options=options)
    return tokenize_unpaired(records, tokenizer, key=key, **kwargs), records.kind


def tokenize_unpaired(
    records: Records,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "reject",
    threshold: float | None = None,
    threshold_key: str = "kto.desirable_threshold",
    key: str = "data.train",
) -> list[dict]:
    """Tokenise validated graded or preference records into labelled examples (module docstring).

    `max_length` bounds prompt + completion, `max_prompt_length` (optional) the prompt; `truncation`
    is "reject" (stop, naming the row, the field and the lengths), "drop" or "truncate". `threshold`
    splits graded scores (above: desirable; below: undesirable; equal: left out); `threshold_key` is
    the config key named when a score needs one. `key` is the config key the data came from.
    """
    if records.kind not in ("graded", "preference"):
        raise ValueError(
            f"tokenize_unpaired needs graded or preference records, but {records.source} was loaded as {records.kind!r}"
        )
    check_eos(tokenizer)
    policy = LengthPolicy(max_length, max_prompt_length, truncation, key=key, noun="completion")
    examples, dropped, truncated, at_threshold, pairs = [], [], 0, 0, 0
    for i, row in enumerate(records.dataset):
        where = f"{key}: {records.where(i)}"
        if records.kind == "graded":
            desirable = _desirable(row["score"], threshold, where, threshold_key)
            if desirable is None:
                at_threshold += 1
                continue
            sides = [("completion", row["completion"], desirable)]
        else:
            sides = [("chosen", row["chosen"], True), ("rejected", row["rejected"], False)]
        encoded = [(f, encode_response(tokenizer, row["prompt"], text, where, f), d) for f, text, d in sides]
        over = [(f, enc) for f, enc, _ in encoded if policy.too_long(enc)]
        if over:
            if truncation == "reject":
                raise policy.error(over[0][1], where, "prompt", over[0][0])
            if truncation == "drop":
                dropped.append(records.where(i))
                continue
            cut = []
            for f, enc, d in encoded:
                short = policy.cut(enc, tokenizer.bos_token_id)
                policy.check_left(short, enc, where, f)
                cut.append((f, short, d))
            encoded, truncated = cut, truncated + 1
        pair = None
        if records.kind == "preference":
            pair, pairs = pairs, pairs + 1
        examples += [_example(enc, d, pair) for _, enc, d in encoded]
    if at_threshold:
        logger.info(
            "%s: left out %d of %d rows scoring exactly %s=%g (neither desirable nor undesirable)",
            key,
            at_threshold,
            len(records.dataset),
            threshold_key,
            threshold,
        )
        if not examples:
            raise DataError(
                f"every row scores exactly {threshold_key}={threshold:g}; nothing is desirable or undesirable",
                where=f"{key}: {records.source}",
            )
    policy.report(dropped, truncated, kept=len(examples), records=records, log=logger)
    return examples


def _desirable(score: float, threshold: float | None, where: str, threshold_key: str) -> bool | None:
    """True (desirable), False (undesirable) or None (exactly at the threshold: left out)."""
    if threshold is None:
        if score in (0.0, 1.0):
            return score == 1.0
        raise DataError(
            f"{score:g} is not a label (1 or true: desirable; 0 or false: undesirable); to train KTO on graded "
            f"scores set {threshold_key}: scores above it are desirable, below it undesirable",
            where=where,
            field="score",
        )
    if score == threshold:
        return None
    return score > threshold


def _example(enc: Encoded, desirable: bool, pair: int | None) -> dict:
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(enc.ids, enc.in_loss)]
    return {
        "input_ids": enc.ids,
        "labels": labels,
        "prompt_length": enc.n_prompt,
        "desirable": bool(desirable),
        "pair": pair,
    }


def mismatched(prompt_of: dict, completion_of: dict, max_length: int) -> dict[str, list[int]]:
    """The prompt of example `prompt_of` followed by the completion of `completion_of` (a row for the
    estimate of z0: a completion that does not answer its prompt), labelled on the completion and
    cut from the right to `max_length` tokens. The prompt's own example fitted in `max_length` with
    at least one completion token, so at least one labelled token is left."""
    p, q = prompt_of["prompt_length"], completion_of["prompt_length"]
    ids = prompt_of["input_ids"][:p] + completion_of["input_ids"][q:]
    labels = [IGNORE_INDEX] * p + completion_of["labels"][q:]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def counts(examples: list[dict]) -> tuple[int, int]:
    """(desirable, undesirable) examples."""
    n = sum(e["desirable"] for e in examples)
    return n, len(examples) - n
