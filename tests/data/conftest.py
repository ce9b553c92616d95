"""Fixtures for the data tests: a tiny locally trained tokenizer and a file writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tok():
    """Byte-level BPE tokenizer with bos "<s>", eos "</s>", pad "<pad>" and a Zephyr-style chat template."""
    from rufus.models.tiny import builtin_corpus, train_tokenizer

    return train_tokenizer(builtin_corpus())


@pytest.fixture
def write(tmp_path, monkeypatch):
    """write(name, content) -> path as a string, relative to a fresh working directory (so error messages
    show the short name). `content` is bytes / str written as is, or a list of rows: JSON Lines for
    .jsonl, a JSON array for .json, a parquet file for .parquet."""
    monkeypatch.chdir(tmp_path)

    def _write(name: str, content) -> str:
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".parquet"):
            import datasets

            datasets.Dataset.from_list(content).to_parquet(str(path))
        elif name.endswith(".json"):
            path.write_text(json.dumps(content, indent=1), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(row) + "\n" for row in content), encoding="utf-8")
        return name

    return _write
