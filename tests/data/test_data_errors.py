"""Bad input fails before training, with the config key, file, line or row, and field in the message."""

from __future__ import annotations

import re

import pytest

from rufus.data import DataError, load_records

USER = {"role": "user", "content": "What colour is the sky?"}
GOOD = {"role": "assistant", "content": "Blue."}
BAD = {"role": "assistant", "content": "Green."}


def error(spec: str, format: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_records(spec, kind=format, **kwargs)
    return str(info.value)


# --- the file itself ------------------------------------------------------------------------------


def test_malformed_jsonl_names_line_and_column(write):
    write("bad.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a" "completion": "b"}\n')
    msg = error("bad.jsonl", "sft")
    # line 3: the blank line 2 is skipped but counted; column 16 is where a comma was expected
    assert msg == "data.train: bad.jsonl, line 3: malformed JSON: Expecting ',' delimiter (column 16)"


def test_malformed_json_array_names_line(write):
    write("bad.json", '[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a", "completion": }\n]\n')
    msg = error("bad.json", "sft")
    assert msg.startswith("data.train: bad.json, line 3: malformed JSON: Expecting value (column")


def test_jsonl_line_must_be_an_object(write):
    write("list.jsonl", '{"prompt": "a", "completion": "b"}\n["a", "b"]\n')
    assert error("list.jsonl", "sft") == (
        "data.train: list.jsonl, line 2: expected a JSON object {...}, got list (['a', 'b'])"
    )


def test_json_array_element_must_be_an_object(write):
    write("rows.json", [{"prompt": "a", "completion": "b"}, "just text"])
    assert "rows.json, row 2: expected a JSON object" in error("rows.json", "sft")


def test_json_file_with_one_object_is_not_rows(write):
    write("wrapped.json", '{\n "data": [{"prompt": "a", "completion": "b"}]\n}\n')
    assert error("wrapped.json", "sft") == (
        "data.train: wrapped.json: holds a single JSON object (keys 'data'), not rows; write a JSON array of "
        "row objects, or JSON Lines"
    )


def test_directory_with_mixed_file_types(write):
    write("shards/a.jsonl", [{"prompt": "a", "completion": "b"}])
    write("shards/b.csv", "prompt,completion\na,b\n")
    assert error("shards", "sft") == "data.train: shards: mixes file types (csv, jsonl); keep one type per directory"


def test_error_in_second_shard_names_the_shard(write):
    write("shards/a.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    write("shards/b.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    assert error("shards", "sft") == "data.train: shards/b.jsonl, line 2, field 'completion': empty"


def test_non_utf8_jsonl_names_line_and_column(write):
    write(
        "enc.jsonl",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xc3\xa9 \xff", "completion": "b"}\n',
    )
    # column counts characters: {"prompt": "café  -> the bad byte is the 18th character of the line
    assert error("enc.jsonl", "sft") == "data.train: enc.jsonl, line 2: not valid UTF-8 (byte 0xff at column 18)"


def test_non_utf8_csv_names_line(write):
    write("enc.csv", b"prompt,completion\nhi,there\nhello,\xfe\xfe\n")
    assert error("enc.csv", "sft") == "data.train: enc.csv, line 3: not valid UTF-8 (byte 0xfe at column 7)"


@pytest.mark.parametrize("name", ["missing.jsonl", "./data/missing", "data/sub/missing"])
def test_missing_file_is_not_sent_to_the_hub(write, monkeypatch, name):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    write("other.jsonl", [{"prompt": "a", "completion": "b"}])
    assert error(name, "sft") == f"data.train: {name}: file not found"


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", "\n  \n\n", "the file is empty"),
        ("empty.json", "[]", "an empty JSON array"),
        ("header.csv", "prompt,completion\n", "only a header"),
        ("empty.csv", "", "the file is empty"),
    ],
)
def test_empty_file(write, name, content, why):
    write(name, content)
    assert error(name, "sft", key="data.eval") == f"data.eval: {name}: no rows ({why})"


def test_empty_parquet(write):
    import datasets

    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet("empty.parquet")
    assert error("empty.parquet", "sft") == "data.train: empty.parquet: no rows (the file is empty)"


def test_unsupported_extension(write):
    write("notes.txt", "hello\n")
    assert "notes.txt: unsupported file type '.txt'" in error("notes.txt", "sft")


def test_unknown_kind_lists_choices(write):
    write("a.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="unknown kind of rows .pairs.; choose one of sft, preference"):
        load_records("a.jsonl", kind="pairs")


# --- fields: sft ------------------------------------------------------------------------------------


def test_missing_field(write):
    write("sft.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    assert error("sft.jsonl", "sft") == "data.train: sft.jsonl, line 2, field 'completion': missing"


def test_null_field(write):
    write("sft.jsonl", [{"prompt": None, "completion": "b"}])
    assert "sft.jsonl, line 1, field 'prompt': missing (null)" in error("sft.jsonl", "sft")


def test_wrong_type_int_prompt(write):
    write("data/train.jsonl", [{"prompt": "a", "completion": "b"}] * 6 + [{"prompt": 42, "completion": "b"}])
    assert error("data/train.jsonl", "sft") == (
        "data.train: data/train.jsonl, line 7, field 'prompt': expected a non-empty string, got int (42)"
    )


def test_prompt_list_of_non_messages(write):
    write("sft.jsonl", [{"prompt": ["a", "b"], "completion": [GOOD]}])
    msg = error("sft.jsonl", "sft")
    assert msg.startswith("data.train: sft.jsonl, line 1, field 'prompt[0]': expected a message")
    assert "got str ('a')" in msg


@pytest.mark.parametrize(
    "message, field, problem",
    [
        ({"content": "hi"}, "messages[0].role", "missing"),
        (
            {"role": "bot", "content": "hi"},
            "messages[0].role",
            "expected one of system, user, assistant, tool",
        ),
        ({"role": "user", "content": 3}, "messages[0].content", "expected a string, got int (3)"),
        ({"role": "user", "content": " "}, "messages[0].content", "empty"),
    ],
)
def test_bad_message_names_the_path_into_the_field(write, message, field, problem):
    write("chat.jsonl", [{"messages": [message, GOOD]}])
    assert f"chat.jsonl, line 1, field '{field}': {problem}" in error("chat.jsonl", "sft")


def test_messages_without_assistant_turn(write):
    write("chat.jsonl", [{"messages": [USER, GOOD]}, {"messages": [USER]}])
    assert error("chat.jsonl", "sft") == (
        "data.train: chat.jsonl, line 2, field 'messages': no assistant turn, so nothing to train on"
    )


def test_sft_completion_must_be_assistant_turns(write):
    write("chat.jsonl", [{"prompt": [USER], "completion": [USER]}])
    assert "line 1, field 'completion[0].role': expected only assistant turns" in error("chat.jsonl", "sft")


def test_both_messages_and_prompt(write):
    write("chat.jsonl", [{"messages": [USER, GOOD], "prompt": "hi"}])
    assert "chat.jsonl, line 1, field 'messages': row has both 'messages' and 'prompt'" in error("chat.jsonl", "sft")


def test_mixed_row_styles_names_first_deviating_row(write):
    write("mixed.jsonl", [{"prompt": "a", "completion": "b"}] * 2 + [{"messages": [USER, GOOD]}] * 2)
    msg = error("mixed.jsonl", "sft")
    assert msg.startswith(
        "data.train: mixed.jsonl, line 3, field 'messages': this row uses a 'messages' "
        "conversation but the first row (mixed.jsonl, line 1) uses plain strings"
    )


def test_mixed_string_and_list_within_a_row(write):
    write("sft.jsonl", [{"prompt": "hi", "completion": [GOOD]}])
    assert "line 1, field 'completion': is a list but 'prompt' is a string" in error("sft.jsonl", "sft")


# --- fields: preference, ranking, prompt ---------------------------------------------------------


def test_empty_field_in_csv_names_row_and_line(write):
    write("prefs.csv", "prompt,chosen,rejected\na,b,c\nd,e,f\ng,h,\n")
    assert error("prefs.csv", "preference") == "data.train: prefs.csv, row 3 (line 4), field 'rejected': empty"


def test_csv_line_follows_multiline_quoted_fields(write):
    write("prefs.csv", 'prompt,chosen,rejected\n"two\nlines",b,c\nd,e,\n')
    assert error("prefs.csv", "preference") == "data.train: prefs.csv, row 2 (line 4), field 'rejected': empty"


def test_missing_rejected(write):
    write("prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    assert error("prefs.jsonl", "preference") == "data.train: prefs.jsonl, line 2, field 'rejected': missing"


def test_missing_rejected_column_in_parquet(write):
    write("prefs.parquet", [{"prompt": "p", "chosen": "a"}])
    assert error("prefs.parquet", "preference") == "data.train: prefs.parquet, row 1, field 'rejected': missing"


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]},
        {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},
    ],
    ids=["plain", "conversational", "implicit-prompt"],
)
def test_chosen_equals_rejected(write, row):
    write("prefs.jsonl", [row])
    assert error("prefs.jsonl", "preference") == (
        "data.train: prefs.jsonl, line 1, field 'rejected': chosen and rejected are identical"
    )


def test_plain_strings_need_a_shared_opening_word(write):
    write(
        "prefs.jsonl",
        [{"chosen": "The sky is blue.", "rejected": "The sky is green."}, {"chosen": "a", "rejected": "b"}],
    )
    assert "line 2, field 'prompt': missing; chosen and rejected share no opening words" in error(
        "prefs.jsonl", "preference"
    )


def test_plain_and_message_sides_cannot_mix_without_a_prompt(write):
    write("prefs.jsonl", [{"chosen": "a b", "rejected": [BAD]}])
    assert "field 'prompt': missing; chosen and rejected must both be strings or both message lists" in error(
        "prefs.jsonl", "preference"
    )


def test_implicit_prompt_needs_shared_opening(write):
    other = {"role": "user", "content": "Something else"}
    write("prefs.jsonl", [{"chosen": [USER, GOOD], "rejected": [other, BAD]}])
    assert "field 'prompt': missing; chosen and rejected share no opening turns" in error("prefs.jsonl", "preference")


def test_implicit_prompt_answers_must_be_assistant_turns(write):
    write("prefs.jsonl", [{"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, BAD]}])
    assert "field 'chosen[2].role': expected only assistant turns" in error("prefs.jsonl", "preference")


def test_ranking_needs_two_responses(write):
    write("rank.jsonl", [{"prompt": "p", "responses": ["only one"]}])
    assert error("rank.jsonl", "ranking") == (
        "data.train: rank.jsonl, line 1, field 'responses': needs at least 2 responses to rank, got 1"
    )


def test_ranking_responses_must_be_distinct(write):
    write("rank.jsonl", [{"prompt": "p", "responses": ["a", "b", "a"]}])
    assert "field 'responses[2]': identical to responses[0]" in error("rank.jsonl", "ranking")


def test_ranking_scores_length_mismatch(write):
    write("rank.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 2.0, 3.0]}])
    assert error("rank.jsonl", "ranking") == (
        "data.train: rank.jsonl, line 1, field 'scores': has 3 scores for 2 responses"
    )


@pytest.mark.parametrize(
    "literal, shown",
    [("NaN", "float (nan)"), ("Infinity", "float (inf)"), ("true", "bool (True)"), ('"3"', "str ('3')")],
)
def test_ranking_scores_must_be_finite_numbers(write, literal, shown):
    # Python's json accepts the NaN / Infinity literals many tools write; they must not reach a loss.
    write("rank.jsonl", '{"prompt": "p", "responses": ["a", "b"], "scores": [1, ' + literal + "]}\n")
    assert error("rank.jsonl", "ranking") == (
        f"data.train: rank.jsonl, line 1, field 'scores[1]': expected a finite number, got {shown}"
    )


def test_prompt_format_needs_prompt(write):
    write("prompts.jsonl", [{"prompt": "a"}, {"question": "b"}])
    assert error("prompts.jsonl", "prompt") == "data.train: prompts.jsonl, line 2, field 'prompt': missing"


def test_prompt_format_mixed_styles(write):
    write("prompts.json", [{"prompt": [USER]}, {"prompt": "plain"}])
    msg = error("prompts.json", "prompt")
    assert re.match(
        r"data\.train: prompts\.json, row 2, field 'prompt': this row uses plain strings but the "
        r"first row \(prompts\.json, row 1\) uses message lists",
        msg,
    )


# --- hub datasets (the real code path, with datasets.load_dataset stubbed: tests never go online) ---


def test_hub_rows_are_validated_with_row_numbers(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ""}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert error("org/prefs", "preference", split="test") == (
        "data.train: hub:org/prefs[test], row 2, field 'rejected': empty"
    )
    assert calls == [("org/prefs", "test")]


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = error("hub:org/prefs", "preference", key="data.eval")
    assert msg.startswith("data.eval: could not load the hub dataset 'org/prefs' (split 'train'): ConnectionError")


def test_error_is_a_value_error_with_attributes(write):
    write("sft.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError) as info:
        load_records("sft.jsonl", kind="sft")
    assert isinstance(info.value, DataError)
    assert info.value.field == "completion" and info.value.where == "data.train: sft.jsonl, line 1"
