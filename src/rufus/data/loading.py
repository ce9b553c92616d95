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
row is checked before any training starts, and the first bad one raises `DataError` (or, with
``data.invalid_rows=skip``, is left out with one warning).

Which format a file is written in (a published data set's shape such as HH-RLHF, or Rufus's own rows)
is detected from its columns; `rufus.data.readers` turns published rows into the kind a trainer asks
for. Rufus's own rows go to `datasets` as they are; published ones are read from the parsed rows and
built into a dataset from the reader's output.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rufus.data.errors import DataError, describe
from rufus.data.formats import KINDS, from_csv, normalise, validate_rows
from rufus.data.readers import READERS, Reader, ReadOptions, Rejects, detect, is_unpaired, read

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import datasets

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}  # datasets' packaged loaders


@dataclass
class Records:
    """A validated dataset and enough about where each row came from to point a user at it.

    `dataset` holds the rows with their kind's normalised columns (see `rufus.data.formats`).
    `lines` is the line each input row starts on, for line-based files (jsonl, csv); None otherwise.
    `files` is set when the spec was a directory: (index of the file's first input row, path) per file.
    `origins` maps each row of `dataset` to the input row it was read from, when a reader made the rows
    (a published format) or rows were skipped; None when they are the input rows one for one.
    """

    dataset: datasets.Dataset
    source: str  # the file path as given, or "hub:name[split]"
    lines: list[int | None] | None
    file_type: str  # "jsonl" | "json" | "csv" | "parquet" | "hub"
    kind: str = ""  # "sft" | "preference" | "ranking" | "prompt" | "graded" | "comparison"
    files: list[tuple[int, str]] | None = None
    format: str = "trl"  # the reader: a published format's name, or trl (Rufus's own rows)
    origins: list[int] | None = None
    read_rows: int = 0  # input rows read
    rejected: list[tuple[int, DataError]] = field(default_factory=list)  # skipped (data.invalid_rows=skip)
    filtered: int = 0  # left out by a filter the user set (data.lang, data.min_score_ratio)
    ties: int = 0  # left out because all their responses tie

    def where(self, i: int) -> str:
        """Human location of row `i` (0-based): "train.jsonl, line 4", "prefs.csv, row 3 (line 4)"."""
        return self.where_input(self.origins[i] if self.origins is not None else i)

    def where_input(self, i: int) -> str:
        """Human location of input row `i` (0-based)."""
        path, row = self.source, i
        if self.files:
            j = bisect.bisect_right(self.files, i, key=lambda f: f[0]) - 1
            start, path = self.files[j]
            row = i - start
        line = self.lines[i] if self.lines is not None else None
        if line is None:
            return f"{path}, row {row + 1}"
        if self.file_type == "csv":
            return f"{path}, row {row + 1} (line {line})"
        return f"{path}, line {line}"

    def __len__(self) -> int:
        return len(self.dataset)


def load_records(
    spec: str | os.PathLike,
    *,
    kind: str | tuple[str, ...],
    split: str = "train",
    key: str = "data.train",
    options: ReadOptions | None = None,
) -> Records:
    """Load `spec` as rows of `kind`; raise DataError naming `key`, file, row and field.

    `spec` is a .jsonl / .json / .csv / .parquet file, a directory of files of one such type (read in
    name order), or a hub dataset id ("org/name", or "hub:org/name" to be explicit) read with
    ``datasets.load_dataset(name, options.subset, split=split)``. `split` only applies to hub datasets.
    A spec that looks like a path (known extension, or starting with ".", "/" or "~") is never sent to
    the hub, so a typo in a file name is reported as such instead of as a failed download.

    The file's format (a published data set's shape, or Rufus's own rows) is detected from its columns
    or forced by ``options.format``, and logged once. `kind` may be several kinds in order of
    preference (a reward model takes a ranking, else pairs): the first one the file can give is used.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind of rows {k!r}; choose one of {', '.join(KINDS)}")
    opts = options or ReadOptions()
    if opts.format != "auto" and opts.format not in READERS:
        raise DataError(f"unknown format {opts.format!r}; choose auto or one of {', '.join(READERS)}", where=key)
    spec = os.fspath(spec)
    if spec.startswith("hub:"):
        return _load_hub(spec[len("hub:") :], split, kinds, key, opts)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in EXTENSIONS)
        if not names:
            raise DataError(f"no {', '.join(EXTENSIONS)} files in this directory", where=f"{key}: {spec}")
        types = {EXTENSIONS[os.path.splitext(n)[1].lower()] for n in names}
        if len(types) > 1:
            raise DataError(
                f"mixes file types ({', '.join(sorted(types))}); keep one type per directory",
                where=f"{key}: {spec}",
            )
        members = [(os.path.join(spec, n), os.path.join(path, n)) for n in names]
        return _load_local(spec, members, types.pop(), kinds, key, opts, directory=True)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise DataError(
                f"unsupported file type {ext or '(no extension)'!r}; expected one of {', '.join(EXTENSIONS)}",
                where=f"{key}: {spec}",
            )
        return _load_local(spec, [(spec, path)], EXTENSIONS[ext], kinds, key, opts, directory=False)
    if _looks_local(spec):
        raise DataError("file not found", where=f"{key}: {spec}")
    return _load_hub(spec, split, kinds, key, opts)


# --- which reader, which kind; reading through a reader -----------------------------------------------

_logged: set[tuple[str, str, str]] = set()


def _columns(rows: list[dict] | datasets.Dataset) -> set[str]:
    """The columns of parsed rows (those of the first 100: JSON rows may leave some out) or a dataset."""
    if isinstance(rows, list):
        return set().union(*(r.keys() for r in rows[:100]))
    return set(rows.column_names)


def _choose(
    records: Records, rows: list[dict] | datasets.Dataset, columns: set[str], kinds: tuple[str, ...], key: str, opts
) -> Reader:
    """Pick the reader (detected or forced) and the kind, set them on `records`, log them once."""
    first = rows[0]
    reader = READERS[opts.format] if opts.format != "auto" else detect(columns, first)
    if opts.format != "auto" and not reader.detect(columns, first):
        raise DataError(
            f"data.format={opts.format}, but the rows have columns {', '.join(sorted(columns))}; "
            f"{opts.format} rows hold {reader.identify}",
            where=f"{key}: {records.source}",
        )
    offered = reader.kinds_for(columns)
    kind = next((k for k in kinds if k in offered), None)
    if kind is None:
        if reader.name != "trl":
            raise DataError(
                f"read as {reader.name}, which gives {', '.join(offered)} rows; this needs {' or '.join(kinds)}",
                where=f"{key}: {records.source}",
            )
        kind = kinds[0]  # Rufus's own rows: the row checks name the missing field
    records.format, records.kind = reader.name, kind
    if (records.source, reader.name, kind) not in _logged:
        _logged.add((records.source, reader.name, kind))
        how = "detected" if opts.format == "auto" else "data.format"
        log.info("%s: reading %s as %s (%s rows; %s)", key, records.source, reader.name, kind, how)
    return reader


def _converts(reader: Reader, columns: set[str]) -> bool:
    """Whether the rows go through a reader, rather than being Rufus's own rows checked as they are."""
    return reader.name != "trl" or is_unpaired(columns)


def _through_reader(records: Records, reader: Reader, rows, columns: set[str], key: str, opts) -> None:
    """Fill `records.dataset` with the rows `reader` makes of `rows`, checked as their kind."""
    import datasets

    rows = rows if isinstance(rows, list) else [dict(r) for r in rows]
    rej = Rejects(opts.invalid_rows, records.where_input, key)
    out = read(reader, rows, records.kind, opts, rej, columns)
    where_out = lambda i: records.where_input(out.origins[i])  # noqa: E731
    kept = validate_rows(out.rows, records.kind, where_out, key, lambda i, err: rej.add(out.origins[i], err))
    records.rejected, records.filtered, records.ties = rej.rows, out.filtered, out.ties
    records.origins = [out.origins[i] for i in kept]
    good = [out.rows[i] for i in kept]
    _report(records, key, len(good))
    records.dataset = normalise(datasets.Dataset.from_list(good), records.kind)


def _rejects(records: Records, key: str, opts: ReadOptions) -> Rejects:
    """The collector of rows that cannot be used, kept on `records` for the report."""
    rej = Rejects(opts.invalid_rows, records.where_input, key)
    records.rejected = rej.rows
    return rej


def _keep(records: Records, dataset, kept: list[int], key: str) -> None:
    """Rufus's own rows, checked: keep the good ones, report the rest."""
    if records.rejected:
        records.origins = kept
        dataset = dataset.select(kept)
    _report(records, key, len(kept))
    records.dataset = normalise(dataset, records.kind)


def _report(records: Records, key: str, kept: int) -> None:
    """One warning for skipped rows, one log line for rows left out by a filter or a tie; an error
    when nothing is left."""
    where = f"{key}: {records.source}"
    if records.rejected:
        shown = "; ".join(str(err) for _, err in records.rejected[:3])
        warnings.warn(
            f"{key}: skipped {len(records.rejected)} of {records.read_rows} rows that cannot be used "
            f"(data.invalid_rows=skip; `rufus data inspect` lists them all). First: {shown}",
            stacklevel=4,
        )
    if records.filtered:
        log.info(
            "%s: left out %d of %d rows by the filter set (data.lang / data.min_score_ratio)",
            key,
            records.filtered,
            records.read_rows,
        )
    if records.ties:
        log.info("%s: left out %d prompts whose responses all tie", key, records.ties)
    if not kept:
        why = []
        if records.rejected:
            why.append(f"{len(records.rejected)} cannot be used")
        if records.filtered:
            why.append(f"{records.filtered} filtered out")
        if records.ties:
            why.append(f"{records.ties} all tied")
        raise DataError(
            f"no {records.kind} rows left of {records.read_rows} read" + (f" ({', '.join(why)})" if why else ""),
            where=where,
        )


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
    spec: str,
    members: list[tuple[str, str]],
    file_type: str,
    kinds: tuple[str, ...],
    key: str,
    opts: ReadOptions,
    *,
    directory: bool,
) -> Records:
    """`members` are (path as shown to the user, path on disk), in reading order."""
    scans = [_scan(shown, path, file_type, key) for shown, path in members]
    for (shown, _), scan in zip(members, scans):
        if scan.rows == 0:
            why = {
                "csv": "only a header" if scan.header else "the file is empty",
                "json": "an empty JSON array",
            }
            raise DataError(f"no rows ({why.get(scan.kind, 'the file is empty')})", where=f"{key}: {shown}")
    starts = [sum(s.rows for s in scans[:j]) for j in range(len(scans))]
    types = {s.kind for s in scans}
    total = sum(s.rows for s in scans)
    records = Records(
        dataset=None,  # filled in below, once the rows are known to be good
        source=spec,
        lines=[line for s in scans for line in s.lines] if any(s.kind in ("jsonl", "csv") for s in scans) else None,
        file_type=types.pop() if len(types) == 1 else "json",
        files=[(start, shown) for start, (shown, _) in zip(starts, members)] if directory else None,
        read_rows=total,
    )
    objects = [o for s in scans for o in s.objects] if scans[0].objects is not None else None
    if objects is not None:
        columns = _columns(objects)
        reader = _choose(records, objects, columns, kinds, key, opts)
        if _converts(reader, columns):  # a published format: no need for datasets to read the file
            _through_reader(records, reader, objects, columns, key, opts)
            return records
        # Rufus's own rows: checked before Arrow unifies their types, then read by datasets
        kept = validate_rows(objects, records.kind, records.where_input, key, _rejects(records, key, opts).add)

    kwargs: dict[str, Any] = {}
    if file_type == "csv":
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
    dataset = _read(BUILDERS[file_type], [path for _, path in members], f"{key}: {spec}", **kwargs)
    if len(dataset) != total:
        if file_type != "csv":
            raise DataError(f"datasets read {len(dataset)} rows but the file holds {total}", where=f"{key}: {spec}")
        # pandas split the rows differently from the csv module: fall back to plain row numbers
        records.lines = None
    if objects is not None:
        _keep(records, dataset, kept, key)
        return records
    columns = _columns(dataset)
    reader = _choose(records, dataset, columns, kinds, key, opts)
    if _converts(reader, columns):
        _through_reader(records, reader, dataset, columns, key, opts)
        return records
    rows = (from_csv(row, records.kind) for row in dataset) if file_type == "csv" else dataset
    kept = validate_rows(rows, records.kind, records.where_input, key, _rejects(records, key, opts).add)
    _keep(records, dataset, kept, key)
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


def _load_hub(name: str, split: str, kinds: tuple[str, ...], key: str, opts: ReadOptions) -> Records:
    import datasets

    try:
        args = (name, opts.subset) if opts.subset else (name,)
        dataset = datasets.load_dataset(*args, split=split)
    except Exception as e:  # offline, not found, gated, bad split: all reported the same way
        subset = f", subset {opts.subset!r}" if opts.subset else ""
        raise DataError(
            f"could not load the hub dataset {name!r} (split {split!r}{subset}): {type(e).__name__}: {e}", where=key
        ) from e
    records = Records(dataset=None, source=f"hub:{name}[{split}]", lines=None, file_type="hub", read_rows=len(dataset))
    if len(dataset) == 0:
        raise DataError("no rows", where=f"{key}: {records.source}")
    columns = _columns(dataset)
    reader = _choose(records, dataset, columns, kinds, key, opts)
    if _converts(reader, columns):
        _through_reader(records, reader, dataset, columns, key, opts)
        return records
    kept = validate_rows(dataset, records.kind, records.where_input, key, _rejects(records, key, opts).add)
    _keep(records, dataset, kept, key)
    return records
