"""What the admin pages show of a round's labels: the label distribution and the most disputed items.

Disagreement of one item among its n >= 2 labels, in [0, 1]:
- pairwise: 1 - (votes for the most common outcome) / n, outcomes being "this response better",
  "that response better", tie, both bad;
- ranking: the mean, over pairs of labels, of the fraction of response pairs the two order
  differently (a pair one label ties and the other orders counts half): Kendall's distance, normalised;
- rating: the mean over responses of the ratings' standard deviation, divided by 3 (the largest
  standard deviation two ratings on a 1-7 scale can have).
Annotator agreement statistics proper (kappas, alpha) belong to the agreement module.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from itertools import combinations

from sqlalchemy import select

from rufus.studio.db import (
    Assignment,
    Database,
    Exclusion,
    Item,
    Label,
    Prompt,
    Response,
    User,
    excluded_users,
)
from rufus.studio.rounds import get_round


def _position(ranking: list[list[int]]) -> dict[int, int]:
    return {int(rid): t for t, tier in enumerate(ranking) for rid in tier}


def _kendall(a: dict[int, int], b: dict[int, int]) -> float:
    pairs = list(combinations(sorted(a), 2))
    if not pairs:
        return 0.0
    total = 0.0
    for x, y in pairs:
        sa = (a[x] > a[y]) - (a[x] < a[y])
        sb = (b[x] > b[y]) - (b[x] < b[y])
        if sa != sb:
            total += 0.5 if sa == 0 or sb == 0 else 1.0
    return total / len(pairs)


def item_disagreement(task: str, labels: list[Label]) -> float:
    """Disagreement in [0, 1] among one item's labels (module docstring)."""
    n = len(labels)
    if n < 2:
        return 0.0
    if task == "pairwise":
        votes = Counter((lb.outcome, lb.winner_id) for lb in labels)
        return 1.0 - max(votes.values()) / n
    if task == "ranking":
        pos = [_position(lb.ranking) for lb in labels]
        return statistics.fmean(_kendall(a, b) for a, b in combinations(pos, 2))
    ids = list(labels[0].ratings)
    return statistics.fmean(statistics.pstdev([lb.ratings[r] for lb in labels]) for r in ids) / 3.0


def label_distribution(db: Database, round_name: str) -> dict:
    """Counts an admin reads at a glance: outcomes (and whether the first- or second-shown response
    won, for position bias), strengths, ties in rankings, the rating histogram, flags, better answers."""
    with db.read() as s:
        rnd = get_round(s, round_name)
        rows = s.execute(
            select(Label, Assignment.order)
            .join(Assignment, Assignment.id == Label.assignment_id)
            .where(Label.round_id == rnd.id)
        ).all()
    out: dict = {"labels": len(rows), "flags": Counter(), "better_answers": 0, "comments": 0}
    if rnd.task == "pairwise":
        out.update(outcomes=Counter(), shown_first_won=0, shown_second_won=0, strengths=Counter())
    elif rnd.task == "ranking":
        out.update(with_ties=0)
    else:
        out.update(ratings=Counter())
    for lb, order in rows:
        out["flags"].update(lb.flags or [])
        out["better_answers"] += bool(lb.better_answer)
        out["comments"] += bool(lb.comment)
        if rnd.task == "pairwise":
            out["outcomes"][lb.outcome] += 1
            if lb.outcome == "win":
                out["strengths"][lb.strength or "unspecified"] += 1
                out["shown_first_won" if lb.winner_id == order[0] else "shown_second_won"] += 1
        elif rnd.task == "ranking":
            out["with_ties"] += any(len(t) > 1 for t in lb.ranking)
        else:
            out["ratings"].update(lb.ratings.values())
    for key in ("flags", "outcomes", "strengths", "ratings"):
        if key in out:
            out[key] = dict(sorted(out[key].items(), key=lambda kv: str(kv[0])))
    return out


def disputed_items(db: Database, round_name: str, limit: int = 10) -> list[dict]:
    """The `limit` items with the highest disagreement (at least two labels), most disputed first."""
    with db.read() as s:
        rnd = get_round(s, round_name)
        by_item: dict[int, list[Label]] = defaultdict(list)
        for lb in s.scalars(select(Label).where(Label.round_id == rnd.id)):
            by_item[lb.item_id].append(lb)
        scored = sorted(
            (
                (item_disagreement(rnd.task, labels), item_id, len(labels))
                for item_id, labels in by_item.items()
                if len(labels) >= 2
            ),
            key=lambda t: (-t[0], t[1]),
        )
        out = []
        for score, item_id, n in scored[:limit]:
            if score <= 0:
                break
            prompt = s.scalar(select(Prompt.content).join(Item, Item.prompt_id == Prompt.id).where(Item.id == item_id))
            text = prompt if isinstance(prompt, str) else " / ".join(str(m.get("content", "")) for m in prompt)
            out.append(
                {
                    "item_id": item_id,
                    "disagreement": score,
                    "labels": n,
                    "prompt": text if len(text) <= 160 else text[:157] + "...",
                }
            )
        return out


# --- the studio's labels as input to the leaderboard and the agreement coefficients ----------------


def _labels_with_models(db: Database, round_names: list[str]):
    with db.read() as s:
        ids = []
        for name in round_names:
            ids.append(get_round(s, name).id)
        left_out = {
            (r, u)
            for r, u in s.execute(select(Exclusion.round_id, Exclusion.user_id).where(Exclusion.round_id.in_(ids)))
        }
        labels = [
            lb
            for lb in s.scalars(select(Label).where(Label.round_id.in_(ids)).order_by(Label.id))
            if (lb.round_id, lb.user_id) not in left_out
        ]
        items = {i.id: i for i in s.scalars(select(Item).where(Item.round_id.in_(ids)))}
        response_ids = {rid for i in items.values() for rid in i.response_ids}
        models = dict(s.execute(select(Response.id, Response.model).where(Response.id.in_(response_ids))).all())
    return labels, items, models


def round_comparisons(db: Database, round_names: list[str]):
    """Every model-vs-model comparison the rounds' labels make, in label order, as leaderboard
    Comparisons: a pairwise label is one (a tie or "both bad" is a tie); a ranking or rating label
    gives every pair of its responses from different models (equal ranks or ratings: a tie).
    Responses without a model name, or two from the same model, compare nothing here."""
    from rufus.studio.export import label_scores
    from rufus.studio.leaderboard import Comparison

    labels, items, models = _labels_with_models(db, round_names)
    out = []
    for lb in labels:
        ids = list(items[lb.item_id].response_ids)
        scores = label_scores(lb, ids) or {rid: 0.5 for rid in ids}  # both bad: a tie
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                ma, mb = models.get(a), models.get(b)
                if not ma or not mb or ma == mb:
                    continue
                winner = "tie" if scores[a] == scores[b] else ("a" if scores[a] > scores[b] else "b")
                out.append(Comparison(ma, mb, winner))
    return out


def round_agreement(db: Database, round_name: str) -> dict:
    """Agreement among a round's annotators (rufus.studio.agreement): raw agreement and Cohen's
    kappa per pair of annotators always; Fleiss' kappa for pairwise rounds (the outcome, with the
    responses in id order: first better, second better, tie, both bad); Krippendorff's alpha
    (ordinal) for ranking and rating rounds, each response of an item being a unit whose value is its
    rank (tier) or rating."""
    from rufus.studio import agreement as A

    with db.read() as s:
        rnd = get_round(s, round_name)
        left_out = excluded_users(s, rnd.id)
        labels = [lb for lb in s.scalars(select(Label).where(Label.round_id == rnd.id)) if lb.user_id not in left_out]
        items = {i.id: i for i in s.scalars(select(Item).where(Item.round_id == rnd.id))}
        names = dict(s.execute(select(User.id, User.name)).all())
    units: dict = defaultdict(dict)
    for lb in labels:
        who = names.get(lb.user_id, lb.user_id)
        ids = sorted(items[lb.item_id].response_ids)
        if rnd.task == "pairwise":
            value = lb.outcome if lb.outcome != "win" else ("first" if lb.winner_id == ids[0] else "second")
            units[lb.item_id][who] = value
        elif rnd.task == "ranking":
            for rid, tier in _position(lb.ranking).items():
                units[(lb.item_id, rid)][who] = tier
        else:
            for rid, value in lb.ratings.items():
                units[(lb.item_id, int(rid))][who] = value
    shared = sum(1 for by in units.values() if len(by) >= 2)
    out = {
        "round": round_name,
        "task": rnd.task,
        "labels": len(labels),
        "shared_units": shared,
        "raw_agreement": A.raw_agreement(units),
        "cohen": A.pairwise_cohen(units),
    }
    if rnd.task == "pairwise":
        out["fleiss_kappa"] = A.fleiss_kappa(units)
    else:
        out["krippendorff_alpha"] = A.krippendorff_alpha(units, "ordinal")
    return out
