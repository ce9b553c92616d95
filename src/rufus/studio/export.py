"""From labels to training files: exactly the formats `rufus rm`, `rufus dpo`, `rufus kto` and `rufus sft` read.

Formats (every row also carries provenance: ``round``, ``item_id``, the response ids, and for
per-label rows ``annotator_id`` and ``label_id``; ``chosen_model`` / ``rejected_model`` /
``models`` only with ``with_models``, since model names are what labelling is blind to):

``preference``  ``prompt``, ``chosen``, ``rejected`` for `rufus rm` and `rufus dpo`. From a pairwise
                round each decisive label (or majority) is one row, with its ``strength``; from a
                ranking or rating round every pair of responses in a strict order is one row.
                "both bad" labels give no row. Ties follow `tie`: ``drop``, or ``half``: the tie is
                written in both orders (A over B and B over A, marked ``tie: true``), whose two
                Bradley-Terry terms -log s(d) - log s(-d) are minimised at equal scores, i.e. a half
                win each.
``ranking``     ``prompt``, ``responses`` (best first) and ``scores`` (higher = better, ties as equal
                scores) for `rufus rm`. A pairwise label is a ranking of two; rows
                whose responses all tie teach nothing and are left out.
``sft``         ``prompt``, ``completion``: the better answers annotators wrote, for `rufus sft`.
``graded``      ``prompt``, ``completion``, ``score`` for a reward model's pointwise warm-up. Ratings
                1-7 map to (r - 1) / 6 in [0, 1] (``scale="unit"``, what the default bce warm-up
                accepts) or stay 1-7 (``scale="raw"``, for the mse warm-up); a pairwise label gives the
                winner 1, the loser 0 (a tie 0.5 each, both bad 0 each); a ranking gives each
                response its Borda share (responses it beats + half the ties) / (K - 1).
``kto``         ``prompt``, ``completion``, ``label`` (true = desirable): TRL's unpaired rows, for
                `rufus kto`. A response is desirable when its graded score on the unit scale (above)
                is above 1/2, undesirable below 1/2, and left out at exactly 1/2. So: a rating above
                the scale's midpoint (5-7 of 1-7) is desirable, below it (1-3) undesirable, the
                midpoint 4 left out; a pairwise label makes its winner desirable and its loser
                undesirable, leaves a tie out, and "both bad" makes both undesirable; a ranking makes
                its best half desirable and its worst half undesirable (Borda share above / below
                1/2), leaving out the middle response of an odd K and responses tied across the
                middle. With ``majority``: the mean rating, the mean Borda share, the majority vote.

Labels on gold items (which measure annotators) and labels by annotators an admin excluded from the
round (`rufus.studio.quality.exclude`) are left out of every format.

Aggregation: ``label`` (one row per label) or ``majority`` (one per item). Majority for pairwise
items: the response with more "better" votes is chosen; equal votes make a tie (or, when every
label says both bad, no row); the vote counts go into ``votes``. For rankings the responses are
ordered by their mean Borda points; for ratings by their mean rating.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import select

from rufus.studio.db import (
    Assignment,
    Database,
    Item,
    Label,
    Prompt,
    Response,
    Round,
    StudioError,
    User,
    excluded_users,
)
from rufus.studio.rounds import RATING_SCALE, get_round

FORMATS = ("preference", "ranking", "sft", "graded", "kto")
TIES = ("drop", "half")
AGGREGATES = ("label", "majority")


def borda(ranking: list[list[int]]) -> dict[int, float]:
    """Points per response of one ranking (tiers best first): responses below it + half the others
    in its tier."""
    total = sum(len(t) for t in ranking)
    points, above = {}, 0
    for tier in ranking:
        below = total - above - len(tier)
        for rid in tier:
            points[rid] = below + 0.5 * (len(tier) - 1)
        above += len(tier)
    return points


def label_scores(label: Label, response_ids: list[int]) -> dict[int, float] | None:
    """Per-response scores of one label (higher = better), or None when it orders nothing
    (pairwise both bad)."""
    if label.task == "pairwise":
        if label.outcome == "win":
            return {rid: 1.0 if rid == label.winner_id else 0.0 for rid in response_ids}
        if label.outcome == "tie":
            return {rid: 0.5 for rid in response_ids}
        return None
    if label.task == "ranking":
        return borda([[int(r) for r in tier] for tier in label.ranking])
    return {int(rid): float(v) for rid, v in label.ratings.items()}


def _load(s, rnd: Round):
    """The round's items, prompts, responses, and the labels that train: not on gold items (those
    measure annotators), not by annotators the admin excluded."""
    items = {i.id: i for i in s.scalars(select(Item).where(Item.round_id == rnd.id))}
    prompts = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.round_id == rnd.id))}
    responses = {r.id: r for r in s.scalars(select(Response).where(Response.prompt_id.in_(list(prompts))))}
    left_out = excluded_users(s, rnd.id)
    labels = [
        lb
        for lb in s.scalars(select(Label).where(Label.round_id == rnd.id).order_by(Label.id))
        if lb.user_id not in left_out and not items[lb.item_id].gold
    ]
    return items, prompts, responses, labels


def export_rows(
    db: Database,
    round_name: str,
    format: str,
    *,
    tie: str = "drop",
    aggregate: str = "label",
    with_models: bool = False,
    scale: str = "unit",
) -> list[dict[str, Any]]:
    """The rows of one round's labels in a training format (module docstring)."""
    if format not in FORMATS:
        raise StudioError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if tie not in TIES:
        raise StudioError(f"tie must be drop or half, not {tie!r}")
    if aggregate not in AGGREGATES:
        raise StudioError(f"aggregate must be label or majority, not {aggregate!r}")
    if scale not in ("unit", "raw"):
        raise StudioError(f"scale must be unit or raw, not {scale!r}")
    with db.read() as s:
        rnd = get_round(s, round_name)
        if scale == "raw" and format == "graded" and rnd.task != "rating":
            raise StudioError("scale=raw keeps 1-7 ratings, so it needs a rating round; this one is " + rnd.task)
        items, prompts, responses, labels = _load(s, rnd)

    # a round with message-list prompts writes each response as a list of assistant turns, as the
    # data formats ask (a prompt and its responses in one style), whatever form it was stored in
    conversational = any(isinstance(p.content, list) for p in prompts.values())

    def styled(value: Any) -> Any:
        if conversational and isinstance(value, str):
            return [{"role": "assistant", "content": value}]
        return value

    def content(rid: int) -> Any:
        return styled(responses[rid].content)

    base = {"round": rnd.name}
    if format == "sft":
        return [
            {
                "prompt": prompts[items[lb.item_id].prompt_id].content,
                "completion": styled(lb.better_answer),
                **base,
                "item_id": lb.item_id,
                "annotator_id": lb.user_id,
                "label_id": lb.id,
            }
            for lb in labels
            if lb.better_answer
        ]

    # one entry per row to write: (item, per-response scores, provenance)
    units: list[tuple[Item, dict[int, float], dict[str, Any]]] = []
    if aggregate == "label":
        for lb in labels:
            item = items[lb.item_id]
            scores = label_scores(lb, list(item.response_ids))
            if scores is None:  # both bad: no preference between them; as grades, 0 each (kto: undesirable)
                if format not in ("graded", "kto"):
                    continue
                scores = {rid: 0.0 for rid in item.response_ids}
            prov = {"annotator_id": lb.user_id, "label_id": lb.id}
            if lb.task == "pairwise" and lb.strength:
                prov["strength"] = lb.strength
            if lb.flags:
                prov["flags"] = list(lb.flags)
            units.append((item, scores, prov))
    else:
        by_item: dict[int, list[Label]] = defaultdict(list)
        for lb in labels:
            by_item[lb.item_id].append(lb)
        for item_id, group in by_item.items():
            item = items[item_id]
            ids = list(item.response_ids)
            if rnd.task == "pairwise":
                votes = {
                    "labels": len(group),
                    "tie": sum(lb.outcome == "tie" for lb in group),
                    "both_bad": sum(lb.outcome == "both_bad" for lb in group),
                }
                wins = {rid: sum(lb.outcome == "win" and lb.winner_id == rid for lb in group) for rid in ids}
                a, b = ids
                if votes["both_bad"] == len(group):
                    if format not in ("graded", "kto"):
                        continue
                    scores = {a: 0.0, b: 0.0}
                else:
                    scores = (
                        {a: 0.5, b: 0.5}
                        if wins[a] == wins[b]
                        else {a: 1.0, b: 0.0}
                        if wins[a] > wins[b]
                        else {a: 0.0, b: 1.0}
                    )
                votes["responses"] = {str(rid): wins[rid] for rid in ids}
            else:
                per = [label_scores(lb, ids) for lb in group]
                scores = {rid: sum(p[rid] for p in per) / len(per) for rid in ids}
                votes = {"labels": len(group)}
            units.append((item, scores, {"votes": votes}))

    rows: list[dict[str, Any]] = []
    for item, scores, prov in units:
        prompt = prompts[item.prompt_id].content
        ids = list(item.response_ids)
        common = {**base, "item_id": item.id, **prov}
        if format == "preference":
            for i, a in enumerate(ids):
                for b in ids[i + 1 :]:
                    if scores[a] == scores[b]:
                        if tie == "half":
                            for win, lose in ((a, b), (b, a)):
                                rows.append(_pref(prompt, win, lose, content, common, responses, with_models, tie=True))
                        continue
                    win, lose = (a, b) if scores[a] > scores[b] else (b, a)
                    rows.append(_pref(prompt, win, lose, content, common, responses, with_models))
        elif format == "ranking":
            if len(set(scores.values())) == 1:
                continue
            order = sorted(ids, key=lambda rid: -scores[rid])  # stable: ties keep item order
            row = {
                "prompt": prompt,
                "responses": [content(r) for r in order],
                "scores": [scores[r] for r in order],
                **common,
                "response_ids": order,
            }
            if with_models:
                row["models"] = [responses[r].model for r in order]
            rows.append(row)
        else:  # graded, kto
            for rid in ids:
                unit = _unit_score(rnd.task, scores[rid], len(ids))
                if format == "kto":
                    if round(unit, 9) == 0.5:  # the middle: neither desirable nor undesirable
                        continue
                    row = {"prompt": prompt, "completion": content(rid), "label": unit > 0.5}
                else:
                    score = scores[rid] if rnd.task == "rating" and scale == "raw" else unit
                    row = {"prompt": prompt, "completion": content(rid), "score": score}
                row.update(common, response_id=rid)
                if with_models:
                    row["model"] = responses[rid].model
                rows.append(row)
    return rows


def _unit_score(task: str, score: float, k: int) -> float:
    """A response's score on [0, 1]: a rating's (r - low) / (high - low), a ranking's Borda share
    points / (K - 1), a pairwise label's 1 / 0.5 / 0 as it is."""
    if task == "rating":
        low, high = RATING_SCALE
        return (score - low) / (high - low)
    if task == "ranking":
        return score / (k - 1)
    return score


def _pref(prompt, win: int, lose: int, content, common: dict, responses, with_models: bool, tie: bool = False) -> dict:
    row = {
        "prompt": prompt,
        "chosen": content(win),
        "rejected": content(lose),
        **common,
        "chosen_id": win,
        "rejected_id": lose,
    }
    if tie:
        row["tie"] = True
    if with_models:
        row["chosen_model"], row["rejected_model"] = responses[win].model, responses[lose].model
    return row


def write_jsonl(rows: list[dict], out: str | Path) -> None:
    from rufus.config import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def export_round(db: Database, round_name: str, format: str, out: str | Path, **kwargs) -> int:
    """Write one round's labels as `format` to the jsonl file `out`; return the number of rows."""
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise StudioError(
            f"--out {out}: training exports are jsonl files (prompts and responses may be "
            "message lists); name it *.jsonl"
        )
    rows = export_rows(db, round_name, format, **kwargs)
    if not rows:
        raise StudioError(f"round {round_name!r} has no labels that make {format} rows yet")
    write_jsonl(rows, out)
    return len(rows)


# --- raw downloads (admin) ----------------------------------------------------------------------

TABLES = ("labels", "items", "responses", "annotators")


def table_rows(db: Database, table: str, round_name: str | None = None) -> list[dict[str, Any]]:
    """Everything, as plain rows: labels (with the order each was shown in), items, responses (with
    their models) and annotators (no token hashes). Admin only."""
    if table not in TABLES:
        raise StudioError(f"table must be one of {', '.join(TABLES)}")
    with db.read() as s:
        rounds = {r.id: r.name for r in s.scalars(select(Round))}
        rid = None
        if round_name is not None:
            rid = get_round(s, round_name).id
        if table == "annotators":
            return [
                {"annotator_id": u.id, "name": u.name, "role": u.role, "active": u.active, "created_at": u.created_at}
                for u in s.scalars(select(User).order_by(User.id))
            ]
        if table == "labels":
            q = (
                select(Label, Assignment.order)
                .join(Assignment, Assignment.id == Label.assignment_id)
                .order_by(Label.id)
            )
            if rid is not None:
                q = q.where(Label.round_id == rid)
            return [
                {
                    "label_id": lb.id,
                    "round": rounds[lb.round_id],
                    "item_id": lb.item_id,
                    "annotator_id": lb.user_id,
                    "task": lb.task,
                    "outcome": lb.outcome,
                    "winner_id": lb.winner_id,
                    "strength": lb.strength,
                    "ranking": lb.ranking,
                    "ratings": lb.ratings,
                    "better_answer": lb.better_answer,
                    "comment": lb.comment,
                    "flags": lb.flags,
                    "shown_order": order,
                    "duration_s": lb.duration_s,
                    "created_at": lb.created_at,
                }
                for lb, order in s.execute(q)
            ]
        if table == "items":
            q = select(Item, Prompt.content).join(Prompt, Prompt.id == Item.prompt_id).order_by(Item.id)
            if rid is not None:
                q = q.where(Item.round_id == rid)
            return [
                {
                    "item_id": it.id,
                    "round": rounds[it.round_id],
                    "prompt_id": it.prompt_id,
                    "prompt": content,
                    "response_ids": it.response_ids,
                }
                for it, content in s.execute(q)
            ]
        q = select(Response, Prompt.round_id).join(Prompt, Prompt.id == Response.prompt_id).order_by(Response.id)
        if rid is not None:
            q = q.where(Prompt.round_id == rid)
        return [
            {
                "response_id": r.id,
                "round": rounds[round_id],
                "prompt_id": r.prompt_id,
                "content": r.content,
                "model": r.model,
                "sample": r.sample,
            }
            for r, round_id in s.execute(q)
        ]


def to_csv(rows: list[dict]) -> str:
    """Rows as csv text; lists and mappings become JSON in their cell."""
    buf = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in row.items()}
        )
    return buf.getvalue()


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
