"""Good input of every format and file type loads, normalised to its format's columns."""

from __future__ import annotations

import math

import pytest

from rufus.data import load_records, split_implicit_prompt

USER = {"role": "user", "content": "What colour is the sky?"}
GOOD = {"role": "assistant", "content": "Blue."}
BAD = {"role": "assistant", "content": "Green."}
SYSTEM = {"role": "system", "content": ""}  # system content may be empty

SFT_ROWS = [{"prompt": "Hi", "completion": "Hello there."}, {"prompt": "Sky?", "completion": "Blue."}]


@pytest.mark.parametrize(
    "name, kind, second",
    [
        ("sft.jsonl", "jsonl", "sft.jsonl, line 2"),
        ("sft.json", "json", "sft.json, row 2"),
        ("sft.csv", "csv", "sft.csv, row 2 (line 3)"),
        ("sft.parquet", "parquet", "sft.parquet, row 2"),
    ],
)
def test_plain_sft_in_every_file_type(write, name, kind, second):
    if kind == "csv":
        write(name, "prompt,completion\nHi,Hello there.\nSky?,Blue.\n")
    else:
        write(name, SFT_ROWS)
    records = load_records(name, kind="sft")
    assert records.dataset.to_list() == SFT_ROWS
    assert (records.file_type, records.source, records.kind, len(records)) == (kind, name, "sft", 2)
    assert records.where(1) == second


def test_jsonl_keeps_line_numbers_across_blank_lines(write):
    write("sft.jsonl", '\n{"prompt": "a", "completion": "b"}\n\n\n{"prompt": "c", "completion": "d"}\n')
    records = load_records("sft.jsonl", kind="sft")
    assert records.lines == [2, 5]
    assert [records.where(i) for i in range(2)] == ["sft.jsonl, line 2", "sft.jsonl, line 5"]


def test_json_file_holding_json_lines(write):
    write("sft.json", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    records = load_records("sft.json", kind="sft")
    assert records.file_type == "jsonl" and records.where(1) == "sft.json, line 2"
    assert records.dataset["completion"] == ["b", "d"]


def test_utf8_bom_is_accepted(write):
    write("bom.jsonl", b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9", "completion": "b"}\n')
    assert load_records("bom.jsonl", kind="sft").dataset["prompt"] == ["café"]


def test_csv_cells_stay_text(write):
    # pandas would read "42" as an int and "NA" as null; as prompts they are text.
    write("sft.csv", 'prompt,completion\n42,NA\n"two\nlines","a, b"\n')
    records = load_records("sft.csv", kind="sft")
    assert records.dataset.to_list() == [
        {"prompt": "42", "completion": "NA"},
        {"prompt": "two\nlines", "completion": "a, b"},
    ]
    assert records.where(1) == "sft.csv, row 2 (line 3)"


def test_directory_of_shards_reports_the_shard(write):
    write("shards/b.jsonl", [{"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}])
    write("shards/a.jsonl", [{"prompt": "a", "completion": "b"}])
    write("shards/README.md", "not data")
    records = load_records("shards", kind="sft")
    assert records.dataset["prompt"] == ["a", "c", "e"]  # files in name order
    assert [records.where(i) for i in range(3)] == [
        "shards/a.jsonl, line 1",
        "shards/b.jsonl, line 1",
        "shards/b.jsonl, line 2",
    ]


def test_conversational_sft(write):
    rows = [
        {
            "messages": [
                SYSTEM,
                USER,
                GOOD,
                {"role": "user", "content": "And at night?"},
                {"role": "assistant", "content": "Black."},
            ]
        }
    ]
    write("chat.parquet", rows)
    assert load_records("chat.parquet", kind="sft").dataset.to_list() == rows
    pc = [{"prompt": [USER], "completion": [GOOD]}]
    write("pc.jsonl", pc)
    assert load_records("pc.jsonl", kind="sft").dataset.to_list() == pc


def test_unknown_columns_are_kept_even_with_mixed_types(write):
    rows = [{"prompt": "a", "completion": "b", "meta": 1}, {"prompt": "c", "completion": "d", "meta": "x"}]
    write("sft.jsonl", rows)
    assert load_records("sft.jsonl", kind="sft").dataset["meta"] == [1, "x"]


def test_plain_preference_csv(write):
    write("prefs.csv", "prompt,chosen,rejected\nSky?,Blue.,Green.\n")
    records = load_records("prefs.csv", kind="preference")
    assert records.dataset.to_list() == [{"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}]


def test_conversational_preference_json(write):
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    write("prefs.json", rows)
    assert load_records("prefs.json", kind="preference").dataset.to_list() == rows


def test_implicit_prompt_preference_is_split(write):
    follow = {"role": "user", "content": "Sure?"}
    write(
        "prefs.jsonl",
        [
            {"chosen": [USER, GOOD], "rejected": [USER, BAD], "id": 1},
            {"chosen": [USER, GOOD, follow, GOOD], "rejected": [USER, GOOD, follow, BAD], "id": 2},
        ],
    )
    records = load_records("prefs.jsonl", kind="preference")
    assert records.dataset.to_list() == [
        {"chosen": [GOOD], "rejected": [BAD], "id": 1, "prompt": [USER]},
        {"chosen": [GOOD], "rejected": [BAD], "id": 2, "prompt": [USER, GOOD, follow]},
    ]


def test_implicit_and_explicit_prompts_may_mix(write):
    write(
        "prefs.parquet",
        [
            {"prompt": None, "chosen": [USER, GOOD], "rejected": [USER, BAD]},
            {"prompt": [USER], "chosen": [BAD], "rejected": [GOOD]},
        ],
    )
    records = load_records("prefs.parquet", kind="preference")
    assert records.dataset["prompt"] == [[USER], [USER]]
    assert records.dataset["chosen"] == [[GOOD], [BAD]]


def test_split_implicit_prompt_ignores_arrow_null_keys():
    chosen = [{"role": "user", "content": "q", "name": None}, GOOD]
    assert split_implicit_prompt(chosen, [{"role": "user", "content": "q"}, BAD]) == (
        [chosen[0]],
        [GOOD],
        [BAD],
    )


def test_ranking_by_order_gets_descending_scores(write):
    write("rank.jsonl", [{"prompt": "p", "responses": ["best", "middle", "worst"]}])
    row = load_records("rank.jsonl", kind="ranking").dataset[0]
    assert row == {
        "prompt": "p",
        "responses": ["best", "middle", "worst"],
        "scores": [2.0, 1.0, 0.0],
        "ranked_by_order": True,
    }


def test_ranking_with_scores_keeps_order_and_values(write):
    write(
        "rank.parquet",
        [
            {"prompt": [USER], "responses": [[BAD], [GOOD]], "scores": [-1.5, 3.0]},
            {"prompt": [USER], "responses": [[GOOD], [BAD]], "scores": [2.0, 2.0]},
        ],
    )  # ties allowed
    dataset = load_records("rank.parquet", kind="ranking").dataset
    assert dataset["scores"] == [[-1.5, 3.0], [2.0, 2.0]]
    assert dataset["ranked_by_order"] == [False, False]
    assert dataset["responses"][0] == [[BAD], [GOOD]]
    assert all(math.isfinite(s) for row in dataset["scores"] for s in row)


def test_ranking_int_scores_become_floats(write):
    write("rank.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}])
    assert load_records("rank.jsonl", kind="ranking").dataset[0]["scores"] == [1.0, 0.0]


def test_prompt_format_keeps_extra_columns(write):
    rows = [{"prompt": "What is two plus two?", "answer": "4"}, {"prompt": "Name a colour.", "answer": "red"}]
    write("prompts.jsonl", rows)
    assert load_records("prompts.jsonl", kind="prompt").dataset.to_list() == rows
    write("chat_prompts.csv", "prompt,answer\nHi,hello\n")
    assert load_records("chat_prompts.csv", kind="prompt").dataset.to_list() == [{"prompt": "Hi", "answer": "hello"}]


def test_hub_dataset_is_loaded_by_name(monkeypatch):
    import datasets

    rows = [{"prompt": "p", "responses": ["a", "b"]}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows))
    records = load_records("org/rankings", kind="ranking", split="validation")
    assert (records.source, records.file_type, records.where(0)) == (
        "hub:org/rankings[validation]",
        "hub",
        "hub:org/rankings[validation], row 1",
    )
    assert records.dataset[0]["scores"] == [1.0, 0.0]
