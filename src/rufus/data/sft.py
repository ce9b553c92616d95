"""Tokenisation for supervised fine-tuning, with the loss on the completion only, and its collator.

Each row becomes ``{"input_ids": [...], "labels": [...]}`` with ``labels[t] = input_ids[t]`` where the
model should learn the token and ``-100`` (ignored by the cross-entropy) elsewhere. Labels are aligned
with the inputs, not shifted: Hugging Face causal LMs shift them inside ``forward``.

Plain rows are tokenised the way they will be at generation time: the prompt on its own (with the
tokenizer's special tokens, e.g. bos), then the completion without them, then eos, so the model learns
to stop (Ouyang et al. 2022 and TRL's SFTTrainer do the same). Conversational rows are rendered by the
tokenizer's chat template; every assistant turn is trained on (for ``messages``) or the completion's
assistant turns (for prompt/completion message lists), located by rendering the conversation prefix by
prefix: the same idea as TRL's ``assistant_only_loss``, but working with any prefix-stable template
instead of needing ``{% generation %}`` tags in it.

Rows longer than the limits are handled by an explicit policy, decided before any training:
``reject`` (the default) stops with the row's location and lengths, ``drop`` skips it with a warning,
``truncate`` cuts the prompt from the left and the completion from the right and logs how many rows it
touched.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from rufus.data.encoding import (  # noqa: F401  (encode_prompt, render_prompt: re-exported)
    Encoded,
    encode_conversation,
    encode_plain,
    encode_prompt,
    render_prompt,
    tokenizer_name,
)
from rufus.data.errors import DataError
from rufus.data.loading import Records

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value torch.nn.functional.cross_entropy skips
TRUNCATION = ("reject", "drop", "truncate")


def tokenize_sft(
    records: Records,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "reject",
    completion_only_loss: bool = True,
    key: str = "data.train",
) -> list[dict[str, list[int]]]:
    """Tokenise validated sft records into ``[{"input_ids", "labels"}]``, applying the length policy.

    `max_length` bounds prompt + completion, `max_prompt_length` (optional, < max_length) the prompt;
    `truncation` is "reject", "drop" or "truncate" (module docstring). `completion_only_loss=False`
    labels every token. `key` is the config key the data came from; limits are named relative to it
    ("data.train" -> "data.max_length") in error messages.
    """
    policy = LengthPolicy(max_length, max_prompt_length, truncation, key=key, noun="completion")
    if records.kind and records.kind != "sft":
        raise ValueError(f"tokenize_sft needs sft records, but {records.source} was loaded as {records.kind!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer_name(tokenizer)!r} has no eos token, so completions cannot be terminated"
        )

    examples, dropped, truncated = [], [], 0
    for i, row in enumerate(records.dataset):
        where = f"{key}: {records.where(i)}"
        enc, prompt_field, completion_field = encode_row(tokenizer, row, where)
        original = enc
        if policy.too_long(enc):
            if truncation == "reject":
                raise policy.error(enc, where, prompt_field, completion_field)
            if truncation == "drop":
                dropped.append(records.where(i))
                continue
            enc = policy.cut(enc, tokenizer.bos_token_id)
            truncated += 1
        policy.check_left(enc, original, where, completion_field)
        labels = [t if keep or not completion_only_loss else IGNORE_INDEX for t, keep in zip(enc.ids, enc.in_loss)]
        examples.append({"input_ids": enc.ids, "labels": labels})
    policy.report(dropped, truncated, kept=len(examples), records=records, log=logger)
    return examples


class LengthPolicy:
    """What happens to rows longer than the limits; shared by the SFT and reward-model tokenisers.

    `max_length` bounds prompt + `noun` ("completion" for SFT, "response" for reward models),
    `max_prompt_length` (optional, < max_length) the prompt; `truncation` is "reject", "drop" or
    "truncate" (module docstring). Arguments are checked here, with the limits named relative to
    `key` ("data.train" -> "data.max_length"), so every tokeniser reports them the same way.
    """

    def __init__(
        self,
        max_length: int,
        max_prompt_length: int | None = None,
        truncation: str = "reject",
        *,
        key: str = "data.train",
        noun: str = "completion",
    ):
        if truncation not in TRUNCATION:
            raise ValueError(f"unknown truncation policy {truncation!r}; choose one of {', '.join(TRUNCATION)}")
        section = key.rsplit(".", 1)[0]
        if max_length < 1:
            raise ValueError(f"{section}.max_length must be positive, got {max_length}")
        if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
            raise ValueError(
                f"{section}.max_prompt_length must be between 1 and {section}.max_length - 1 "
                f"({max_length - 1}), got {max_prompt_length}"
            )
        self.max_length, self.max_prompt_length, self.truncation = max_length, max_prompt_length, truncation
        self.key, self.section, self.noun = key, section, noun
        self.length_limit = f"{section}.max_length={max_length}"
        self.prompt_limit = f"{section}.max_prompt_length={max_prompt_length}"
        self.limits = self.length_limit + (f", {self.prompt_limit}" if max_prompt_length is not None else "")

    def too_long(self, enc: Encoded) -> bool:
        over_prompt = self.max_prompt_length is not None and enc.n_prompt > self.max_prompt_length
        return over_prompt or len(enc.ids) > self.max_length

    def error(self, enc: Encoded, where: str, prompt_field: str, field: str) -> DataError:
        """The "reject" error for a too-long row: names the prompt's field when the prompt is over its
        own limit, else the trained part's, with both lengths."""
        n_total, n_prompt = len(enc.ids), enc.n_prompt
        if self.max_prompt_length is not None and n_prompt > self.max_prompt_length:
            return DataError(f"prompt is {n_prompt} tokens, limit {self.prompt_limit}", where=where, field=prompt_field)
        return DataError(
            f"prompt + {self.noun} is {n_total} tokens (prompt {n_prompt}, {self.noun} "
            f"{n_total - n_prompt}), limit {self.length_limit}",
            where=where,
            field=field,
        )

    def cut(self, enc: Encoded, bos_id: int | None) -> Encoded:
        return _truncate(enc, self.max_length, self.max_prompt_length, bos_id)

    def check_left(self, enc: Encoded, original: Encoded, where: str, field: str) -> None:
        """Raise unless some of the trained part survived; `original` is the row before any cut."""
        if any(enc.in_loss):
            return
        problem = f"the {self.noun} has no tokens to train on"
        # Only possible without max_prompt_length: the prompt alone filled max_length.
        if len(enc.ids) < len(original.ids):
            problem = (
                f"no {self.noun} tokens left after truncation (prompt is {original.n_prompt} tokens, limit "
                f"{self.length_limit}); set {self.section}.max_prompt_length so long prompts are cut instead"
            )
        raise DataError(problem, where=where, field=field)

    def report(self, dropped: list[str], truncated: int, *, kept: int, records: Records, log: logging.Logger) -> None:
        """After the loop: one warning listing dropped rows (an error if nothing is left), one log line
        counting truncated ones. `dropped` holds the rows' locations."""
        total = len(records.dataset)
        if dropped:
            if not kept:
                raise DataError(
                    f"all {len(dropped)} rows are longer than {self.limits}; nothing left to train on",
                    where=f"{self.key}: {records.source}",
                )
            shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
            warnings.warn(
                f"{self.key}: dropped {len(dropped)} of {total} rows longer than {self.limits}: {shown}",
                stacklevel=3,
            )
        if truncated:
            log.warning("%s: truncated %d of %d rows to fit %s", self.key, truncated, total, self.limits)


def encode_row(tokenizer, row: dict[str, Any], where: str) -> tuple[Encoded, str, str]:
    """Tokenise one validated sft row; also return the fields its prompt and completion came from."""
    if row.get("messages") is not None:
        return encode_conversation(tokenizer, row["messages"], 0, where, "messages"), "messages", "messages"
    if isinstance(row["prompt"], list):
        messages = row["prompt"] + row["completion"]
        return (
            encode_conversation(tokenizer, messages, len(row["prompt"]), where, "prompt"),
            "prompt",
            "completion",
        )
    return encode_plain(tokenizer, row["prompt"], row["completion"]), "prompt", "completion"


def _truncate(enc: Encoded, max_length: int, max_prompt_length: int | None, bos_id: int | None) -> Encoded:
    """Cut the prompt from the left to `max_prompt_length`, then the whole sequence from the right to
    `max_length`. The left cut keeps the end of the prompt, which the response answers, and a leading
    bos, which every sequence the model was pretrained on starts with."""
    ids, in_loss, n_prompt = enc.ids, enc.in_loss, enc.n_prompt
    if max_prompt_length is not None and n_prompt > max_prompt_length:
        head = 1 if bos_id is not None and ids[0] == bos_id and max_prompt_length > 1 else 0
        cut = n_prompt - max_prompt_length
        ids, in_loss = ids[:head] + ids[head + cut :], in_loss[:head] + in_loss[head + cut :]
        n_prompt = max_prompt_length
    ids, in_loss = ids[:max_length], in_loss[:max_length]
    return Encoded(ids=ids, in_loss=in_loss, n_prompt=min(n_prompt, len(ids)))


class SFTCollator:
    """Right-pad a list of tokenised examples into a batch of LongTensors.

    Returns ``input_ids`` (B, T) padded with `pad_token_id`, ``attention_mask`` (B, T) with 1 on real
    tokens and 0 on padding, and ``labels`` (B, T) padded with -100 so padding never enters the loss.
    T is the longest example, rounded up to `pad_to_multiple_of` (tensor-core friendly shapes on GPU).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError(
                "SFTCollator needs a pad_token_id; the tokenizer has none (set tokenizer.pad_token, "
                "e.g. to a dedicated '<pad>' token or to its eos token)"
            )
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(examples), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros(shape, dtype=torch.long)  # (B, T) 1 = real token
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (B, T) -100 = not in the loss
        for b, example in enumerate(examples):
            n = len(example["input_ids"])
            if len(example["labels"]) != n:
                raise ValueError(f"example {b} has {n} input_ids but {len(example['labels'])} labels")
            input_ids[b, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.tensor(example["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
