"""The one exception the data layer raises for bad input.

A user who gets a data error should be able to open the file at the right place without reading
our code: every message names the config key, the file (or hub dataset), the row or line, and the
field, e.g. ``data.train: data/train.jsonl, line 7, field 'prompt': expected a non-empty string,
got int (42)``. It subclasses ValueError so generic ``except ValueError`` handlers still catch it.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data, with its location.

    `where` is the location prefix ("data.train: train.jsonl, line 7"), `field` the column, or a
    path into it ("messages[2].content"). Both are kept as attributes for callers that want them;
    the message reads ``{where}, field '{field}': {problem}`` (or ``{where}: {problem}`` with no
    field). The exception pickles (``self.args`` is the full message), so worker processes can
    raise it.
    """

    def __init__(self, problem: str, *, where: str | None = None, field: str | None = None):
        self.problem, self.where, self.field = problem, where, field
        message = f"field '{field}': {problem}" if field else problem
        if where:
            message = f"{where}, {message}" if field else f"{where}: {message}"
        super().__init__(message)


def describe(value: object, limit: int = 40) -> str:
    """'int (42)', "str ('')", 'list ([1, 2])': the type and a short repr, for "got ..." messages."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} ({text})"
