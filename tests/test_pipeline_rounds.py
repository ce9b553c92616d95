"""Iterated rounds (`rounds=N`) and labels from the studio (`collect.source=studio`): the run stops
while a round waits for labels and picks up where it stopped; each round's reward model learns from
every round so far and its RL starts from the previous policy; the leaderboard ranks every policy;
an admin's exclusion re-exports the labels; and (slow) two rounds labelled through the studio's web
pages by simulated annotators make a better policy each round, with the adversarial one flagged."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from rufus.cli import main
from rufus.pipeline import PENDING_EXIT, LabelsPending, run_pipeline
from rufus.playground.taste import gold_score
from tests.helpers import tiny


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def studio_config(small_base, out: Path, **over) -> dict:
    cfg = tiny(
        small_base,
        out,
        collect={
            "responses": 2,
            "held_out": 0.5,
            "generation": {"max_new_tokens": 16},
            "source": "studio",
            "studio": {"prompts": 8, "labels_per_item": 2},
        },
        leaderboard={"prompts": 4},
    )
    cfg.update(over)
    return cfg


def test_studio_round_stops_the_run_until_its_labels_are_in(small_base, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(studio_config(small_base, out)))
    db = str(out / "studio.db")

    # 1: sft runs, the first round is created, nobody has labelled it: stop with the count and how to go on
    assert main(["pipeline", "--config", str(config)]) == PENDING_EXIT
    said = capsys.readouterr().out
    assert "round 1 open: 0/16 labels; run the same command again when it is done" in said
    assert f"rufus studio serve --db {db}" in said
    assert (out / "sft" / "stage.json").exists() and not (out / "collect" / "stage.json").exists()

    # some labels: still open, and the count says how far it is
    assert main(["studio", "simulate", "--db", db, "--round", "run round 1", "--annotators", "1", "--limit", "3"]) == 0
    capsys.readouterr()
    assert main(["pipeline", "--config", str(config)]) == PENDING_EXIT
    said = capsys.readouterr().out
    assert "round 1 open: 3/16 labels" in said and "[sft] up to date" in said

    # the rest of round 1: collect, rm, rl and eval go on; the leaderboard round is next to wait
    assert main(["studio", "simulate", "--db", db, "--round", "run round 1", "--annotators", "2"]) == 0
    assert main(["pipeline", "--config", str(config)]) == PENDING_EXIT
    said = capsys.readouterr().out
    assert re.search(r"leaderboard open: 0/\d+ labels", said)
    for stage in ("collect", "rm", "rl", "eval"):
        assert (out / stage / "stage.json").exists(), stage
    train, held_out = read_jsonl(out / "collect" / "train.jsonl"), read_jsonl(out / "collect" / "eval.jsonl")
    assert len(train) + len(held_out) >= 6 and all({"prompt", "chosen", "rejected"} <= set(r) for r in train)
    prompts = {r["prompt"] for r in read_jsonl(out / "data" / "comparison_prompts.jsonl")[:4]}
    assert {r["prompt"] for r in held_out} <= prompts and not {r["prompt"] for r in train} & prompts

    # the leaderboard's labels: the run finishes, ranking SFT and the round-1 policy
    assert main(["studio", "simulate", "--db", db, "--round", "run leaderboard", "--annotators", "2"]) == 0
    assert main(["pipeline", "--config", str(config)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"sft", "round-1"}
    assert summary["policies"]["sft"]["rating"] == 1000.0
    assert sum(p["wins"] + p["ties"] / 2 for p in summary["policies"].values()) == summary["leaderboard_comparisons"]
    assert [a["round"] for a in summary["agreement"]] == ["run round 1", "run leaderboard"]
    html = (out / "report.html").read_text()
    assert html.index("Headline figures") < html.index("Leaderboard of the run") < html.index("Training curves")
    assert "Agreement among the annotators" in html

    # an admin leaves an annotator out: the next run re-exports the round without them and re-trains
    before = read_jsonl(out / "collect" / "train.jsonl") + read_jsonl(out / "collect" / "eval.jsonl")
    assert main(["studio", "exclude", "--db", db, "--round", "run round 1", "--annotator", "sim-1"]) == 0
    capsys.readouterr()
    with pytest.raises(LabelsPending, match="leaderboard open"):  # a new policy: its answers need new labels
        run_pipeline(studio_config(small_base, out))
    said = capsys.readouterr().out
    assert "[sft] up to date" in said and all(f"[{s}] done" in said for s in ("collect", "rm", "rl", "eval"))
    after = read_jsonl(out / "collect" / "train.jsonl") + read_jsonl(out / "collect" / "eval.jsonl")
    assert len({r["annotator"] for r in before}) == 2 and len({r["annotator"] for r in after}) == 1
    assert len(after) < len(before)
    assert json.loads((out / "collect" / "stage.json").read_text())["excluded"] == ["sim-1"]


def test_rounds_chain_policies_labels_and_the_leaderboard(small_base, tmp_path):
    out = tmp_path / "run"
    result = run_pipeline(tiny(small_base, out, rounds=2, round_start="sft"))
    names = [
        "sft",
        "round-1/collect",
        "round-1/rm",
        "round-1/rl",
        "round-2/collect",
        "round-2/rm",
        "round-2/rl",
        "eval",
        "leaderboard",
        "report",
    ]
    assert result.stages == dict.fromkeys(names, "ran")

    # round 2 compares answers to prompts of its own, and its reward model learns from both rounds
    r1, r2 = out / "round-1" / "collect", out / "round-2" / "collect"
    data = out / "data"
    assert read_jsonl(data / "comparison_prompts.jsonl") != read_jsonl(data / "comparison_prompts_2.jsonl")
    for collect, prompts in ((r1, "comparison_prompts.jsonl"), (r2, "comparison_prompts_2.jsonl")):
        asked = {r["prompt"] for r in read_jsonl(data / prompts)}
        assert {r["prompt"] for r in read_jsonl(collect / "train.jsonl")} <= asked
    assert (r2 / "train_all.jsonl").read_text() == (r1 / "train.jsonl").read_text() + (r2 / "train.jsonl").read_text()
    rm2 = yaml.safe_load((out / "round-2" / "rm" / "config.yaml").read_text())
    assert rm2["data"]["train"] == str(r2 / "train_all.jsonl") and rm2["model"] == str(out / "sft" / "final")

    # round_start=sft: round 2's RL starts from the SFT model again, against round 2's reward model
    rl1 = yaml.safe_load((out / "round-1" / "rl" / "config.yaml").read_text())
    rl2 = yaml.safe_load((out / "round-2" / "rl" / "config.yaml").read_text())
    assert rl1["model"] == rl2["model"] == str(out / "sft" / "final") and rl1["ref_model"] is rl2["ref_model"] is None
    assert rl2["reward"]["model"] == [str(out / "round-2" / "rm" / "final")]
    evaluation = yaml.safe_load((out / "eval" / "config.yaml").read_text())
    assert evaluation["model"] == str(out / "round-2" / "rl" / "final")

    # the leaderboard: every policy, SFT the anchor; the gold figures are the taste applied to the answers
    board = json.loads((out / "leaderboard" / "leaderboard.json").read_text())
    assert {r["model"] for r in board} == {"sft", "round-1", "round-2"}
    assert next(r for r in board if r["model"] == "sft")["rating"] == 1000.0
    answers = read_jsonl(out / "leaderboard" / "answers.jsonl")
    assert len(answers) == 12
    for name in ("sft", "round-1", "round-2"):
        mean = sum(gold_score(a["prompt"], a["answers"][name]) for a in answers) / len(answers)
        assert result.summary["policies"][name]["gold_score"] == pytest.approx(mean)
    assert sum(b["wins"] + b["losses"] + b["ties"] for b in board) == 2 * 3 * 12  # every pair on every prompt

    again = run_pipeline(tiny(small_base, out, rounds=2, round_start="sft"))
    assert all(again.stages[s] == "skipped" for s in names if s != "report")


def test_rounds_need_labels_of_each_policy(small_base, tmp_path):
    from rufus.config import ConfigError

    with pytest.raises(ConfigError, match="rounds"):
        run_pipeline(
            tiny(
                small_base,
                tmp_path / "a",
                rounds=2,
                playground={"enabled": False},
                data={"sft": "x.jsonl", "prompts": "p.jsonl", "comparisons": "c.jsonl"},
            )
        )
    with pytest.raises(ConfigError, match="rounds"):
        run_pipeline(tiny(small_base, tmp_path / "b", rounds=0))
    with pytest.raises(ConfigError, match="collect.studio.prompts"):
        run_pipeline(studio_config(small_base, tmp_path / "c", collect={"source": "studio", "studio": {"prompts": 1}}))


def gold_pairs(answers: list[dict]) -> list[dict]:
    """Every two policies' answers to a prompt, ordered by the gold taste (gold ties left out)."""
    out = []
    for row in answers:
        texts = list(row["answers"].values())
        for i, a in enumerate(texts):
            for b in texts[i + 1 :]:
                ga, gb = gold_score(row["prompt"], a), gold_score(row["prompt"], b)
                if ga != gb and a != b:
                    out.append(
                        {"prompt": row["prompt"], "chosen": a if ga > gb else b, "rejected": b if ga > gb else a}
                    )
    return out


@pytest.mark.slow
def test_two_studio_rounds_with_simulated_annotators_make_better_policies(small_base, tmp_path):
    """Three honest simulated annotators and an adversarial one label two rounds and the leaderboard
    through the studio's web pages; annotators flagged below chance are left out. The round-2 policy
    beats the round-1 policy and SFT on the leaderboard and by the gold taste; the adversarial
    annotator is the one flagged; and putting their labels back does not make the reward model
    agree better with the gold taste."""
    out = tmp_path / "run"
    cfg = tiny(
        small_base,
        out,
        rounds=2,
        playground={"comparison_prompts": 150, "eval_prompts": 256, "temperature": 0.2},
        collect={
            "responses": 4,
            "held_out": 0.2,
            "generation": {"max_new_tokens": 48},
            "source": "studio",
            "studio": {"prompts": 150, "simulate": 3, "adversarial": 1, "exclude_below_chance": True},
        },
        rm={"epochs": 4, "batch_size": 16},
        rl={"max_steps": 40, "batch_size": 16, "lr": 1e-4, "kl": {"coef": 0.05}, "generation": {"max_new_tokens": 48}},
        eval={"generation": {"max_new_tokens": 48}},
    )
    result = run_pipeline(cfg)
    # round_start=previous, the default: round 2's RL continues from round 1's policy, anchored to SFT
    rl2 = yaml.safe_load((out / "round-2" / "rl" / "config.yaml").read_text())
    assert rl2["model"] == str(out / "round-1" / "rl" / "final") and rl2["ref_model"] == str(out / "sft" / "final")
    policies = result.summary["policies"]
    print(json.dumps(policies, indent=1))
    assert policies["round-2"]["rating"] > policies["round-1"]["rating"] > policies["sft"]["rating"]
    assert policies["round-2"]["gold_score"] > policies["round-1"]["gold_score"] > policies["sft"]["gold_score"]
    assert policies["round-2"]["gold_win_rate_vs_sft"] > 0.5

    for a in result.summary["agreement"]:
        flagged = {q["annotator"] for q in a["annotators"] if any(f.startswith("below chance") for f in q["flags"])}
        assert flagged == {"adversarial-1"}, a["round"]
        assert {q["annotator"] for q in a["annotators"] if q["excluded"]} == {"adversarial-1"}

    # the round-1 reward model against the gold order of answers it never saw (the leaderboard's: three
    # policies' answers to the held-out prompts), without and with the adversary's labels
    from rufus.trainers.reward import eval_reward_model

    pairs = tmp_path / "gold_pairs.jsonl"
    ordered = gold_pairs(read_jsonl(out / "leaderboard" / "answers.jsonl"))
    assert len(ordered) > 400
    pairs.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    rm = out / "round-1" / "rm" / "final"
    without = eval_reward_model({"model": str(rm), "data": str(pairs), "max_length": 256})["rm/accuracy"]
    shutil.copytree(rm, tmp_path / "rm_without")
    assert (
        main(
            [
                "studio",
                "exclude",
                "--db",
                str(out / "studio.db"),
                "--round",
                "run round 1",
                "--annotator",
                "adversarial-1",
                "--undo",
            ]
        )
        == 0
    )
    again = run_pipeline(
        {
            **cfg,
            "stages": ["collect", "rm"],
            "collect": {**cfg["collect"], "studio": {**cfg["collect"]["studio"], "exclude_below_chance": False}},
        }
    )
    assert again.stages["round-1/collect"] == "ran" and again.stages["round-1/rm"] == "ran"
    with_adversary = eval_reward_model({"model": str(rm), "data": str(pairs), "max_length": 256})["rm/accuracy"]
    print("RM gold accuracy without the adversarial annotator", without, "with", with_adversary)
    assert without >= with_adversary
