"""Reward-model trainer: learns a taste from comparisons, rankings train, normalised, LoRA, bad rows."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rufus.data.errors import DataError
from rufus.data.reward import RewardCollator, encode_for_reward
from rufus.models.loading import load_tokenizer
from rufus.models.reward import load_reward_model, raw_scores, score
from rufus.trainers.reward import eval_reward_model, train_reward_model
from tests.helpers import preference_rows, ranking_rows, with_overrides, write_jsonl


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    return write_jsonl(d / "train.jsonl", preference_rows(256, seed=1)), write_jsonl(
        d / "eval.jsonl", preference_rows(128, seed=2)
    )


def rm_config(tiny_model, train, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(train), "max_length": 48},
        "batch_size": 16,
        "lr": 3e-3,
        "max_steps": 60,
        "dtype": "float32",
        "progress": False,
        "log_every": 10,
    }
    return with_overrides(cfg, over)


def test_new_head_init_scale(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = load_reward_model(str(tiny_model), tokenizer=tok)
    std = model.score.weight.std().item()
    assert abs(std - 1 / math.sqrt(64 + 1)) < 0.3 / math.sqrt(65)  # 64 weights: the estimate is within ~25%


def test_left_and_right_padding_score_the_same(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = load_reward_model(str(tiny_model), tokenizer=tok).eval()
    seqs = [
        encode_for_reward(tok, "what is one ?", r) for r in (" yes", " the cat sat on a mat and ran to sea .", " no")
    ]
    with torch.no_grad():
        right = RewardCollator(tok.pad_token_id, padding_side="right")(seqs)
        left = RewardCollator(tok.pad_token_id, padding_side="left")(seqs)
        a = raw_scores(model, right["input_ids"], right["attention_mask"])
        b = raw_scores(model, left["input_ids"], left["attention_mask"])
        alone = torch.cat([raw_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, alone, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_learns_the_synthetic_taste_and_normalises(tiny_model, prefs, tmp_path):
    train, held_out = prefs
    result = train_reward_model(
        rm_config(tiny_model, train, tmp_path / "rm", max_steps=150, eval_every=50, **{"data.eval": str(held_out)})
    )
    assert result.eval["rm/accuracy"] >= 0.95, result.eval
    logged = [r for r in result.metrics if "rm/accuracy" in r]
    assert {"rm/accuracy", "rm/margin", "rm/ece"} <= set(logged[-1])
    assert 0.0 <= logged[-1]["rm/ece"] <= 0.5

    # reloaded with plain transformers; normalised scores on the reference set (training chosen)
    rm = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tok = load_tokenizer(str(result.final_dir))
    rows = preference_rows(256, seed=1)
    batch = RewardCollator(tok.pad_token_id)([encode_for_reward(tok, r["prompt"], r["chosen"]) for r in rows])
    s = score(rm, batch["input_ids"], batch["attention_mask"])
    assert abs(s.mean().item()) < 1e-3 and abs(s.std(unbiased=False).item() - 1) < 1e-3

    standalone = eval_reward_model({"model": str(result.final_dir), "data": str(held_out)})
    assert standalone["rm/accuracy"] == pytest.approx(result.eval["rm/accuracy"])
    assert standalone["rm/pairs"] == 128


def test_k4_rankings_train(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "rank.jsonl", ranking_rows(128, seed=3))
    held = write_jsonl(tmp_path / "rank_eval.jsonl", ranking_rows(32, seed=4))
    result = train_reward_model(
        rm_config(
            tiny_model,
            train,
            tmp_path / "rank",
            max_steps=80,
            batch_size=8,
            **{"data.eval": str(held)},
        )
    )
    first = result.metrics[0]["rm/train_accuracy"]
    assert result.eval["rm/accuracy"] >= 0.85 and result.eval["rm/accuracy"] > first
    assert eval_reward_model({"model": str(result.final_dir), "data": str(held)})["rm/pairs"] == 32 * 6


def _train_gaps(model, tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) scores of every training response, and each pair's gap r_c - r_r."""
    collate = RewardCollator(tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        scores = [
            raw_scores(model, b["input_ids"], b["attention_mask"])
            for b in (
                collate([encode_for_reward(tokenizer, r["prompt"], r[k]) for r in rows]) for k in ("chosen", "rejected")
            )
        ]
    return torch.cat(scores), scores[0] - scores[1]


def test_centering_and_margin_put_the_logistic_scores_where_the_formula_says(tiny_model, prefs, tmp_path):
    # Per pair the trainer minimises -log sigmoid(g - m) + c (r_c^2 + r_r^2) / 2 (the pair term over P
    # prompts, the centering term over 2P responses). Writing r_c = a + g/2, r_r = a - g/2 the centering
    # term is c (a^2 + g^2 / 4): d/da = 2 c a = 0 gives a = 0 (mean score 0; the logistic term only sees
    # g), and d/dg = -sigmoid(m - g) + c g / 2 = 0 fixes the gap. With c = 0.1 (bisection):
    #   m = 0: sigmoid(-g) = 0.05 g      -> g* = 2.128
    #   m = 3: sigmoid(3 - g) = 0.05 g   -> g* = 4.296
    # Without centering the gaps grow without bound on this separable data (to 11-14 in 60 steps, mean
    # score anywhere in +-3); with the margin ignored both runs land at 2.128. Seeds 0-2 observed
    # 2.13-2.16 and 4.29-4.30.
    train, _ = prefs
    rows = preference_rows(256, seed=1)  # the training file's rows
    tok = load_tokenizer(str(tiny_model))
    for margin, expected_gap in ((None, 2.128), (3.0, 4.296)):
        result = train_reward_model(
            rm_config(
                tiny_model,
                train,
                tmp_path / f"m{margin}",
                **{"rm.center_coef": 0.1, "rm.margin": margin, "rm.normalize": False},
            )
        )
        scores, gaps = _train_gaps(result.model, tok, rows)
        assert abs(scores.mean().item()) < 0.1, (margin, scores.mean().item())
        assert gaps.mean().item() == pytest.approx(expected_gap, rel=0.05), margin
        assert gaps.min().item() > 0.85 * expected_gap, margin


def test_hinge_with_centering_settles_at_the_margin_after_a_pointwise_warmup(tiny_model, prefs, tmp_path):
    # Hinge per pair: max(0, m - g) + c g^2 / 4 (centred as above). Below the margin the gap is pushed
    # up with slope 1 - c g / 2 > 0 (c = 0.1, g < 20); above it only the centering pulls it down; so
    # every gap settles at g = m = 2 and the mean score at 0. (Without centering the hinge stops
    # pushing but nothing pulls back: observed gaps 4.6-8.1 for m = 1.)
    train, held_out = prefs
    graded = write_jsonl(
        tmp_path / "graded.jsonl",
        [
            {"prompt": r["prompt"], "completion": r[k], "score": float(k == "chosen")}
            for r in preference_rows(32, seed=5)
            for k in ("chosen", "rejected")
        ],
    )
    result = train_reward_model(
        rm_config(
            tiny_model,
            train,
            tmp_path / "hinge",
            max_steps=60,
            **{
                "rm.loss": "hinge",
                "rm.margin": 2.0,
                "rm.center_coef": 0.1,
                "rm.pointwise_data": str(graded),
                "rm.pointwise_steps": 10,
                "rm.normalize": False,
                "data.eval": str(held_out),
            },
        )
    )
    stages = [r["stage"] for r in result.metrics if "stage" in r]
    assert stages[0] == "pointwise" and stages[-1] == "pairwise"
    assert result.eval["rm/accuracy"] >= 0.9
    scores, gaps = _train_gaps(result.model, load_tokenizer(str(tiny_model)), preference_rows(256, seed=1))
    assert abs(scores.mean().item()) < 0.1, scores.mean().item()
    assert gaps.mean().item() == pytest.approx(2.0, rel=0.1)  # observed 2.05-2.06
    assert gaps.min().item() > 0.85 * 2.0  # observed 1.92


def test_lora_reward_model(tiny_model, prefs, tmp_path):
    train, held_out = prefs
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).state_dict()
    result = train_reward_model(
        rm_config(
            tiny_model,
            train,
            tmp_path / "lora",
            max_steps=80,
            lr=1e-2,
            **{"lora.r": 8, "lora.alpha": 16, "data.eval": str(held_out)},
        )
    )
    assert result.eval["rm/accuracy"] >= 0.8
    for name, p in result.model.named_parameters():
        if "lora_" not in name and "score" not in name and "modules_to_save" not in name:
            assert not p.requires_grad, name
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), before[key]), name
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert not any("lora" in k for k in reloaded.state_dict())


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "hi", "chosen": " yes ."}, "rejected"),
        ({"prompt": "hi", "chosen": " yes .", "rejected": " yes ."}, "rejected"),
        ({"prompt": "hi", "chosen": "", "rejected": " no ."}, "chosen"),
    ],
)
def test_bad_preference_rows_name_file_row_and_field(tiny_model, tmp_path, row, field):
    bad = write_jsonl(tmp_path / "bad.jsonl", preference_rows(3) + [row])
    with pytest.raises(DataError) as e:
        train_reward_model(rm_config(tiny_model, bad, tmp_path / "bad"))
    assert "bad.jsonl, line 4" in str(e.value) and field in str(e.value)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
