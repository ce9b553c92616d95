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
        rows.append(
            {
                "step": step,
                "reward/mean": 0.1 * step,
                "kl/mean": 0.02 * step,
                "policy/entropy": 2.0 - 0.1 * step,
                "policy/loss": 1.0 / step,
                "score/raw": 5.0,
                "score/length_penalty": -0.01 * step,
            }
        )
        if step % 4 == 0:  # eval rows carry only their own keys
            rows.append({"step": step, "score/gold": 0.05 * step})
    return rows


def _inputs():
    curves = {
        "sft": [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/loss": 0.9}],
        "rm": [{"step": s, "rm/loss": 0.7 - 0.05 * s, "rm/accuracy": 0.5 + 0.05 * s} for s in range(1, 6)],
        "ppo": _rl_rows(),
        # Logged only bookkeeping keys (and a NaN stored as a string): nothing to plot.
        "empty": [{"step": 1, "score/raw": 1.0, "lr": 1e-5, "loss": "nan"}],
    }
    overopt = [{"step": s, "kl": 0.5 * s, "proxy": 0.3 * s, "gold": 0.2 * s - 0.04 * s * s} for s in range(6)]
    samples = [
        {"prompt": "say <b>&", "sft": "plain one", "final": "a | b\nsecond line", "gold_sft": 0.25, "gold_final": 0.75},
        {"prompt": "other prompt", "sft": "x", "final": "y", "gold_sft": 0.1, "gold_final": 0.2},
    ]
    summary = {"algo": "ppo", "gold_score_sft": 0.123456789, "gold_score_final": 0.987654321, "kl": 1.5, "seconds": 42}
    return dict(
        title="Run <report>",
        summary=summary,
        curves=curves,
        overopt=overopt,
        samples=samples,
        notes=["rufus demo --algo ppo"],
    )


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
    # Fixed list in its order, then other score/ keys (reward sources); bookkeeping score/raw is left out.
    assert keys == ["reward/mean", "score/gold", "kl/mean", "policy/entropy", "policy/loss", "score/length_penalty"]
    assert curve_keys([{"step": 1, "score/raw": 1.0, "lr": 0.1, "loss": "nan", "ok": True}]) == []


@pytest.mark.parametrize("summary", [{}, {"flag": True, "name": "x"}])
def test_minimal_inputs(tmp_path, summary):
    html_path, _ = write_report(tmp_path, title="t", summary=summary, curves={}, overopt=None, samples=[])
    text = html_path.read_text(encoding="utf-8")
    assert "<img" not in text and "No curves were logged" in text


def test_a_metric_logged_once_is_a_number_not_a_line(tmp_path):
    from rufus.report.html import single_points

    rows = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/loss": 0.9}]
    assert curve_keys(rows) == ["loss"] and single_points(rows) == [("eval/loss", 0.9, 5)]
    html_path, md_path = write_report(
        tmp_path, title="t", summary={}, curves={"sft": rows, "rm": rows[-1:]}, overopt=None, samples=[]
    )
    text, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert len(_html_images(text)) == 1  # sft's loss; rm logged a single point: no figure
    for doc in (text, md):
        assert doc.count("Logged once: eval/loss 0.9 (step 5)") == 2  # under sft and under rm


def test_binned_trend_by_hand():
    from rufus.report.html import _binned

    xs, ys = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0], [30.0, 10.0, 20.0, 60.0, 50.0, 40.0]
    # sorted by x: (1, 2, 3), (4, 5, 6) -> means 2 and 5
    assert _binned(xs, ys, 2) == ([2.0, 5.0], [20.0, 50.0])
    assert _binned(xs, ys, 3) == ([1.5, 3.5, 5.5], [15.0, 35.0, 55.0])


def test_headline_and_sections_come_first(tmp_path):
    png = _html_images(write_report(tmp_path / "a", **_inputs())[0].read_text(encoding="utf-8"))[0]
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    sections = [
        {
            "title": "Leaderboard",
            "table": (["policy", "rating"], [["sft", "1000"], ["round-1", "1042"]]),
            "figure": buf.getvalue(),
            "stem": "leaderboard",
            "text": "Bradley-Terry <ratings>",
        }
    ]
    html_path, md_path = write_report(
        tmp_path / "b", **_inputs(), headline=[("gold win rate, final vs SFT", "61.0%")], sections=sections
    )
    text, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    for doc in (text, md):
        order = [
            doc.index(s)
            for s in (
                "Headline figures",
                "gold win rate, final vs SFT",
                "Leaderboard",
                "round-1",
                "Training curves",
                "Over-optimisation",
                "Every figure",
                "gold_score_sft",
            )
        ]
        assert order == sorted(order)
    assert "Bradley-Terry &lt;ratings&gt;" in text
    assert len(_html_images(text)) == 5 and (tmp_path / "b" / "report_files" / "leaderboard.png").exists()
