"""Exports: hand-built labels -> the exact rows of each training format, tie and aggregation policies,
and files the data layer reads as its formats."""

from __future__ import annotations

import json

import pytest

from rufus.data.loading import load_records
from rufus.studio import export as E
from rufus.studio import rounds as R
from rufus.studio.db import StudioError
from tests.studio.conftest import add_people


def by_text(view, text):
    """The letter under which `text` is shown in this annotator's order."""
    return next(letter for letter, content in view.responses if content == text)


def label(db, uid, round_name, decide):
    """Label the next item with `decide(view)`'s form."""
    aid = R.next_assignment(db, uid, round_name)
    R.submit_label(db, uid, aid, decide(R.view_assignment(db, uid, aid)))


@pytest.fixture()
def pairwise(db):
    """One item (good vs bad), three annotators: two say good is better (one "much", one with a better
    answer), one says tie. A second item: one says both bad."""
    R.create_round(
        db,
        "p",
        "pairwise",
        [R.Candidate("Q1", ["good", "bad"], ["m1", "m2"]), R.Candidate("Q2", ["meh", "ugh"], ["m1", "m2"])],
        labels_per_item=3,
    )
    people = add_people(db, "a", "b", "c")
    ua, ub, uc = (people[n][0] for n in "abc")
    label(db, ua, "p", lambda v: {"choice": by_text(v, "good"), "strength": "much"})
    label(db, ub, "p", lambda v: {"choice": by_text(v, "good"), "better_answer": "excellent"})
    label(db, uc, "p", lambda v: {"choice": "tie"})
    label(db, ua, "p", lambda v: {"choice": "both_bad"})  # a's second item is Q2
    return ua, ub, uc


def test_pairwise_preference_per_label_drops_ties_and_both_bad(db, pairwise):
    ua, ub, _ = pairwise
    rows = E.export_rows(db, "p", "preference")
    assert [(r["prompt"], r["chosen"], r["rejected"], r["annotator_id"]) for r in rows] == [
        ("Q1", "good", "bad", ua),
        ("Q1", "good", "bad", ub),
    ]
    assert rows[0]["strength"] == "much" and "strength" not in rows[1]
    assert all(r["round"] == "p" and "chosen_model" not in r for r in rows)  # models only on request


def test_tie_half_writes_both_orders(db, pairwise):
    *_, uc = pairwise
    rows = [r for r in E.export_rows(db, "p", "preference", tie="half") if r["annotator_id"] == uc]
    assert [(r["chosen"], r["rejected"], r["tie"]) for r in rows] == [("good", "bad", True), ("bad", "good", True)]


def test_majority_per_item(db, pairwise):
    rows = E.export_rows(db, "p", "preference", aggregate="majority", with_models=True)
    # Q1: 2 votes for good, 0 for bad, 1 tie -> good over bad; Q2: only "both bad" -> no row
    assert len(rows) == 1
    (row,) = rows
    assert (row["chosen"], row["rejected"], row["chosen_model"], row["rejected_model"]) == ("good", "bad", "m1", "m2")
    assert (
        row["votes"]["labels"] == 3
        and row["votes"]["tie"] == 1
        and sorted(row["votes"]["responses"].values()) == [0, 2]
    )


def test_majority_draw_is_a_tie(db):
    R.create_round(db, "d", "pairwise", [R.Candidate("Q", ["x", "y"])], labels_per_item=2)
    people = add_people(db, "a", "b")
    label(db, people["a"][0], "d", lambda v: {"choice": by_text(v, "x")})
    label(db, people["b"][0], "d", lambda v: {"choice": by_text(v, "y")})
    assert E.export_rows(db, "d", "preference", aggregate="majority") == []
    half = E.export_rows(db, "d", "preference", aggregate="majority", tie="half")
    assert sorted((r["chosen"], r["rejected"]) for r in half) == [("x", "y"), ("y", "x")]


def test_ranking_sft_and_graded_from_pairwise(db, pairwise):
    ranking = E.export_rows(db, "p", "ranking")
    assert [(r["responses"], r["scores"]) for r in ranking] == [(["good", "bad"], [1.0, 0.0])] * 2  # tie: no row
    sft = E.export_rows(db, "p", "sft")
    assert [(r["prompt"], r["completion"]) for r in sft] == [("Q1", "excellent")]
    graded = E.export_rows(db, "p", "graded")
    # per label: winner 1, loser 0; a tie 0.5 each; both bad 0 each
    assert sorted((r["completion"], r["score"]) for r in graded) == sorted(
        [("good", 1.0), ("bad", 0.0)] * 2 + [("good", 0.5), ("bad", 0.5), ("meh", 0.0), ("ugh", 0.0)]
    )


def test_borda_points_by_hand():
    # a first, b and c tied second, d last: a beats 3; b and c beat d and tie each other: 1 + 0.5
    assert E.borda([[1], [2, 3], [4]]) == {1: 3.0, 2: 1.5, 3: 1.5, 4: 0.0}


def test_ranking_round_exports(db):
    R.create_round(db, "k", "ranking", [R.Candidate("Q", ["r1", "r2", "r3"], ["m1", "m2", "m3"])], labels_per_item=2)
    people = add_people(db, "a", "b")

    def ranks(order):  # order: texts best first, a list inside = tied
        def decide(v):
            form = {}
            for rank, group in enumerate(order, start=1):
                for text in group if isinstance(group, list) else [group]:
                    form[f"rank_{by_text(v, text)}"] = str(rank)
            return form

        return decide

    label(db, people["a"][0], "k", ranks(["r1", ["r2", "r3"]]))
    label(db, people["b"][0], "k", ranks(["r2", "r1", "r3"]))
    rows = E.export_rows(db, "k", "ranking")
    assert [(r["responses"], r["scores"]) for r in rows] == [
        (["r1", "r2", "r3"], [2.0, 0.5, 0.5]),
        (["r2", "r1", "r3"], [2.0, 1.0, 0.0]),
    ]
    # majority: mean Borda points r1 (2 + 1) / 2 = 1.5, r2 (0.5 + 2) / 2 = 1.25, r3 (0.5 + 0) / 2 = 0.25
    (maj,) = E.export_rows(db, "k", "ranking", aggregate="majority", with_models=True)
    assert maj["responses"] == ["r1", "r2", "r3"] and maj["scores"] == [1.5, 1.25, 0.25]
    assert maj["models"] == ["m1", "m2", "m3"]
    prefs = E.export_rows(db, "k", "preference")
    # a: r1>r2, r1>r3 (r2 = r3 dropped); b: r2>r1, r2>r3, r1>r3
    assert sorted((r["annotator_id"], r["chosen"], r["rejected"]) for r in prefs) == sorted(
        [
            (people["a"][0], "r1", "r2"),
            (people["a"][0], "r1", "r3"),
            (people["b"][0], "r2", "r1"),
            (people["b"][0], "r2", "r3"),
            (people["b"][0], "r1", "r3"),
        ]
    )
    graded = E.export_rows(db, "k", "graded")  # Borda / (K - 1)
    assert [(r["completion"], r["score"]) for r in graded][:3] == [("r1", 1.0), ("r2", 0.25), ("r3", 0.25)]


def test_rating_round_exports(db):
    R.create_round(db, "g", "rating", [R.Candidate("Q", ["lo", "hi"])])
    ((uid, _),) = add_people(db, "a").values()
    label(db, uid, "g", lambda v: {f"rating_{by_text(v, 'lo')}": "1", f"rating_{by_text(v, 'hi')}": "7"})
    unit = E.export_rows(db, "g", "graded")
    assert sorted((r["completion"], r["score"]) for r in unit) == [("hi", 1.0), ("lo", 0.0)]  # (r - 1) / 6
    raw = E.export_rows(db, "g", "graded", scale="raw")
    assert sorted((r["completion"], r["score"]) for r in raw) == [("hi", 7.0), ("lo", 1.0)]
    assert [(r["chosen"], r["rejected"]) for r in E.export_rows(db, "g", "preference")] == [("hi", "lo")]
    assert E.export_rows(db, "g", "ranking")[0]["scores"] == [7.0, 1.0]


def test_kto_rows_from_pairwise_labels_and_majorities(db, pairwise):
    ua, ub, uc = pairwise
    rows = E.export_rows(db, "p", "kto")
    # a and b chose good over bad: good desirable, bad undesirable, per label; c's tie leaves both out;
    # a's "both bad" on Q2 makes meh and ugh both undesirable
    assert sorted((r["annotator_id"], r["completion"], r["label"]) for r in rows) == sorted(
        [(ua, "good", True), (ua, "bad", False), (ub, "good", True), (ub, "bad", False)]
        + [(ua, "meh", False), (ua, "ugh", False)]
    )
    assert all(r["round"] == "p" and isinstance(r["label"], bool) and "response_id" in r for r in rows)
    # majority: Q1 2 votes to 0 for good (1 tie); Q2 every label "both bad"
    maj = E.export_rows(db, "p", "kto", aggregate="majority", with_models=True)
    assert sorted((r["completion"], r["label"], r["model"]) for r in maj) == [
        ("bad", False, "m2"),
        ("good", True, "m1"),
        ("meh", False, "m1"),
        ("ugh", False, "m2"),
    ]


def test_kto_rows_from_ratings_leave_the_midpoint_out(db):
    R.create_round(db, "g", "rating", [R.Candidate("Q", ["lo", "mid", "hi"])], labels_per_item=2)
    people = add_people(db, "a", "b")

    def rate(lo, mid, hi):
        return lambda v: {f"rating_{by_text(v, t)}": str(x) for t, x in (("lo", lo), ("mid", mid), ("hi", hi))}

    label(db, people["a"][0], "g", rate(2, 4, 6))
    label(db, people["b"][0], "g", rate(3, 5, 7))
    # 1-7 scale, midpoint 4: a's 2 undesirable, 4 left out, 6 desirable; b's 3 undesirable, 5 and 7 desirable
    rows = E.export_rows(db, "g", "kto")
    assert sorted((r["annotator_id"], r["completion"], r["label"]) for r in rows) == sorted(
        [(people["a"][0], "lo", False), (people["a"][0], "hi", True)]
        + [(people["b"][0], "lo", False), (people["b"][0], "mid", True), (people["b"][0], "hi", True)]
    )
    # majority: mean ratings lo 2.5, mid 4.5, hi 6.5: only lo is below the midpoint
    maj = E.export_rows(db, "g", "kto", aggregate="majority")
    assert sorted((r["completion"], r["label"]) for r in maj) == [("hi", True), ("lo", False), ("mid", True)]


def test_kto_rows_from_rankings_best_half_and_worst_half(db):
    R.create_round(db, "k", "ranking", [R.Candidate("Q", ["r1", "r2", "r3"])], labels_per_item=2)
    R.create_round(db, "k4", "ranking", [R.Candidate("Q4", ["s1", "s2", "s3", "s4"])])
    people = add_people(db, "a", "b")

    def ranks(order):  # texts best first, a list inside = tied
        def decide(v):
            return {
                f"rank_{by_text(v, text)}": str(rank)
                for rank, group in enumerate(order, start=1)
                for text in (group if isinstance(group, list) else [group])
            }

        return decide

    label(db, people["a"][0], "k", ranks(["r1", ["r2", "r3"]]))
    label(db, people["b"][0], "k", ranks(["r2", "r1", "r3"]))
    label(db, people["a"][0], "k4", ranks(["s1", "s2", "s3", "s4"]))
    # Borda share points / (K - 1): a gives r1 2/2 = 1, r2 and r3 0.5/2 = 0.25 each (tied below the
    # middle): r1 desirable, r2 and r3 undesirable. b gives r2 1, r1 0.5 (the middle: left out), r3 0.
    rows = E.export_rows(db, "k", "kto")
    assert sorted((r["annotator_id"], r["completion"], r["label"]) for r in rows) == sorted(
        [(people["a"][0], "r1", True), (people["a"][0], "r2", False), (people["a"][0], "r3", False)]
        + [(people["b"][0], "r2", True), (people["b"][0], "r3", False)]
    )
    # K = 4 in strict order: shares 1, 2/3, 1/3, 0: the best two desirable, the worst two undesirable
    rows = E.export_rows(db, "k4", "kto")
    assert sorted((r["completion"], r["label"]) for r in rows) == [
        ("s1", True),
        ("s2", True),
        ("s3", False),
        ("s4", False),
    ]
    # majority: mean Borda r1 1.5, r2 1.25, r3 0.25 -> shares 0.75, 0.625, 0.125
    maj = E.export_rows(db, "k", "kto", aggregate="majority")
    assert sorted((r["completion"], r["label"]) for r in maj) == [("r1", True), ("r2", True), ("r3", False)]


def test_exported_files_read_as_their_formats(db, pairwise, tmp_path):
    for fmt, reader in (("preference", "preference"), ("ranking", "ranking"), ("sft", "sft"), ("graded", "graded")):
        out = tmp_path / f"{fmt}.jsonl"
        n = E.export_round(db, "p", fmt, out, tie="half")
        records = load_records(str(out), kind=reader)
        assert len(records) == n > 0
    # kto rows are TRL's unpaired rows, which the loader reads as graded rows scoring 1 or 0
    for aggregate in ("label", "majority"):
        n = E.export_round(db, "p", "kto", tmp_path / f"kto-{aggregate}.jsonl", aggregate=aggregate)
        records = load_records(str(tmp_path / f"kto-{aggregate}.jsonl"), kind=("graded", "preference"))
        assert records.kind == "graded" and len(records) == n > 0
        assert set(records.dataset["score"]) == {0.0, 1.0}
    first = json.loads((tmp_path / "preference.jsonl").read_text().splitlines()[0])
    assert {
        "prompt",
        "chosen",
        "rejected",
        "round",
        "item_id",
        "annotator_id",
        "label_id",
        "chosen_id",
        "rejected_id",
    } <= set(first)


def test_export_errors(db, pairwise, tmp_path):
    with pytest.raises(StudioError, match="jsonl"):
        E.export_round(db, "p", "preference", tmp_path / "x.csv")
    with pytest.raises(StudioError, match="no round"):
        E.export_rows(db, "nope", "preference")
    with pytest.raises(StudioError, match="format must be"):
        E.export_rows(db, "p", "dialogue")
    with pytest.raises(StudioError, match="needs a rating round"):
        E.export_rows(db, "p", "graded", scale="raw")
    R.create_round(db, "empty", "pairwise", [R.Candidate("Q", ["x", "y"])])
    with pytest.raises(StudioError, match="no labels"):
        E.export_round(db, "empty", "preference", tmp_path / "e.jsonl")
    assert not (tmp_path / "e.jsonl").exists()


def test_raw_tables_and_csv(db, pairwise):
    labels = E.table_rows(db, "labels", "p")
    assert len(labels) == 4 and all(len(r["shown_order"]) == 2 for r in labels)
    people = E.table_rows(db, "annotators")
    assert {p["name"] for p in people} == {"a", "b", "c"} and not any("token" in k for p in people for k in p)
    responses = E.table_rows(db, "responses", "p")
    assert {r["model"] for r in responses} == {"m1", "m2"}
    text = E.to_csv(labels)
    assert text.splitlines()[0].startswith("label_id,round,item_id") and len(text.splitlines()) == 5


def test_conversational_rounds_export_assistant_turns(db, tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    R.create_round(db, "chat", "pairwise", [R.Candidate(prompt, ["Hello.", "Go away."])])
    ((uid, _),) = add_people(db, "a").values()
    label(db, uid, "chat", lambda v: {"choice": by_text(v, "Hello."), "better_answer": "Hello there."})
    (row,) = E.export_rows(db, "chat", "preference")
    assert row["prompt"] == prompt and row["chosen"] == [{"role": "assistant", "content": "Hello."}]
    for fmt in ("preference", "ranking", "sft", "graded"):
        E.export_round(db, "chat", fmt, tmp_path / f"{fmt}.jsonl")
        assert len(load_records(str(tmp_path / f"{fmt}.jsonl"), kind=fmt)) >= 1
    E.export_round(db, "chat", "kto", tmp_path / "kto.jsonl")
    assert len(load_records(str(tmp_path / "kto.jsonl"), kind="graded")) == 2  # Hello. desirable, Go away. not
