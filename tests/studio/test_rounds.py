"""Rounds: items from candidates, assignment (no repeats, labels_per_item, skip, undo, stale claims),
label parsing into response ids, progress."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import func, select

from rufus.studio import rounds as R
from rufus.studio.db import Assignment, Item, Label, Response, StudioError
from tests.studio.conftest import add_people, pairwise_candidates


def items_of(db, name):
    with db.session() as s:
        rnd = R.get_round(s, name)
        return list(s.scalars(select(Item).where(Item.round_id == rnd.id).order_by(Item.position)))


def texts(db, ids):
    with db.session() as s:
        return [s.get(Response, i).content for i in ids]


def label_all(db, uid, name, choose):
    """Label everything the round offers `uid`; `choose(view) -> form`. Returns the labelled assignments."""
    done = []
    while (aid := R.next_assignment(db, uid, name)) is not None:
        R.submit_label(db, uid, aid, choose(R.view_assignment(db, uid, aid)))
        done.append(aid)
    return done


def test_pairwise_items_are_every_distinct_pair_and_duplicates_show_once(db):
    cands = [
        R.Candidate("p0", ["x", "y", "z"], ["m1", "m2", "m1"]),
        R.Candidate("p1", ["same", "same"], ["m1", "m2"]),  # nothing to compare: no item
        R.Candidate("p2", ["a", "b", "a"], ["m1", "m2", "m3"]),
    ]  # "a" twice: shown once
    summary = R.create_round(db, "all", "pairwise", cands)
    assert summary["items"] == 3 + 1 and summary["skipped_prompts"] == 1
    pairs = [sorted(texts(db, it.response_ids)) for it in items_of(db, "all")]
    assert pairs == [["x", "y"], ["x", "z"], ["y", "z"], ["a", "b"]]
    R.create_round(db, "models", "pairwise", cands, pairs="models")  # x and z are both m1's
    assert [sorted(texts(db, it.response_ids)) for it in items_of(db, "models")] == [["x", "y"], ["y", "z"], ["a", "b"]]


def test_ranking_and_rating_items_hold_all_distinct_responses(db):
    cands = [R.Candidate("p", ["a", "b", "c", "b"])]
    R.create_round(db, "rank", "ranking", cands)
    (item,) = items_of(db, "rank")
    assert texts(db, item.response_ids) == ["a", "b", "c"]


def test_round_creation_errors(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(1))
    with pytest.raises(StudioError, match="already a round"):
        R.create_round(db, "r", "pairwise", pairwise_candidates(1))
    with pytest.raises(StudioError, match="task must be"):
        R.create_round(db, "x", "poll", pairwise_candidates(1))
    with pytest.raises(StudioError, match="no items"):
        R.create_round(db, "y", "pairwise", [R.Candidate("p", ["a", "a"])])
    with pytest.raises(StudioError, match="labels_per_item"):
        R.create_round(db, "z", "pairwise", pairwise_candidates(1), labels_per_item=0)
    with pytest.raises(StudioError, match="no round"), db.session() as s:
        R.get_round(s, "y")  # the failed round left nothing behind


def test_every_item_gets_labels_per_item_labels_from_different_people(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(10), labels_per_item=2)
    people = add_people(db, "a", "b", "c")
    for uid, _ in people.values():
        label_all(db, uid, "r", lambda v: {"choice": "A"})
    with db.session() as s:
        rows = s.execute(select(Label.item_id, Label.user_id)).all()
    assert len(rows) == 10 * 2 and len(set(rows)) == len(rows)  # nobody labelled an item twice
    assert set(Counter(item for item, _ in rows).values()) == {2}
    # one after the other: a and b label every item, nothing is left for c
    assert sorted(Counter(u for _, u in rows).values()) == [10, 10]


def test_interleaved_annotators_share_items_depth_first(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(3), labels_per_item=2)
    people = add_people(db, "a", "b")
    (ua, _), (ub, _) = people["a"], people["b"]
    a1 = R.next_assignment(db, ua, "r")
    R.submit_label(db, ua, a1, {"choice": "A"})
    b1 = R.next_assignment(db, ub, "r")
    with db.session() as s:  # b is given the item a just labelled: it completes first
        assert s.get(Assignment, b1).item_id == s.get(Assignment, a1).item_id


def test_a_returning_annotator_gets_their_open_item_back(db, pairwise_round):
    ((uid, _),) = add_people(db, "a").values()
    first = R.next_assignment(db, uid, pairwise_round)
    assert R.next_assignment(db, uid, pairwise_round) == first


def test_order_is_random_per_annotator_and_stored(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(40), labels_per_item=1)
    ((uid, _),) = add_people(db, "a").values()
    shown_first = Counter()
    while (aid := R.next_assignment(db, uid, "r")) is not None:
        view = R.view_assignment(db, uid, aid)
        shown_first[view.responses[0][1].endswith("m1")] += 1
        with db.session() as s:
            a = s.get(Assignment, aid)
            assert sorted(a.order) == sorted(s.get(Item, a.item_id).response_ids)
        R.submit_label(db, uid, aid, {"choice": "A"})
    # 40 fair coin flips: both orders appear (all on one side has probability 2 * 2^-40)
    assert shown_first[True] > 0 and shown_first[False] > 0


def test_labels_are_stored_in_response_ids_whatever_the_order(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(20))
    ((uid, _),) = add_people(db, "a").values()
    # an annotator who always prefers the m2 answer, wherever it is shown
    label_all(db, uid, "r", lambda v: {"choice": "A" if v.responses[0][1].endswith("m2") else "B"})
    with db.session() as s:
        winners = [s.get(Response, lb.winner_id) for lb in s.scalars(select(Label))]
    assert len(winners) == 20 and {w.model for w in winners} == {"model-two"}


def test_skip_goes_to_someone_else_and_never_back(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(1))
    people = add_people(db, "a", "b")
    (ua, _), (ub, _) = people["a"], people["b"]
    aid = R.next_assignment(db, ua, "r")
    R.skip(db, ua, aid)
    assert R.next_assignment(db, ua, "r") is None
    bid = R.next_assignment(db, ub, "r")
    assert bid is not None and bid != aid
    with pytest.raises(R.Conflict):
        R.skip(db, ua, aid)  # twice
    with pytest.raises(R.Conflict):
        R.submit_label(db, ua, aid, {"choice": "A"})


def test_undo_removes_the_last_label_and_reopens_its_item(db, pairwise_round):
    ((uid, _),) = add_people(db, "a").values()
    with pytest.raises(R.Conflict, match="no label"):
        R.undo_last(db, uid)
    first = R.next_assignment(db, uid, pairwise_round)
    R.submit_label(db, uid, first, {"choice": "A"})
    second = R.next_assignment(db, uid, pairwise_round)
    R.submit_label(db, uid, second, {"choice": "B"})
    third = R.next_assignment(db, uid, pairwise_round)  # claimed, then the person undoes
    assert R.undo_last(db, uid) == second
    assert R.next_assignment(db, uid, pairwise_round) == second  # the undone item comes back first
    R.submit_label(db, uid, second, {"choice": "tie"})
    with db.session() as s:
        labels = {lb.assignment_id: lb.outcome for lb in s.scalars(select(Label))}
        assert s.get(Assignment, third) is None  # the item claimed before the undo went back to the pool
    assert labels == {first: "win", second: "tie"}


def test_an_abandoned_claim_stops_blocking_others(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(1), labels_per_item=1)
    people = add_people(db, "a", "b")
    (ua, _), (ub, _) = people["a"], people["b"]
    R.next_assignment(db, ua, "r", now=1000.0)
    assert R.next_assignment(db, ub, "r", now=1000.0 + 60) is None  # a is working on it
    assert R.next_assignment(db, ub, "r", now=1000.0 + R.CLAIM_SECONDS + 1) is not None


def test_a_stale_claim_is_not_handed_back_once_others_completed_the_item(db):
    R.create_round(db, "r", "pairwise", pairwise_candidates(1), labels_per_item=2)
    people = add_people(db, "x", "y", "z")
    ux, uy, uz = (people[n][0] for n in "xyz")
    R.next_assignment(db, ux, "r", now=0.0)  # x opens the item and walks away
    later = R.CLAIM_SECONDS + 1
    for u in (uy, uz):
        R.submit_label(db, u, R.next_assignment(db, u, "r", now=later), {"choice": "A"}, now=later)
    assert R.next_assignment(db, ux, "r", now=later + 1) is None  # complete: x's old claim is dropped
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 2
        assert s.scalar(select(func.count()).select_from(Assignment).where(Assignment.user_id == ux)) == 0


def test_bad_submissions_change_nothing(db, pairwise_round):
    people = add_people(db, "a", "b")
    (ua, _), (ub, _) = people["a"], people["b"]
    aid = R.next_assignment(db, ua, pairwise_round)
    with pytest.raises(R.NotFound):
        R.submit_label(db, ub, aid, {"choice": "A"})  # someone else's
    with pytest.raises(R.LabelError):
        R.submit_label(db, ua, aid, {"choice": "C"})
    with pytest.raises(R.NotFound):
        R.submit_label(db, ua, 10**6, {"choice": "A"})
    R.submit_label(db, ua, aid, {"choice": "A"})
    with pytest.raises(R.Conflict):
        R.submit_label(db, ua, aid, {"choice": "B"})
    R.set_round_status(db, pairwise_round, "closed")
    with pytest.raises(R.Conflict, match="closed"):
        R.next_assignment(db, ub, pairwise_round)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 1
        assert s.scalar(select(Label.outcome)) == "win"


def test_members_only_see_their_rounds(db):
    R.create_round(db, "one", "pairwise", pairwise_candidates(1))
    R.create_round(db, "two", "pairwise", pairwise_candidates(1))
    people = add_people(db, "a", "b")
    with db.session() as s:
        from rufus.studio.db import User

        a = s.get(User, people["a"][0])
        R.add_member(s, a, R.get_round(s, "two"))
    with db.session() as s:
        a, b = s.get(User, people["a"][0]), s.get(User, people["b"][0])
        assert [r.name for r in R.rounds_for(s, a)] == ["two"]
        assert [r.name for r in R.rounds_for(s, b)] == ["one", "two"]
    with pytest.raises(R.NotFound):
        R.next_assignment(db, people["a"][0], "one")


# --- parse_label: forms -> columns in response ids -------------------------------------------------


def test_parse_pairwise():
    order = [11, 7]  # shown as A = 11, B = 7
    assert R.parse_label("pairwise", {"choice": "B", "strength": "much"}, order)["winner_id"] == 7
    out = R.parse_label("pairwise", {"choice": "A", "strength": ""}, order)
    assert (out["outcome"], out["winner_id"], out["strength"]) == ("win", 11, None)
    assert R.parse_label("pairwise", {"choice": "both_bad"}, order)["outcome"] == "both_bad"
    for bad, match in (
        ({}, "choice"),
        ({"choice": "tie", "strength": "much"}, "strength goes with"),
        ({"choice": "A", "strength": "huge"}, "strength"),
        ({"choice": ["A", "B"]}, "2 times"),
        ({"choice": "A", "flag": ["harmful", "rude"]}, "unknown flag"),
        ({"choice": "A", "comment": "x" * (R.MAX_TEXT + 1)}, "longer"),
    ):
        with pytest.raises(R.LabelError, match=match):
            R.parse_label("pairwise", bad, order)


def test_parse_ranking_with_ties():
    order = [5, 6, 7, 8]  # A..D
    out = R.parse_label("ranking", {"rank_A": "2", "rank_B": "1", "rank_C": "2", "rank_D": "4"}, order)
    assert out["ranking"] == [[6], [5, 7], [8]]
    for form, match in (
        ({"rank_A": "1", "rank_B": "2", "rank_C": "3"}, "response D has no rank"),
        ({"rank_A": "1", "rank_B": "2", "rank_C": "3", "rank_D": "5"}, "between 1 and 4"),
        ({"rank_A": "1", "rank_B": "2", "rank_C": "3", "rank_D": "x"}, "whole number"),
    ):
        with pytest.raises(R.LabelError, match=match):
            R.parse_label("ranking", form, order)


def test_parse_rating_and_extras():
    out = R.parse_label(
        "rating",
        {"rating_A": "7", "rating_B": "1", "better_answer": "  better  ", "flag": ["wrong", "harmful", "wrong"]},
        [3, 9],
    )
    assert out["ratings"] == {"3": 7, "9": 1} and out["better_answer"] == "better"
    assert out["flags"] == ["harmful", "wrong"]
    with pytest.raises(R.LabelError, match="between 1 and 7"):
        R.parse_label("rating", {"rating_A": "8", "rating_B": "1"}, [3, 9])
    with pytest.raises(R.LabelError, match="no rating"):
        R.parse_label("rating", {"rating_A": "2"}, [3, 9])


def test_progress_counts_and_medians(db, pairwise_round):
    ((uid, _),) = add_people(db, "a").values()
    aid = R.next_assignment(db, uid, pairwise_round, now=100.0)
    R.submit_label(db, uid, aid, {"choice": "A"}, now=104.0)
    bid = R.next_assignment(db, uid, pairwise_round, now=104.0)
    R.submit_label(db, uid, bid, {"choice": "A"}, now=110.0)
    R.skip(db, uid, R.next_assignment(db, uid, pairwise_round, now=110.0))
    with db.session() as s:
        p = R.round_progress(s, R.get_round(s, pairwise_round))
    assert (p["items"], p["labels"], p["labels_wanted"], p["complete_items"]) == (4, 2, 8, 0)
    assert p["annotators"] == [{"annotator": "a", "labels": 2, "skipped": 1, "median_seconds": 5.0}]
