"""The published formats: detection, what each reader makes of its rows, and the errors for bad rows."""

from __future__ import annotations

import copy
import json
import math

import pytest

from rufus.data.errors import DataError
from rufus.data.formats import split_implicit_text
from rufus.data.loading import load_records
from rufus.data.readers import ReadOptions, hh_turns, pairs_of, parse_attributes
from tests import published


def load(name, rows, kind, **opts):
    """Write `rows` as JSON Lines to `name` and load them as `kind`."""
    with open(name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return load_records(name, kind=kind, options=ReadOptions(**opts))


def error(name, rows, kind, **opts) -> str:
    with pytest.raises(DataError) as e:
        load(name, rows, kind, **opts)
    return str(e.value)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, fmt, kind",
    [
        (published.hh_rlhf(), "hh-rlhf", "preference"),
        (published.ultrafeedback_binarized(), "ultrafeedback", "preference"),
        (published.ultrafeedback_raw(), "ultrafeedback", "ranking"),
        (published.oasst1(), "oasst1", "ranking"),
        (published.shp(), "shp", "preference"),
        (published.summarize_from_feedback(), "summarize_from_feedback", "preference"),
        (published.helpsteer2(), "helpsteer2", "ranking"),
        (published.trl_implicit(), "trl", "preference"),
    ],
)
def test_each_format_is_detected_and_a_reward_model_gets_its_richest_kind(rows, fmt, kind, caplog):
    caplog.set_level("INFO", logger="rufus.data.loading")
    records = load("data.jsonl", rows, ("ranking", "preference"))
    assert (records.format, records.kind) == (fmt, kind)
    assert f"reading data.jsonl as {fmt} ({kind} rows" in caplog.text
    load("data.jsonl", rows, ("ranking", "preference"))  # logged once per file, format and kind
    assert caplog.text.count(f"reading data.jsonl as {fmt}") == 1


def test_forced_format_that_does_not_fit_names_the_columns():
    msg = error("data.jsonl", published.shp(2), "preference", format="hh-rlhf")
    assert "data.format=hh-rlhf, but the rows have columns c_root_id_A" in msg
    assert "hh-rlhf rows hold chosen, rejected" in msg


def test_a_kind_the_format_cannot_give_is_an_error():
    msg = error("data.jsonl", published.shp(2), "graded")
    assert msg == "data.train: data.jsonl: read as shp, which gives preference, sft, prompt rows; this needs graded"


# --- hh-rlhf -------------------------------------------------------------------------------------


def test_hh_turns_parse_and_reasons():
    assert hh_turns("\n\nHuman: Hi\n\nAssistant: Hello.\n\nMore.\n\nHuman: ok\n\nAssistant: fine") == [
        ("user", "Hi"),
        ("assistant", "Hello.\n\nMore."),  # paragraphs inside a turn stay in it
        ("user", "ok"),
        ("assistant", "fine"),
    ]
    for text, reason in [
        ("Hi\n\nAssistant: x", "does not start with"),
        ("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "two Human: turns in a row"),
        ("\n\nHuman: a", "does not end with an Assistant turn"),
    ]:
        with pytest.raises(ValueError, match=reason):
            hh_turns(text)


def test_hh_as_messages():
    rows = published.hh_rlhf(4)
    records = load("hh.jsonl", rows, "preference", hh_rlhf="messages")
    single, multi = records.dataset[1], records.dataset[0]
    assert single["prompt"] == [{"role": "user", "content": "Tell me about bread."}]
    assert single["chosen"] == [{"role": "assistant", "content": "Bread has 1 facts: 1 2 3 1."}]
    assert single["rejected"] == [{"role": "assistant", "content": "no idea 1"}]
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"]
    assert multi["prompt"][2]["content"] == "More please?"


def test_hh_as_text_cuts_the_prompt_at_the_last_assistant_marker():
    records = load("hh.jsonl", published.hh_rlhf(4), "preference", hh_rlhf="text")
    row = records.dataset[0]
    assert row["prompt"] == (
        "\n\nHuman: Tell me about the moon.\n\nAssistant: Sure, the moon 0.\n\nHuman: More please?\n\nAssistant:"
    )
    assert (row["chosen"], row["rejected"]) == (" The moon has 0 facts: 1 2 3 0.", " no idea 0")
    assert row["prompt"] + row["chosen"] == published.hh_rlhf(1)[0]["chosen"]


def test_hh_auto_follows_the_tokenizer():
    assert isinstance(
        load("hh.jsonl", published.hh_rlhf(2), "preference", chat_template=True).dataset[0]["prompt"], list
    )
    assert isinstance(load("hh.jsonl", published.hh_rlhf(2), "preference").dataset[0]["prompt"], str)


@pytest.mark.parametrize(
    "change, field, reason",
    [
        (lambda r: r.update(rejected=r["chosen"]), "rejected", "chosen and rejected are identical"),
        (
            lambda r: r.update(rejected="\n\nHuman: Something else\n\nAssistant: no idea"),
            "rejected",
            "chosen and rejected differ before their last Assistant turn, so they share no prompt",
        ),
        (
            lambda r: r.update(chosen="Human: hi Assistant: there"),
            "chosen",
            "not an hh-rlhf dialogue: it does not start with '\\n\\nHuman:'",
        ),
        (lambda r: r.update(chosen=r["chosen"] + "\n\nHuman: and?"), "chosen", "does not end with an Assistant turn"),
        (lambda r: r.update(chosen=7), "chosen", "expected a string, got int (7)"),
        (
            lambda r: r.update(chosen=r["chosen"].rsplit("Assistant:", 1)[0] + "Assistant:   "),
            "chosen",
            "its last Assistant turn is empty",
        ),
    ],
)
def test_hh_bad_rows_name_file_line_and_reason(change, field, reason):
    rows = published.hh_rlhf(5)
    change(rows[3])
    assert error("hh.jsonl", rows, "preference") == f"data.train: hh.jsonl, line 4, field '{field}': {reason}"


def test_skipped_rows_are_counted_and_later_rows_keep_their_lines():
    rows = published.hh_rlhf(6)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["chosen"] = "not a dialogue"
    with pytest.warns(UserWarning, match=r"skipped 2 of 6 rows that cannot be used .* line 2, field 'rejected'"):
        records = load("hh.jsonl", rows, "preference", invalid_rows="skip")
    assert len(records) == 4
    assert [records.where(i) for i in range(4)] == [f"hh.jsonl, line {n}" for n in (1, 3, 5, 6)]
    assert [(i, e.field) for i, e in records.rejected] == [(1, "rejected"), (3, "chosen")]


def test_all_rows_skipped_is_an_error():
    rows = [dict(r, rejected=r["chosen"]) for r in published.hh_rlhf(3)]
    with pytest.warns(UserWarning):
        msg = error("hh.jsonl", rows, "preference", invalid_rows="skip")
    assert msg == "data.train: hh.jsonl: no preference rows left of 3 read (3 cannot be used)"


def test_hh_gives_demonstrations_and_prompts():
    rows = published.hh_rlhf(4) + published.hh_rlhf(1)  # the last repeats the first prompt
    sft = load("hh.jsonl", rows, "sft", hh_rlhf="messages").dataset
    assert sft[1]["completion"] == [{"role": "assistant", "content": "Bread has 1 facts: 1 2 3 1."}]
    prompts = load("hh.jsonl", rows, "prompt", hh_rlhf="text")
    assert len(prompts) == 4 and prompts.dataset[1]["prompt"].endswith("\n\nAssistant:")


# --- UltraFeedback --------------------------------------------------------------------------------


def test_ultrafeedback_binarized_splits_the_shared_user_turn_and_keeps_the_score_gap():
    records = load("uf.jsonl", published.ultrafeedback_binarized(3), "preference")
    row = records.dataset[1]
    assert row["prompt"] == [{"content": "Explain bread, case 1.", "role": "user"}]
    assert row["chosen"] == [{"content": "Bread has 1 facts: 1 2 3 1.", "role": "assistant"}]
    assert [records.dataset[i]["margin"] for i in range(3)] == [5.0, 6.0, 5.0]


def test_ultrafeedback_binarized_bad_rows():
    rows = published.ultrafeedback_binarized(3)
    rows[2]["chosen"] = "a string"
    assert error("uf.jsonl", rows, "preference") == (
        "data.train: uf.jsonl, line 3, field 'chosen': expected a list of messages, got str ('a string')"
    )
    rows = published.ultrafeedback_binarized(3)
    rows[1]["score_chosen"] = 1.0
    assert "line 2, field 'score_chosen': score_chosen 1 is below score_rejected 3" in error(
        "uf.jsonl", rows, "preference"
    )


def test_ultrafeedback_raw_is_a_ranking_with_ties_kept():
    records = load("uf.jsonl", published.ultrafeedback_raw(2), "ranking")
    row = records.dataset[0]
    assert row["responses"] == [
        "The moon has 0 facts: 1 2 3 0.",
        "the moon maybe 0 1",
        "the moon perhaps 0 2",
        "no idea 0",
    ]
    assert row["scores"] == [5.0, 3.0, 3.0, 2.0] and row["ranked_by_order"] is False


def test_ultrafeedback_raw_without_fine_grained_score_averages_the_ratings():
    rows = published.ultrafeedback_raw(1)
    for c, ratings in zip(rows[0]["completions"], (["1", "2", "N/A", "3"], ["5", "5", "4", "5"], ["3"] * 4, ["2"] * 4)):
        del c["fine-grained_score"]
        for aspect, rating in zip(c["annotations"].values(), ratings):
            aspect["Rating"] = rating
    row = load("uf.jsonl", rows, "ranking").dataset[0]
    assert row["scores"] == [4.75, 3.0, 2.0, 2.0]  # the N/A rating is left out of the first mean


def test_rankings_become_pairs_per_data_pairs():
    rows = published.ultrafeedback_raw(1)
    for how, expected in [
        ("best_vs_worst", [("The moon has 0 facts: 1 2 3 0.", "no idea 0", 3.0)]),
        ("best_vs_rest", None),
        ("all", None),
    ]:
        got = [
            (r["chosen"], r["rejected"], r["margin"]) for r in load("uf.jsonl", rows, "preference", pairs=how).dataset
        ]
        if expected:
            assert got == expected
        else:
            assert len(got) == {"best_vs_rest": 3, "all": 5}[how]  # the tied middle pair never pairs
    assert pairs_of([5, 3, 3, 2], "all") == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert pairs_of([2, 2], "best_vs_worst") == []


def test_ultrafeedback_raw_bad_row():
    rows = published.ultrafeedback_raw(2)
    rows[1]["completions"][2]["response"] = None
    assert error("uf.jsonl", rows, "ranking") == (
        "data.train: uf.jsonl, line 2, field 'completions[2].response': expected a string, got null"
    )


# --- oasst1 ----------------------------------------------------------------------------------------


def test_oasst1_rankings_by_parent_with_deleted_replies_skipped():
    rows = published.oasst1(3)
    records = load("oasst.jsonl", rows, "ranking")
    assert len(records) == 6  # per tree: the root's 3 ranked replies, the follow-up's 2
    by_prompt = {json.dumps(r["prompt"]): r for r in records.dataset}
    first = by_prompt[json.dumps([{"role": "user", "content": "What about the moon?"}])]
    assert first["responses"] == [
        [{"role": "assistant", "content": "The moon has 0 facts: 1 2 3 0."}],
        [{"role": "assistant", "content": "the moon maybe 0 1"}],
        [{"role": "assistant", "content": "no idea 0"}],
    ]
    follow = [r for r in records.dataset if len(r["prompt"]) == 3]
    assert [m["role"] for m in follow[0]["prompt"]] == ["user", "assistant", "user"]
    root_line = 1 + next(i for i, r in enumerate(rows) if r["message_id"] == "m0-root")
    first_index = [r["prompt"] for r in records.dataset].index(first["prompt"])
    assert records.where(first_index) == f"oasst.jsonl, line {root_line}"


def test_oasst1_lang_filter_and_first_rank_path_for_sft():
    rows = published.oasst1(3)  # the last tree is in German
    assert len(load("oasst.jsonl", rows, "ranking", lang=("en",))) == 4
    sft = load("oasst.jsonl", rows, "sft", lang=("en",))
    assert len(sft) == 2 and sft.filtered == 7  # the German tree's seven messages
    assert sft.dataset[0]["messages"] == [
        {"role": "user", "content": "What about the moon?"},
        {"role": "assistant", "content": "The moon has 0 facts: 1 2 3 0."},
        {"role": "user", "content": "And the moon 1?"},
        {"role": "assistant", "content": "The moon has 1 facts: 1 2 3 1."},
    ]


def test_oasst1_bad_messages():
    rows = published.oasst1(2)
    i = next(i for i, r in enumerate(rows) if r["message_id"] == "m1-a1")
    rows[i]["role"] = "bot"
    assert error("oasst.jsonl", rows, "ranking") == (
        f"data.train: oasst.jsonl, line {i + 1}, field 'role': expected prompter or assistant, got str ('bot')"
    )
    rows = published.oasst1(2)
    rows[i]["parent_id"] = "nowhere"
    assert error("oasst.jsonl", rows, "ranking") == (
        f"data.train: oasst.jsonl, line {i + 1}, field 'parent_id': parent 'nowhere' is not in the file"
    )


# --- SHP, summarize_from_feedback ------------------------------------------------------------------


def test_shp_labels_pick_the_preferred_comment_and_the_margin_is_the_log_vote_ratio():
    rows = published.shp(4)
    records = load("shp.jsonl", rows, "preference")
    for k, row in enumerate(records.dataset):
        assert row["prompt"] == rows[k]["history"]
        assert row["chosen"].startswith(published.TOPICS[k].capitalize())
        good, bad = (rows[k]["score_A"], rows[k]["score_B"])[:: 1 if rows[k]["labels"] == 1 else -1]
        assert row["margin"] == pytest.approx(math.log(good / bad))


def test_shp_min_score_ratio_filters():
    rows = published.shp(12)
    kept = [r for r in rows if r["score_ratio"] >= 2.5]
    records = load("shp.jsonl", rows, "preference", min_score_ratio=2.5)
    assert len(records) == len(kept) and records.filtered == len(rows) - len(kept) > 0


def test_shp_bad_label():
    rows = published.shp(3)
    rows[2]["labels"] = 2
    assert error("shp.jsonl", rows, "preference") == (
        "data.train: shp.jsonl, line 3, field 'labels': expected 1 (A preferred) or 0 (B preferred), got int (2)"
    )


def test_summarize_query_format_choice_and_confidence():
    rows = published.summarize_from_feedback(2)
    records = load("tldr.jsonl", rows, "preference")
    row = records.dataset[1]
    assert row["prompt"] == (
        "SUBREDDIT: r/relationships\n\nTITLE: About bread\n\nPOST: I keep thinking about bread. It happened 1 times."
        "\n\nTL;DR:"
    )
    assert row["chosen"] == rows[1]["summaries"][1]["text"] and row["margin"] == 2.0


def test_summarize_bad_choice():
    rows = published.summarize_from_feedback(2)
    rows[0]["choice"] = 2
    assert error("tldr.jsonl", rows, "preference") == (
        "data.train: tldr.jsonl, line 1, field 'choice': "
        "expected 0 or 1, the index of the preferred summary, got int (2)"
    )


# --- HelpSteer2 -----------------------------------------------------------------------------------


def test_helpsteer2_graded_with_a_weighted_mix():
    rows = published.helpsteer2(2)
    attrs = parse_attributes("helpfulness:0.65,correctness:0.8,verbosity:-0.4")
    records = load("hs.jsonl", rows, "graded", attributes=attrs)
    assert records.dataset["score"] == pytest.approx(
        [0.65 * r["helpfulness"] + 0.8 * r["correctness"] - 0.4 * r["verbosity"] for r in rows]
    )
    assert records.dataset[0]["completion"] == rows[0]["response"]


def test_helpsteer2_binarised_per_prompt():
    rows = published.helpsteer2(3)
    pairs = load("hs.jsonl", rows, "preference").dataset
    assert len(pairs) == 3 and pairs[0]["chosen"] == rows[0]["response"] and pairs[0]["margin"] == 3.0
    ranking = load("hs.jsonl", rows, "ranking")
    assert len(ranking) == 3 and ranking.dataset[0]["scores"] == [4.0, 1.0]


def test_helpsteer2_bad_rows():
    rows = published.helpsteer2(2)
    rows[3]["helpfulness"] = "x"
    assert error("hs.jsonl", rows, "graded") == (
        "data.train: hs.jsonl, line 4, field 'helpfulness': expected a finite number, got str ('x')"
    )
    msg = error("hs.jsonl", published.helpsteer2(2), "graded", attributes={"kindness": 1.0})
    assert msg == (
        "data.train: data.attributes names 'kindness', which the file does not have "
        "(its attributes: helpfulness, correctness, coherence, complexity, verbosity)"
    )


def test_parse_attributes():
    assert parse_attributes("helpfulness") == {"helpfulness": 1.0}
    assert parse_attributes("a:0.5, b:-1") == {"a": 0.5, "b": -1.0}
    with pytest.raises(DataError, match="weight of 'a' is not a number"):
        parse_attributes("a:x")


# --- TRL's schemas ------------------------------------------------------------------------------------


def test_trl_unpaired_rows():
    rows = published.trl_unpaired(4)
    graded = load("kto.jsonl", rows, "graded")
    assert graded.format == "trl" and graded.dataset["score"] == [1.0, 0.0, 1.0, 0.0]
    sft = load("kto.jsonl", rows, "sft")
    assert sft.dataset["completion"] == [rows[0]["completion"], rows[2]["completion"]]
    assert [sft.where(i) for i in range(2)] == ["kto.jsonl, line 1", "kto.jsonl, line 3"]
    bad = copy.deepcopy(rows)
    bad[1]["label"] = "maybe"
    assert error("kto.jsonl", bad, "graded") == (
        "data.train: kto.jsonl, line 2, field 'label': expected true or false, got str ('maybe')"
    )


def test_trl_implicit_prompt_strings():
    records = load("prefs.jsonl", published.trl_implicit(2), "preference")
    row = records.dataset[1]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        "Question about bread 1. Answer:",
        " Bread has 1 facts: 1 2 3 1.",
        " no idea 1",
    )


def test_split_implicit_text_keeps_words_whole():
    assert split_implicit_text("The cat sat", "The car sat") == ("The", " cat sat", " car sat")
    assert split_implicit_text("A  b", "A  c") == ("A", "  b", "  c")
    assert split_implicit_text("cat", "car") == ("", "cat", "car")


# --- hub datasets -------------------------------------------------------------------------------------


def test_a_published_hub_dataset_is_read_by_name_with_its_subset(monkeypatch):
    # the hub gives Arrow rows: nested structs as dicts, a null oasst1 rank as NaN after pandas
    import datasets

    calls = []

    def hub(*args, split):
        calls.append((args, split))
        return datasets.Dataset.from_list(published.summarize_from_feedback(3))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    records = load_records(
        "openai/summarize_from_feedback",
        kind="preference",
        split="validation",
        options=ReadOptions(subset="comparisons"),
    )
    assert calls == [(("openai/summarize_from_feedback", "comparisons"), "validation")]
    assert (records.format, len(records), records.where(2)) == (
        "summarize_from_feedback",
        3,
        "hub:openai/summarize_from_feedback[validation], row 3",
    )
    rows = published.oasst1(2)
    for r in rows:
        r["rank"] = float("nan") if r["rank"] is None else float(r["rank"])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split: datasets.Dataset.from_list(rows))
    assert len(load_records("OpenAssistant/oasst1", kind="ranking")) == 4
