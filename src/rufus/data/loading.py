"""Load a dataset from a local file, a directory of files, or the Hugging Face hub, and validate it.

Reading is done by `datasets` (Arrow, memory-mapped, cached); what we add is the error reporting.
Arrow's readers report problems by byte offset or not at all (a prompt that is an int in one row
silently becomes a string column, or the whole column becomes JSON), so for text files we first
scan the raw bytes ourselves:

- every line must be valid UTF-8 (the error names line and column);
- json / jsonl are parsed with the standard library first, so malformed JSON is reported at its
  line and column, and the parsed rows are validated *before* Arrow unifies their types;
- csv rows are mapped to the physical line they start on (quoted fields may span lines).

csv / parquet / hub rows are validated after loading, from what `datasets` returns. Either way every
row is checked before any training starts, and the first bad one raises `DataError`.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rufus.data.errors import DataError, describe
from rufus.data.formats import FORMATS, from_csv, normalise, validate_rows

if TYPE_CHECKING:
    import datasets

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}  # datasets' packaged loaders


@dataclass
class Records:
    """A validated dataset and enough about where each row came from to point a user at it.

    `dataset` holds the rows with their format's normalised columns (see `rufus.data.formats`).
    `lines` is the line each row starts on, for line-based files (jsonl, csv); None otherwise.
    `files` is set when the spec was a directory: (index of the file's first row, path) per file.
    """

    dataset: datasets.Dataset
    source: str  # the file path as given, or "hub:name[split]"
    lines: list[int | None] | None
    kind: str  # "jsonl" | "json" | "csv" | "parquet" | "hub"
    format: str = ""  # "sft" | "preference" | "ranking" | "prompt" | "graded"
    files: list[tuple[int, str]] | None = None

    def where(self, i: int) -> str:
        """Human location of row `i` (0-based): "train.jsonl, line 4", "prefs.csv, row 3 (line 4)"."""
        path, row = self.source, i
        if self.files:
            j = bisect.bisect_right(self.files, i, key=lambda f: f[0]) - 1
            start, path = self.files[j]
            row = i - start
        line = self.lines[i] if self.lines is not None else None
        if line is None:
            return f"{path}, row {row + 1}"
        if self.kind == "csv":
            return f"{path}, row {row + 1} (line {line})"
        return f"{path}, line {line}"

    def __len__(self) -> int:
        return len(self.dataset)


def load_records(spec: str | os.PathLike, *, format: str, split: str = "train", key: str = "data.train") -> Records:
    """Load `spec` and validate every row as `format`; raise DataError naming `key`, file, row and field.

    `spec` is a .jsonl / .json / .csv / .parquet file, a directory of files of one such type (read in
    name order), or a hub dataset id ("org/name", or "hub:org/name" to be explicit) read with
    ``datasets.load_dataset(name, split=split)``. `split` only applies to hub datasets. A spec that
    looks like a path (known extension, or starting with ".", "/" or "~") is never sent to the hub,
    so a typo in a file name is reported as such instead of as a failed download.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    spec = os.fspath(spec)
    if spec.startswith("hub:"):
        return _load_hub(spec[len("hub:") :], split, format, key)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in EXTENSIONS)
        if not names:
            raise DataError(f"no {', '.join(EXTENSIONS)} files in this directory", where=f"{key}: {spec}")
        kinds = {EXTENSIONS[os.path.splitext(n)[1].lower()] for n in names}
        if len(kinds) > 1:
            raise DataError(
                f"mixes file types ({', '.join(sorted(kinds))}); keep one type per directory",
                where=f"{key}: {spec}",
            )
        members = [(os.path.join(spec, n), os.path.join(path, n)) for n in names]
        return _load_local(spec, members, kinds.pop(), format, key, directory=True)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise DataError(
                f"unsupported file type {ext or '(no extension)'!r}; expected one of {', '.join(EXTENSIONS)}",
                where=f"{key}: {spec}",
            )
        return _load_local(spec, [(spec, path)], EXTENSIONS[ext], format, key, directory=False)
    if _looks_local(spec):
        raise DataError("file not found", where=f"{key}: {spec}")
    return _load_hub(spec, split, format, key)


def _looks_local(spec: str) -> bool:
    """Hub ids are "name" or "org/name" without a file extension; anything else is meant as a path."""
    ext = os.path.splitext(spec)[1].lower()
    return ext in EXTENSIONS or spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


# --- local files ------------------------------------------------------------------------------


@dataclass
class _Scan:
    """What the byte-level scan of one file found."""

    kind: str  # what the file holds: a .json file may turn out to be JSON Lines
    rows: int
    lines: list[int | None]  # line each row starts on; None entries where the format has none
    objects: list[dict[str, Any]] | None = None  # parsed json / jsonl rows
    header: list[str] | None = None  # csv column names


def _load_local(
    spec: str, members: list[tuple[str, str]], kind: str, format: str, key: str, *, directory: bool
) -> Records:
    """`members` are (path as shown to the user, path on disk), in reading order."""
    scans = [_scan(shown, path, kind, key) for shown, path in members]
    for (shown, _), scan in zip(members, scans):
        if scan.rows == 0:
            why = {
                "csv": "only a header" if scan.header else "the file is empty",
                "json": "an empty JSON array",
            }
            raise DataError(f"no rows ({why.get(scan.kind, 'the file is empty')})", where=f"{key}: {shown}")
    starts = [sum(s.rows for s in scans[:j]) for j in range(len(scans))]
    kinds = {s.kind for s in scans}
    records = Records(
        dataset=None,  # filled in below, once the rows are known to be good
        source=spec,
        lines=[line for s in scans for line in s.lines] if any(s.kind in ("jsonl", "csv") for s in scans) else None,
        kind=kinds.pop() if len(kinds) == 1 else "json",
        format=format,
        files=[(start, shown) for start, (shown, _) in zip(starts, members)] if directory else None,
    )
    total = sum(s.rows for s in scans)
    objects = [o for s in scans for o in s.objects] if scans[0].objects is not None else None
    if objects is not None:
        validate_rows(objects, format, records.where, key)

    kwargs: dict[str, Any] = {}
    if kind == "csv":
        headers = {tuple(s.header) for s in scans}
        if len(headers) > 1:
            raise DataError("the files have different csv headers", where=f"{key}: {spec}")
        # Read every column as text: pandas would otherwise turn a prompt "42" into an int and an
        # empty cell or "NA" into null; an empty cell stays "" so it is reported as empty.
        import datasets

        kwargs = dict(
            features=datasets.Features({c: datasets.Value("string") for c in scans[0].header}),
            keep_default_na=False,
        )
    dataset = _read(BUILDERS[kind], [path for _, path in members], f"{key}: {spec}", **kwargs)
    if len(dataset) != total:
        if kind != "csv":
            raise DataError(f"datasets read {len(dataset)} rows but the file holds {total}", where=f"{key}: {spec}")
        # pandas split the rows differently from the csv module: fall back to plain row numbers
        records.lines = None
    if objects is None:
        rows = (from_csv(row, format) for row in dataset) if kind == "csv" else dataset
        validate_rows(rows, format, records.where, key)
    records.dataset = normalise(dataset, format)
    return records


def _read(builder: str, paths: list[str], where: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)
    except Exception as e:  # Arrow / pandas errors: keep their text, add the location
        raise DataError(f"could not be read by datasets: {type(e).__name__}: {e}", where=where) from e


def _scan(shown: str, path: str, kind: str, key: str) -> _Scan:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            raise DataError(f"not a readable parquet file: {e}", where=f"{key}: {shown}") from e
        return _Scan(kind, rows, [None] * rows)
    with open(path, "rb") as f:
        data = f.read()
    lines = _decode_lines(data, f"{key}: {shown}")
    if kind == "csv":
        return _scan_csv(lines, f"{key}: {shown}")
    if kind == "json":
        text = "\n".join(lines)
        if text.lstrip().startswith("["):
            return _scan_json_array(text, f"{key}: {shown}")
        _reject_single_object(text, lines, f"{key}: {shown}")
    # .jsonl, or a .json file holding JSON Lines (which `datasets` reads too)
    return _scan_jsonl(lines, f"{key}: {shown}")


def _decode_lines(data: bytes, where: str) -> list[str]:
    """Decode line by line, so a bad byte is reported at its line and column (UTF-8 never puts 0x0A
    inside a multi-byte character, so splitting the bytes first is safe)."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    lines = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            column = len(raw[: e.start].decode("utf-8")) + 1
            raise DataError(
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})", where=f"{where}, line {n}"
            ) from None
    return lines


def _scan_jsonl(lines: list[str], where: str) -> _Scan:
    objects, numbers = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines are skipped, but still counted
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", where=f"{where}, line {n}") from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object {{...}}, got {describe(obj)}", where=f"{where}, line {n}")
        objects.append(obj)
        numbers.append(n)
    return _Scan("jsonl", len(objects), numbers, objects)


def _reject_single_object(text: str, lines: list[str], where: str) -> None:
    """A .json file holding one object spread over several lines ({"data": [...]}) is not rows; without
    this check it would be reported as malformed JSON Lines at its line 1."""
    if sum(1 for line in lines if line.strip()) < 2 or not text.lstrip().startswith("{"):
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON Lines (or broken): the line-by-line scan reports it
    if isinstance(whole, dict):
        keys = ", ".join(list(map(repr, whole))[:5])
        raise DataError(
            f"holds a single JSON object (keys {keys}), not rows; write a JSON array of row objects, or JSON Lines",
            where=where,
        )


def _scan_json_array(text: str, where: str) -> _Scan:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", where=f"{where}, line {e.lineno}") from None
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object {{...}}, got {describe(obj)}", where=f"{where}, row {i + 1}")
    return _Scan("json", len(data), [None] * len(data), data)


def _scan_csv(lines: list[str], where: str) -> _Scan:
    """Find the header and the physical line each data row starts on (pandas skips blank lines too)."""
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header, numbers, previous = None, [], 0
    try:
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not record:
                continue
            if header is None:
                header = record
                seen = set()
                for name in header:
                    if name in seen:
                        raise DataError(f"duplicate column {name!r} in the header", where=f"{where}, line {start}")
                    seen.add(name)
            else:
                numbers.append(start)
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", where=f"{where}, line {reader.line_num}") from None
    return _Scan("csv", len(numbers), numbers, header=header)


# --- hub ------------------------------------------------------------------------------------------


def _load_hub(name: str, split: str, format: str, key: str) -> Records:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, not found, gated, bad split: all reported the same way
        raise DataError(
            f"could not load the hub dataset {name!r} (split {split!r}): {type(e).__name__}: {e}", where=key
        ) from e
    records = Records(dataset=None, source=f"hub:{name}[{split}]", lines=None, kind="hub", format=format)
    if len(dataset) == 0:
        raise DataError("no rows", where=f"{key}: {records.source}")
    validate_rows(dataset, format, records.where, key)
    records.dataset = normalise(dataset, format)
    return records
