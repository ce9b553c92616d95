"""Reward-model data: the one (prompt, response) encoding, comparisons per prompt, graded rows, collator."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from rufus.data import (
    DataError,
    RewardCollator,
    encode_for_reward,
    encode_prompt,
    load_records,
    tokenize_comparisons,
    tokenize_graded,
)
from rufus.losses.reward import ranking_pairs

PROMPT = "What colour is the sky at night?"
CHOSEN = "The sky is black and the moon is white."
REJECTED = "The sky is green."
LONG_PROMPT = "Please tell me about the sun and the moon and the stars in the sky at night, " * 4


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def load(write):
    """load(rows, format, name="rows.jsonl") -> Records."""

    def _load(rows, format, name="rows.jsonl"):
        write(name, rows)
        return load_records(name, kind=format)

    return _load


def error(spec, format, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_records(spec, kind=format, **kwargs)
    return str(info.value)


# --- encode_for_reward ---------------------------------------------------------------------------


def test_plain_is_prompt_then_response_then_eos(tok):
    ids = encode_for_reward(tok, PROMPT, CHOSEN)
    prompt_ids = tok(PROMPT)["input_ids"]  # bos + prompt, as generation sees it
    response_ids = tok(CHOSEN, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id and tok.eos_token_id not in response_ids
    assert ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert ids.count(tok.bos_token_id) == 1


def test_plain_eos_not_doubled(tok):
    ids = encode_for_reward(tok, PROMPT, CHOSEN + "</s>")
    assert ids == encode_for_reward(tok, PROMPT, CHOSEN)
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id


def test_chat_renders_the_template_and_ends_with_eos(tok):
    prompt = [user("Hi there."), assistant("Hello."), user("Name a colour.")]
    ids = encode_for_reward(tok, prompt, "Red.")
    rendered = tok.apply_chat_template(prompt + [assistant("Red.")], tokenize=False)
    assert rendered == (
        "<s><|user|>\nHi there.</s><|assistant|>\nHello.</s><|user|>\nName a colour.</s><|assistant|>\nRed.</s>"
    )
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
    assert ids[: len(encode_prompt(tok, prompt))] == encode_prompt(tok, prompt)  # the prompt generation saw
    # a response given as assistant turns is the same thing
    assert encode_for_reward(tok, prompt, [assistant("Red.")]) == ids


def test_chatml_style_newline_after_eos_is_cut_not_doubled(tok):
    # ChatML-like: each turn ends with eos and then "\n"; the rendered text ends "...Red.</s>\n"
    template = (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    saved, tok.chat_template = tok.chat_template, template
    try:
        ids = encode_for_reward(tok, [user("Hi.")], "Hello.")
    finally:
        tok.chat_template = saved
    assert tok.decode(ids) == "<|user|>\nHi.</s>\n<|assistant|>\nHello.</s>"
    assert ids.count(tok.eos_token_id) == 2  # one per turn, none added


def test_template_without_eos_gets_one(tok):
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    saved, tok.chat_template = tok.chat_template, template
    try:
        ids = encode_for_reward(tok, [user("Hi.")], "Hello.")
    finally:
        tok.chat_template = saved
    assert tok.decode(ids) == "[user] Hi.\n[assistant] Hello.\n</s>"


def test_plain_prompt_with_message_response_is_refused(tok):
    with pytest.raises(ValueError, match="plain-string prompt needs a plain-string response"):
        encode_for_reward(tok, PROMPT, [assistant("Red.")])


# --- tokenize_comparisons ------------------------------------------------------------------------


def test_preference_rows_become_chosen_then_rejected(tok, load):
    records = load(
        [
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
            {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."},
        ],
        "preference",
    )
    groups = tokenize_comparisons(records, tok, max_length=128)
    assert groups[0] == {
        "responses": [encode_for_reward(tok, PROMPT, CHOSEN), encode_for_reward(tok, PROMPT, REJECTED)],
        "scores": [1.0, 0.0],
    }
    assert len(groups) == 2 and ranking_pairs(groups[1]["scores"]) == [(0, 1)]


def test_implicit_prompt_conversations(tok, load):
    question = user("What is two plus two?")
    records = load(
        [{"chosen": [question, assistant("Four.")], "rejected": [question, assistant("Five.")]}], "preference"
    )
    [group] = tokenize_comparisons(records, tok, max_length=128)
    assert group["responses"] == [
        encode_for_reward(tok, [question], [assistant("Four.")]),
        encode_for_reward(tok, [question], [assistant("Five.")]),
    ]


def test_ranking_k4_keeps_all_responses_and_scores(tok, load):
    responses = ["one", "two", "three", "four"]
    records = load(
        [
            {"prompt": PROMPT, "responses": responses},  # best first: scores 3, 2, 1, 0
            {"prompt": PROMPT, "responses": responses, "scores": [0.5, 2, -1, 2]},  # a tie
        ],
        "ranking",
    )
    by_order, scored = tokenize_comparisons(records, tok, max_length=128)
    assert by_order["responses"] == [encode_for_reward(tok, PROMPT, r) for r in responses]
    assert by_order["scores"] == [3.0, 2.0, 1.0, 0.0] and len(ranking_pairs(by_order["scores"])) == 6
    assert scored["scores"] == [0.5, 2.0, -1.0, 2.0] and len(ranking_pairs(scored["scores"])) == 5


def test_all_tied_rankings_are_skipped_with_a_warning(tok, load):
    rows = [
        {"prompt": PROMPT, "responses": ["a", "b"], "scores": [1, 1]},
        {"prompt": PROMPT, "responses": ["a", "b"]},
    ]
    with pytest.warns(UserWarning) as caught:
        groups = tokenize_comparisons(load(rows, "ranking"), tok, max_length=64)
    assert [str(w.message) for w in caught] == [
        "data.train: skipped 1 of 2 rows whose responses all have equal scores: rows.jsonl, line 1"
    ]
    assert [g["scores"] for g in groups] == [[1.0, 0.0]]
    with pytest.raises(DataError, match=r"rows.jsonl: no row has responses with different scores \(1 of 1 rows"):
        tokenize_comparisons(load(rows[:1], "ranking"), tok, max_length=64)


def test_responses_that_tokenize_alike_are_an_error(load):
    class Lowercasing:  # a lossy tokenizer: "Blue." and "blue." become the same ids
        eos_token_id, bos_token_id, name_or_path = 1, 0, "lower"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [0] * add_special_tokens + [ord(c) for c in text.lower()]}

    records = load([{"prompt": "Sky?", "chosen": "Blue.", "rejected": "blue."}], "preference")
    with pytest.raises(DataError) as info:
        tokenize_comparisons(records, Lowercasing(), max_length=64)
    assert str(info.value) == (
        "data.train: rows.jsonl, line 1, field 'rejected': tokenizes to the same 11 ids as 'chosen' "
        "(tokenizer 'lower' normalises their difference away), so the comparison cannot be learned"
    )


def test_comparisons_need_comparison_records(tok, load):
    with pytest.raises(ValueError, match="needs preference or ranking records, but rows.jsonl was loaded as 'sft'"):
        tokenize_comparisons(load([{"prompt": "a", "completion": "b"}], "sft"), tok, max_length=64)


# --- length policies -----------------------------------------------------------------------------


def test_reject_names_the_long_response_with_lengths(tok, load):
    long = "the cat sat on a mat " * 10
    records = load([{"prompt": PROMPT, "responses": ["short", "also short", long]}], "ranking")
    n_prompt = len(tok(PROMPT)["input_ids"])
    n_total = len(encode_for_reward(tok, PROMPT, long))
    with pytest.raises(DataError) as info:
        tokenize_comparisons(records, tok, max_length=40, key="data.eval")
    assert str(info.value) == (
        f"data.eval: rows.jsonl, line 1, field 'responses[2]': prompt + response is {n_total} tokens "
        f"(prompt {n_prompt}, response {n_total - n_prompt}), limit data.max_length=40"
    )


def test_reject_long_prompt_names_prompt(tok, load):
    n_prompt = len(tok(LONG_PROMPT)["input_ids"])
    records = load([{"prompt": LONG_PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], "preference")
    with pytest.raises(DataError) as info:
        tokenize_comparisons(records, tok, max_length=256, max_prompt_length=20)
    assert str(info.value) == (
        f"data.train: rows.jsonl, line 1, field 'prompt': prompt is {n_prompt} tokens, limit data.max_prompt_length=20"
    )


def test_drop_drops_the_whole_prompt(tok, load):
    short = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    long_rejected = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": "the dog ran to sea " * 30}
    records = load([short, long_rejected, short], "preference")
    with pytest.warns(UserWarning) as caught:
        groups = tokenize_comparisons(records, tok, max_length=64, truncation="drop")
    assert [str(w.message) for w in caught] == [
        "data.train: dropped 1 of 3 rows longer than data.max_length=64: rows.jsonl, line 2"
    ]
    assert len(groups) == 2 and groups[0] == groups[1]
    with pytest.raises(DataError, match="all 1 rows are longer than data.max_length=8"):
        tokenize_comparisons(load([short], "preference"), tok, max_length=8, truncation="drop")


def test_truncate_cuts_every_response_the_same_way(tok, load, caplog):
    prompt_ids = tok(LONG_PROMPT)["input_ids"]
    records = load([{"prompt": LONG_PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], "preference")
    with caplog.at_level(logging.WARNING, logger="rufus.data.reward"):
        [group] = tokenize_comparisons(records, tok, max_length=25, max_prompt_length=20, truncation="truncate")
    # prompt: bos + its last 19 tokens (20, the same for both); then the first 5 response tokens
    for response, ids in zip((CHOSEN, REJECTED), group["responses"]):
        full_response = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == [tok.bos_token_id] + prompt_ids[-19:] + full_response[:5]
    assert "data.train: truncated 1 of 1 rows to fit data.max_length=25, data.max_prompt_length=20" in caplog.text


def test_truncate_without_response_left_is_an_error(tok, load):
    n_prompt = len(tok(LONG_PROMPT)["input_ids"])
    records = load([{"prompt": LONG_PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], "preference")
    with pytest.raises(DataError) as info:
        tokenize_comparisons(records, tok, max_length=20, truncation="truncate")
    assert str(info.value) == (
        "data.train: rows.jsonl, line 1, field 'chosen': no response tokens left after truncation "
        f"(prompt is {n_prompt} tokens, limit data.max_length=20); set data.max_prompt_length so long "
        "prompts are cut instead"
    )


def test_truncation_that_makes_responses_identical_warns(tok, load):
    shared = "the cat sat on a mat and the dog ran to sea "
    records = load([{"prompt": "Hi", "chosen": shared + "yes", "rejected": shared + "no"}], "preference")
    with pytest.warns(UserWarning, match="1 of 1 rows have two responses with different scores that are identical"):
        [group] = tokenize_comparisons(records, tok, max_length=8, truncation="truncate")
    assert group["responses"][0] == group["responses"][1]


def test_bad_limits(tok, load):
    records = load([{"prompt": "a", "chosen": "b", "rejected": "c"}], "preference")
    with pytest.raises(ValueError, match="unknown truncation policy 'cut'"):
        tokenize_comparisons(records, tok, max_length=64, truncation="cut")
    with pytest.raises(ValueError, match=r"data.max_prompt_length must be between 1 and data.max_length - 1 \(63\)"):
        tokenize_comparisons(records, tok, max_length=64, max_prompt_length=64)


# --- graded format -------------------------------------------------------------------------------

GRADED = {"prompt": "Sky?", "completion": "Blue.", "score": 0.75}


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "Sky?", "completion": "Blue."},
            "field 'score': missing; a number grading the completion",
        ),
        ({**GRADED, "score": None}, "field 'score': missing (null); a number grading the completion"),
        ({**GRADED, "score": True}, "field 'score': expected a finite number, got bool (True)"),
        ({**GRADED, "score": "0.5"}, "field 'score': expected a finite number, got str ('0.5')"),
        ({**GRADED, "score": [1]}, "field 'score': expected a finite number, got list ([1])"),
        ({"prompt": "Sky?", "score": 1}, "field 'completion': missing"),
        (
            {"completion": "Blue.", "score": 1},
            "field 'prompt': missing; a graded row needs 'prompt', 'completion' and 'score'",
        ),
        ({**GRADED, "completion": ""}, "field 'completion': empty"),
        ({**GRADED, "completion": [user("Blue.")]}, "field 'completion': is a list but 'prompt' is a string"),
        (
            {**GRADED, "prompt": [user("Sky?")], "completion": [user("Blue.")]},
            "field 'completion[0].role': expected only assistant turns",
        ),
    ],
)
def test_graded_row_errors_name_file_line_and_field(write, row, message):
    write("graded.jsonl", [GRADED, row])
    assert error("graded.jsonl", "graded").startswith(f"data.train: graded.jsonl, line 2, {message}")


@pytest.mark.parametrize("literal, shown", [("NaN", "float (nan)"), ("-Infinity", "float (-inf)")])
def test_graded_score_must_be_finite(write, literal, shown):
    write("graded.jsonl", '{"prompt": "Sky?", "completion": "Blue.", "score": ' + literal + "}\n")
    assert error("graded.jsonl", "graded") == (
        f"data.train: graded.jsonl, line 1, field 'score': expected a finite number, got {shown}"
    )


def test_graded_csv_scores_are_parsed(write):
    write("graded.csv", "prompt,completion,score\nSky?,Blue.,0.25\nGrass?,Green., 1\n")
    dataset = load_records("graded.csv", kind="graded").dataset
    assert dataset["score"] == [0.25, 1.0] and dataset.features["score"].dtype == "float64"
    write("bad.csv", "prompt,completion,score\nSky?,Blue.,0.25\nGrass?,Green.,high\n")
    assert error("bad.csv", "graded") == (
        "data.train: bad.csv, row 2 (line 3), field 'score': expected a finite number, got str ('high')"
    )
    write("nan.csv", "prompt,completion,score\nSky?,Blue.,nan\n")
    assert "field 'score': expected a finite number, got float (nan)" in error("nan.csv", "graded")


def test_graded_int_scores_become_floats_and_conversations_load(write):
    rows = [
        {"prompt": [user("Sky?")], "completion": [assistant("Blue.")], "score": 1},
        {"prompt": [user("Sea?")], "completion": [assistant("Red.")], "score": 0},
    ]
    write("graded.jsonl", rows)
    dataset = load_records("graded.jsonl", kind="graded").dataset
    assert dataset["score"] == [1.0, 0.0] and dataset.features["score"].dtype == "float64"


def test_tokenize_graded(tok, load, write):
    records = load([GRADED, {"prompt": "Sea?", "completion": "Green.", "score": 2}], "graded")
    examples = tokenize_graded(records, tok, max_length=64)
    assert examples == [
        {"ids": encode_for_reward(tok, "Sky?", "Blue."), "score": 0.75},
        {"ids": encode_for_reward(tok, "Sea?", "Green."), "score": 2.0},
    ]
    with pytest.raises(DataError) as info:
        tokenize_graded(records, tok, max_length=64, score_range=(0, 1), key="rm.pointwise_data")
    assert str(info.value) == (
        "rm.pointwise_data: rows.jsonl, line 2, field 'score': 2 is outside [0, 1], the range this loss accepts"
    )
    long = {"prompt": "Sea?", "completion": "the dog ran to sea " * 20, "score": 1}
    with pytest.raises(DataError, match=r"line 1, field 'completion': prompt \+ completion is \d+ tokens"):
        tokenize_graded(load([long], "graded"), tok, max_length=32)
    with pytest.raises(ValueError, match="needs graded records, but rows.jsonl was loaded as 'preference'"):
        tokenize_graded(load([{"prompt": "a", "chosen": "b", "rejected": "c"}], "preference"), tok, max_length=64)


# --- collator ------------------------------------------------------------------------------------


def test_collator_left_and_right_give_the_same_positions():
    seqs = [[5, 6, 7, 8], [9, 10], [11]]
    right = RewardCollator(pad_token_id=3)(seqs)
    left = RewardCollator(pad_token_id=3, padding_side="left")(seqs)
    assert right["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3], [11, 3, 3, 3]]
    assert left["input_ids"].tolist() == [[5, 6, 7, 8], [3, 3, 9, 10], [3, 3, 3, 11]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    for batch in (right, left):
        assert all(t.dtype == torch.long for t in batch.values())
        mask = batch["attention_mask"].bool()
        for b, ids in enumerate(seqs):
            assert batch["input_ids"][b][mask[b]].tolist() == ids  # the same content ...
            assert batch["position_ids"][b][mask[b]].tolist() == list(range(len(ids)))  # ... at 0..n-1
        assert (batch["position_ids"] >= 0).all()


def test_collator_pad_to_multiple_and_pad_equal_to_eos(tok):
    seqs = [encode_for_reward(tok, PROMPT, CHOSEN), encode_for_reward(tok, PROMPT, REJECTED)]
    batch = RewardCollator(tok.eos_token_id, pad_to_multiple_of=8)(seqs)  # pad == eos: mask from lengths
    longest = max(map(len, seqs))
    assert batch["input_ids"].shape == (2, math.ceil(longest / 8) * 8)
    assert batch["attention_mask"].sum(1).tolist() == [len(s) for s in seqs]
    last = batch["attention_mask"].sum(1) - 1  # each row's last real token is its eos
    assert batch["input_ids"][torch.arange(2), last].tolist() == [tok.eos_token_id] * 2


def test_collator_arguments():
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        RewardCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'top'"):
        RewardCollator(0, padding_side="top")
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        RewardCollator(0)([[1], []])
