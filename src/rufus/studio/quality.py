"""Annotator quality: agreement with the others, accuracy on gold items, warning flags, exclusions.

Every label is read as preferences between the pairs of responses it covers: for responses r, s of
its item, the sign of score(r) - score(s) (+1, -1, or 0 for a tie; "both bad" is a tie), with the
scores of `rufus.studio.export.label_scores` (a pairwise choice, Borda points of a ranking, ratings).
This one reading serves every task.

- **Agreement with the leave-one-out majority**: for each of an annotator's pairs, the majority sign
  of the *other* annotators' labels of that item (the sign of their sum; pairs where the others are
  split evenly are skipped). Matching scores 1, a tie against a preference 1/2, the opposite 0. The
  mean over pairs; chance is 1/2 for a coin-flipping annotator on pairwise items.
- **Gold accuracy**: the same score against the known answer of gold items.
- **Flags** (each needs enough evidence, `MIN_EVIDENCE` pairs or labels, and says why):
  - `below chance`: agreement or gold accuracy under 1/2 with a one-sided binomial p-value under
    0.05 (H0: a fair coin), i.e. systematically the other way round: careless or adversarial;
  - `same side`: in pairwise items, 90% or more of the decisive labels chose the response shown in
    the same position (first or second);
  - `too fast`: more than half of the labels were given in less time than it takes to read the item
    at `READING_WORDS_PER_SECOND` (a fast skim).
- **Exclusion**: an admin excludes an annotator from a round (`exclude`); exports, agreement and the
  leaderboard then leave that person's labels of the round out. `include` takes it back.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import delete, select

from rufus.studio.db import (
    Assignment,
    Database,
    Exclusion,
    Item,
    Label,
    Prompt,
    Response,
    StudioError,
    User,
    excluded_users,
    log_event,
)
from rufus.studio.rounds import get_round

MIN_EVIDENCE = 10
SAME_SIDE = 0.9
READING_WORDS_PER_SECOND = 8.0  # about 480 words a minute: skimming, not reading
ALPHA = 0.05


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _agree(mine: int, reference: int) -> float:
    """1 for the same preference, 1/2 when one side is a tie, 0 for opposite preferences."""
    if mine == reference:
        return 1.0
    return 0.5 if mine == 0 or reference == 0 else 0.0


def binomial_tail_below(k: float, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p): how likely so few agreements are from a fair coin."""
    k = math.floor(k)
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


@dataclass
class AnnotatorQuality:
    annotator: str
    labels: int
    agreement: float | None  # with the leave-one-out majority
    agreement_pairs: int
    gold_accuracy: float | None
    gold_pairs: int
    shown_first_rate: float | None  # pairwise: share of decisive labels won by the response shown first
    too_fast_rate: float | None
    median_seconds: float | None
    excluded: bool
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _words(content) -> int:
    if isinstance(content, str):
        return len(content.split())
    return sum(len(str(m.get("content", "")).split()) for m in content)


def annotator_quality(db: Database, round_name: str) -> list[AnnotatorQuality]:
    """Each annotator's figures and flags in the round (module docstring)."""
    from rufus.studio.export import label_scores

    with db.read() as s:
        rnd = get_round(s, round_name)
        labels = list(s.scalars(select(Label).where(Label.round_id == rnd.id)))
        items = {i.id: i for i in s.scalars(select(Item).where(Item.round_id == rnd.id))}
        names = dict(s.execute(select(User.id, User.name)).all())
        shown = dict(s.execute(select(Assignment.id, Assignment.order).where(Assignment.round_id == rnd.id)).all())
        excluded = excluded_users(s, rnd.id)
        words = {}
        for (
            item_id,
            prompt,
        ) in s.execute(
            select(Item.id, Prompt.content).join(Prompt, Prompt.id == Item.prompt_id).where(Item.round_id == rnd.id)
        ).all():
            words[item_id] = _words(prompt)
        response_words = {
            r.id: _words(r.content)
            for r in s.scalars(
                select(Response).join(Prompt, Prompt.id == Response.prompt_id).where(Prompt.round_id == rnd.id)
            )
        }

    # signs[item][user][(r, s)] for r < s
    signs: dict[int, dict[int, dict[tuple[int, int], int]]] = defaultdict(dict)
    for lb in labels:
        ids = sorted(items[lb.item_id].response_ids)
        scores = label_scores(lb, ids) or {rid: 0.0 for rid in ids}
        signs[lb.item_id][lb.user_id] = {
            (a, b): _sign(scores[a] - scores[b]) for i, a in enumerate(ids) for b in ids[i + 1 :]
        }

    out = []
    for uid in sorted({lb.user_id for lb in labels}, key=lambda u: str(names.get(u, u))):
        mine = [lb for lb in labels if lb.user_id == uid]
        agree, gold = [], []
        for lb in mine:
            item = items[lb.item_id]
            for pair, sign in signs[lb.item_id][uid].items():
                if item.gold:
                    known = item.gold["scores"]
                    gold.append(_agree(sign, _sign(known[str(pair[0])] - known[str(pair[1])])))
                    continue
                others = sum(v[pair] for u, v in signs[lb.item_id].items() if u != uid and u not in excluded)
                if _sign(others) != 0:
                    agree.append(_agree(sign, _sign(others)))
        decisive = [lb for lb in mine if lb.task == "pairwise" and lb.outcome == "win"]
        first = sum(lb.winner_id == shown[lb.assignment_id][0] for lb in decisive) / len(decisive) if decisive else None
        fast = [
            lb.duration_s
            < (words[lb.item_id] + sum(response_words[r] for r in items[lb.item_id].response_ids))
            / READING_WORDS_PER_SECOND
            for lb in mine
        ]
        q = AnnotatorQuality(
            annotator=str(names.get(uid, uid)),
            labels=len(mine),
            agreement=statistics.fmean(agree) if agree else None,
            agreement_pairs=len(agree),
            gold_accuracy=statistics.fmean(gold) if gold else None,
            gold_pairs=len(gold),
            shown_first_rate=first,
            too_fast_rate=sum(fast) / len(fast) if fast else None,
            median_seconds=statistics.median(lb.duration_s for lb in mine) if mine else None,
            excluded=uid in excluded,
        )
        for what, scores in (("agreement with the others", agree), ("gold accuracy", gold)):
            if len(scores) >= MIN_EVIDENCE and statistics.fmean(scores) < 0.5:
                p = binomial_tail_below(sum(scores), len(scores))
                if p < ALPHA:
                    q.flags.append(
                        f"below chance: {what} {statistics.fmean(scores):.2f} over {len(scores)} pairs "
                        f"(p = {p:.3g} for a coin)"
                    )
        if len(decisive) >= MIN_EVIDENCE and first is not None and max(first, 1 - first) >= SAME_SIDE:
            side = "first" if first >= 0.5 else "second"
            q.flags.append(
                f"same side: the response shown {side} won {max(first, 1 - first):.0%} of {len(decisive)} choices"
            )
        if len(fast) >= MIN_EVIDENCE // 2 and q.too_fast_rate > 0.5:
            q.flags.append(
                f"too fast: {q.too_fast_rate:.0%} of labels in less than the reading time "
                f"({READING_WORDS_PER_SECOND:g} words/s)"
            )
        out.append(q)
    return out


def exclude(db: Database, round_name: str, annotator: str, reason: str = "") -> None:
    """Leave `annotator`'s labels of the round out of its exports, agreement and leaderboard."""
    with db.session() as s:
        rnd = get_round(s, round_name)
        user = s.scalar(select(User).where(User.name == annotator))
        if user is None:
            raise StudioError(f"no annotator named {annotator!r}")
        if s.get(Exclusion, (rnd.id, user.id)) is None:
            s.add(Exclusion(round_id=rnd.id, user_id=user.id, reason=reason))
        log_event(s, "exclude", None, round=round_name, annotator=annotator, reason=reason)


def include(db: Database, round_name: str, annotator: str) -> None:
    """Take an exclusion back."""
    with db.session() as s:
        rnd = get_round(s, round_name)
        user = s.scalar(select(User).where(User.name == annotator))
        if user is None:
            raise StudioError(f"no annotator named {annotator!r}")
        s.execute(delete(Exclusion).where(Exclusion.round_id == rnd.id, Exclusion.user_id == user.id))
        log_event(s, "include", None, round=round_name, annotator=annotator)
