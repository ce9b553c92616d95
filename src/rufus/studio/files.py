"""Reading the files a round is built from, through the data layer (so every error names the file,
the line and the field): a prompts file (prompt format), or a responses file (rows with `prompt`,
a `responses` list and optionally `models`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rufus.studio.db import StudioError
from rufus.studio.rounds import Candidate, candidates_from_rows


def read_prompts(path: str) -> list:
    """The prompts (strings or message lists) of a prompt-format file."""
    from rufus.data.loading import load_records

    records = load_records(path, kind="prompt", key="prompts")
    return [row["prompt"] for row in records.dataset]


def read_candidates(path: str, key: str = "responses") -> list[Candidate]:
    """Candidates from a responses file (module docstring)."""
    from rufus.data.formats import clean_message
    from rufus.data.loading import load_records

    records = load_records(path, kind="prompt", key=key)
    if "responses" not in records.dataset.column_names:
        raise StudioError(
            f"{key}: {path} has no 'responses' column; a responses file has rows with 'prompt' and "
            "'responses' (a list), optionally 'models'"
        )
    rows = []
    for row in records.dataset:
        row = dict(row)
        if isinstance(row.get("prompt"), list):
            row["prompt"] = [clean_message(m) for m in row["prompt"]]
        if isinstance(row.get("responses"), list):
            row["responses"] = [[clean_message(m) for m in r] if isinstance(r, list) else r for r in row["responses"]]
        rows.append(row)
    return candidates_from_rows(rows, lambda i: f"{key}: {records.where(i)}")


def read_gold(path: str) -> list[Candidate]:
    """Gold prompts from a ranking file: `prompt`, `responses` and their known `scores` (higher =
    better; a best-first order without scores works too)."""
    from rufus.data.loading import load_records

    records = load_records(path, kind="ranking", key="gold")
    return [
        Candidate(row["prompt"], list(row["responses"]), gold=[float(x) for x in row["scores"]])
        for row in records.dataset
    ]


def candidates_from_upload(data: bytes, filename: str) -> list[Candidate]:
    """Candidates from the bytes of an uploaded responses file (its name gives the type)."""
    from rufus.data.errors import DataError

    suffix = Path(filename).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise StudioError(f"{filename}: upload a .jsonl, .json, .csv or .parquet file")
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="rufus-studio-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return read_candidates(tmp, key="upload")
        except DataError as e:
            raise StudioError(str(e).replace(tmp, filename)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
