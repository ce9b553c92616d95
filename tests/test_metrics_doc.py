"""docs/metrics.md documents every key a trainer logs: short runs of every trainer (and the variants
that log more: PPO-ptx, a shared critic, reward scaling and clipping, DPO's evaluation and online
rounds, the reward model's ranking data and evaluation) are checked against the page's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rufus
from rufus.report.metrics import read_metrics
from tests.helpers import arithmetic_prompts, digit_fraction, preference_rows, sft_rows, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def documented_keys(text: str) -> list[str]:
    """The keys in the first column of the page's tables: `name` or `prefix/<placeholder>`."""
    keys = []
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and line.lstrip().startswith("|"):
            keys += re.findall(r"`([^`]+)`", cells[1])
    return keys


def matches(key: str, documented: list[str]) -> bool:
    """`key` is documented exactly, or by a pattern whose <placeholder> stands for one or more parts."""
    for doc in documented:
        if "<" not in doc:
            if key == doc:
                return True
        elif re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(doc).replace(r"\<", "<").replace(r"\>", ">")), key):
            return True
    return False


def test_the_matcher_tells_documented_keys_from_the_rest():
    documented = documented_keys(
        "| key | meaning |\n| --- | --- |\n| `score/mean`, `score/<source>` | x |\n| `eval/<metric>` | y |\n"
    )
    assert documented == ["score/mean", "score/<source>", "eval/<metric>"]
    assert matches("score/mean", documented) and matches("score/gold", documented)
    assert matches("eval/rm/accuracy", documented)
    assert not matches("reward/mean", documented) and not matches("score", documented)


@pytest.fixture(scope="module")
def logged(tiny_model, tmp_path_factory) -> dict[str, set[str]]:
    """Every key each trainer logged in short runs, by run name."""
    tmp = tmp_path_factory.mktemp("metrics")
    prompts = str(write_jsonl(tmp / "prompts.jsonl", arithmetic_prompts(16)))
    sft = str(write_jsonl(tmp / "sft.jsonl", sft_rows(8)))
    prefs = str(write_jsonl(tmp / "prefs.jsonl", preference_rows(16)))
    ranks = str(
        write_jsonl(
            tmp / "ranks.jsonl", [{"prompt": "what is 1 ?", "responses": [" yes .", " no .", " the cat ."]}] * 8
        )
    )
    base = {
        "model": str(tiny_model),
        "dtype": "float32",
        "progress": False,
        "seed": 0,
        "max_steps": 2,
        "batch_size": 4,
        "log_every": 1,
        "eval_every": 1,
        "data": {"max_length": 40},
    }
    online = {**base, "data": {"train": prompts, "max_length": 40}, "generation": {"max_new_tokens": 6}}
    runs = {
        "sft": (rufus.train_sft, {**base, "data": {"train": sft, "eval": sft, "max_length": 40}}),
        "rm": (rufus.train_reward_model, {**base, "data": {"train": prefs, "eval": prefs, "max_length": 40}}),
        "rm_ranking": (
            rufus.train_reward_model,
            {**base, "data": {"train": ranks, "max_length": 40}},
        ),
        "ppo": (
            rufus.train_ppo,
            {
                **online,
                "reward": {"scale": True, "clip": 1.0, "missing_eos_penalty": -1.0},
                "ptx": {"coef": 0.5, "data": sft},
                "kl": {"target": 1.0},
            },
        ),
        "ppo_shared": (rufus.train_ppo, {**online, "critic": {"shared": True}}),
        "grpo": (rufus.train_grpo, {**online, "grpo": {"group_size": 2}}),
        "rloo": (rufus.train_rloo, {**online, "rloo": {"group_size": 2}}),
        "dpo": (
            rufus.train_dpo,
            {
                **base,
                "data": {"train": prefs, "eval": prefs, "max_length": 40},
                "dpo": {"rounds": 2, "prompts_per_round": 4},
                "generation": {"max_new_tokens": 6},
            },
        ),
        "bon": (rufus.train_bon, {**online, "bon": {"group_size": 2, "prompts_per_round": 4}}),
        "ilql": (rufus.train_ilql, {**base, "data": {"train": prefs, "eval": prefs, "max_length": 40}}),
    }
    out = {}
    for name, (train, cfg) in runs.items():
        train(
            {**cfg, "output_dir": str(tmp / name)},
            **({"reward_fn": digit_fraction} if name not in ("sft", "rm", "rm_ranking", "ilql") else {}),
        )
        out[name] = {k for row in read_metrics(tmp / name / "metrics.jsonl") for k in row}
    return out


def test_every_logged_key_is_documented(logged):
    documented = documented_keys(DOC.read_text(encoding="utf-8"))
    missing = {name: sorted(k for k in keys if not matches(k, documented)) for name, keys in logged.items()}
    assert all(not keys for keys in missing.values()), f"keys logged but not in docs/metrics.md: {missing}"


def test_one_name_per_concept_across_trainers(logged):
    """score/mean is the reward sources' score and reward/mean the KL-penalised reward, in every RL
    trainer; ptx/loss appears when PPO-ptx is on; the policy's statistics share one prefix."""
    for name in ("ppo", "ppo_shared", "grpo", "rloo"):
        keys = logged[name]
        assert {
            "score/mean",
            "score/std",
            "reward/mean",
            "reward/std",
            "kl/mean",
            "response/length",
            "policy/loss",
            "policy/entropy",
            "policy/approx_kl",
            "policy/clipfrac",
            "policy/updates",
        } <= keys, name
        assert not {"entropy", "approx_kl", "clipfrac", "reward/score", "ppo/updates"} & keys, name
    assert "ptx/loss" in logged["ppo"] and "ptx/loss" not in logged["ppo_shared"]
    assert {"score/mean", "score/kept"} <= logged["bon"] and {"score/mean", "score/chosen"} <= logged["dpo"]
