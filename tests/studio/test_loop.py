"""The studio as a training loop's label source (rufus.studio.loop): progress counted up to each
item's quota, rounds found again by fingerprint, and below-chance annotators excluded one at a time."""

from __future__ import annotations

import pytest

from rufus.studio import loop
from rufus.studio import rounds as R
from rufus.studio.db import StudioError
from tests.studio.conftest import add_people
from tests.studio.test_quality import adversarial, clear_round, honest


def work(db, uid, name, decide, limit):
    t = 1_000.0
    for _ in range(limit):
        aid = R.next_assignment(db, uid, name, now=t)
        if aid is None:
            return
        R.submit_label(db, uid, aid, decide(R.view_assignment(db, uid, aid)), now=t + 30)
        t += 31


def test_progress_counts_labels_up_to_the_quota_and_leaves_gold_items_out(db):
    gold = [R.Candidate("g", ["good g", "bad g"], [], gold=[1.0, 0.0])]
    R.create_round(db, "r", "pairwise", clear_round(3), labels_per_item=2, gold=gold)
    people = add_people(db, "a", "b", "c")
    p = loop.progress(db, "r")
    assert (p.items, p.labels, p.wanted, p.complete_items, p.done, p.finished) == (3, 0, 6, 0, False, False)
    assert p.line() == "round 'r' open: 0/6 labels"
    work(db, people["a"][0], "r", honest, 10)  # every item once, and the gold item (not counted)
    p = loop.progress(db, "r")
    assert (p.labels, p.complete_items, p.done) == (3, 0, False)
    work(db, people["b"][0], "r", honest, 1)
    assert (loop.progress(db, "r").labels, loop.progress(db, "r").complete_items) == (4, 1)
    R.set_round_status(db, "r", "closed")  # an admin who stops the round: what is in is what there is
    p = loop.progress(db, "r")
    assert not p.done and p.finished
    R.set_round_status(db, "r", "open")
    work(db, people["b"][0], "r", honest, 10)
    work(db, people["c"][0], "r", honest, 10)  # nothing left to complete: the gold item only
    p = loop.progress(db, "r")
    assert (p.labels, p.complete_items, p.done) == (6, 3, True)


def test_a_round_is_found_again_by_its_fingerprint(db):
    assert loop.find_round(db, "run round 1", "a" * 16) is None
    assert loop.free_name(db, "run round 1", "a" * 16) == "run round 1"
    R.create_round(db, "run round 1", "pairwise", clear_round(2), source={"fingerprint": "a" * 16})
    assert loop.find_round(db, "run round 1", "a" * 16) == "run round 1"
    # other settings: the name is taken, so the round for them gets the fingerprint's variant
    assert loop.find_round(db, "run round 1", "b" * 16) is None
    name = loop.free_name(db, "run round 1", "b" * 16)
    assert name == "run round 1 (bbbbbb)"
    R.create_round(db, name, "pairwise", clear_round(2), source={"fingerprint": "b" * 16})
    assert loop.find_round(db, "run round 1", "b" * 16) == name
    assert loop.find_round(db, "run round 1", "a" * 16) == "run round 1"
    with pytest.raises(StudioError):
        loop.progress(db, "no such round")


def test_below_chance_exclusion_takes_the_adversary_and_spares_their_partner(db):
    """h3 labels only items that the adversary labels too, so while the adversary counts, h3's
    "others' majority" is the adversary's reversed answers and h3 looks below chance as well. The
    adversary, who also disagrees with h1, is the surer case; once they are out, h3 is not flagged."""
    R.create_round(db, "r", "pairwise", clear_round(30), labels_per_item=2)
    people = {k: v[0] for k, v in add_people(db, "h1", "h2", "h3", "adv").items()}
    work(db, people["h1"], "r", honest, 12)  # items 0-11
    work(db, people["h2"], "r", honest, 12)  # completes 0-11
    work(db, people["h3"], "r", honest, 12)  # items 12-23
    work(db, people["adv"], "r", adversarial, 18)  # completes 12-23, starts 24-29
    work(db, people["h1"], "r", honest, 6)  # completes 24-29
    assert loop.progress(db, "r").done
    from rufus.studio.quality import annotator_quality

    before = {q.annotator: q for q in annotator_quality(db, "r")}
    assert any(f.startswith("below chance") for f in before["h3"].flags)
    assert any(f.startswith("below chance") for f in before["adv"].flags)
    assert loop.exclude_below_chance(db, "r") == ["adv"]
    assert loop.excluded_names(db, "r") == ["adv"]
    after = {q.annotator: q for q in annotator_quality(db, "r")}
    assert not any(f.startswith("below chance") for f in after["h3"].flags)
    assert loop.exclude_below_chance(db, "r") == []  # nothing more to do
    figures = loop.round_figures(db, "r")
    assert figures["labels"] == 60 and figures["agreement"]["task"] == "pairwise"
    assert {a["annotator"] for a in figures["annotators"] if a["excluded"]} == {"adv"}
