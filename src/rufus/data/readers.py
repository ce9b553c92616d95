"""Readers for preference data sets as they are published: which one a file holds, and its rows in Rufus's kinds.

Rufus trains on six kinds of rows (`rufus.data.formats`: sft, preference, ranking, prompt, graded,
comparison), whose field names are TRL's. The public data sets people bring first are written in
their own shapes. A reader turns one such shape into the kind a trainer asks for, so these files
train as published, with nothing converted by hand:

``hh-rlhf`` (Bai et al. 2022)
    ``chosen`` / ``rejected``: whole ``\n\nHuman:`` / ``\n\nAssistant:`` dialogues. Gives preference,
    sft, prompt.
``ultrafeedback`` (Cui et al. 2023)
    binarized: ``prompt``, ``chosen`` / ``rejected`` message lists, ``score_chosen`` / ``score_rejected``
    (preference, sft, prompt); raw: ``instruction`` and ``completions`` with their ratings (ranking,
    preference, sft, prompt).
``oasst1`` (Köpf et al. 2023)
    the flat message table: ``message_id``, ``parent_id``, ``role``, ``text``, ``rank``, ...
    Gives ranking, preference, sft (the first-rank path of each tree), prompt.
``shp`` (Ethayarajh et al. 2022)
    ``history``, ``human_ref_A`` / ``human_ref_B``, ``labels``, ``score_A`` / ``score_B``. Gives
    preference, sft, prompt.
``summarize_from_feedback`` (Stiennon et al. 2020)
    ``info`` (post, title, subreddit), ``summaries``, ``choice``. Gives preference, sft, prompt.
``helpsteer2`` (Wang et al. 2024)
    ``prompt``, ``response`` and the 0-4 attributes. Gives graded, ranking (the responses to one
    prompt), preference, sft, prompt.
``trl``
    Rufus's own rows, which are TRL's dataset types (plus ranking and graded), and TRL's unpaired
    ``prompt`` / ``completion`` / ``label`` rows (graded, sft and prompt from them).

Every reader also gives prompts (for RL), and sft rows from the preferred response. A reader that
holds more than two responses per prompt (a ranking) gives preference pairs chosen by
``data.pairs``: ``best_vs_worst`` (the default: the clearest signal, one pair per prompt, as each
prompt weighs one), ``best_vs_rest`` or ``all``; tied responses never make a pair.

A score difference a format carries (UltraFeedback's ratings, SHP's log vote ratio, the
summarisation comparisons' confidence, HelpSteer2's attributes) rides along as the ``margin`` of a
preference row or the ``scores`` of a ranking row, for the reward model's margin loss
(``rm.margin_from_data``).

A row that is malformed (a field missing or of the wrong type) or that cannot be used (two
identical answers, a dialogue that is not one) is an error naming the file, the line and the
reason; ``data.invalid_rows=skip`` drops such rows with one warning instead, and ``rufus data inspect``
lists them all. Rows left out by a filter the user set (``data.lang``, ``data.min_score_ratio``) are
counted, not errors.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rufus.data.errors import DataError, describe
from rufus.data.formats import canonical, clean_message, split_implicit_prompt

log = logging.getLogger(__name__)

Row = dict[str, Any]
PAIRS = ("best_vs_worst", "best_vs_rest", "all")
HH_STYLES = ("auto", "messages", "text")


@dataclass
class ReadOptions:
    """How to read a published format; built from the `data` section (`options_from`)."""

    format: str = "auto"  # a reader's name, or auto = detect from the columns
    hh_rlhf: str = "auto"  # messages | text | auto (messages where the tokenizer has a chat template)
    chat_template: bool = False  # whether the tokenizer has one (decides hh_rlhf=auto)
    lang: tuple[str, ...] = ()  # oasst1: keep messages in these languages only (empty = all)
    min_score_ratio: float = 0.0  # shp: keep pairs whose vote ratio is at least this
    attributes: dict[str, float] = field(default_factory=lambda: {"helpfulness": 1.0})  # helpsteer2 score
    pairs: str = "best_vs_worst"  # rankings as preference pairs
    invalid_rows: str = "error"  # error | skip
    subset: str | None = None  # a hub dataset's configuration name


def parse_attributes(text: str, key: str = "data.attributes") -> dict[str, float]:
    """ "helpfulness" or "helpfulness:0.65,correctness:0.8,verbosity:-0.4" -> {name: weight}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise DataError(f"weight of {name!r} is not a number: {weight!r}", where=key) from None
        if not name or not math.isfinite(w):
            raise DataError(f"expected name or name:weight, got {part!r}", where=key)
        out[name] = w
    if not out:
        raise DataError("names no attribute", where=key)
    return out


def options_from(data, tokenizer=None) -> ReadOptions:
    """ReadOptions from a config's `data` section (any object with its keys; missing keys keep their
    defaults) and the tokenizer the rows are for."""
    opts = ReadOptions()
    for name in ("format", "hh_rlhf", "min_score_ratio", "pairs", "invalid_rows", "subset"):
        if hasattr(data, name):
            setattr(opts, name, getattr(data, name))
    if getattr(data, "lang", None):
        opts.lang = tuple(data.lang)
    if getattr(data, "attributes", None):
        opts.attributes = parse_attributes(data.attributes)
    opts.chat_template = bool(getattr(tokenizer, "chat_template", None))
    return opts


# --- reading context: locations, rejected rows ------------------------------------------------------


class Rejects:
    """Rows that cannot be used. In "error" mode the first one raises; in "skip" mode they are kept,
    with their locations and reasons, for one warning (and for `rufus data inspect`)."""

    def __init__(self, mode: str, where: Callable[[int], str], key: str):
        self.mode, self.where, self.key = mode, where, key
        self.rows: list[tuple[int, DataError]] = []  # (input row, the error)

    def error(self, i: int, problem: str, field: str | None = None) -> DataError:
        return DataError(problem, where=f"{self.key}: {self.where(i)}", field=field)

    def add(self, i: int, err: DataError) -> None:
        if self.mode == "error":
            raise err
        self.rows.append((i, err))

    def reject(self, i: int, problem: str, field: str | None = None) -> None:
        self.add(i, self.error(i, problem, field))


@dataclass
class Group:
    """One prompt with its responses, best first, read from a published row.

    `scores` order the responses (higher = better; equal = a tie); `gaps` are the numbers whose
    differences are the margins the format carries (None when it carries none). `origin` is the input
    row it came from, for error locations.
    """

    prompt: str | list[dict]
    responses: list[Any]
    scores: list[float]
    origin: int
    gaps: list[float] | None = None


@dataclass
class Output:
    """What a reader made of a file: rows of one kind, the input row each came from, what it left out."""

    rows: list[Row]
    origins: list[int]
    filtered: int = 0  # left out by a filter the user set
    ties: int = 0  # left out because all their responses tie


# --- field helpers (each raises DataError through `ctx.error`) ---------------------------------------


def _text(rej: Rejects, i: int, row: Row, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise rej.error(i, "missing", name)
    if not isinstance(value, str):
        raise rej.error(i, f"expected a string, got {describe(value)}", name)
    if not value.strip():
        raise rej.error(i, "empty", name)
    return value


def _number(rej: Rejects, i: int, value: Any, name: str) -> float:
    if isinstance(value, str):  # csv cells
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise rej.error(i, f"expected a finite number, got {describe(value)}", name)
    return float(value)


def _flag(value: Any) -> bool | None:
    """A boolean cell as published (JSON bool, or csv text)."""
    if isinstance(value, str):
        return {"true": True, "false": False, "1": True, "0": False}.get(value.strip().lower())
    return value if isinstance(value, bool) or value is None else bool(value)


# --- hh-rlhf ----------------------------------------------------------------------------------------

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_MARKER = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def hh_turns(text: str) -> list[tuple[str, str]]:
    """A "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue as [(role, content)], raising ValueError with the
    reason when it is not one: it must open with a Human turn, alternate, and end with an Assistant turn."""
    parts = _MARKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not an hh-rlhf dialogue: it does not start with '\\n\\nHuman:'")
    turns = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == HUMAN else "assistant"
        if turns and turns[-1][0] == role:
            raise ValueError(f"two {marker.strip()} turns in a row; turns must alternate Human / Assistant")
        turns.append((role, content.strip()))
    if turns[0][0] != "user":
        raise ValueError("not an hh-rlhf dialogue: it does not start with '\\n\\nHuman:'")
    if turns[-1][0] != "assistant":
        raise ValueError("does not end with an Assistant turn")
    return turns


def _hh_group(rej: Rejects, i: int, row: Row, style: str) -> Group:
    sides = {}
    for name in ("chosen", "rejected"):
        text = _text(rej, i, row, name)
        try:
            turns = hh_turns(text)
        except ValueError as e:
            raise rej.error(i, str(e), name) from None
        if not turns[-1][1]:
            raise rej.error(i, "its last Assistant turn is empty", name)
        sides[name] = (text, turns)
    (chosen, c_turns), (rejected, r_turns) = sides["chosen"], sides["rejected"]
    if chosen == rejected:
        raise rej.error(i, "chosen and rejected are identical", "rejected")
    if c_turns[:-1] != r_turns[:-1]:
        raise rej.error(
            i, "chosen and rejected differ before their last Assistant turn, so they share no prompt", "rejected"
        )
    if style == "text":
        # the shared opening, cut back to (and including) the last Assistant marker
        cut = chosen.rindex(ASSISTANT) + len(ASSISTANT)
        prompt = chosen[:cut]
        c, r = chosen[cut:], rejected[rejected.rindex(ASSISTANT) + len(ASSISTANT) :]
        if c == r:
            raise rej.error(i, "chosen and rejected give the same last Assistant turn", "rejected")
        return Group(prompt, [c, r], [1.0, 0.0], i)
    if c_turns[-1][1] == r_turns[-1][1]:
        raise rej.error(i, "chosen and rejected give the same last Assistant turn", "rejected")
    prompt = [{"role": role, "content": content} for role, content in c_turns[:-1]]
    return Group(prompt, [_assistant(c_turns[-1][1]), _assistant(r_turns[-1][1])], [1.0, 0.0], i)


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def read_hh(rows, rej: Rejects, opts: ReadOptions) -> list[Group]:
    style = opts.hh_rlhf if opts.hh_rlhf != "auto" else ("messages" if opts.chat_template else "text")
    return _each(rows, rej, lambda i, row: _hh_group(rej, i, row, style))


# --- UltraFeedback ----------------------------------------------------------------------------------


def _uf_binarized(rej: Rejects, i: int, row: Row) -> Group:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list) or not value:
            raise rej.error(i, f"expected a list of messages, got {describe(value)}", name)
        for j, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") is None:
                problem = f"expected a message {{'role': ..., 'content': ...}}, got {describe(m)}"
                raise rej.error(i, problem, f"{name}[{j}]")
    prompt, c_rest, r_rest = split_implicit_prompt(chosen, rejected)
    if not c_rest and not r_rest:
        raise rej.error(i, "chosen and rejected are identical", "rejected")
    if not prompt:
        raise rej.error(i, "chosen and rejected share no opening turns to take as the prompt", "chosen")
    for name, rest in (("chosen", c_rest), ("rejected", r_rest)):
        if not rest or any(m.get("role") != "assistant" for m in rest):
            raise rej.error(i, "expected assistant turns after the prompt it shares with the other answer", name)
        if not any(m["content"].strip() for m in rest):
            raise rej.error(i, "its answer is empty", name)
    gaps = [
        _number(rej, i, row.get("score_chosen"), "score_chosen"),
        _number(rej, i, row.get("score_rejected"), "score_rejected"),
    ]
    if gaps[0] < gaps[1]:
        raise rej.error(i, f"score_chosen {gaps[0]:g} is below score_rejected {gaps[1]:g}", "score_chosen")
    prompt = [clean_message(m) for m in prompt]
    return Group(prompt, [[clean_message(m) for m in c_rest], [clean_message(m) for m in r_rest]], [1.0, 0.0], i, gaps)


def _uf_rating(rej: Rejects, i: int, j: int, completion: dict) -> float:
    """A completion's score: its fine-grained score (the mean of its aspect ratings), else the mean of
    the numeric ratings in its annotations, else its overall score."""
    value = completion.get("fine-grained_score")
    if value is not None:
        return _number(rej, i, value, f"completions[{j}].fine-grained_score")
    ratings = []
    for aspect in (completion.get("annotations") or {}).values():
        rating = aspect.get("Rating") if isinstance(aspect, dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):
            continue  # "N/A"
    if ratings:
        return sum(ratings) / len(ratings)
    return _number(rej, i, completion.get("overall_score"), f"completions[{j}].overall_score")


def _uf_raw(rej: Rejects, i: int, row: Row) -> Group:
    prompt = _text(rej, i, row, "instruction")
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise rej.error(i, f"expected a list of completions, got {describe(completions)}", "completions")
    responses, scores, seen = [], [], set()
    for j, c in enumerate(completions):
        if not isinstance(c, dict):
            raise rej.error(i, f"expected a completion object, got {describe(c)}", f"completions[{j}]")
        text = c.get("response")
        if not isinstance(text, str):
            raise rej.error(i, f"expected a string, got {describe(text)}", f"completions[{j}].response")
        if not text.strip() or text in seen:
            continue  # an empty or repeated completion ranks nothing
        seen.add(text)
        responses.append(text)
        scores.append(_uf_rating(rej, i, j, c))
    if len(responses) < 2:
        raise rej.error(
            i, f"needs at least 2 distinct non-empty responses to rank, got {len(responses)}", "completions"
        )
    order = sorted(range(len(responses)), key=lambda k: -scores[k])  # stable: ties keep their order
    ranked = [scores[k] for k in order]
    return Group(prompt, [responses[k] for k in order], ranked, i, ranked)


def read_ultrafeedback(rows, rej: Rejects, opts: ReadOptions) -> list[Group]:
    return _each(rows, rej, lambda i, row: (_uf_raw if "completions" in row else _uf_binarized)(rej, i, row))


# --- OpenAssistant oasst1 ---------------------------------------------------------------------------

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class _Message:
    i: int  # input row
    id: str
    parent: str | None
    role: str
    text: str
    rank: float | None
    usable: bool  # not deleted, not failed review, in a wanted language


def _oasst_messages(rows, rej: Rejects, opts: ReadOptions) -> tuple[dict[str, _Message], int]:
    messages: dict[str, _Message] = {}
    filtered = 0
    for i, row in enumerate(rows):
        try:
            mid = _text(rej, i, row, "message_id")
            if mid in messages:
                raise rej.error(i, f"message_id {mid!r} also on {rej.where(messages[mid].i)}", "message_id")
            role = row.get("role")
            if role not in OASST_ROLES:
                raise rej.error(i, f"expected prompter or assistant, got {describe(role)}", "role")
            parent = row.get("parent_id")
            if parent is not None and not isinstance(parent, str):
                raise rej.error(i, f"expected a message id or null, got {describe(parent)}", "parent_id")
            if role == "prompter" and parent is None:
                pass
            elif parent is None:
                raise rej.error(i, "an assistant message needs a parent_id", "parent_id")
            text = _text(rej, i, row, "text")
            rank = row.get("rank")
            if isinstance(rank, float) and math.isnan(rank):
                rank = None  # a null rank read through pandas
            if rank is not None:
                rank = _number(rej, i, rank, "rank")
        except DataError as e:
            rej.add(i, e)
            continue
        usable = not _flag(row.get("deleted")) and _flag(row.get("review_result")) is not False
        if usable and opts.lang and row.get("lang") not in opts.lang:
            usable, filtered = False, filtered + 1
        messages[mid] = _Message(i, mid, parent, OASST_ROLES[role], text, rank, usable)
    return messages, filtered


def read_oasst1(rows, rej: Rejects, opts: ReadOptions) -> tuple[list[Group], list[Group], int]:
    """(ranking groups: one per prompter message with >= 2 ranked replies; first-rank paths for sft, as
    single-response groups whose prompt is empty; messages left out by data.lang)."""
    messages, filtered = _oasst_messages(rows, rej, opts)
    children: dict[str, list[_Message]] = {}
    for m in messages.values():
        if m.parent is not None:
            if m.parent not in messages:
                rej.reject(m.i, f"parent {m.parent!r} is not in the file", "parent_id")
                m.usable = False
                continue
            children.setdefault(m.parent, []).append(m)

    path_cache: dict[str, list[dict] | None] = {}

    def path(m: _Message) -> list[dict] | None:
        """The conversation from the root through `m`, or None if any message on it is unusable."""
        if m.id not in path_cache:
            head = [] if m.parent is None else path(messages[m.parent])
            ok = m.usable and head is not None
            path_cache[m.id] = head + [{"role": m.role, "content": m.text}] if ok else None
        return path_cache[m.id]

    def by_rank(replies: list[_Message]) -> list[_Message]:
        return sorted(replies, key=lambda m: math.inf if m.rank is None else m.rank)  # stable: file order

    rankings, paths = [], []
    for m in messages.values():
        if m.role != "user" or path(m) is None:
            continue
        replies = [r for r in children.get(m.id, []) if r.role == "assistant" and r.usable and r.rank is not None]
        distinct = {}
        for r in by_rank(replies):
            distinct.setdefault(r.text, r)  # a repeated reply ranks nothing; keep its best rank
        replies = list(distinct.values())
        if len(replies) >= 2:
            scores = [-r.rank for r in replies]
            rankings.append(Group(path(m), [_assistant(r.text) for r in replies], scores, m.i))
    for root in messages.values():  # the first-rank path of each tree, for sft
        if root.parent is not None or path(root) is None:
            continue
        node = root
        while True:
            nxt = [c for c in by_rank(children.get(node.id, [])) if c.usable]
            if not nxt:
                break
            node = nxt[0]
        conversation = path(node)
        while conversation and conversation[-1]["role"] != "assistant":
            conversation = conversation[:-1]
        if conversation:
            paths.append(Group(conversation, [], [], root.i))
    return rankings, paths, filtered


# --- Stanford SHP -----------------------------------------------------------------------------------


def read_shp(rows, rej: Rejects, opts: ReadOptions) -> tuple[list[Group], int]:
    groups, filtered = [], 0
    for i, row in enumerate(rows):
        try:
            history = _text(rej, i, row, "history")
            a, b = _text(rej, i, row, "human_ref_A"), _text(rej, i, row, "human_ref_B")
            label = row.get("labels")
            if isinstance(label, str) and label.strip() in ("0", "1"):
                label = int(label)
            if isinstance(label, bool) or label not in (0, 1):
                raise rej.error(i, f"expected 1 (A preferred) or 0 (B preferred), got {describe(label)}", "labels")
            if a == b:
                raise rej.error(i, "human_ref_A and human_ref_B are identical", "human_ref_B")
            score_a = _number(rej, i, row.get("score_A"), "score_A") if row.get("score_A") is not None else None
            score_b = _number(rej, i, row.get("score_B"), "score_B") if row.get("score_B") is not None else None
        except DataError as e:
            rej.add(i, e)
            continue
        best, other = (a, b) if label == 1 else (b, a)
        s_best, s_other = (score_a, score_b) if label == 1 else (score_b, score_a)
        gaps = None
        if s_best is not None and s_other is not None and s_best > 0 and s_other > 0:
            gaps = [math.log(s_best), math.log(s_other)]  # margin: the log ratio of the votes
        if opts.min_score_ratio > 0:
            ratio = row.get("score_ratio")
            if ratio is None and s_best and s_other:
                ratio = max(s_best, s_other) / min(s_best, s_other)
            if ratio is None:
                rej.reject(i, "data.min_score_ratio needs score_ratio, or score_A and score_B", "score_ratio")
                continue
            if float(ratio) < opts.min_score_ratio:
                filtered += 1
                continue
        groups.append(Group(history, [best, other], [1.0, 0.0], i, gaps))
    return groups, filtered


# --- summarize_from_feedback --------------------------------------------------------------------------


def tldr_query(info: dict) -> str:
    """The summarisation query of Stiennon et al. (2020): the post under its subreddit and title, ending
    with "TL;DR:" and no trailing space (the summary brings its own leading space)."""
    if info.get("post") is not None:
        subreddit, title = info.get("subreddit") or "", info.get("title") or ""
        return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {info['post']}\n\nTL;DR:"
    return f"ARTICLE: {info['article']}\n\nTL;DR:"  # the CNN/DM part of the comparisons


def _summarize_group(rej: Rejects, i: int, row: Row) -> Group:
    info = row.get("info")
    if not isinstance(info, dict):
        raise rej.error(i, f"expected an object with the post, got {describe(info)}", "info")
    body = info.get("post") if info.get("post") is not None else info.get("article")
    if not isinstance(body, str) or not body.strip():
        raise rej.error(i, f"expected the post (or article) text, got {describe(body)}", "info.post")
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise rej.error(i, f"expected a list of 2 summaries, got {describe(summaries)}", "summaries")
    texts = []
    for j, s in enumerate(summaries):
        text = s.get("text") if isinstance(s, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise rej.error(i, f"expected a non-empty text, got {describe(text)}", f"summaries[{j}].text")
        texts.append(text if text[:1].isspace() else " " + text)
    choice = row.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise rej.error(i, f"expected 0 or 1, the index of the preferred summary, got {describe(choice)}", "choice")
    if texts[0] == texts[1]:
        raise rej.error(i, "the two summaries are identical", "summaries[1].text")
    confidence = (row.get("extra") or {}).get("confidence") if isinstance(row.get("extra"), dict) else None
    gaps = None
    if confidence is not None:
        gaps = [_number(rej, i, confidence, "extra.confidence"), 0.0]
    return Group(tldr_query(info), [texts[choice], texts[1 - choice]], [1.0, 0.0], i, gaps)


def read_summarize(rows, rej: Rejects, opts: ReadOptions) -> list[Group]:
    return _each(rows, rej, lambda i, row: _summarize_group(rej, i, row))


# --- HelpSteer2 ---------------------------------------------------------------------------------------

HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def _helpsteer_score(rej: Rejects, i: int, row: Row, weights: dict[str, float]) -> float:
    return sum(w * _number(rej, i, row.get(name), name) for name, w in weights.items())


def read_helpsteer2(rows, rej: Rejects, opts: ReadOptions, columns: set[str]) -> tuple[list[Row], list[Group]]:
    """(graded rows with the weighted attribute score, one per input row; ranking groups per prompt)."""
    missing = [a for a in opts.attributes if a not in columns]
    if missing:
        raise DataError(
            f"data.attributes names {', '.join(map(repr, missing))}, which the file does not have "
            f"(its attributes: {', '.join(a for a in HELPSTEER_ATTRIBUTES if a in columns) or 'none'})",
            where=rej.key,
        )
    graded: list[Row] = []
    by_prompt: dict[str, Group] = {}
    for i, row in enumerate(rows):
        try:
            prompt, response = _text(rej, i, row, "prompt"), _text(rej, i, row, "response")
            score = _helpsteer_score(rej, i, row, opts.attributes)
        except DataError as e:
            rej.add(i, e)
            continue
        graded.append({"prompt": prompt, "completion": response, "score": score, "_origin": i})
        group = by_prompt.setdefault(prompt, Group(prompt, [], [], i, []))
        if response not in group.responses:
            group.responses.append(response)
            group.scores.append(score)
    groups = []
    for g in by_prompt.values():
        order = sorted(range(len(g.responses)), key=lambda k: -g.scores[k])
        scores = [g.scores[k] for k in order]
        groups.append(Group(g.prompt, [g.responses[k] for k in order], scores, g.origin, scores))
    return graded, groups


# --- TRL's unpaired rows ----------------------------------------------------------------------------


def read_unpaired(rows, rej: Rejects, opts: ReadOptions) -> list[Row]:
    """prompt / completion / label (true = desirable) -> graded rows with score 1.0 or 0.0."""
    out = []
    for i, row in enumerate(rows):
        label = _flag(row.get("label"))
        if label is None:
            rej.reject(i, f"expected true or false, got {describe(row.get('label'))}", "label")
            continue
        out.append({**{k: v for k, v in row.items() if k != "label"}, "score": float(label), "_origin": i})
    return out


# --- from groups to the kind a trainer asks for -----------------------------------------------------


def pairs_of(scores: list[float], how: str) -> list[tuple[int, int]]:
    """(better, worse) index pairs of a best-first list of scores, per `data.pairs`; ties never pair."""
    k = len(scores)
    if how == "best_vs_worst":
        return [(0, k - 1)] if scores[0] > scores[-1] else []
    if how == "best_vs_rest":
        return [(0, j) for j in range(1, k) if scores[0] > scores[j]]
    return [(a, b) for a in range(k) for b in range(a + 1, k) if scores[a] > scores[b]]


def emit(groups: list[Group], kind: str, opts: ReadOptions) -> Output:
    """Rows of `kind` from `groups` (preference, ranking, sft or prompt)."""
    rows, origins, ties = [], [], 0
    if kind == "prompt":
        seen = set()
        for g in groups:
            key = canonical(g.prompt)
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": g.prompt})
                origins.append(g.origin)
        return Output(rows, origins)
    for g in groups:
        if kind == "sft":
            rows.append({"prompt": g.prompt, "completion": g.responses[0]})
        elif kind == "ranking":
            if g.scores[0] == g.scores[-1]:
                ties += 1
                continue
            row = {"prompt": g.prompt, "responses": g.responses}
            if g.gaps is not None or len(set(g.scores)) < len(g.scores):
                row["scores"] = g.scores  # ratings, or ties; a plain order needs no scores
            rows.append(row)
        elif kind == "preference":
            pairs = pairs_of(g.scores, opts.pairs) if len(g.responses) > 2 else [(0, 1)]
            if not pairs:
                ties += 1
            for b, w in pairs:
                row = {"prompt": g.prompt, "chosen": g.responses[b], "rejected": g.responses[w]}
                if g.gaps is not None:
                    row["margin"] = g.gaps[b] - g.gaps[w]
                rows.append(row)
                origins.append(g.origin)
            continue
        else:
            raise ValueError(f"cannot make {kind} rows from comparisons")
        origins.append(g.origin)
    return Output(rows, origins, ties=ties)


def _each(rows, rej: Rejects, fn: Callable[[int, Row], Group]) -> list[Group]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(fn(i, row))
        except DataError as e:
            rej.add(i, e)
    return out


# --- the readers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    name: str
    kinds: tuple[str, ...]  # the kinds it gives, the one a reward model trains on first
    identify: str  # the columns that identify it, for messages and docs
    detect: Callable[[set[str], Row], bool]

    def kinds_for(self, columns: set[str]) -> tuple[str, ...]:
        """The kinds this file can be read as (some readers read two published forms)."""
        if self.name == "trl":
            return trl_kinds(columns)
        if self.name == "ultrafeedback" and "completions" not in columns:
            return ("preference", "sft", "prompt")  # the binarized form: one pair per row
        return self.kinds


def _is_hh(columns: set[str], first: Row) -> bool:
    chosen = first.get("chosen")
    return {"chosen", "rejected"} <= columns and "prompt" not in columns and isinstance(chosen, str) and HUMAN in chosen


READERS = {
    r.name: r
    for r in (
        Reader(
            "oasst1",
            ("ranking", "preference", "sft", "prompt"),
            "message_id, parent_id, role, text",
            lambda c, f: {"message_id", "parent_id", "role", "text"} <= c,
        ),
        Reader(
            "shp",
            ("preference", "sft", "prompt"),
            "history, human_ref_A, human_ref_B, labels",
            lambda c, f: {"history", "human_ref_A", "human_ref_B", "labels"} <= c,
        ),
        Reader(
            "summarize_from_feedback",
            ("preference", "sft", "prompt"),
            "info, summaries, choice",
            lambda c, f: {"info", "summaries", "choice"} <= c,
        ),
        Reader(
            "ultrafeedback",
            ("ranking", "preference", "sft", "prompt"),
            "instruction + completions (raw), or chosen / rejected + score_chosen / score_rejected (binarized)",
            lambda c, f: (
                {"instruction", "completions"} <= c or {"chosen", "rejected", "score_chosen", "score_rejected"} <= c
            ),
        ),
        Reader(
            "helpsteer2",
            ("ranking", "graded", "preference", "sft", "prompt"),
            "prompt, response, helpfulness ... verbosity",
            lambda c, f: {"prompt", "response"} <= c and bool(c & set(HELPSTEER_ATTRIBUTES)),
        ),
        Reader("hh-rlhf", ("preference", "sft", "prompt"), "chosen, rejected as \\n\\nHuman: dialogues", _is_hh),
        Reader(
            "trl",
            ("ranking", "preference", "sft", "graded", "prompt", "comparison"),
            "TRL's field names (prompt, completion, chosen, rejected, messages, label) and ranking / graded rows",
            lambda c, f: True,
        ),
    )
}
FORMAT_NAMES = tuple(READERS)


def detect(columns: set[str], first: Row) -> Reader:
    """The first reader whose columns the file has (trl, Rufus's own rows, last)."""
    return next(r for r in READERS.values() if r.detect(columns, first))


def is_unpaired(columns: set[str]) -> bool:
    """TRL's unpaired preference rows: prompt, completion and a boolean label."""
    return {"prompt", "completion", "label"} <= columns and "score" not in columns


def trl_kinds(columns: set[str]) -> tuple[str, ...]:
    """The kinds a file of Rufus's own rows can be read as, from its columns."""
    if is_unpaired(columns):
        return ("graded", "sft", "prompt")
    if "responses" in columns:
        return ("ranking", "prompt")
    if {"chosen", "rejected"} & columns:
        return ("preference", "prompt")
    if {"model_a", "model_b", "winner"} <= columns:
        return ("comparison",)
    if "score" in columns:
        return ("graded", "sft", "prompt")
    if "messages" in columns or "completion" in columns:
        return ("sft", "prompt")
    return ("prompt",)


def read(reader: Reader, rows: list[Row], kind: str, opts: ReadOptions, rej: Rejects, columns: set[str]) -> Output:
    """Rows of `kind` from a published file's `rows`, read by `reader` (not `trl`'s own rows)."""
    if reader.name == "oasst1":
        rankings, paths, filtered = read_oasst1(rows, rej, opts)
        if kind == "sft":
            out = Output([{"messages": g.prompt} for g in paths], [g.origin for g in paths])
        else:
            out = emit(rankings, kind, opts)
        out.filtered = filtered
        return out
    if reader.name == "helpsteer2":
        graded, groups = read_helpsteer2(rows, rej, opts, columns)
        if kind == "graded":
            return Output(
                [{k: v for k, v in r.items() if k != "_origin"} for r in graded], [r["_origin"] for r in graded]
            )
        return emit(groups, kind, opts)
    if reader.name == "trl":  # unpaired rows
        graded = read_unpaired(rows, rej, opts)
        if kind == "sft":
            graded = [r for r in graded if r["score"] == 1.0]
        origins = [r.pop("_origin") for r in graded]
        if kind == "sft":
            return Output([{"prompt": r["prompt"], "completion": r["completion"]} for r in graded], origins)
        if kind == "prompt":
            groups = [Group(r["prompt"], [], [], o) for r, o in zip(graded, origins)]
            return emit(groups, "prompt", opts)
        return Output(graded, origins)
    filtered = 0
    if reader.name == "hh-rlhf":
        groups = read_hh(rows, rej, opts)
    elif reader.name == "ultrafeedback":
        groups = read_ultrafeedback(rows, rej, opts)
    elif reader.name == "shp":
        groups, filtered = read_shp(rows, rej, opts)
    elif reader.name == "summarize_from_feedback":
        groups = read_summarize(rows, rej, opts)
    else:
        raise ValueError(f"no reader named {reader.name!r}")
    out = emit(groups, kind, opts)
    out.filtered = filtered
    return out
