"""metrics.jsonl, one JSON object per logged step, plus optional tensorboard / wandb sinks."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from rufus.config import atomic_write_text

log = logging.getLogger(__name__)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash or drop
    return value


class MetricsLogger:
    """Appends rows to `output_dir/metrics.jsonl` on the main process.

    When a run resumes from step `resume_step`, rows written after that step by the interrupted
    run are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        report_to: list[str] = (),
        resume_step: int | None = None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.sinks = []
        self.rows: list[dict] = []  # what this logger wrote in this process
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        for name in report_to:
            self.sinks.append(self._open_sink(name, Path(output_dir), run_config or {}))

    @staticmethod
    def _open_sink(name: str, output_dir: Path, run_config: dict):
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "report_to=tensorboard needs the tensorboard package: pip install 'rufus[tensorboard]'"
                ) from e
            writer = SummaryWriter(str(output_dir / "tensorboard"))
            return ("tensorboard", writer)
        if name == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise ImportError("report_to=wandb needs the wandb package: pip install 'rufus[wandb]'") from e
            run = wandb.init(dir=str(output_dir), config=run_config, resume="allow")
            return ("wandb", run)
        raise ValueError(f"report_to: unknown sink {name!r}; choose tensorboard or wandb")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for k, v in numeric.items():
                    sink.add_scalar(k, v, step)
            else:
                sink.log(numeric, step=step)

    def close(self) -> None:
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                sink.close()
            else:
                sink.finish()
        self.sinks = []
