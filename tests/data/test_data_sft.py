"""SFT tokenisation: completion-only labels, chat-template assistant spans, length policies, collator."""

from __future__ import annotations

import logging

import pytest
import torch

from rufus.data import DataError, SFTCollator, encode_prompt, load_records, render_prompt, tokenize_sft
from rufus.models.tiny import CHAT_TEMPLATE

PROMPT = "What colour is the sky at night?"
COMPLETION = "The sky is black and the moon is white."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def load(write):
    """load(rows, format="sft") -> Records, via a jsonl file named train.jsonl."""

    def _load(rows, format="sft"):
        write("train.jsonl", rows)
        return load_records("train.jsonl", kind=format)

    return _load


def labelled_runs(example) -> list[list[int]]:
    """The maximal runs of labelled tokens, as token id lists."""
    runs, current = [], []
    for label in example["labels"]:
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


# --- plain prompt / completion -------------------------------------------------------------------


def test_prompt_masked_and_eos_appended(tok, load):
    [ex] = tokenize_sft(load([{"prompt": PROMPT, "completion": COMPLETION}]), tok, max_length=128)
    prompt_ids = tok(PROMPT)["input_ids"]
    completion_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id and tok.eos_token_id not in completion_ids
    assert ex["input_ids"] == prompt_ids + completion_ids + [tok.eos_token_id]
    n = len(prompt_ids)
    assert ex["labels"][:n] == [-100] * n  # exactly the prompt positions are masked ...
    assert ex["labels"][n:] == completion_ids + [tok.eos_token_id]  # ... and the eos is learned
    assert -100 not in ex["labels"][n:]


def test_eos_not_doubled(tok, load):
    [ex] = tokenize_sft(load([{"prompt": PROMPT, "completion": COMPLETION + "</s>"}]), tok, max_length=128)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"][-2] != tok.eos_token_id


def test_full_sequence_loss(tok, load):
    [ex] = tokenize_sft(
        load([{"prompt": PROMPT, "completion": COMPLETION}]), tok, max_length=128, completion_only_loss=False
    )
    assert ex["labels"] == ex["input_ids"]


def test_tokenize_rejects_other_formats(tok, load):
    records = load([{"prompt": "p", "chosen": "a", "rejected": "b"}], format="preference")
    with pytest.raises(ValueError, match="needs sft records, but train.jsonl was loaded as 'preference'"):
        tokenize_sft(records, tok, max_length=64)


# --- conversations -------------------------------------------------------------------------------


def test_only_assistant_turns_are_labelled(tok, load):
    messages = [
        {"role": "system", "content": "Be brief."},
        user("Hi there."),
        assistant("Hello, how can I help?"),
        user("What is two plus two?"),
        assistant("Four."),
    ]
    [ex] = tokenize_sft(load([{"messages": messages}]), tok, max_length=256)
    assert (
        ex["input_ids"] == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    runs = [tok.decode(run) for run in labelled_runs(ex)]
    assert runs == ["Hello, how can I help?</s>", "Four.</s>"]
    [full] = tokenize_sft(load([{"messages": messages}]), tok, max_length=256, completion_only_loss=False)
    assert full["labels"] == full["input_ids"]


def test_conversational_prompt_completion_labels_only_the_completion(tok, load):
    prompt = [user("Hi there."), assistant("Hello."), user("Name a colour.")]
    [ex] = tokenize_sft(load([{"prompt": prompt, "completion": [assistant("Red.")]}]), tok, max_length=256)
    assert [tok.decode(run) for run in labelled_runs(ex)] == ["Red.</s>"]  # the prompt's assistant turn is not
    n_prompt = len(encode_prompt(tok, prompt))
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and ex["labels"][n_prompt] != -100


def test_no_chat_template_is_a_data_error(tok, load):
    template, tok.chat_template = tok.chat_template, None
    try:
        records = load([{"messages": [user("Hi."), assistant("Hello.")]}])
        with pytest.raises(
            DataError,
            match=r"train.jsonl, line 1, field 'messages': conversational rows need a "
            r"chat template",
        ):
            tokenize_sft(records, tok, max_length=64)
    finally:
        tok.chat_template = template


def test_template_that_is_not_prefix_stable(tok, load):
    # Renders every turn but the last in a different form, as templates that strip past reasoning do.
    unstable = (
        "{{ bos_token }}{% for m in messages %}{% if loop.last %}<|{{ m.role }}|>\n{{ m.content }}"
        "{{ eos_token }}{% else %}[{{ m.role }}] {{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    template, tok.chat_template = tok.chat_template, unstable
    try:
        records = load([{"messages": [user("Hi."), assistant("Hello."), user("Bye."), assistant("Bye.")]}])
        with pytest.raises(
            DataError,
            match="line 1, field 'messages': the chat template of tokenizer .* is not prefix-stable",
        ):
            tokenize_sft(records, tok, max_length=64)
    finally:
        tok.chat_template = template


def test_render_and_encode_prompt(tok):
    assert render_prompt(tok, PROMPT) == PROMPT
    assert render_prompt(tok, [user("Hi.")]) == "<s><|user|>\nHi.</s><|assistant|>\n"
    ids = encode_prompt(tok, [user("Hi.")])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's bos, once
    assert encode_prompt(tok, PROMPT) == tok(PROMPT)["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE


# --- length policies -----------------------------------------------------------------------------


LONG_PROMPT = "Please tell me about the sun and the moon and the stars in the sky at night, " * 4


def lengths(tok, prompt=LONG_PROMPT, completion=COMPLETION):
    return len(tok(prompt)["input_ids"]), len(tok(completion, add_special_tokens=False)["input_ids"]) + 1


def test_reject_long_prompt_names_row_field_and_lengths(tok, load):
    n_prompt, _ = lengths(tok)
    records = load([{"prompt": "Hi", "completion": "Hello."}, {"prompt": LONG_PROMPT, "completion": COMPLETION}])
    with pytest.raises(DataError) as info:
        tokenize_sft(records, tok, max_length=256, max_prompt_length=20)
    assert str(info.value) == (
        f"data.train: train.jsonl, line 2, field 'prompt': prompt is {n_prompt} tokens, limit data.max_prompt_length=20"
    )


def test_reject_long_sequence_names_completion(tok, load):
    n_prompt, n_completion = lengths(tok)
    with pytest.raises(DataError) as info:
        tokenize_sft(
            load([{"prompt": LONG_PROMPT, "completion": COMPLETION}]),
            tok,
            max_length=n_prompt + 3,
            key="data.eval",
        )
    assert str(info.value) == (
        "data.eval: train.jsonl, line 1, field 'completion': "
        f"prompt + completion is {n_prompt + n_completion} tokens (prompt {n_prompt}, "
        f"completion {n_completion}), limit data.max_length={n_prompt + 3}"
    )


def test_reject_long_conversation_names_messages(tok, load):
    records = load([{"messages": [user(LONG_PROMPT), assistant(COMPLETION)]}])
    with pytest.raises(
        DataError,
        match=r"line 1, field 'messages': prompt is \d+ tokens, limit "
        r"data.max_prompt_length=10",
    ):
        tokenize_sft(records, tok, max_length=256, max_prompt_length=10)


def test_drop_skips_long_rows_with_one_warning(tok, load):
    short = {"prompt": "Hi", "completion": "Hello."}
    long = {"prompt": LONG_PROMPT, "completion": COMPLETION}
    records = load([short, long, short, long])
    with pytest.warns(UserWarning) as caught:
        examples = tokenize_sft(records, tok, max_length=256, max_prompt_length=20, truncation="drop")
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "data.train: dropped 2 of 4 rows longer than data.max_length=256, "
        "data.max_prompt_length=20: train.jsonl, line 2, train.jsonl, line 4"
    )
    assert len(examples) == 2 and examples[0] == examples[1]


def test_drop_everything_is_an_error(tok, load):
    with pytest.raises(DataError, match="all 1 rows are longer than data.max_length=8"):
        tokenize_sft(load([{"prompt": LONG_PROMPT, "completion": COMPLETION}]), tok, max_length=8, truncation="drop")


def test_truncate_cuts_prompt_left_keeping_bos_then_completion_right(tok, load, caplog):
    prompt_ids = tok(LONG_PROMPT)["input_ids"]
    completion_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(prompt_ids) > 20 and len(completion_ids) > 5
    records = load([{"prompt": LONG_PROMPT, "completion": COMPLETION}, {"prompt": "Hi", "completion": "Hello."}])
    with caplog.at_level(logging.WARNING, logger="rufus.data.sft"):
        examples = tokenize_sft(records, tok, max_length=25, max_prompt_length=20, truncation="truncate")
    # prompt: bos + its last 19 tokens (20); then 5 completion tokens fill max_length=25; eos is cut off
    expected = [tok.bos_token_id] + prompt_ids[-19:] + completion_ids[:5]
    assert examples[0]["input_ids"] == expected and len(expected) == 25
    assert examples[0]["labels"] == [-100] * 20 + completion_ids[:5]
    assert examples[1]["input_ids"] == tok("Hi")["input_ids"] + tok("Hello.", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]  # short rows untouched
    assert "truncated 1 of 2 rows" in caplog.text


def test_truncate_without_completion_left_is_an_error(tok, load):
    n_prompt, _ = lengths(tok)
    with pytest.raises(
        DataError,
        match=rf"line 1, field 'completion': no completion tokens left after truncation "
        rf"\(prompt is {n_prompt} tokens, limit data.max_length=20\); set "
        r"data.max_prompt_length",
    ):
        tokenize_sft(
            load([{"prompt": LONG_PROMPT, "completion": COMPLETION}]),
            tok,
            max_length=20,
            truncation="truncate",
        )


def test_truncate_conversation(tok, load):
    messages = [user(LONG_PROMPT), assistant(COMPLETION)]
    [full] = tokenize_sft(load([{"messages": messages}]), tok, max_length=512)
    [cut] = tokenize_sft(
        load([{"messages": messages}]), tok, max_length=30, max_prompt_length=12, truncation="truncate"
    )
    n_prompt = next(t for t, label in enumerate(full["labels"]) if label != -100)
    assert (
        cut["input_ids"]
        == [tok.bos_token_id]
        + full["input_ids"][n_prompt - 11 : n_prompt]
        + full["input_ids"][n_prompt : n_prompt + 18]
    )
    assert cut["labels"][:12] == [-100] * 12 and -100 not in cut["labels"][12:]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(truncation="cut"), "unknown truncation policy 'cut'; choose one of reject, drop, truncate"),
        (
            dict(max_prompt_length=64),
            r"data.max_prompt_length must be between 1 and data.max_length - 1 \(63\)",
        ),
    ],
)
def test_bad_arguments(tok, load, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_sft(load([{"prompt": "a", "completion": "b"}]), tok, max_length=64, **kwargs)


# --- collator ------------------------------------------------------------------------------------


def test_collator_pads_right():
    batch = SFTCollator(pad_token_id=3)(
        [
            {"input_ids": [0, 10, 11, 12, 1], "labels": [-100, -100, 11, 12, 1]},
            {"input_ids": [0, 20, 1], "labels": [-100, 20, 1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[0, 10, 11, 12, 1], [0, 20, 1, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 11, 12, 1], [-100, 20, 1, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_pad_to_multiple_and_real_tokens(tok, load):
    examples = tokenize_sft(
        load([{"prompt": PROMPT, "completion": COMPLETION}, {"prompt": "Hi", "completion": "Yes."}]),
        tok,
        max_length=128,
    )
    batch = SFTCollator(tok.pad_token_id, pad_to_multiple_of=8)(examples)
    longest = len(examples[0]["input_ids"])
    assert batch["input_ids"].shape == (2, -(-longest // 8) * 8)
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in examples]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_collator_needs_pad_token():
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        SFTCollator(pad_token_id=None)
