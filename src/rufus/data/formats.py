"""What a row of each kind must hold, checked one row at a time, and how rows are normalised.

Six kinds of rows, named after what a trainer (or the leaderboard) consumes (field names follow TRL's, so data sets
written for it load here unchanged; TRL calls these dataset types). Published data sets in their own shapes
(HH-RLHF, UltraFeedback, oasst1, ...) are turned into these kinds by `rufus.data.readers`:

``sft``
    ``prompt`` + ``completion`` strings; or ``messages``, a conversation with at least one assistant
    turn; or ``prompt`` + ``completion`` as message lists (the completion holds assistant turns only).
    Normalised: unchanged.
``preference``
    ``prompt`` + ``chosen`` + ``rejected``: all strings, or a message-list prompt with lists of
    assistant turns; or no ``prompt`` and two whole conversations sharing their opening turns, or two
    strings sharing their opening words (an "implicit prompt"). Optionally ``margin``, a finite number:
    how much better chosen is, for the reward model's margin loss (``rm.margin_from_data``; TRL's
    reward trainer reads the same column). Normalised: ``prompt``, ``chosen``, ``rejected``, implicit
    prompts split off.
``ranking``
    ``prompt`` + ``responses`` (>= 2 distinct, best first), optionally ``scores`` (one finite number
    per response, higher = better). Normalised: ``scores`` (list[float], ``scores[k]`` belongs to
    ``responses[k]``, higher = better; K-1, ..., 1, 0 when only the order was given) and
    ``ranked_by_order`` (bool: True when the scores were made from the order). Responses keep their
    order, so ties and score gaps given by the user survive.
``prompt``
    ``prompt``: a string or a message list; other columns are kept (e.g. reference answers for a
    reward function). Normalised: unchanged.
``comparison``
    ``model_a``, ``model_b`` (two different non-empty model names) and ``winner`` (``a``, ``b`` or ``tie``):
    one comparison of two models, for the leaderboard (`rufus leaderboard`). Other columns (the prompt,
    the responses) are kept and ignored. Normalised: unchanged.
``graded``
    ``prompt`` + ``completion`` (as for ``sft``: strings, or a message-list prompt with a list of
    assistant turns) + ``score``, one finite number grading the completion (higher = better; not a
    bool), for a reward model's pointwise warm-up. In csv files, where every cell is text, a score
    cell must parse as a number. Normalised: ``score`` becomes a float.

A "message list" is a non-empty list of ``{"role": system|user|assistant|tool, "content": str}``
dicts; user and assistant content must be non-empty. Extra keys in a message and unknown columns are
kept and ignored. Within one file every row must use the same style (all plain strings, or all
message lists), because downstream code tokenises a whole dataset one way.

A missing field and a null one are the same thing here: Arrow fills absent columns with null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from rufus.data.errors import DataError, describe

KINDS = ("sft", "preference", "ranking", "prompt", "graded", "comparison")
ROLES = ("system", "user", "assistant", "tool")

Row = dict[str, Any]
Messages = list[dict[str, Any]]

# Row styles, as returned by the row checks; the text is used in the mixed-styles error.
STYLES = {
    "plain": "plain strings",
    "conversational": "message lists",
    "messages": "a 'messages' conversation",
}


# --- field checks: each returns the value or raises DataError naming the field ---------------------


def _present(row: Row, field: str) -> bool:
    return row.get(field) is not None


def _missing(row: Row, field: str, where: str, hint: str = "") -> DataError:
    what = "missing (null)" if field in row else "missing"
    return DataError(what + (f"; {hint}" if hint else ""), where=where, field=field)


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a non-empty string, got {describe(value)}", where=where, field=field)
    if not value.strip():
        raise DataError("empty", where=where, field=field)
    return value


def _number(value: Any, field: str, where: str) -> float:
    # bool is an int subclass: a `true` score is a data bug, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"expected a finite number, got {describe(value)}", where=where, field=field)
    return float(value)


def _messages(value: Any, field: str, where: str, *, assistant_only: bool = False, start: int = 0) -> Messages:
    """Check a message list; `start` offsets the indices in error paths (for slices of a longer list)."""
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {describe(value)}", where=where, field=field)
    if not value:
        raise DataError("empty list of messages", where=where, field=field)
    for j, message in enumerate(value, start):
        path = f"{field}[{j}]"
        if not isinstance(message, dict):
            raise DataError(
                f"expected a message {{'role': ..., 'content': ...}}, got {describe(message)}",
                where=where,
                field=path,
            )
        role = message.get("role")
        if role is None:
            raise DataError("missing", where=where, field=f"{path}.role")
        if role not in ROLES:
            raise DataError(
                f"expected one of {', '.join(ROLES)}, got {describe(role)}", where=where, field=f"{path}.role"
            )
        if assistant_only and role != "assistant":
            raise DataError(
                f"expected only assistant turns here, got a {role!r} turn", where=where, field=f"{path}.role"
            )
        content = message.get("content")
        if content is None:
            raise DataError("missing", where=where, field=f"{path}.content")
        if not isinstance(content, str):
            raise DataError(f"expected a string, got {describe(content)}", where=where, field=f"{path}.content")
        if role in ("user", "assistant") and not content.strip():
            raise DataError("empty", where=where, field=f"{path}.content")
    return value


def _same_style(value: Any, style: str, field: str, other: str, where: str) -> None:
    """A row cannot pair a string prompt with message-list answers (or the reverse)."""
    if style == "plain" and isinstance(value, list):
        raise DataError(
            f"is a list but '{other}' is a string; use strings for both, or message lists for both",
            where=where,
            field=field,
        )
    if style == "conversational" and isinstance(value, str):
        raise DataError(
            f"is a string but '{other}' is a message list; use strings for both, or message lists for both",
            where=where,
            field=field,
        )


def clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """Drop null keys: Arrow gives every message the union of keys seen in the column, filled with null."""
    return {k: v for k, v in message.items() if v is not None}


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two strings into (shared opening words, rest of chosen, rest of rejected).

    The cut is at the last whitespace inside the longest common prefix, so a word both share only in
    part ("ca-t" / "ca-r") stays whole in the answers, and the answers keep their leading space, as a
    model writes them after the prompt. The prompt is "" when the two share no whole word.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n == len(chosen) == len(rejected):
        return chosen, "", ""
    cut = max((j for j in range(n) if chosen[j].isspace()), default=0)
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1  # the whole run of whitespace goes to the answers
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Split two conversations into (shared opening turns, rest of chosen, rest of rejected).

    Preference data is often stored as two whole conversations that differ only at the end (e.g.
    Anthropic HH in conversational form); the shared opening is the prompt. Same rule as TRL's
    ``extract_prompt``: the longest common prefix, compared message by message.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if clean_message(a) != clean_message(b):
            break
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


# --- one check per kind: (row, where) -> style, raising DataError on the first problem ----------


def check_sft(row: Row, where: str) -> str:
    if _present(row, "messages"):
        for other in ("prompt", "completion"):
            if _present(row, other):
                raise DataError(
                    f"row has both 'messages' and '{other}'; use either messages, or prompt + completion",
                    where=where,
                    field="messages",
                )
        messages = _messages(row["messages"], "messages", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("no assistant turn, so nothing to train on", where=where, field="messages")
        return "messages"
    if not _present(row, "prompt"):
        raise _missing(row, "prompt", where, "an sft row needs 'prompt' + 'completion', or 'messages'")
    return _prompt_completion(row, where)


def _prompt_completion(row: Row, where: str) -> str:
    """The prompt + completion pair of sft and graded rows (the prompt is known to be present)."""
    if not _present(row, "completion"):
        raise _missing(row, "completion", where)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        _messages(prompt, "prompt", where)
        _same_style(completion, "conversational", "completion", "prompt", where)
        _messages(completion, "completion", where, assistant_only=True)
        return "conversational"
    _text(prompt, "prompt", where)
    _same_style(completion, "plain", "completion", "prompt", where)
    _text(completion, "completion", where)
    return "plain"


def check_preference(row: Row, where: str) -> str:
    for field in ("chosen", "rejected"):
        if not _present(row, field):
            raise _missing(row, field, where)
    chosen, rejected = row["chosen"], row["rejected"]
    if _present(row, "margin"):
        _number(row["margin"], "margin", where)
    if not _present(row, "prompt") and isinstance(chosen, str) and isinstance(rejected, str):
        _text(chosen, "chosen", where)
        _text(rejected, "rejected", where)
        if chosen == rejected:
            raise DataError("chosen and rejected are identical", where=where, field="rejected")
        prompt, chosen_rest, rejected_rest = split_implicit_text(chosen, rejected)
        if not prompt.strip():
            raise _missing(row, "prompt", where, "chosen and rejected share no opening words to take as the prompt")
        for field, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
            if not rest.strip():
                raise DataError("has nothing after the prompt shared with the other answer", where=where, field=field)
        return "plain"
    if not _present(row, "prompt"):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise _missing(
                row,
                "prompt",
                where,
                "chosen and rejected must both be strings or both message lists to leave the prompt implicit",
            )
        _messages(chosen, "chosen", where)
        _messages(rejected, "rejected", where)
        prompt, chosen_rest, rejected_rest = split_implicit_prompt(chosen, rejected)
        if not chosen_rest and not rejected_rest:
            raise DataError("chosen and rejected are identical", where=where, field="rejected")
        if not prompt:
            raise _missing(row, "prompt", where, "chosen and rejected share no opening turns to take as the prompt")
        for field, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
            if not rest:
                raise DataError("has no turns after the prompt shared with the other answer", where=where, field=field)
            _messages(rest, field, where, assistant_only=True, start=len(prompt))
        return "conversational"
    prompt = row["prompt"]
    if isinstance(prompt, list):
        _messages(prompt, "prompt", where)
        for field in ("chosen", "rejected"):
            _same_style(row[field], "conversational", field, "prompt", where)
            _messages(row[field], field, where, assistant_only=True)
        style = "conversational"
    else:
        _text(prompt, "prompt", where)
        for field in ("chosen", "rejected"):
            _same_style(row[field], "plain", field, "prompt", where)
            _text(row[field], field, where)
        style = "plain"
    if canonical(chosen) == canonical(rejected):
        raise DataError("chosen and rejected are identical", where=where, field="rejected")
    return style


def check_ranking(row: Row, where: str) -> str:
    if not _present(row, "prompt"):
        raise _missing(row, "prompt", where)
    if not _present(row, "responses"):
        raise _missing(row, "responses", where, "a ranking row needs 'prompt' and 'responses' (best first)")
    prompt, responses = row["prompt"], row["responses"]
    style = "conversational" if isinstance(prompt, list) else "plain"
    if style == "conversational":
        _messages(prompt, "prompt", where)
    else:
        _text(prompt, "prompt", where)
    if not isinstance(responses, list):
        raise DataError(
            f"expected a list of at least 2 responses, got {describe(responses)}",
            where=where,
            field="responses",
        )
    if len(responses) < 2:
        raise DataError(f"needs at least 2 responses to rank, got {len(responses)}", where=where, field="responses")
    for j, response in enumerate(responses):
        field = f"responses[{j}]"
        _same_style(response, style, field, "prompt", where)
        if style == "conversational":
            _messages(response, field, where, assistant_only=True)
        else:
            _text(response, field, where)
    seen = {}
    for j, response in enumerate(responses):
        first = seen.setdefault(canonical(response), j)
        if first != j:
            raise DataError(
                f"identical to responses[{first}]; responses must be distinct",
                where=where,
                field=f"responses[{j}]",
            )
    scores = row.get("scores")
    if scores is not None:
        if not isinstance(scores, list):
            raise DataError(f"expected a list of numbers, got {describe(scores)}", where=where, field="scores")
        if len(scores) != len(responses):
            raise DataError(f"has {len(scores)} scores for {len(responses)} responses", where=where, field="scores")
        for j, score in enumerate(scores):
            _number(score, f"scores[{j}]", where)
    return style


def check_prompt(row: Row, where: str) -> str:
    if not _present(row, "prompt"):
        raise _missing(row, "prompt", where)
    if isinstance(row["prompt"], list):
        _messages(row["prompt"], "prompt", where)
        return "conversational"
    _text(row["prompt"], "prompt", where)
    return "plain"


def check_graded(row: Row, where: str) -> str:
    if not _present(row, "prompt"):
        raise _missing(row, "prompt", where, "a graded row needs 'prompt', 'completion' and 'score'")
    style = _prompt_completion(row, where)
    if not _present(row, "score"):
        raise _missing(row, "score", where, "a number grading the completion, higher = better")
    _number(row["score"], "score", where)
    return style


def check_comparison(row: Row, where: str) -> str:
    for field in ("model_a", "model_b", "winner"):
        if not _present(row, field):
            raise _missing(row, field, where, "a comparison row needs 'model_a', 'model_b' and 'winner' (a, b or tie)")
    _text(row["model_a"], "model_a", where)
    _text(row["model_b"], "model_b", where)
    if row["model_a"] == row["model_b"]:
        raise DataError("is the same model as 'model_a'; a comparison needs two models", where=where, field="model_b")
    if row["winner"] not in ("a", "b", "tie"):
        raise DataError(f"expected a, b or tie, got {describe(row['winner'])}", where=where, field="winner")
    return "plain"


CHECKS: dict[str, Callable[[Row, str], str]] = {
    "sft": check_sft,
    "preference": check_preference,
    "ranking": check_ranking,
    "prompt": check_prompt,
    "graded": check_graded,
    "comparison": check_comparison,
}

# Fields that hold a number, per kind. csv cells are all text (see loading.py), so these are parsed
# before the row checks; a cell that is not a number stays text and is reported as such.
CSV_NUMBERS = {"graded": ("score",), "preference": ("margin",)}


def from_csv(row: Row, kind: str) -> Row:
    """`row` as read from a csv file, with the number fields of `kind` parsed (where they parse)."""
    fields = CSV_NUMBERS.get(kind, ())
    if not fields:
        return row
    row = dict(row)
    for field in fields:
        value = row.get(field)
        if isinstance(value, str):
            try:
                row[field] = float(value)
            except ValueError:
                pass  # left as text: the check reports "expected a finite number, got str ('...')"
    return row


def canonical(value: Any) -> Any:
    """A comparable form of a string or message list that ignores Arrow's null-filled keys."""
    if isinstance(value, list):
        return json.dumps([clean_message(m) for m in value], sort_keys=True, default=str)
    return value


def validate_rows(
    rows: Iterable[Row],
    kind: str,
    where: Callable[[int], str],
    key: str,
    reject: Callable[[int, DataError], None] | None = None,
) -> list[int]:
    """Check every row of `kind`; return the indices of the good ones.

    `where(i)` gives the human location of row i ("train.jsonl, line 4"); `key` is the config key
    that named the data ("data.train"), put in front of every message. A bad row raises its DataError,
    unless `reject(i, error)` is given: it then decides (raise, or keep a note and go on).
    """
    check = CHECKS[kind]
    first_style, first = None, 0
    kept = []
    for i, row in enumerate(rows):
        loc = f"{key}: {where(i)}"
        try:
            style = check(row, loc)
            if first_style is not None and style != first_style:
                raise DataError(
                    f"this row uses {STYLES[style]} but the first row ({where(first)}) uses "
                    f"{STYLES[first_style]}; all rows must use one style",
                    where=loc,
                    field="messages" if style == "messages" else "prompt",
                )
        except DataError as err:
            if reject is None:
                raise
            reject(i, err)
            continue
        if first_style is None:
            first_style, first = style, i
        kept.append(i)
    return kept


# --- normalisation: run on the loaded datasets.Dataset after validation ---------------------------


def _normalise_preference(row: Row) -> Row:
    if row.get("prompt") is not None:
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    split = split_implicit_text if isinstance(row["chosen"], str) else split_implicit_prompt
    prompt, chosen, rejected = split(row["chosen"], row["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _normalise_ranking(row: Row) -> Row:
    k = len(row["responses"])
    if row.get("scores") is None:
        # Best-first order becomes descending scores, so downstream code has one representation.
        return {"scores": [float(k - 1 - j) for j in range(k)], "ranked_by_order": True}
    return {"scores": [float(s) for s in row["scores"]], "ranked_by_order": False}


def normalise(dataset, kind: str):
    """Bring a validated dataset to the normalised columns of its kind (see the module table).

    Done with ``Dataset.map`` so columns we do not touch keep their Arrow types and the result is
    cached next to the source like any other datasets transform.
    """
    if kind == "graded":
        if getattr(dataset.features.get("score"), "dtype", None) == "string":
            # csv text, which validation has already parsed as finite numbers (Python's float(), which
            # accepts more spellings than an Arrow cast)
            dataset = dataset.map(lambda row: {"score": float(row["score"])}, desc="graded: scores")
        if getattr(dataset.features["score"], "dtype", None) != "float64":
            import datasets

            dataset = dataset.cast_column("score", datasets.Value("float64"))  # e.g. int64 from json
        return dataset
    if kind == "ranking":
        return dataset.map(_normalise_ranking, desc="ranking: scores")
    if kind == "preference":
        if getattr(dataset.features.get("margin"), "dtype", None) == "string":  # csv text, already checked
            dataset = dataset.map(lambda row: {"margin": float(row["margin"])}, desc="preference: margins")
        if "prompt" in dataset.column_names and all(p is not None for p in dataset["prompt"]):
            return dataset
        return dataset.map(_normalise_preference, desc="preference: split implicit prompts")
    return dataset
