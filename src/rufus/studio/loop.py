"""The studio as the source of a training loop's labels: a round per collect step, its progress,
and what is done with it once the labels are in.

`rufus pipeline collect.source=studio` uses these: it finds the round it created for a collect step
(by the step's fingerprint, kept in the round's `source`), or creates it; reads how many of the
round's labels are in; and, when the round is complete, applies the admin's exclusions (or, when
asked, excludes annotators who are flagged below chance) before exporting. Nothing here knows
about the pipeline; the pipeline knows these few calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from rufus.studio.db import Database, Exclusion, Item, Label, Round, User
from rufus.studio.rounds import get_round


@dataclass
class Progress:
    """How far a round is: labels counted up to the quota of each (non-gold) item."""

    round: str
    status: str
    items: int
    labels_per_item: int
    labels: int
    wanted: int
    complete_items: int

    @property
    def done(self) -> bool:
        return self.items > 0 and self.complete_items >= self.items

    @property
    def finished(self) -> bool:
        """Done, or closed by an admin with some labels in (what is there is what there will be)."""
        return self.done or (self.status == "closed" and self.labels > 0)

    def line(self) -> str:
        return f"round {self.round!r} {self.status}: {self.labels}/{self.wanted} labels"


def find_round(db: Database, name: str, fingerprint: str) -> str | None:
    """The round made for `fingerprint`: named `name`, or `name (fingerprint[:6])` where `name`
    was taken by a round made for different settings; None when neither exists yet."""
    with db.read() as s:
        for candidate in (name, _variant(name, fingerprint)):
            rnd = s.scalar(select(Round).where(Round.name == candidate))
            if rnd is not None and (rnd.source or {}).get("fingerprint") == fingerprint:
                return candidate
    return None


def free_name(db: Database, name: str, fingerprint: str) -> str:
    """`name` if no round has it, else its variant for `fingerprint` (see find_round)."""
    with db.read() as s:
        taken = s.scalar(select(Round.id).where(Round.name == name)) is not None
    return _variant(name, fingerprint) if taken else name


def _variant(name: str, fingerprint: str) -> str:
    return f"{name} ({fingerprint[:6]})"


def progress(db: Database, name: str) -> Progress:
    with db.read() as s:
        rnd = get_round(s, name)
        items = list(s.scalars(select(Item.id).where(Item.round_id == rnd.id, Item.gold.is_(None))))
        counts = dict(
            s.execute(select(Label.item_id, func.count()).where(Label.round_id == rnd.id).group_by(Label.item_id)).all()
        )
        quota = rnd.labels_per_item
        labels = sum(min(counts.get(i, 0), quota) for i in items)
        complete = sum(counts.get(i, 0) >= quota for i in items)
        return Progress(rnd.name, rnd.status, len(items), quota, labels, len(items) * quota, complete)


def excluded_names(db: Database, name: str) -> list[str]:
    """The annotators whose labels of the round are left out, by name."""
    with db.read() as s:
        rnd = get_round(s, name)
        return sorted(
            s.scalars(
                select(User.name).join(Exclusion, Exclusion.user_id == User.id).where(Exclusion.round_id == rnd.id)
            )
        )


def exclude_below_chance(db: Database, name: str) -> list[str]:
    """Exclude the annotators flagged below chance in the round (their agreement with the others'
    majority, or their gold accuracy, significantly under a coin's); return their names.

    One at a time, the surest case first (the smallest p-value for a coin), and the figures
    recomputed after each: an honest annotator who shared many items with an adversarial one can
    look below chance while the adversary's labels still make up "the others' majority", and stops
    looking so once they are left out."""
    from rufus.studio.quality import annotator_quality, binomial_tail_below, exclude

    def evidence(q) -> float:  # the smaller p-value of the two figures for a coin: lower = surer
        return min(
            [
                binomial_tail_below(rate * n, n)
                for rate, n in ((q.agreement, q.agreement_pairs), (q.gold_accuracy, q.gold_pairs))
                if rate is not None
            ]
            or [1.0]
        )

    out = []
    while True:
        flagged = [
            (evidence(q), q.annotator, below)
            for q in annotator_quality(db, name)
            if not q.excluded
            for below in [[f for f in q.flags if f.startswith("below chance")]]
            if below
        ]
        if not flagged:
            return out
        _, who, below = min(flagged)
        exclude(db, name, who, reason="flagged by the pipeline: " + "; ".join(below))
        out.append(who)


def round_figures(db: Database, name: str) -> dict:
    """Progress, agreement and each annotator's quality figures, as plain data (for reports)."""
    from rufus.studio.quality import annotator_quality
    from rufus.studio.stats import round_agreement

    p = progress(db, name)
    return {
        "round": name,
        "labels": p.labels,
        "items": p.items,
        "labels_per_item": p.labels_per_item,
        "agreement": round_agreement(db, name),
        "annotators": [q.as_dict() for q in annotator_quality(db, name)],
    }
