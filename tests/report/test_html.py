"""The run report: self-contained HTML, markdown with linked PNGs, escaping, and figure selection."""

import base64
import io
import re

import pytest
from PIL import Image

from rufus.report.html import curve_keys, write_report


def _rl_rows():
    rows = []
    for step in range(1, 9):
        rows.append({"step": step, "reward/mean": 0.1 * step, "kl/mean": 0.02 * step, "entropy": 2.0 - 0.1 * step,
                     "policy/loss": 1.0 / step, "reward/raw": 5.0, "reward/length_penalty": -0.01 * step})
        if step % 4 == 0:  # eval rows carry only their own keys
            rows.append({"step": step, "reward/gold": 0.05 * step})
    return rows


def _inputs():
    curves = {
        "sft": [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/loss": 0.9}],
        "rm": [{"step": s, "rm/loss": 0.7 - 0.05 * s, "rm/accuracy": 0.5 + 0.05 * s} for s in range(1, 6)],
        "ppo": _rl_rows(),
        # Logged only bookkeeping keys (and a NaN stored as a string): nothing to plot.
        "empty": [{"step": 1, "reward/raw": 1.0, "lr": 1e-5, "loss": "nan"}],
    }
    overopt = [{"step": s, "kl": 0.5 * s, "proxy": 0.3 * s, "gold": 0.2 * s - 0.04 * s * s} for s in range(6)]
    samples = [
        {"prompt": "say <b>&", "sft": "plain one", "final": "a | b\nsecond line", "gold_sft": 0.25, "gold_final": 0.75},
        {"prompt": "other prompt", "sft": "x", "final": "y", "gold_sft": 0.1, "gold_final": 0.2},
    ]
    summary = {"algo": "ppo", "gold_score_sft": 0.123456789, "gold_score_final": 0.987654321, "kl": 1.5, "seconds": 42}
    return dict(title="Run <report>", summary=summary, curves=curves, overopt=overopt, samples=samples,
                notes=["rufus demo --algo ppo"])


def _html_images(text):
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert len(srcs) == text.count("<img")
    images = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        images.append(Image.open(io.BytesIO(data)))
    return images


def _assert_real_plot(image):
    image.load()
    assert image.width > 0 and image.height > 0
    extrema = image.convert("L").getextrema()
    assert extrema[0] != extrema[1], "a single flat colour is not a plot"


def test_html_is_self_contained_with_one_figure_per_plottable_stage(tmp_path):
    html_path, md_path = write_report(tmp_path, **_inputs())
    assert html_path == tmp_path / "report.html" and md_path == tmp_path / "report.md"
    text = html_path.read_text(encoding="utf-8")
    images = _html_images(text)
    assert len(images) == 4  # sft, rm, ppo curves + over-optimisation; "empty" has none
    for image in images:
        _assert_real_plot(image)
    for forbidden in ("http://", "https://", "<script", "<link"):
        assert forbidden not in text.lower()
    assert "<h3>empty</h3>" not in text
    assert not (tmp_path / "report_files" / "curves_empty.png").exists()
    # Written through temporary files that were renamed away, and readable by others (a report is shared).
    assert not list(tmp_path.rglob("*.tmp"))
    for path in [html_path, tmp_path / "report.md", *(tmp_path / "report_files").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_markdown_links_existing_pngs(tmp_path):
    _, md_path = write_report(tmp_path, **_inputs())
    md = md_path.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4
    for link in links:
        assert link.startswith("report_files/") and link.endswith(".png")
        with Image.open(tmp_path / link) as image:
            _assert_real_plot(image)


def test_summary_and_samples_are_rendered_and_escaped(tmp_path):
    html_path, md_path = write_report(tmp_path, **_inputs())
    text, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    for doc in (text, md):
        assert "0.1235" in doc and "0.9877" in doc and "42" in doc and "ppo" in doc  # 4 significant digits
        assert "0.123456789" not in doc
        assert "other prompt" in doc and "rufus demo --algo ppo" in doc
    assert "say &lt;b&gt;&amp;" in text and "<b>&" not in text
    assert "Run &lt;report&gt;" in text
    # The markdown row stays one row: the pipe is escaped and the newline becomes <br>.
    row = next(line for line in md.splitlines() if "say &lt;b&gt;&amp;" in line)
    assert "a \\| b<br>second line" in row
    assert row.count(" | ") == len(["prompt", "sft", "final", "gold_sft", "gold_final"]) - 1


def test_without_overopt_the_section_says_so(tmp_path):
    for overopt in (None, []):
        inputs = {**_inputs(), "overopt": overopt}
        html_path, md_path = write_report(tmp_path / str(overopt), **inputs)
        text, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
        assert len(_html_images(text)) == 3
        assert "Not available" in text and "Not available" in md
        assert "overoptimisation.png" not in md


def test_curve_selection_rule():
    keys = curve_keys(_rl_rows())
    # Fixed list in its order, then other reward/ keys; bookkeeping reward/raw is left out.
    assert keys == ["reward/mean", "reward/gold", "kl/mean", "entropy", "policy/loss", "reward/length_penalty"]
    assert curve_keys([{"step": 1, "reward/raw": 1.0, "lr": 0.1, "loss": "nan", "ok": True}]) == []


@pytest.mark.parametrize("summary", [{}, {"flag": True, "name": "x"}])
def test_minimal_inputs(tmp_path, summary):
    html_path, _ = write_report(tmp_path, title="t", summary=summary, curves={}, overopt=None, samples=[])
    text = html_path.read_text(encoding="utf-8")
    assert "<img" not in text and "No curves were logged" in text
