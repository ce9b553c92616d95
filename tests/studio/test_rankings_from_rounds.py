"""The studio's labels as comparisons of models (`rufus leaderboard`) and as agreement figures
(`rufus studio stats`)."""

from __future__ import annotations

import json

import pytest

from rufus.cli import main
from rufus.studio import rounds as R
from rufus.studio.leaderboard import Comparison
from rufus.studio.stats import round_agreement, round_comparisons
from tests.helpers import write_jsonl
from tests.studio.conftest import add_people


def label_next(db, uid, name, decide):
    aid = R.next_assignment(db, uid, name)
    R.submit_label(db, uid, aid, decide(R.view_assignment(db, uid, aid)))


def letter(view, text):
    return next(k for k, t in view.responses if t == text)


def test_pairwise_and_ranking_labels_become_model_comparisons(db):
    R.create_round(db, "p", "pairwise", [R.Candidate("q", ["good", "bad", "same"], ["M1", "M2", "M1"])], pairs="all")
    R.create_round(db, "k", "ranking", [R.Candidate("q", ["x", "y", "z"], ["M1", "M2", "M3"])])
    ((uid, _),) = add_people(db, "a").values()
    decisions = {frozenset({"good", "bad"}): "good", frozenset({"bad", "same"}): "tie"}

    def pairwise(view):
        texts = frozenset(t for _, t in view.responses)
        if texts not in decisions:  # good vs same: both M1's, nothing for the leaderboard
            return {"choice": "A"}
        pick = decisions[texts]
        return {"choice": "tie" if pick == "tie" else letter(view, pick)}

    for _ in range(3):
        label_next(db, uid, "p", pairwise)
    label_next(
        db,
        uid,
        "k",
        lambda v: {f"rank_{letter(v, 'x')}": "1", f"rank_{letter(v, 'y')}": "2", f"rank_{letter(v, 'z')}": "2"},
    )
    got = {(c.model_a, c.model_b, c.winner) for c in round_comparisons(db, ["p", "k"])}
    assert got == {
        ("M1", "M2", "a"),
        ("M2", "M1", "tie"),  # pairwise: good > bad, bad ~ same
        ("M1", "M2", "a"),
        ("M1", "M3", "a"),
        ("M2", "M3", "tie"),
    }  # the ranking's three pairs
    assert len(round_comparisons(db, ["p", "k"])) == 5


def test_pairwise_agreement_of_a_round_by_hand(db):
    # 2 items x 3 annotators. Item 1: first, first, second -> P = (2*1)/(3*2) = 1/3; item 2: all tie -> 1.
    # P-bar = 2/3; shares: first 2/6, second 1/6, tie 3/6 -> P_e = (4 + 1 + 9)/36 = 14/36;
    # Fleiss' kappa = (24/36 - 14/36) / (22/36) = 10/22
    R.create_round(
        db, "r", "pairwise", [R.Candidate("q1", ["u", "v"]), R.Candidate("q2", ["s", "t"])], labels_per_item=3
    )
    people = add_people(db, "a", "b", "c")
    plan = {"a": {"q1": "u", "q2": "tie"}, "b": {"q1": "u", "q2": "tie"}, "c": {"q1": "v", "q2": "tie"}}
    for name, (uid, _) in people.items():
        for _ in range(2):
            aid = R.next_assignment(db, uid, "r")
            view = R.view_assignment(db, uid, aid)
            pick = plan[name][view.prompt]
            R.submit_label(db, uid, aid, {"choice": "tie" if pick == "tie" else letter(view, pick)})
    figures = round_agreement(db, "r")
    assert figures["shared_units"] == 2 and figures["raw_agreement"] == pytest.approx(2 / 3)
    assert figures["fleiss_kappa"] == pytest.approx(10 / 22)
    ab = next(p for p in figures["cohen"] if p["annotators"] == ("a", "b"))
    assert ab["agreement"] == 1.0


def test_rating_agreement_uses_ordinal_alpha(db):
    R.create_round(db, "g", "rating", [R.Candidate("q", ["lo", "hi"])], labels_per_item=2)
    people = add_people(db, "a", "b")
    for uid, _ in people.values():
        label_next(db, uid, "g", lambda v: {f"rating_{letter(v, 'lo')}": "2", f"rating_{letter(v, 'hi')}": "6"})
    figures = round_agreement(db, "g")
    assert figures["krippendorff_alpha"] == pytest.approx(1.0) and "fleiss_kappa" not in figures


def test_leaderboard_command_from_a_file_and_from_rounds(db, tmp_path, capsys):
    rows = (
        [{"model_a": "big", "model_b": "small", "winner": "a"}] * 30
        + [{"model_a": "big", "model_b": "small", "winner": "b"}] * 10
        + [{"model_a": "small", "model_b": "tiny", "winner": "a"}] * 30
        + [{"model_a": "tiny", "model_b": "small", "winner": "a"}] * 10
        + [{"model_a": "big", "model_b": "tiny", "winner": "tie"}] * 2
        + [{"model_a": "big", "model_b": "tiny", "winner": "a"}] * 8
        + [{"model_a": "tiny", "model_b": "big", "winner": "a"}] * 1
    )
    path = write_jsonl(tmp_path / "cmp.jsonl", rows)
    out, png = tmp_path / "board.json", tmp_path / "board.png"
    assert (
        main(
            ["leaderboard", str(path), "--anchor", "small", "--resamples", "200", "--out", str(out), "--plot", str(png)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.index("big") < printed.index("small") < printed.index("tiny")  # best first
    table = json.loads(out.read_text())
    assert [r["model"] for r in table] == ["big", "small", "tiny"]
    small = next(r for r in table if r["model"] == "small")
    assert small["rating"] == 1000.0 and small["wins"] == 40 and small["losses"] == 40
    assert set(table[0]) >= {"model", "rating", "ci_low", "ci_high", "rank", "wins", "losses", "ties"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"model_a": "x", "model_b": "x", "winner": "a"}])
    assert main(["leaderboard", str(bad)]) == 2
    assert "bad.jsonl, line 1" in capsys.readouterr().err

    R.create_round(db, "r", "pairwise", [R.Candidate(f"q{i}", ["strong", f"weak {i}"], ["S", "W"]) for i in range(6)])
    ((uid, _),) = add_people(db, "a").values()
    for _ in range(6):
        label_next(db, uid, "r", lambda v: {"choice": letter(v, "strong") if not v.prompt.endswith("5") else "tie"})
    if db.is_sqlite:
        url = db.url.split(":///", 1)[1]
        assert main(["leaderboard", "--db", url, "--rounds", "r", "--resamples", "50", "--prior", "0.1"]) == 0
        printed = capsys.readouterr().out
        assert printed.index(" S ") < printed.index(" W ")  # the stronger model first
        assert main(["studio", "stats", "--db", url, "--round", "r"]) == 0
        assert "raw agreement" in capsys.readouterr().out
    got = round_comparisons(db, ["r"])
    assert got.count(Comparison("S", "W", "a")) + got.count(Comparison("W", "S", "b")) == 5
