"""`rufus data inspect FILE`: what a data file is, what a trainer will make of it, and what it will refuse.

It reads the file the way the trainers do (same readers, same checks, same tokenisation) but never
stops at a bad row: it counts every row that cannot be used, groups them by reason and shows the
first few with their lines. With a tokenizer it gives length percentiles in tokens and a few rows as
the model will see them, the chat template applied and special tokens shown.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from rufus.config import REQUIRED, as_config, opt


@dataclass
class InspectConfig:
    """Look at a data file (or hub dataset): its format, its rows, rejected rows, lengths in tokens."""

    file: str = opt(REQUIRED, "a .jsonl/.json/.csv/.parquet file, a directory of them, or a hub dataset name")
    kind: Literal["auto", "sft", "preference", "ranking", "prompt", "graded", "comparison"] = opt(
        "auto", "the kind of rows to read it as (auto: a ranking where the file gives one, else pairs, else ...)"
    )
    tokenizer: str | None = opt(
        None, "tokenizer (path, hub id or builtin:...) for token lengths and examples as the model sees them"
    )
    chat_template: str | None = opt(None, "Jinja chat template overriding the tokenizer's")
    examples: int = opt(2, "rows to show as the trainer will see them", ge=0)
    show_rejected: int = opt(5, "rejected rows to show with their line and reason", ge=0)
    split: str = opt("train", "split to read when `file` is a hub dataset")
    format: Literal[
        "auto", "hh-rlhf", "ultrafeedback", "oasst1", "shp", "summarize_from_feedback", "helpsteer2", "trl"
    ] = opt("auto", "how the file is written: auto = detected from its columns (see docs/data.md)")
    subset: str | None = opt(None, "configuration (subset) of a hub dataset")
    pairs: Literal["best_vs_worst", "best_vs_rest", "all"] = opt("best_vs_worst", "preference pairs from a ranking")
    hh_rlhf: Literal["auto", "messages", "text"] = opt("auto", "hh-rlhf dialogues as chat messages or plain text")
    lang: list[str] = opt([], "oasst1: keep messages in these languages only")
    min_score_ratio: float = opt(0.0, "shp: keep pairs whose vote ratio is at least this", ge=0)
    attributes: str = opt("helpfulness", "helpsteer2: the score, e.g. helpfulness:0.65,correctness:0.8")


ORDER = ("ranking", "preference", "sft", "graded", "prompt", "comparison")


def inspect_data(config: InspectConfig | dict) -> dict[str, Any]:
    """Read the file as configured; return the report as a dict (`format_report` prints it)."""
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from

    cfg = as_config(InspectConfig, config)
    tokenizer = None
    if cfg.tokenizer:
        from rufus.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer, chat_template=cfg.chat_template)
    opts = options_from(cfg, tokenizer)
    opts.invalid_rows = "skip"  # count every bad row instead of stopping at the first
    kinds = ORDER if cfg.kind == "auto" else (cfg.kind,)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report lists the skipped rows itself
        records = load_records(cfg.file, kind=kinds, split=cfg.split, key="file", options=opts)
    reasons = Counter(err.problem for _, err in records.rejected)
    report: dict[str, Any] = {
        "file": cfg.file,
        "source": records.source,
        "format": records.format,
        "detected": cfg.format == "auto",
        "kind": records.kind,
        "rows_read": records.read_rows,
        "rows": len(records),
        "rejected": len(records.rejected),
        "reasons": reasons.most_common(),
        "rejected_rows": [str(err) for _, err in records.rejected[: cfg.show_rejected]],
        "filtered": records.filtered,
        "ties": records.ties,
        "columns": records.dataset.column_names,
    }
    if tokenizer is not None:
        encoded = [(i, encode_row(tokenizer, records.kind, row)) for i, row in enumerate(records.dataset)]
        report["tokenizer"] = cfg.tokenizer
        report["lengths"] = lengths([parts for _, parts in encoded])
        report["examples"] = [
            {"where": records.where(i), **{part: decode(tokenizer, ids) for part, ids in parts.items()}}
            for i, parts in encoded[: cfg.examples]
        ]
    else:
        report["examples"] = [
            {"where": records.where(i), **records.dataset[i]} for i in range(min(cfg.examples, len(records)))
        ]
    return report


def encode_row(tokenizer, kind: str, row: dict) -> dict[str, list[int]]:
    """The token ids of each part of a row as the trainer of its kind builds them: the prompt, then each
    response (chosen / rejected, the ranked responses, the completion)."""
    from rufus.data.encoding import encode_prompt, encode_response
    from rufus.data.sft import encode_row as encode_sft

    if kind == "prompt":
        return {"prompt": encode_prompt(tokenizer, row["prompt"])}
    if kind == "sft":
        enc, _, _ = encode_sft(tokenizer, row, "")
        return {"prompt": enc.ids[: enc.n_prompt], "completion": enc.ids[enc.n_prompt :]}
    if kind == "preference":
        fields = {"chosen": row["chosen"], "rejected": row["rejected"]}
    elif kind == "ranking":
        fields = {f"responses[{j}]": r for j, r in enumerate(row["responses"])}
    elif kind == "graded":
        fields = {"completion": row["completion"]}
    else:
        return {}
    parts: dict[str, list[int]] = {}
    for name, response in fields.items():
        enc = encode_response(tokenizer, row["prompt"], response)
        parts.setdefault("prompt", enc.ids[: enc.n_prompt])
        parts[name] = enc.ids[enc.n_prompt :]
    return parts


def lengths(rows: list[dict[str, list[int]]]) -> dict[str, dict[str, int]]:
    """Percentiles (nearest rank) of each part's length in tokens, and of prompt + longest response."""
    columns: dict[str, list[int]] = {}
    for parts in rows:
        for name, ids in parts.items():
            key = "responses" if name.startswith("responses[") else name
            columns.setdefault(key, []).append(len(ids))
        longest = max((len(ids) for name, ids in parts.items() if name != "prompt"), default=0)
        columns.setdefault("total", []).append(len(parts.get("prompt", [])) + longest)
    return {name: percentiles(values) for name, values in columns.items()}


def percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)

    def rank(q: float) -> int:  # nearest-rank percentile
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1]}


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def format_report(report: dict[str, Any]) -> str:
    """The report as a person reads it in a terminal."""
    how = "detected from its columns" if report["detected"] else "data.format"
    lines = [f"{report['source']}: {report['format']} ({how}), read as {report['kind']} rows"]
    lines.append(f"  rows read        {report['rows_read']}")
    lines.append(f"  {report['kind']} rows{' ' * max(1, 12 - len(report['kind']))}{report['rows']}")
    lines.append(f"  rejected         {report['rejected']}")
    for reason, n in report["reasons"]:
        lines.append(f"    {n:>6}  {reason}")
    if report["rejected_rows"]:
        lines.append("  first rejected rows:")
        lines += [f"    {text}" for text in report["rejected_rows"]]
    if report["filtered"]:
        lines.append(f"  filtered out     {report['filtered']} (data.lang / data.min_score_ratio)")
    if report["ties"]:
        lines.append(f"  all tied         {report['ties']} (no pair to learn from)")
    if "lengths" in report:
        lines.append(f"\ntokens, with tokenizer {report['tokenizer']}:")
        lines.append(f"  {'':<18}" + "".join(f"{q:>7}" for q in ("p50", "p90", "p99", "max")))
        for name, p in report["lengths"].items():
            lines.append(f"  {name:<18}" + "".join(f"{p[q]:>7}" for q in ("p50", "p90", "p99", "max")))
    for n, example in enumerate(report["examples"], 1):
        lines.append(f"\nexample {n} ({example['where']}):")
        for name, value in example.items():
            if name != "where":
                lines.append(f"  {name}: {value!r}")
    return "\n".join(lines)
