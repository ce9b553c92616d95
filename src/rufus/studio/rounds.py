"""Rounds: building one from prompts and responses, handing items to annotators, taking their labels.

A round holds prompts, each with candidate responses (from one model or several), and items: what one
label is about.

- pairwise: one item per pair of distinct responses of a prompt (`pairs="all"`), or only pairs whose
  responses come from different models (`pairs="models"`, for comparing checkpoints);
  the label is A better / B better / tie / both bad, with an optional strength (slightly / much);
- ranking: one item per prompt with all its distinct responses, ordered best first, ties allowed;
- rating: one item per prompt, each response rated 1-7.

Any task may carry a better answer written by the annotator (an SFT demonstration), a comment and
flags (harmful, factually wrong). Identical responses (two models writing the same text) are kept
with their provenance but shown once.

Assignment (`next_assignment`). An item is open to an annotator who has never been given it while
fewer than `labels_per_item` people hold it (labelled, or working on it right now, claimed less
than `CLAIM_SECONDS` ago). Among the open items the ones closest to complete come first, then file
order: every item gets all its labels before new items are started, so a round stopped early holds
complete items, and the annotators' work interleaves on the same items, which is what agreement
statistics need. An annotator who comes back gets their unfinished item first. Skipped items go
back to the others and never return to the one who skipped. Each annotator sees the responses of an
item in their own random order (stored with the assignment); labels are stored in terms of
response ids, so the order never leaks into the data.

Every change happens in one database transaction that is committed before the caller answers: a
label acknowledged to the browser is on disk.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from rufus.data.formats import canonical
from rufus.studio.db import (
    TASKS,
    Assignment,
    Database,
    Item,
    Label,
    Prompt,
    Response,
    Round,
    RoundMember,
    StudioError,
    User,
    log_event,
)

log = logging.getLogger(__name__)

CLAIM_SECONDS = 3600.0  # an unfinished item stops blocking others after this long
RATING_SCALE = (1, 7)
FLAGS = ("harmful", "wrong")  # harmful; factually wrong
STRENGTHS = ("slightly", "much")
PAIRWISE_CHOICES = ("A", "B", "tie", "both_bad")
MAX_TEXT = 20_000  # longest better answer / comment accepted
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class LabelError(StudioError):
    """A submitted label that is malformed or incomplete (HTTP 400)."""


class Conflict(StudioError):
    """A request that is well-formed but not possible now (HTTP 409): a second submission, a closed round."""


class NotFound(StudioError):
    """An unknown round, item or assignment, or one that is not this person's (HTTP 404)."""


# --- building a round ---------------------------------------------------------------------------


@dataclass
class Candidate:
    """One prompt and its responses, before they are stored."""

    prompt: Any  # str or a message list
    responses: list[Any]  # str, or lists of assistant turns
    models: list[str | None] = field(default_factory=list)  # one per response (None = unknown)
    samples: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    gold: list[float] | None = None  # a gold prompt: the known score of each response (higher = better)


def create_round(
    db: Database,
    name: str,
    task: str,
    candidates: list[Candidate],
    *,
    labels_per_item: int = 1,
    pairs: str = "all",
    instructions: str = "",
    source: dict | None = None,
    gold: list[Candidate] | None = None,
) -> dict:
    """Store a new round; return a summary (items, gold items, prompts, skipped prompts).

    `gold` candidates carry known answers (`Candidate.gold`): their items are spread evenly among the
    others, shown like any item, offered to every annotator (not capped by `labels_per_item`), left
    out of training exports, and scored by `rufus.studio.quality` as each annotator's accuracy.
    """
    name = name.strip()
    if not name:
        raise StudioError("a round needs a non-empty name")
    if len(name) > 200:
        raise StudioError("round names are at most 200 characters")
    if "/" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise StudioError(f"round names cannot contain slashes or control characters: {name!r}")
    if task not in TASKS:
        raise StudioError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if labels_per_item < 1:
        raise StudioError(f"labels_per_item must be at least 1, got {labels_per_item}")
    if pairs not in ("all", "models"):
        raise StudioError(f"pairs must be all or models, not {pairs!r}")
    if not candidates:
        raise StudioError("no prompts to build the round from")
    for k, cand in enumerate(gold or []):
        if cand.gold is None or len(cand.gold) != len(cand.responses):
            raise StudioError(f"gold prompt {k}: needs one known score per response")
    with db.session() as s:
        if s.scalar(select(Round.id).where(Round.name == name)) is not None:
            raise StudioError(f"there is already a round named {name!r}")
        rnd = Round(
            name=name,
            task=task,
            labels_per_item=labels_per_item,
            status="open",
            instructions=instructions,
            source=source or {},
            created_at=time.time(),
        )
        s.add(rnd)
        s.flush()
        specs, gold_specs, skipped = [], [], 0  # (prompt id, response ids, gold answer)
        for position, cand in enumerate(list(candidates) + list(gold or [])):
            is_gold = position >= len(candidates)
            prompt = Prompt(
                round_id=rnd.id,
                position=position,
                content=cand.prompt,
                extra={**(cand.extra or {}), **({"gold": True} if is_gold else {})},
            )
            s.add(prompt)
            s.flush()
            models = cand.models or [None] * len(cand.responses)
            samples = cand.samples or [0] * len(cand.responses)
            rows = [
                Response(prompt_id=prompt.id, position=j, content=c, model=m, sample=k)
                for j, (c, m, k) in enumerate(zip(cand.responses, models, samples))
            ]
            s.add_all(rows)
            s.flush()
            known = {r.id: float(g) for r, g in zip(rows, cand.gold)} if is_gold else None
            distinct, seen = [], set()
            for r in rows:  # identical texts are shown once (the first keeps the item's place)
                key = canonical(r.content)
                if key not in seen:
                    seen.add(key)
                    distinct.append(r)
            if len(distinct) < 2:
                skipped += 1
                continue
            if task == "pairwise":
                groups = [
                    [a.id, b.id]
                    for i, a in enumerate(distinct)
                    for b in distinct[i + 1 :]
                    if pairs == "all" or is_gold or a.model != b.model
                ]
            else:
                groups = [[r.id for r in distinct]]
            for ids in groups:
                answer = {"scores": {str(rid): known[rid] for rid in ids}} if known else None
                (gold_specs if known else specs).append((prompt.id, ids, answer))
        if not specs:
            raise StudioError(
                f"round {name!r} has no items: no prompt has two different responses"
                + (" from different models" if pairs == "models" else "")
            )
        # gold items spread evenly through the round, so they are met all along the way
        ordered, every = list(specs), (len(specs) + len(gold_specs)) / max(len(gold_specs), 1)
        for k, spec in enumerate(gold_specs):
            ordered.insert(min(len(ordered), int((k + 0.5) * every)), spec)
        for position, (prompt_id, ids, answer) in enumerate(ordered):
            s.add(Item(round_id=rnd.id, prompt_id=prompt_id, response_ids=ids, position=position, gold=answer))
        items = len(specs)
        log_event(
            s, "round_created", None, round=name, task=task, items=items, gold=len(gold_specs), prompts=len(candidates)
        )
    if skipped:
        log.warning(
            "round %s: %d of %d prompts have fewer than two different responses and get no item",
            name,
            skipped,
            len(candidates) + len(gold or []),
        )
    return {
        "round": name,
        "task": task,
        "prompts": len(candidates),
        "items": items,
        "gold_items": len(gold_specs),
        "skipped_prompts": skipped,
        "labels_per_item": labels_per_item,
    }


def candidates_from_rows(rows: list[dict], where) -> list[Candidate]:
    """Candidates from rows with `prompt`, a `responses` list and optionally `models` (one name per
    response); `where(i)` names row i in errors. Prompts were validated by the prompt format."""
    from rufus.data.errors import DataError, describe

    out = []
    for i, row in enumerate(rows):
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(
                f"expected a list of at least 2 responses, got {describe(responses)}", where=where(i), field="responses"
            )
        for j, r in enumerate(responses):
            ok = (isinstance(r, str) and r.strip()) or (
                isinstance(r, list) and r and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in r)
            )
            if not ok:
                raise DataError(
                    f"expected a non-empty string (or a list of assistant turns), got {describe(r)}",
                    where=where(i),
                    field=f"responses[{j}]",
                )
        models = row.get("models")
        if models is not None:
            if not isinstance(models, list) or len(models) != len(responses):
                raise DataError(
                    f"expected one model name per response ({len(responses)}), got {describe(models)}",
                    where=where(i),
                    field="models",
                )
            if not all(m is None or isinstance(m, str) for m in models):
                raise DataError("model names must be strings", where=where(i), field="models")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "responses", "models")}
        out.append(Candidate(row["prompt"], responses, list(models) if models else [], [], extra))
    return out


# --- who works on what --------------------------------------------------------------------------


def rounds_for(s: Session, user: User) -> list[Round]:
    """The rounds `user` may label in: their rounds if they are members of any, else every round."""
    member = s.scalars(select(RoundMember.round_id).where(RoundMember.user_id == user.id)).all()
    q = select(Round).order_by(Round.created_at, Round.id)
    if member:
        q = q.where(Round.id.in_(member))
    return list(s.scalars(q))


def get_round(s: Session, name: str) -> Round:
    rnd = s.scalar(select(Round).where(Round.name == name))
    if rnd is None:
        raise NotFound(f"no round named {name!r}")
    return rnd


def may_work_on(s: Session, user: User, rnd: Round) -> bool:
    """Members of the round, or anyone who is a member of no round."""
    rows = s.execute(select(RoundMember.round_id).where(RoundMember.user_id == user.id)).scalars().all()
    return not rows or rnd.id in rows


def add_member(s: Session, user: User, rnd: Round) -> None:
    if s.get(RoundMember, (rnd.id, user.id)) is None:
        s.add(RoundMember(round_id=rnd.id, user_id=user.id))


def next_assignment(db: Database, user_id: int, round_name: str, *, now: float | None = None) -> int | None:
    """The id of the assignment `user` should work on next in the round (claiming a new item if they
    have none open), or None when nothing is left for them."""
    now = time.time() if now is None else now
    with db.session() as s:
        q = select(Round).where(Round.name == round_name)
        if not db.is_sqlite:  # PostgreSQL & co.: serialise claims per round (SQLite's BEGIN IMMEDIATE does)
            q = q.with_for_update()
        rnd = s.scalar(q)
        user = s.get(User, user_id)
        if rnd is None or user is None or not may_work_on(s, user, rnd):
            raise NotFound(f"no round named {round_name!r} for you")
        if rnd.status != "open":
            raise Conflict(f"round {round_name!r} is closed")
        open_one = s.scalar(
            select(Assignment)
            .where(Assignment.round_id == rnd.id, Assignment.user_id == user.id, Assignment.status == "active")
            .order_by(Assignment.id)
            .limit(1)
        )
        if open_one is not None:
            # a claim older than CLAIM_SECONDS stopped holding its item; if others have since given it
            # all its labels, the claim is dropped rather than handed back (no item gets extra labels)
            labelled = s.scalar(
                select(func.count())
                .select_from(Assignment)
                .where(Assignment.item_id == open_one.item_id, Assignment.status == "done")
            )
            if labelled < rnd.labels_per_item:
                return open_one.id
            s.delete(open_one)
            s.flush()
        held = (
            select(Assignment.item_id, func.count().label("n"))
            .where(
                Assignment.round_id == rnd.id,
                or_(
                    Assignment.status == "done",
                    and_(Assignment.status == "active", Assignment.shown_at > now - CLAIM_SECONDS),
                ),
            )
            .group_by(Assignment.item_id)
            .subquery()
        )
        mine = select(Assignment.item_id).where(Assignment.round_id == rnd.id, Assignment.user_id == user.id)
        n = func.coalesce(held.c.n, 0)
        row = s.execute(
            select(Item.id, Item.response_ids)
            .outerjoin(held, held.c.item_id == Item.id)
            .where(Item.round_id == rnd.id, Item.id.not_in(mine), or_(n < rnd.labels_per_item, Item.gold.is_not(None)))
            .order_by(n.desc(), Item.position)
            .limit(1)
        ).first()
        if row is None:
            return None
        order = list(row.response_ids)
        random.SystemRandom().shuffle(order)
        a = Assignment(
            round_id=rnd.id, item_id=row.id, user_id=user.id, order=order, status="active", created_at=now, shown_at=now
        )
        s.add(a)
        s.flush()
        return a.id


@dataclass
class ItemView:
    """What an annotator sees of an assignment: no model names, no response ids."""

    assignment_id: int
    round_name: str
    task: str
    instructions: str
    prompt: Any
    responses: list[tuple[str, Any]]  # (letter, content) in this annotator's order
    status: str
    round_open: bool
    labelled: int = 0  # labels this annotator has given in the round


def _own_assignment(s: Session, user_id: int, assignment_id: int) -> Assignment:
    """The assignment, if it is this user's (someone else's is as unknown as a missing one)."""
    a = s.get(Assignment, assignment_id)
    if a is None or a.user_id != user_id:
        raise NotFound("no such item for you")
    return a


def view_assignment(db: Database, user_id: int, assignment_id: int) -> ItemView:
    with db.read() as s:
        a = _own_assignment(s, user_id, assignment_id)
        rnd = s.get(Round, a.round_id)
        item = s.get(Item, a.item_id)
        prompt = s.get(Prompt, item.prompt_id)
        by_id = {r.id: r for r in s.scalars(select(Response).where(Response.id.in_(a.order)))}
        responses = [(LETTERS[k], by_id[rid].content) for k, rid in enumerate(a.order)]
        labelled = (
            s.scalar(select(func.count()).select_from(Label).where(Label.round_id == rnd.id, Label.user_id == user_id))
            or 0
        )
        return ItemView(
            a.id,
            rnd.name,
            rnd.task,
            rnd.instructions,
            prompt.content,
            responses,
            a.status,
            rnd.status == "open",
            labelled,
        )


# --- labels -------------------------------------------------------------------------------------


def parse_label(task: str, form: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """A submitted form (field -> str, or list of str for repeated fields) as label columns, in terms
    of response ids. Raises LabelError naming the field for anything missing or malformed."""

    def one(name: str) -> str | None:
        value = form.get(name)
        if isinstance(value, list):
            if len(value) > 1:
                raise LabelError(f"field '{name}' was sent {len(value)} times")
            value = value[0] if value else None
        if value is not None and not isinstance(value, str):
            raise LabelError(f"field '{name}' must be text")
        return value

    def whole(name: str, letter: str, what: str, low: int, high: int) -> int:
        """The whole number in [low, high] of field `name` (response `letter`'s rank or rating)."""
        text = one(name)
        if text is None or not text.strip():
            raise LabelError(
                f"response {letter} has no {what} (field '{name}'); {'rank' if what == 'rank' else 'rate'} "
                "every response"
            )
        try:
            value = int(text)
        except ValueError:
            raise LabelError(f"field '{name}' must be a whole number, got {text[:20]!r}") from None
        if not low <= value <= high:
            raise LabelError(f"field '{name}' must be between {low} and {high}, got {value}")
        return value

    letters = LETTERS[: len(order)]
    out: dict[str, Any] = {"outcome": None, "winner_id": None, "strength": None, "ranking": None, "ratings": None}
    if task == "pairwise":
        choice = one("choice")
        if choice not in PAIRWISE_CHOICES:
            raise LabelError("choose A, B, tie or both bad (field 'choice')")
        strength = one("strength") or None
        if strength is not None and strength not in STRENGTHS:
            raise LabelError("field 'strength' must be slightly or much (or empty)")
        if choice in ("A", "B"):
            out.update(outcome="win", winner_id=order[letters.index(choice)], strength=strength)
        else:
            if strength is not None:
                raise LabelError(f"a strength goes with A or B better, not with {choice}")
            out["outcome"] = choice
    elif task == "ranking":  # a rank 1..K for every response; equal ranks are a tie
        ranks = {order[k]: whole(f"rank_{letter}", letter, "rank", 1, len(order)) for k, letter in enumerate(letters)}
        out["ranking"] = [[rid for rid in order if ranks[rid] == v] for v in sorted(set(ranks.values()))]
    elif task == "rating":
        low, high = RATING_SCALE
        out["ratings"] = {
            str(order[k]): whole(f"rating_{letter}", letter, "rating", low, high) for k, letter in enumerate(letters)
        }
    else:
        raise LabelError(f"unknown task {task!r}")
    for name in ("better_answer", "comment"):
        text = (one(name) or "").strip()
        if len(text) > MAX_TEXT:
            raise LabelError(f"field '{name}' is longer than {MAX_TEXT} characters")
        out[name] = text or None
    flags = form.get("flag") or []
    flags = [flags] if isinstance(flags, str) else list(flags)
    for f in flags:
        if f not in FLAGS:
            raise LabelError(f"unknown flag {str(f)[:20]!r}; flags are {', '.join(FLAGS)}")
    out["flags"] = sorted(set(flags))
    # strength from an unchosen A/B pair etc. is caught above; unknown fields are ignored
    return out


@dataclass
class Submitted:
    label_id: int
    round_name: str


def submit_label(
    db: Database, user_id: int, assignment_id: int, form: dict[str, Any], *, now: float | None = None
) -> Submitted:
    """Validate and store a label for the user's assignment; return its id and round. The
    transaction is committed when this returns."""
    now = time.time() if now is None else now
    with db.session() as s:
        a = _own_assignment(s, user_id, assignment_id)
        rnd = s.get(Round, a.round_id)
        if rnd.status != "open":
            raise Conflict(f"round {rnd.name!r} is closed; labels are no longer accepted")
        if a.status == "done":
            raise Conflict("this item is already labelled (undo the label first to change it)")
        if a.status == "skipped":
            raise Conflict("this item was skipped")
        columns = parse_label(rnd.task, form, list(a.order))
        # compare-and-set: of two racing submissions of one assignment exactly one gets here
        claimed = s.execute(
            update(Assignment)
            .where(Assignment.id == a.id, Assignment.status == "active")
            .values(status="done", done_at=now)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:
            raise Conflict("this item is already labelled")
        label = Label(
            assignment_id=a.id,
            round_id=a.round_id,
            item_id=a.item_id,
            user_id=user_id,
            task=rnd.task,
            duration_s=max(0.0, now - a.shown_at),
            created_at=now,
            **columns,
        )
        s.add(label)
        s.flush()
        log_event(s, "label", user_id, assignment=a.id, label=label.id)
        return Submitted(label.id, rnd.name)


def skip(db: Database, user_id: int, assignment_id: int) -> str:
    """Skip the user's open assignment (the item goes to others); return the round's name."""
    with db.session() as s:
        a = _own_assignment(s, user_id, assignment_id)
        rnd = s.get(Round, a.round_id)
        if rnd.status != "open":
            raise Conflict("this round is closed")
        done = s.execute(
            update(Assignment)
            .where(Assignment.id == a.id, Assignment.status == "active")
            .values(status="skipped", done_at=time.time())
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:
            raise Conflict("only an item you are working on can be skipped")
        log_event(s, "skip", user_id, assignment=a.id)
        return rnd.name


def undo_last(db: Database, user_id: int, round_name: str | None = None) -> int:
    """Remove the user's most recent label (in an open round; in `round_name` if given) and reopen
    its item for them; return the assignment id."""
    with db.session() as s:
        q = (
            select(Label)
            .join(Round, Round.id == Label.round_id)
            .where(Label.user_id == user_id, Round.status == "open")
            .order_by(Label.id.desc())
            .limit(1)
        )
        if round_name is not None:
            q = q.where(Round.name == round_name)
        label = s.scalar(q)
        if label is None:
            raise Conflict("there is no label of yours to undo")
        # one open item at a time: an item claimed since goes back to the pool
        s.execute(
            delete(Assignment).where(
                Assignment.user_id == user_id, Assignment.round_id == label.round_id, Assignment.status == "active"
            )
        )
        a = s.get(Assignment, label.assignment_id)
        a.status, a.done_at, a.shown_at = "active", None, time.time()
        s.delete(label)
        log_event(s, "undo", user_id, assignment=a.id, label=label.id)
        return a.id


# --- progress -----------------------------------------------------------------------------------


def round_progress(s: Session, rnd: Round) -> dict[str, Any]:
    """Items, labels wanted and given, per-annotator counts and median seconds per label."""
    items = s.scalar(select(func.count()).select_from(Item).where(Item.round_id == rnd.id)) or 0
    labels = s.scalar(select(func.count()).select_from(Label).where(Label.round_id == rnd.id)) or 0
    wanted = items * rnd.labels_per_item
    complete = (
        s.scalar(
            select(func.count()).select_from(
                select(Label.item_id)
                .where(Label.round_id == rnd.id)
                .group_by(Label.item_id)
                .having(func.count() >= rnd.labels_per_item)
                .subquery()
            )
        )
        or 0
    )
    people = []
    rows = s.execute(
        select(User.name, Label.duration_s).join(User, User.id == Label.user_id).where(Label.round_id == rnd.id)
    ).all()
    by_user: dict[str, list[float]] = {}
    for name, d in rows:
        by_user.setdefault(name, []).append(d)
    skips = dict(
        s.execute(
            select(User.name, func.count())
            .select_from(Assignment)
            .join(User, User.id == Assignment.user_id)
            .where(Assignment.round_id == rnd.id, Assignment.status == "skipped")
            .group_by(User.name)
        ).all()
    )
    for name in sorted(set(by_user) | set(skips)):
        durations = by_user.get(name, [])
        people.append(
            {
                "annotator": name,
                "labels": len(durations),
                "skipped": skips.get(name, 0),
                "median_seconds": statistics.median(durations) if durations else None,
            }
        )
    return {
        "round": rnd.name,
        "task": rnd.task,
        "status": rnd.status,
        "items": items,
        "labels_per_item": rnd.labels_per_item,
        "labels": labels,
        "labels_wanted": wanted,
        "complete_items": complete,
        "fraction": labels / wanted if wanted else 0.0,
        "annotators": people,
    }


def user_progress(s: Session, user: User, rnd: Round) -> dict[str, int]:
    done = (
        s.scalar(select(func.count()).select_from(Label).where(Label.round_id == rnd.id, Label.user_id == user.id)) or 0
    )
    return {"labelled": done}


def set_round_status(db: Database, name: str, status: str) -> None:
    if status not in ("open", "closed"):
        raise StudioError(f"status must be open or closed, not {status!r}")
    with db.session() as s:
        rnd = get_round(s, name)
        rnd.status = status
        log_event(s, "round_" + status, None, round=name)
