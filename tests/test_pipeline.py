"""`rufus pipeline` / `rufus demo`: stages wire together, skip when up to date, re-run downstream of a
change, every rl.algo runs, the summary matches the evaluation, the report's images decode, and a
different playground taste moves the final policy towards it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image

from rufus.config import ConfigError
from rufus.pipeline import run_pipeline
from rufus.playground.corpus import measure
from rufus.playground.taste import gold_score
from tests.helpers import tiny


@pytest.fixture(scope="module")
def finished_run(small_base, tmp_path_factory):
    """One complete ppo pipeline run (shared: later tests copy it and change a stage)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    result = run_pipeline(tiny(small_base, out))
    return out, result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_stage_runs_and_the_summary_matches_the_evaluation(finished_run):
    out, result = finished_run
    assert result.stages == {s: "ran" for s in ("sft", "collect", "rm", "rl", "eval", "leaderboard", "report")}
    for stage in ("sft", "rm", "rl"):
        assert (out / stage / "final" / "config.json").exists()
        assert json.loads((out / stage / "stage.json").read_text())["fingerprint"]

    # comparisons: K=3 rankings for training (best first), held-out pairs, DPO pairs best-vs-worst
    train = read_jsonl(out / "collect" / "train.jsonl")
    assert train and all(2 <= len(r["responses"]) <= 3 for r in train)
    held_out = read_jsonl(out / "collect" / "eval.jsonl")
    assert held_out and all({"prompt", "chosen", "rejected"} <= set(r) for r in held_out)
    pairs = read_jsonl(out / "collect" / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["responses"][0], r["responses"][-1]) for r in train]

    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    for key in ("gold_score_sft", "gold_score_final", "gold_win_rate", "kl", "rm_gold_accuracy", "seconds"):
        assert isinstance(summary[key], (int, float)), key
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert summary["gold_win_rate"] == evaluation["gold/win_rate"]
    assert summary["kl"] == evaluation["kl"]
    rows = read_jsonl(out / "eval" / "generations.jsonl")
    assert len(rows) == 12
    # the gold scores are the hidden taste applied to the very responses the eval sampled
    final = [gold_score(r["prompt"], r["response"], "default") for r in rows]
    sft = [gold_score(r["prompt"], r["baseline_response"], "default") for r in rows]
    assert summary["gold_score_final"] == pytest.approx(statistics.mean(final))
    assert summary["gold_score_sft"] == pytest.approx(statistics.mean(sft))
    wins = sum(1.0 if f > s else 0.5 if f == s else 0.0 for f, s in zip(final, sft)) / len(rows)
    assert summary["gold_win_rate"] == pytest.approx(wins)
    assert evaluation["rm/gold_pairs"] >= 5 and 0.0 <= summary["rm_gold_accuracy"] <= 1.0
    assert summary["seconds"] == pytest.approx(sum(summary["stage_seconds"].values()), abs=0.5)


def test_report_is_self_contained_and_its_images_decode(finished_run):
    out, _ = finished_run
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', html)
    # the leaderboard, curves for sft, rm and rl, and the over-optimisation figure (ppo logs score/gold)
    assert len(images) == 5
    for data in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.width > 100 and image.height > 100
        lo, hi = image.convert("L").getextrema()
        assert lo < hi  # not a blank canvas
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 5
    for link in links:
        with Image.open(out / link) as image:
            assert image.width > 100
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['gold_score_final']:.4g}" in html


def test_up_to_date_stages_are_skipped_and_a_change_reruns_downstream(finished_run, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "moved"
    shutil.copytree(out, copy)  # a moved run is still up to date: fingerprints are relative to it
    again = run_pipeline(tiny(finished_run_base(out), copy))
    assert {s: again.stages[s] for s in ("sft", "collect", "rm", "rl", "eval")} == dict.fromkeys(
        ("sft", "collect", "rm", "rl", "eval"), "skipped"
    )
    before = (copy / "rl" / "final" / "model.safetensors").read_bytes()

    changed = run_pipeline(tiny(finished_run_base(out), copy, rl={"max_steps": 3}))
    assert [changed.stages[s] for s in ("sft", "collect", "rm", "rl", "eval")] == [
        "skipped",
        "skipped",
        "skipped",
        "ran",
        "ran",
    ]
    assert (copy / "rl" / "final" / "model.safetensors").read_bytes() != before
    assert json.loads((copy / "rl" / "stage.json").read_text())["steps"] == 3


def finished_run_base(out):
    """The base model a finished run started from (its sft stage's config names it)."""
    import yaml

    return yaml.safe_load((out / "sft" / "config.yaml").read_text())["model"]


@pytest.mark.parametrize(
    "algo,settings",
    [
        ("grpo", {"grpo": {"group_size": 2}}),
        ("rloo", {"rloo": {"group_size": 2}}),
        ("dpo", {"batch_size": 4}),
        ("kto", {"batch_size": 4}),
        ("simpo", {"batch_size": 4}),
        ("orpo", {"batch_size": 4}),
        ("ilql", {"batch_size": 4, "max_steps": 2}),
        ("bon", {"bon": {"group_size": 2, "rounds": 1, "prompts_per_round": 8}, "batch_size": 4, "max_steps": 2}),
    ],
)
def test_every_rl_algo_runs_on_the_same_comparisons(finished_run, tmp_path, algo, settings):
    out, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    rl = {"algo": algo, **settings}
    cfg = tiny(finished_run_base(out), copy, rl=rl)
    if algo in ("kto", "ilql"):  # they never sample while training: no generation settings
        cfg["rl"].pop("generation")
    result = run_pipeline(cfg)
    assert [result.stages[s] for s in ("sft", "collect", "rm", "rl", "eval")] == [
        "skipped",
        "skipped",
        "skipped",
        "ran",
        "ran",
    ]
    assert result.summary["algo"] == algo
    assert json.loads((copy / "rl" / "stage.json").read_text())["algo"] == algo
    assert (copy / "rl" / "final" / "config.json").exists()
    html = (copy / "report.html").read_text()
    # the offline algorithms have no rollouts, so no proxy-vs-gold picture; the online ones log score/gold
    assert ("Not available" in html) == (algo in ("dpo", "kto", "simpo", "orpo", "ilql", "bon"))
    if algo in ("simpo", "orpo"):  # rufus dpo's reference-free objectives
        import yaml

        assert yaml.safe_load((copy / "rl" / "config.yaml").read_text())["dpo"]["loss_type"] == algo
    if algo == "ilql":  # the decoding policy and its heads are what the eval stage sampled
        assert (copy / "rl" / "final" / "ilql.json").exists()
        assert json.loads((copy / "eval" / "eval.json").read_text())["ilql/beta"] == 4.0


def test_bad_settings_fail_before_any_stage_runs(small_base, tmp_path):
    with pytest.raises(ConfigError, match="rl.algo"):
        run_pipeline(tiny(small_base, tmp_path / "a", rl={"algo": "a2c"}))
    with pytest.raises(ConfigError, match=r"sft\.lrr"):
        run_pipeline(tiny(small_base, tmp_path / "b", sft={"lrr": 1.0}))
    with pytest.raises(ConfigError, match="playground.preference"):
        run_pipeline(tiny(small_base, tmp_path / "c", playground={"preference": "grumpy"}))
    with pytest.raises(ConfigError, match="output_dir"):
        run_pipeline(tiny(small_base, tmp_path / "d", rm={"output_dir": "elsewhere"}))
    with pytest.raises(ConfigError, match="data.comparisons"):
        run_pipeline(
            tiny(
                small_base, tmp_path / "e", playground={"enabled": False}, data={"sft": "x.jsonl", "prompts": "p.jsonl"}
            )
        )
    assert not (tmp_path / "b" / "sft" / "stage.json").exists()


def test_a_different_taste_moves_the_final_policy_towards_it(finished_run, tmp_path):
    """Same base and SFT model; annotators who care only for brevity vs only for manners. The reward
    model learns each taste from comparisons alone, and PPO against it must move the policy that way:
    each final policy beats the SFT model on its own quality and beats the other final policy on it
    (qualities measured from the text, on held-out prompts)."""
    out, _ = finished_run
    finals, sft = {}, None
    for taste, quality in (("concise=1", "concise"), ("polite=1", "polite")):
        run = tmp_path / quality
        shutil.copytree(out, run, ignore=shutil.ignore_patterns("collect", "rm", "rl", "eval"))
        result = run_pipeline(
            tiny(
                finished_run_base(out),
                run,
                playground={"preference": taste, "comparison_prompts": 300, "eval_prompts": 64, "temperature": 0.2},
                collect={"responses": 4, "generation": {"max_new_tokens": 48}},
                rm={"epochs": 4, "batch_size": 16},
                rl={
                    "max_steps": 40,
                    "batch_size": 16,
                    "lr": 1e-4,
                    "kl": {"coef": 0.02},
                    "generation": {"max_new_tokens": 48},
                },
                eval={"generation": {"max_new_tokens": 48}},
            )
        )
        assert result.stages["sft"] == "skipped" and result.stages["rl"] == "ran"
        rows = read_jsonl(run / "eval" / "generations.jsonl")

        def mean_quality(key, rows=rows):
            measured = [measure(r["prompt"], r[key]) for r in rows]
            return {q: statistics.mean(m[q] for m in measured) for q in ("concise", "polite")}

        finals[quality] = mean_quality("response")
        sft = mean_quality("baseline_response")  # the same SFT model and prompts in both runs
        print(taste, "final", finals[quality], "sft", sft, "gold win rate", result.summary["gold_win_rate"])
        assert result.summary["gold_win_rate"] > 0.55  # better by the taste it was taught
    assert finals["concise"]["concise"] > sft["concise"] + 0.05
    assert finals["polite"]["polite"] > sft["polite"] + 0.05
    assert finals["concise"]["concise"] > finals["polite"]["concise"] + 0.05
    assert finals["polite"]["polite"] > finals["concise"]["polite"] + 0.05


def test_own_data_without_the_playground_through_the_cli(tmp_path, capsys):
    """`rufus pipeline --config configs/pipeline_tiny.yaml`: labelled comparisons instead of
    annotators, no gold taste; the summary table is printed."""
    from rufus.cli import main

    assert (
        main(
            [
                "pipeline",
                "--config",
                "configs/pipeline_tiny.yaml",
                f"output_dir={tmp_path / 'run'}",
                "progress=false",
                "sft.max_steps=2",
                "rm.epochs=1",
                "rl.max_steps=2",
                "rl.batch_size=4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rufus pipeline summary" in printed and "KL(final || SFT), nats" in printed
    assert "gold score" not in printed  # no hidden taste without the playground
    given = read_jsonl(tmp_path / "run" / "collect" / "train.jsonl")
    held_out = read_jsonl(tmp_path / "run" / "collect" / "eval.jsonl")
    rows = read_jsonl(Path("configs/data/prefs_tiny_train.jsonl"))
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert len(held_out) == round(0.2 * len(rows)) and len(given) == len(rows) - len(held_out)
    assert sorted(map(key, given + held_out)) == sorted(map(key, rows))  # a split, nothing lost or made up
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "gold_score_final" not in summary and "rm_gold_accuracy" not in summary
    assert {"kl", "rm_label_accuracy", "rm_score_final", "rm_win_rate"} <= set(summary)
    assert f"{summary['kl']:.4g}" in printed
    assert (tmp_path / "run" / "report.html").exists()


@pytest.mark.slow
def test_ilql_in_the_demo_pipeline_beats_the_sft_model_on_gold(tmp_path):
    """`rufus demo rl.algo=ilql`: offline RL on the collected responses, scored once by the reward
    model, gives a policy the hidden gold taste prefers to the SFT model (about 6 minutes)."""
    from rufus.pipeline import run_demo

    result = run_demo({"output_dir": str(tmp_path / "demo"), "progress": False, "rl": {"algo": "ilql"}})
    metrics = json.loads((tmp_path / "demo" / "eval" / "eval.json").read_text())
    assert metrics["ilql/beta"] == 4.0
    assert metrics["gold/mean"] > metrics["baseline/gold/mean"] and metrics["gold/win_rate"] > 0.5
    assert result.summary["algo"] == "ilql"
