"""Annotator quality: leave-one-out agreement, gold items, flags; exclusions; the version 1 -> 2 upgrade."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import inspect, select, text

from rufus.cli import main
from rufus.studio import export as E
from rufus.studio import rounds as R
from rufus.studio.db import Item, Meta, open_database
from rufus.studio.quality import annotator_quality, binomial_tail_below, exclude, include
from rufus.studio.stats import round_agreement
from tests.helpers import write_jsonl
from tests.studio.conftest import add_people


def letter(view, text):
    return next(k for k, t in view.responses if t == text)


def clear_round(n: int) -> list[R.Candidate]:
    """n prompts whose better response is obvious: "good i" over "bad i"."""
    return [R.Candidate(f"q{i}", [f"good {i}", f"bad {i}"], ["G", "B"]) for i in range(n)]


def work(db, uid, name, decide, seconds=30.0):
    """Label everything offered, each label `seconds` after the item was shown."""
    t = 1_000.0
    while (aid := R.next_assignment(db, uid, name, now=t)) is not None:
        view = R.view_assignment(db, uid, aid)
        R.submit_label(db, uid, aid, decide(view), now=t + seconds)
        t += seconds + 1


def honest(view):
    good = next(t for _, t in view.responses if t.startswith("good"))
    return {"choice": letter(view, good)}


def adversarial(view):
    bad = next(t for _, t in view.responses if t.startswith("bad"))
    return {"choice": letter(view, bad)}


def test_binomial_tail_by_hand():
    # P(X <= 1) for 4 fair coins = (1 + 4) / 16
    assert binomial_tail_below(1, 4) == pytest.approx(5 / 16)
    assert binomial_tail_below(4, 4) == pytest.approx(1.0)


@pytest.fixture
def seeded_order(monkeypatch):
    """A seeded display order: with the studio's SystemRandom an honest annotator's good answers fall 11 or
    12 times of 12 on one side by chance in 0.6% of runs, which the same-side flag would rightly catch."""
    rng = random.Random(0)
    monkeypatch.setattr(R.random, "SystemRandom", lambda: rng)


def test_an_adversarial_annotator_is_flagged_and_exclusion_removes_their_labels(db, seeded_order):
    R.create_round(db, "r", "pairwise", clear_round(12), labels_per_item=4)
    people = add_people(db, "h1", "h2", "h3", "adv")
    for name in ("h1", "h2", "h3"):
        work(db, people[name][0], "r", honest)
    work(db, people["adv"][0], "r", adversarial)
    quality = {q.annotator: q for q in annotator_quality(db, "r")}
    assert quality["h1"].agreement == 1.0 and quality["h1"].flags == []
    assert quality["adv"].agreement == 0.0 and quality["adv"].agreement_pairs == 12
    (flag,) = quality["adv"].flags
    assert flag.startswith("below chance: agreement with the others 0.00 over 12 pairs")
    assert len(E.export_rows(db, "r", "preference")) == 48
    assert round_agreement(db, "r")["fleiss_kappa"] < 0.5
    exclude(db, "r", "adv", "labels the other way round")
    rows = E.export_rows(db, "r", "preference")
    assert len(rows) == 36 and all(r["chosen"].startswith("good") for r in rows)
    assert round_agreement(db, "r")["raw_agreement"] == pytest.approx(1.0)  # (kappa: one category, undefined)
    assert {q.annotator: q.excluded for q in annotator_quality(db, "r")}["adv"] is True
    include(db, "r", "adv")
    assert len(E.export_rows(db, "r", "preference")) == 48


def test_same_side_and_too_fast_are_flagged(db, seeded_order):
    R.create_round(db, "r", "pairwise", clear_round(12), labels_per_item=2)
    people = add_people(db, "h", "lazy")
    work(db, people["h"][0], "r", honest)
    work(db, people["lazy"][0], "r", lambda v: {"choice": "A"}, seconds=0.2)  # always the first, unread
    quality = {q.annotator: q for q in annotator_quality(db, "r")}
    assert quality["lazy"].shown_first_rate == 1.0
    flags = " | ".join(quality["lazy"].flags)
    assert "same side: the response shown first won 100% of 12 choices" in flags and "too fast: 100%" in flags
    assert not any(f.startswith(("same side", "too fast")) for f in quality["h"].flags)


def test_gold_items_are_spread_offered_to_everyone_and_scored(db):
    gold = [R.Candidate(f"gold {i}", [f"right {i}", f"wrong {i}"], gold=[1.0, 0.0]) for i in range(3)]
    summary = R.create_round(db, "r", "pairwise", clear_round(9), labels_per_item=1, gold=gold)
    assert summary["items"] == 9 and summary["gold_items"] == 3
    with db.read() as s:
        positions = [i.position for i in s.scalars(select(Item).order_by(Item.position)) if i.gold]
    assert positions == [2, 6, 10]  # spread through the 12 items, not bunched at the end
    people = add_people(db, "good", "bad")
    work(
        db,
        people["good"][0],
        "r",
        lambda v: {"choice": letter(v, next(t for _, t in v.responses if t.startswith(("good", "right"))))},
    )
    work(
        db,
        people["bad"][0],
        "r",
        lambda v: {"choice": letter(v, next(t for _, t in v.responses if t.startswith(("bad", "wrong"))))},
    )
    quality = {q.annotator: q for q in annotator_quality(db, "r")}
    # labels_per_item = 1: the 9 ordinary items went to "good"; the 3 gold items to both
    assert (quality["good"].labels, quality["bad"].labels) == (12, 3)
    assert quality["good"].gold_accuracy == 1.0 and quality["bad"].gold_accuracy == 0.0
    assert quality["bad"].gold_pairs == 3
    assert all(not r["prompt"].startswith("gold") for r in E.export_rows(db, "r", "preference"))  # not trained on


def test_schema_1_is_upgraded_to_2(tmp_path):
    path = tmp_path / "old.db"
    db, _ = open_database(path)
    R.create_round(db, "r", "pairwise", clear_round(2))
    with db.engine.begin() as conn:  # back to what version 1 wrote
        conn.execute(text("DROP TABLE exclusions"))
        conn.execute(text("ALTER TABLE items DROP COLUMN gold"))
        conn.execute(text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    db.dispose()
    db, created = open_database(path)
    assert not created
    assert "gold" in {c["name"] for c in inspect(db.engine).get_columns("items")}
    assert "exclusions" in inspect(db.engine).get_table_names()
    with db.read() as s:
        assert s.get(Meta, "schema_version").value == "2"
        assert [i.gold for i in s.scalars(select(Item))] == [None, None]  # the old items kept
    db.dispose()


def test_cli_gold_exclude_and_stats(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    responses = write_jsonl(
        tmp_path / "r.jsonl", [{"prompt": f"q{i}", "responses": [f"good {i}", f"bad {i}"]} for i in range(10)]
    )
    gold = write_jsonl(
        tmp_path / "gold.jsonl",
        [{"prompt": f"g{i}", "responses": [f"right {i}", f"wrong {i}"], "scores": [1, 0]} for i in range(2)],
    )
    assert (
        main(
            [
                "studio",
                "new-round",
                "--db",
                db,
                "--name",
                "r",
                "--responses",
                str(responses),
                "--gold",
                str(gold),
                "--labels-per-item",
                "2",
            ]
        )
        == 0
    )
    assert "and 2 gold items" in capsys.readouterr().out
    database, _ = open_database(db)
    people = add_people(database, "h1", "h2", "adv")
    for name in ("h1", "h2"):
        work(
            database,
            people[name][0],
            "r",
            lambda v: {"choice": letter(v, next(t for _, t in v.responses if t.startswith(("good", "right"))))},
        )
    work(
        database,
        people["adv"][0],
        "r",
        lambda v: {"choice": letter(v, next(t for _, t in v.responses if t.startswith(("bad", "wrong"))))},
    )
    assert main(["studio", "stats", "--db", db, "--round", "r"]) == 0
    out = capsys.readouterr().out
    assert "adv:" in out and "gold accuracy 0.00" in out and "h1:" in out
    assert main(["studio", "exclude", "--db", db, "--round", "r", "--annotator", "adv", "--reason", "test"]) == 0
    assert "left out" in capsys.readouterr().out
    assert all(r["chosen"].startswith("good") for r in E.export_rows(database, "r", "preference"))
    assert main(["studio", "exclude", "--db", db, "--round", "r", "--annotator", "nobody"]) == 2
    assert "no annotator named 'nobody'" in capsys.readouterr().err
