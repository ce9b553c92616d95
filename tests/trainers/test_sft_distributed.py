"""Two CPU processes (one gloo group on 127.0.0.1) give the same losses as one process with the same global batch."""

from __future__ import annotations

import pytest

from rufus.report.metrics import read_metrics
from tests.helpers import run_cli, sft_rows, write_jsonl


def run_sft(args: list[str], nproc: int, cwd) -> None:
    run_cli("sft", args, nproc, cwd)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, tiny_model):
    model = tiny_model
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    common = [
        f"model={model}",
        f"data.train={train}",
        "data.max_length=48",
        "batch_size=8",
        "max_steps=6",
        "lr=3e-3",
        "dtype=float32",
        "progress=false",
        "seed=3",
    ]
    run_sft(common + [f"output_dir={tmp_path / 'one'}", "grad_accum=2"], 1, tmp_path)
    run_sft(common + [f"output_dir={tmp_path / 'two'}"], 2, tmp_path)
    one = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-4)
    assert one[-1] < one[0]  # it trained, so matching losses after step 1 means matching updates
