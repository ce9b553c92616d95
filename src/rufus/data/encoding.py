"""How a (prompt, response) pair becomes tokens, shared by SFT, reward-model and DPO data.

`encode_prompt` gives a prompt's ids as generation sees them (special tokens added once, by the
tokenizer for plain strings or by the chat template for message lists). `encode_plain` and
`encode_conversation` give a whole row as an `Encoded` (ids, which tokens are in the loss, where the
prompt ends); `encode_response` is the reward models' and DPO's form of it, always ending with eos.
The modules `rufus.data.sft`, `rufus.data.reward` and `rufus.data.dpo` build on these.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from rufus.data.errors import DataError
from rufus.data.formats import clean_message

Prompt = str | list[dict[str, Any]]
Response = str | list[dict[str, Any]]


def render_prompt(tokenizer, prompt: str | list[dict[str, Any]]) -> str:
    """Text the model sees before its answer: a plain prompt as is; a message list rendered by the chat
    template with the generation prompt (e.g. "<|assistant|>\\n") appended.

    The rendered text usually starts with the template's own bos, so tokenise it with
    ``add_special_tokens=False`` (or use `encode_prompt`, which does the right thing for both kinds).
    """
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {tokenizer_name(tokenizer)!r} has no chat template, so a conversational prompt "
            "cannot be rendered; set tokenizer.chat_template, or use plain string prompts"
        )
    return tokenizer.apply_chat_template([clean_message(m) for m in prompt], tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt as generation will see them: special tokens added once, either by the
    tokenizer (plain strings) or by the chat template (message lists), never both."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


@dataclass
class Encoded:
    """One row's tokens before the length policy."""

    ids: list[int]
    in_loss: list[bool]  # the completion / assistant tokens: the ones labelled under completion-only loss
    n_prompt: int  # tokens before the first completion token


def encode_plain(tokenizer, prompt: str, completion: str) -> Encoded:
    # Tokenised separately, as at generation time: BPE merges across the boundary would otherwise give
    # token sequences the model never produces from a prompt.
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return Encoded(
        ids=prompt_ids + completion_ids,
        in_loss=[False] * len(prompt_ids) + [True] * len(completion_ids),
        n_prompt=len(prompt_ids),
    )


def encode_conversation(tokenizer, messages: list[dict[str, Any]], first: int, where: str, field: str) -> Encoded:
    """Render a conversation and mark the tokens of its assistant turns from index `first` on.

    An assistant turn's text runs from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[:i+1])`` (its content and end-of-turn marker, e.g. eos); a token is
    in the turn when its first character is.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"conversational rows need a chat template, and tokenizer {tokenizer_name(tokenizer)!r} has none; "
            "set tokenizer.chat_template, or use plain prompt/completion strings",
            where=where,
            field=field,
        )
    messages = [clean_message(m) for m in messages]
    text = _render(tokenizer, messages, False, where, field)
    spans = []
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where, field)
        through = _render(tokenizer, messages[: i + 1], False, where, field)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                f"the chat template of tokenizer {tokenizer_name(tokenizer)!r} is not prefix-stable: rendering the "
                f"first {i + 1} messages is not a prefix of rendering the whole conversation (templates that "
                "rewrite earlier turns, e.g. strip past reasoning, do this), so assistant turns cannot be "
                "located",
                where=where,
                field=field,
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    in_loss = [any(start <= s < end for start, end in spans) for s, _ in encoding["offset_mapping"]]
    n_prompt = in_loss.index(True) if True in in_loss else len(in_loss)
    return Encoded(ids=list(encoding["input_ids"]), in_loss=in_loss, n_prompt=n_prompt)


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool, where: str, field: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # a template's raise_exception() or a jinja error: point at the row
        raise DataError(
            f"the chat template failed on this row: {type(e).__name__}: {e}", where=where, field=field
        ) from e


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_eos(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_name(tokenizer)!r} has no eos token, so responses cannot be terminated")


def encode_response(tokenizer, prompt: Prompt, response: Response, where: str | None = None, field: str = "response"):
    """`encode_for_reward`, keeping where the prompt ends (for the length policy)."""
    check_eos(tokenizer)
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise ValueError("a plain-string prompt needs a plain-string response, got a message list")
        return encode_plain(tokenizer, prompt, response)  # prompt + response + eos (not doubled)
    turns = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    enc = encode_conversation(tokenizer, list(prompt) + turns, len(prompt), where, field)
    return end_with_eos(tokenizer, enc)


def end_with_eos(tokenizer, enc: Encoded) -> Encoded:
    """Make a rendered conversation end with eos. Templates whose end-of-turn token is eos but that
    write a newline after it (ChatML: "<|im_end|>\\n") get the trailing whitespace cut, rather than a
    second end-of-turn; any other ending gets eos appended."""
    eos, ids = tokenizer.eos_token_id, enc.ids
    end = len(ids)
    while end > enc.n_prompt and ids[end - 1] != eos and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1
    if end > enc.n_prompt and ids[end - 1] == eos:
        return Encoded(ids=ids[:end], in_loss=enc.in_loss[:end], n_prompt=enc.n_prompt)
    return Encoded(ids=ids + [eos], in_loss=enc.in_loss + [True], n_prompt=enc.n_prompt)


def warn_rows(key: str, rows: list[str], total: int, message: str) -> None:
    """One warning for a set of rows, listing the first few; `message` may use {n} and {total}."""
    if rows:
        shown = ", ".join(rows[:3]) + (", ..." if len(rows) > 3 else "")
        warnings.warn(f"{key}: {message.format(n=len(rows), total=total)}: {shown}", stacklevel=3)
