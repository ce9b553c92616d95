"""Best-of-n fine-tuning: the reward rises over rounds, top_k / threshold keep what they say,
gradient accumulation leaves the update alone, resume at a round boundary reproduces the run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rufus.config import ConfigError
from rufus.report.metrics import read_metrics
from rufus.trainers.bon import train_bon
from tests.helpers import write_jsonl


def digit_share(prompts, completions, **kw):
    """Programmatic reward: the share of a completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def spread_score(prompts, completions, **kw):
    """A deterministic score in [0, 1) that differs between most texts (for counting what is kept)."""
    return [(sum(ord(c) * (i + 1) for i, c in enumerate(text)) % 997) / 997 for text in completions]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"what is {i} plus {i + 2} ?"} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def bon_config(tiny_model, prompts, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(prompts), "max_length": 40},
        "generation": {"max_new_tokens": 6},
        "batch_size": 8,
        "lr": 1e-2,
        "dtype": "float32",
        "progress": False,
        "seed": 0,
        "bon": {"group_size": 8, "top_k": 1, "rounds": 3, "sft_epochs": 3},
    }
    for k, v in over.items():
        section, _, key = k.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[key] = v
    return cfg


def test_best_of_n_fine_tuning_raises_the_reward(tiny_model, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train_bon(bon_config(tiny_model, prompts, tmp_path / "run"), reward_fn=digit_share)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per round
    first, last = rows[0]["score/mean"], rows[-1]["score/mean"]
    # the untrained model writes ~3% digits; after 3 rounds of best-of-8 it is several times that
    assert last > first + 0.1 and last > 3 * first, (first, last)
    for r in rows:
        assert r["bon/kept"] == 16  # top_k=1 of each of the 16 prompts, no threshold
        assert r["score/kept"] >= r["score/mean"]
        assert r["bon/kl_bound"] == pytest.approx(math.log(8) - 7 / 8)
        assert math.isfinite(r["loss"]) and r["sft/steps"] == 6  # 3 epochs x 16 kept / batch 8
        for key in ("lr", "time/step_s", "grad_norm", "response/length", "time/sample_s", "time/train_s"):
            assert key in r, key
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "response", "score"} <= set(samples[0]) and samples[-1]["step"] == 3
    # final/ is a plain Hugging Face model, and it moved away from the start
    final = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start if final[k].shape == start[k].shape)
    assert result.steps == 18 and result.rounds == 3


def test_top_k_and_threshold_keep_what_they_say(tiny_model, prompts, tmp_path):
    seen = []  # every score the reward gave, call by call (each call = whole groups of n)

    def recorded(prompts, completions, **kw):
        scores = spread_score(prompts, completions)
        seen.append(scores)
        return scores

    n, top_k, threshold = 4, 2, 0.5
    train_bon(
        bon_config(
            tiny_model,
            prompts,
            tmp_path / "thr",
            max_steps=1,
            **{"bon.group_size": n, "bon.top_k": top_k, "bon.threshold": threshold, "bon.rounds": 1},
        ),
        reward_fn=recorded,
    )
    # by hand: each prompt's n scores sit together; keep its top_k, then those >= threshold
    expected = 0
    for scores in seen:
        for g in range(0, len(scores), n):
            best = sorted(scores[g : g + n], reverse=True)[:top_k]
            expected += sum(s >= threshold for s in best)
    (row,) = read_metrics(tmp_path / "thr" / "metrics.jsonl")
    assert sum(len(s) for s in seen) == 16 * n
    assert row["bon/kept"] == expected and 0 < expected < 16 * top_k  # the threshold did remove some
    assert row["score/kept"] >= threshold
    samples = [json.loads(x) for x in (tmp_path / "thr" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["score"] >= threshold for s in samples)


def test_gradient_accumulation_does_not_change_the_update(tiny_model, prompts, tmp_path):
    # lr 1e-3: Adam divides by sqrt(v), so float noise in a near-zero gradient moves a weight by up to ~lr
    over = {"bon.group_size": 2, "bon.rounds": 1, "bon.sft_epochs": 1, "bon.prompts_per_round": 8, "lr": 1e-3}
    train_bon(bon_config(tiny_model, prompts, tmp_path / "one", grad_accum=1, **over), reward_fn=digit_share)
    train_bon(bon_config(tiny_model, prompts, tmp_path / "two", grad_accum=4, **over), reward_fn=digit_share)
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl")[0], read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert a["score/mean"] == b["score/mean"]  # the same samples: sampling precedes any update
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_resume_at_a_round_boundary_reproduces_the_final_weights(tiny_model, prompts, tmp_path):
    # 8 of the 16 prompts a round: the two rounds see different prompts
    over = {
        "bon.group_size": 4,
        "bon.rounds": 2,
        "bon.prompts_per_round": 8,
        "bon.sft_epochs": 1,
        "save_total_limit": 0,
    }
    train_bon(bon_config(tiny_model, prompts, tmp_path / "straight", **over), reward_fn=digit_share)
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-0000001", cut / "checkpoints" / "step-0000001")
    for name in ("metrics.jsonl", "samples.jsonl"):
        shutil.copy(tmp_path / "straight" / name, cut / name)
    train_bon(bon_config(tiny_model, prompts, cut, resume=True, **over), reward_fn=digit_share)

    wa = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    wb = load_file(cut / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]

    assert untimed(read_metrics(cut / "metrics.jsonl")) == untimed(
        read_metrics(tmp_path / "straight" / "metrics.jsonl")
    )
    assert (cut / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()


@pytest.mark.parametrize(
    "over, key",
    [
        ({"bon.top_k": 5, "bon.group_size": 4}, "bon.top_k"),
        ({"bon.group_size": 0}, "bon.group_size"),
        ({"bon.rounds": 0}, "bon.rounds"),
        ({"bon.sft_epochs": 0.0}, "bon.sft_epochs"),
    ],
)
def test_bad_bon_settings_fail_before_anything_loads(tmp_path, over, key):
    cfg = bon_config("org/no-such-model", tmp_path / "missing.jsonl", tmp_path / "out", **over)
    with pytest.raises(ConfigError, match=key):
        train_bon(cfg, reward_fn=digit_share)
    assert not (tmp_path / "out").exists()


def test_example_recipe_loads():
    from pathlib import Path

    from rufus.config import load_config
    from rufus.trainers.bon import BoNConfig

    cfg = load_config(BoNConfig, Path(__file__).parents[2] / "configs" / "bon_tiny.yaml")
    assert cfg.model == "builtin:tiny-llama" and cfg.reward.function == ["configs/rewards.py:digit_share"]
    assert cfg.bon.group_size == 8 and cfg.bon.rounds == 4
