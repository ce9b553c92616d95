"""Plots a person can look at after a run, drawn from metrics.jsonl."""

from __future__ import annotations

import os
from pathlib import Path

from rufus.report.metrics import read_metrics


def plot_metrics(output_dir: str | os.PathLike, keys: list[str], name: str = "training.png") -> Path | None:
    """One panel per metric in `keys` that the run logged, against step; saved as output_dir/plots/name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(output_dir) / "metrics.jsonl")
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            series[key] = points
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output_dir) / "plots" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
