"""The run report: one self-contained report.html plus a report.md with its images beside it.

The HTML embeds every figure as a base64 PNG data URI and carries its CSS inline, so the single
file can be mailed, attached to an issue or opened offline with nothing else. The markdown has
the same sections and links PNGs saved under `report_files/`, which renders on GitHub.

Sections, in order: title and notes (e.g. the commands that were run), the headline figures
under plain names, any extra sections the caller adds (a leaderboard, agreement tables), one figure
of training curves per stage, the over-optimisation figure (proxy vs gold reward against KL, after
Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", Fig. 1), a table of sample
responses before and after RL, and last every number of the summary under its key.

A curve is drawn only where a metric was logged at two steps or more; a metric logged once is
written out as a number under its stage's figure rather than drawn as a line of one point.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

from rufus.config import atomic_write

# Curves worth a panel, in display order: reward first (what RL optimises), then KL and entropy
# (how far and how sharply the policy moved), then losses, then the SFT / RM metrics. A stage
# draws a panel for each key it logged; keys it never logged are skipped, so one list serves
# sft, rm, ppo, grpo, rloo, dpo and bon without per-algorithm branches.
CURVE_KEYS = (
    "reward/mean",
    "score/mean",
    "score/gold",
    "kl/mean",
    "policy/entropy",
    "policy/loss",
    "value/loss",
    "dpo/loss",
    "loss",
    "rm/loss",
    "eval/loss",
    "rm/accuracy",
    "eval/rm/accuracy",
)
# Any other "score/<name>" key (a reward source's mean score) is plotted too, except these
# bookkeeping series, which restate a plotted one or are diagnostics rather than sources.
REWARD_PREFIX = "score/"
REWARD_EXCLUDED = {
    "score/raw",
    "score/std",
    "score/running_std",
    "score/clipped",
    "score/kept",
    "score/chosen",
    "score/rejected",
}
MAX_COLUMNS = 4
DPI = 100

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td.text { white-space: pre-wrap; max-width: 28em; }
img { max-width: 100%; }
.notes { background: #f6f6f6; padding: 0.5em 1em; white-space: pre-wrap; font-family: monospace; }
.na { color: #777; font-style: italic; }
"""


def _number(value) -> float | None:
    """A finite float, or None: metrics.jsonl stores NaN/inf as strings and bools are not metrics."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _wanted(rows: list[dict]) -> list[str]:
    """CURVE_KEYS that `rows` logged, in order, then other reward/ keys sorted."""
    present = {k for row in rows for k, v in row.items() if _number(v) is not None}
    keys = [k for k in CURVE_KEYS if k in present]
    extra = sorted(k for k in present if k.startswith(REWARD_PREFIX) and k not in REWARD_EXCLUDED and k not in keys)
    return keys + extra


def _count(rows: list[dict], key: str) -> int:
    return sum(_number(r.get(key)) is not None for r in rows)


def curve_keys(rows: list[dict]) -> list[str]:
    """The keys of `rows` that get a panel: those logged at two steps or more (module docstring)."""
    return [k for k in _wanted(rows) if _count(rows, k) >= 2]


def single_points(rows: list[dict]) -> list[tuple[str, float, object]]:
    """(key, value, step) of the wanted keys logged exactly once: shown as numbers, not drawn."""
    out = []
    for key in _wanted(rows):
        if _count(rows, key) == 1:
            row = next(r for r in rows if _number(r.get(key)) is not None)
            out.append((key, _number(row[key]), row.get("step")))
    return out


def _png(fig) -> bytes:
    # metadata Software=None drops matplotlib's tEXt chunk (a URL and a version) from the file.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _new_figure(width: float, height: float):
    # A bare Figure on the Agg canvas touches no pyplot state and switches no global backend,
    # so it is safe inside a process that also draws elsewhere, and nothing needs closing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="tight")
    FigureCanvasAgg(fig)
    return fig


def curves_figure(stage: str, rows: list[dict]) -> bytes | None:
    """One figure for a stage, a panel per curve_keys(rows) against step; None if nothing to plot."""
    keys = curve_keys(rows)
    if not keys:
        return None
    cols = min(len(keys), MAX_COLUMNS)
    nrows = math.ceil(len(keys) / cols)
    fig = _new_figure(3.6 * cols, 2.8 * nrows + 0.4)
    fig.suptitle(stage)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        # Eval rows carry only some keys, so each panel takes the rows that have its key.
        points = [(r.get("step", i), _number(r.get(key))) for i, r in enumerate(rows)]
        xs, ys = zip(*[(x, y) for x, y in points if y is not None])
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return _png(fig)


def _binned(xs: list[float], ys: list[float], bins: int) -> tuple[list[float], list[float]]:
    """The trend of ys against xs: the mean x and mean y of `bins` groups of neighbouring points
    (equal counts, sorted by x)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    groups = [order[round(b * len(order) / bins) : round((b + 1) * len(order) / bins)] for b in range(bins)]
    groups = [g for g in groups if g]
    return ([sum(xs[i] for i in g) / len(g) for g in groups], [sum(ys[i] for i in g) / len(g) for g in groups])


def overopt_figure(rows: list[dict] | None) -> bytes | None:
    """Proxy and gold reward against KL(pi_theta || pi_ref); None without usable rows.

    Each logged step is a point (KL is noisy from step to step, so a line through the points in
    step order zig-zags back and forth along the KL axis); the trend is the mean of neighbouring
    points in equal-count bins of KL. Both scores are drawn as change from their first value on one
    shared axis rather than on twin axes: twin axes have independent scales, so where the lines
    cross means nothing, while a shared zero makes the over-optimisation signature (proxy keeps
    rising, gold flattens or falls) readable directly.
    """
    points = [(_number(r.get("kl")), _number(r.get("proxy")), _number(r.get("gold"))) for r in rows or []]
    points = [p for p in points if None not in p]
    if not points:
        return None
    kl, proxy, gold = (list(v) for v in zip(*points))
    fig = _new_figure(5.5, 3.8)
    ax = fig.subplots()
    bins = max(1, min(8, len(points) // 3))
    for values, label, color, marker in (
        (proxy, "proxy (reward model)", "tab:blue", "o"),
        (gold, "gold (hidden)", "tab:orange", "s"),
    ):
        change = [v - values[0] for v in values]
        ax.scatter(kl, change, s=14, alpha=0.45, color=color, marker=marker, label=f"{label}, each step")
        if bins > 1:
            bx, by = _binned(kl, change, bins)
            ax.plot(bx, by, color=color, linewidth=2, label=f"{label}, binned mean")
    ax.axhline(0.0, color="#999", linewidth=0.8)
    ax.set_xlabel("KL(policy || reference), nats")
    ax.set_ylabel("score change from first step")
    ax.set_title("Reward over-optimisation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _md_cell(value) -> str:
    # Entities keep markdown from rendering response text as HTML; pipes and newlines would break the row.
    return html.escape(_fmt(value)).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _tables(summary: dict, samples: list[dict]):
    """(header, rows) for the summary and the samples, shared by both renderers."""
    summary_table = (["metric", "value"], [[k, v] for k, v in summary.items()])
    columns = ["prompt", "sft", "final"]
    columns += [c for c in ("gold_sft", "gold_final", "score_sft", "score_final") if any(c in s for s in samples)]
    sample_table = (columns, [[s.get(c, "") for c in columns] for s in samples])
    return summary_table, sample_table


def _html_table(header, rows, text_columns=()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for row in rows:
        cells = "".join(
            f"<td{' class=text' if h in text_columns else ''}>{html.escape(_fmt(v))}</td>" for h, v in zip(header, row)
        )
        body += f"<tr>{cells}</tr>\n"
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    output_dir,
    *,
    title: str,
    summary: dict,
    curves: dict[str, list[dict]],
    overopt: list[dict] | None,
    samples: list[dict],
    notes: list[str] | None = None,
    headline: list[tuple[str, str]] | None = None,
    sections: list[dict] | None = None,
) -> tuple[Path, Path]:
    """Write output_dir/report.html (self-contained) and output_dir/report.md (+ report_files/*.png).

    `summary` is a flat dict of numbers and strings (shown last, under its keys); `headline` holds
    (plain name, formatted value) rows shown first; `sections` are extra sections after the
    headline, each {"title", "text" (optional paragraph), "table" (optional (header, rows)),
    "figure" (optional png bytes), "stem" (the figure's file name)}; `curves` maps a stage name to
    its metrics.jsonl rows; `overopt` holds {"kl", "proxy", "gold", "step"} rows (None or empty when
    the run had no rollouts, e.g. offline DPO); `samples` holds {"prompt", "sft", "final"} rows
    with optional gold_* / score_* numbers. Returns (html_path, md_path).
    """
    out = Path(output_dir)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    summary_table, sample_table = _tables(summary, samples)

    # Each figure: (heading, file stem, png bytes); drawn once, embedded in HTML and saved for markdown.
    stage_figures = []
    for stage, rows in curves.items():
        png = curves_figure(stage, rows)
        once = single_points(rows)
        if png is not None or once:
            stage_figures.append((stage, "curves_" + re.sub(r"[^A-Za-z0-9_.-]", "_", stage), png, once))
    overopt_png = overopt_figure(overopt)
    extra = list(sections or [])
    for _, stem, png, _ in stage_figures:
        if png is not None:
            atomic_write(files / f"{stem}.png", png)
    if overopt_png:
        atomic_write(files / "overoptimisation.png", overopt_png)
    for sec in extra:
        if sec.get("figure"):
            atomic_write(files / f"{sec['stem']}.png", sec["figure"])

    def img_html(png: bytes, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    not_available = "Not available: this run has no rollouts with proxy and gold scores (e.g. offline DPO)."
    overopt_caption = (
        "Proxy (reward model) and gold (hidden) scores, each as change from its first value, "
        "against the policy's KL to the reference: a point per logged step, and the mean of "
        "neighbouring points as the trend. Proxy rising while gold stalls or falls is "
        "over-optimisation of the reward model."
    )

    h = [
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    m = [f"# {title}", ""]
    if notes:
        h.append('<div class="notes">' + "\n".join(html.escape(n) for n in notes) + "</div>")
        m += ["```", *notes, "```", ""]
    if headline:
        h += ["<h2>Headline figures</h2>", _html_table(["", "value"], [list(r) for r in headline])]
        m += ["## Headline figures", "", _md_table(["", "value"], [list(r) for r in headline]), ""]
    for sec in extra:
        h.append(f"<h2>{html.escape(sec['title'])}</h2>")
        m += [f"## {sec['title']}", ""]
        if sec.get("figure"):
            h.append(img_html(sec["figure"], sec["title"]))
            m += [f"![{sec['title']}](report_files/{sec['stem']}.png)", ""]
        if sec.get("table"):
            h.append(_html_table(*sec["table"]))
            m += [_md_table(*sec["table"]), ""]
        if sec.get("text"):
            h.append(f"<p>{html.escape(sec['text'])}</p>")
            m += [sec["text"], ""]
    h.append("<h2>Training curves</h2>")
    m += ["## Training curves", ""]
    if not stage_figures:
        h.append('<p class="na">No curves were logged.</p>')
        m += ["_No curves were logged._", ""]
    for stage, stem, png, once in stage_figures:
        h.append(f"<h3>{html.escape(stage)}</h3>")
        m += [f"### {stage}", ""]
        if png is not None:
            h.append(img_html(png, stage))
            m += [f"![{stage}](report_files/{stem}.png)", ""]
        if once:
            text = "Logged once: " + ", ".join(
                f"{k} {_fmt(v)}" + (f" (step {st})" if st is not None else "") for k, v, st in once
            )
            h.append(f"<p>{html.escape(text)}</p>")
            m += [text, ""]
    h.append("<h2>Over-optimisation</h2>")
    m += ["## Over-optimisation", ""]
    if overopt_png:
        h += [img_html(overopt_png, "over-optimisation"), f"<p>{overopt_caption}</p>"]
        m += ["![over-optimisation](report_files/overoptimisation.png)", "", overopt_caption, ""]
    else:
        h.append(f'<p class="na">{not_available}</p>')
        m += [f"_{not_available}_", ""]
    h += ["<h2>Samples</h2>", _html_table(*sample_table, text_columns=("prompt", "sft", "final"))]
    m += ["## Samples", "", _md_table(*sample_table), ""]
    h += ["<h2>Every figure</h2>", _html_table(*summary_table)]
    m += ["## Every figure", "", _md_table(*summary_table), ""]
    h.append("</body></html>\n")

    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write(md_path, "\n".join(m).encode("utf-8"))
    atomic_write(html_path, "\n".join(h).encode("utf-8"))
    return html_path, md_path
