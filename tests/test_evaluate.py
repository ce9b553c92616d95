"""`rufus eval`: distinct-n, the sampled KL against a naive recomputation, win rate, gold metrics, the
reward's accuracy on held-out pairs, errors, and the files it writes."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import torch

from rufus.config import ConfigError
from rufus.data.errors import DataError
from rufus.evaluate import distinct_n, evaluate
from rufus.playground.taste import gold_score
from tests.helpers import make_tiny_model_dir, write_jsonl

PROMPTS = [
    "What is 3 plus 4?",
    "Tell me about owls.",
    "How do I make soup?",
    "Where do foxes live?",
    "What causes rain?",
    "How do I learn guitar?",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """Two tiny models with one tokenizer (trained on the same text) but different random weights."""
    return tiny_model, make_tiny_model_dir(tmp_path_factory.mktemp("models") / "other", seed=1)


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def base(model, prompts, **over) -> dict:
    cfg = {
        "model": str(model),
        "prompts": str(prompts),
        "dtype": "float32",
        "progress": False,
        "seed": 3,
        "generation": {"max_new_tokens": 8, "temperature": 0.7},
    }
    cfg.update(over)
    return cfg


def char_length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def word_count(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]


def gold(prompts, completions, **kw):
    return [gold_score(p, c, "default") for p, c in zip(prompts, completions)]


def negative_gold(prompts, completions, **kw):
    return [-g for g in gold(prompts, completions)]


def test_distinct_n_by_hand():
    texts = ["the cat sat", "The cat ran", ""]
    # unigrams: the cat sat the cat ran -> 6, distinct {the, cat, sat, ran} -> 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4, distinct 3; none across texts ("sat the")
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a b a b a"], 2) == pytest.approx(2 / 4)  # (a b) (b a) (a b) (b a)
    assert distinct_n([], 1) == 0.0 and distinct_n(["one", ""], 2) == 0.0


def test_kl_is_zero_against_the_same_weights_and_ties_give_half(models, prompts, tmp_path):
    policy, _ = models
    copy = shutil.copytree(policy, tmp_path / "copy")  # another path, so it is loaded and run separately
    out = evaluate(base(policy, prompts, baseline=str(copy)), reward_fn=char_length)
    assert out["kl"] == 0.0 and out["kl_std_err"] == 0.0  # ref defaults to the baseline
    assert all(r["kl"] == 0.0 for r in out["generations"])
    # re-seeded before each model: the same weights sample the same responses, every prompt a tie
    assert all(r["response"] == r["baseline_response"] for r in out["generations"])
    assert out["win_rate"] == 0.5 and out["score"] == out["baseline/score"]
    same = evaluate(base(policy, prompts, ref_model=str(policy), num_prompts=4))
    assert same["kl"] == 0.0 and same["n_prompts"] == 4 and "win_rate" not in same and "score" not in same


def test_kl_matches_a_naive_per_sequence_recomputation(models, prompts):
    from transformers import set_seed

    from rufus.config import GenerationSection
    from rufus.data.sft import encode_prompt
    from rufus.models.loading import load_causal_lm, load_tokenizer
    from rufus.rollout.generate import generate_responses

    policy, other = models
    cfg = base(policy, prompts, ref_model=str(other))
    out = evaluate(cfg)
    rows = out["generations"]

    # the same sampling call evaluate makes (one batch, same seed) gives the sampled token ids
    tok = load_tokenizer(str(policy))
    pi = load_causal_lm(str(policy), tokenizer=tok).eval()
    ref = load_causal_lm(str(other), tokenizer=tok).eval()
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    set_seed(3)
    ro = generate_responses(pi, tok, PROMPTS, ids, GenerationSection(max_new_tokens=8, temperature=0.7))
    assert ro.completions == [r["response"] for r in rows]
    assert out["length"] == pytest.approx(ro.response_mask.sum(-1).float().mean().item())

    def seq_logprob(model, prompt_ids, response_ids):
        """Plain forward pass over one unpadded sequence; log softmax(logits / T) of each response token."""
        x = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].double() / 0.7, -1)
        return sum(logp[len(prompt_ids) - 1 + t, y].item() for t, y in enumerate(response_ids))

    naive = []
    for i in range(len(PROMPTS)):
        response = []  # the sampled tokens up to and including the first EOS (pad = not generated)
        for y in ro.response_ids[i].tolist():
            if y == tok.pad_token_id:
                break
            response.append(y)
            if y == tok.eos_token_id:
                break
        naive.append(seq_logprob(pi, ids[i], response) - seq_logprob(ref, ids[i], response))
        assert rows[i]["kl"] == pytest.approx(naive[i], abs=1e-4)
    assert out["kl"] == pytest.approx(sum(naive) / len(naive), abs=1e-4) and out["kl"] > 0
    assert out["kl_std_err"] == pytest.approx(statistics.stdev(naive) / math.sqrt(len(naive)), abs=1e-4)
    assert "baseline/length" not in out and "win_rate" not in out  # a reference is not a baseline


def test_win_rate_scores_and_gold_metrics_by_hand(models, prompts, tmp_path):
    policy, other = models
    out = evaluate(
        base(policy, prompts, baseline=str(other), preference="default", output_dir=str(tmp_path / "eval")),
        reward_fn=[char_length, word_count],
    )
    rows = out["generations"]
    a = [len(r["response"]) + len(r["response"].split()) for r in rows]
    b = [len(r["baseline_response"]) + len(r["baseline_response"].split()) for r in rows]
    assert [r["score"] for r in rows] == a and [r["baseline_score"] for r in rows] == b
    assert out["win_rate"] == pytest.approx(sum(1 if x > y else 0.5 if x == y else 0 for x, y in zip(a, b)) / 6)
    assert out["score"] == pytest.approx(sum(a) / 6) and out["baseline/score"] == pytest.approx(sum(b) / 6)
    assert out["score/char_length"] == pytest.approx(sum(len(r["response"]) for r in rows) / 6)
    assert out["baseline/score/word_count"] == pytest.approx(sum(len(r["baseline_response"].split()) for r in rows) / 6)
    texts = [r["response"] for r in rows]
    assert out["distinct_1"] == distinct_n(texts, 1) and out["distinct_2"] == distinct_n(texts, 2)
    assert out["baseline/distinct_2"] == distinct_n([r["baseline_response"] for r in rows], 2)

    for prefix, key in [("", "response"), ("baseline/", "baseline_response")]:
        g = [gold_score(r["prompt"], r[key], "default") for r in rows]
        assert [r[key.replace("response", "gold")] for r in rows] == g
        mean, half = sum(g) / 6, 1.96 * statistics.stdev(g) / math.sqrt(6)
        assert out[f"{prefix}gold/mean"] == pytest.approx(mean)
        assert out[f"{prefix}gold/ci_low"] == pytest.approx(mean - half)
        assert out[f"{prefix}gold/ci_high"] == pytest.approx(mean + half)
        assert out[f"{prefix}gold/ci_low"] <= out[f"{prefix}gold/mean"] <= out[f"{prefix}gold/ci_high"]
    assert out["gold/best"] == 7.0  # default taste: 2 + 1 + 1 + 1 + 2
    ga, gb = [r["gold"] for r in rows], [r["baseline_gold"] for r in rows]
    assert out["gold/win_rate"] == pytest.approx(sum(1 if x > y else 0.5 if x == y else 0 for x, y in zip(ga, gb)) / 6)

    # the files: eval.json is the returned metrics, generations.jsonl the returned rows
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert metrics == {k: v for k, v in out.items() if k != "generations"}
    lines = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    assert (tmp_path / "eval" / "config.yaml").exists()


def test_reward_accuracy_on_pairs_against_labels_and_gold(models, prompts, tmp_path):
    policy, _ = models
    pairs = [  # (prompt, chosen, rejected, gold(chosen), gold(rejected)) under the default taste
        ("What is 3 plus 4?", "Sure! 3 plus 4 equals 7. Hope this helps.", "Ugh. No idea.", 7.0, 2.0),
        (
            "Tell me about owls.",
            "Obviously owls owls owls owls owls owls.",  # the label disagrees with gold
            "Owls hunt mice at night with soft feathers.",
            10 / 3,
            6.5,
        ),
        ("How do I make soup?", "I like the sea.", "We like a tree.", 2.5, 2.5),  # gold ties
        (
            "Where do foxes live?",
            "Sure! Foxes live in the wild and hunt at night. Thanks!",
            "Rain and snow and fog.",
            7.0,
            2.5,
        ),
    ]
    for p, c, r, gc, gr in pairs:
        assert gold_score(p, c) == pytest.approx(gc) and gold_score(p, r) == pytest.approx(gr)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r, *_ in pairs])
    cfg = base(policy, prompts, pairs=str(path), preference="default", num_prompts=2)
    # ordered as gold: labels right on pairs 1 and 4, wrong on 2, tied on 3 -> (1 + 0 + 1/2 + 1) / 4
    out = evaluate(cfg, reward_fn=gold)
    assert out["rm/label_accuracy"] == 0.625 and out["rm/pairs"] == 4
    assert out["rm/gold_accuracy"] == 1.0 and out["rm/gold_pairs"] == 3  # the gold tie is left out
    out = evaluate(cfg, reward_fn=negative_gold)
    assert out["rm/label_accuracy"] == 0.375 and out["rm/gold_accuracy"] == 0.0 and out["rm/gold_pairs"] == 3
    no_gold = evaluate({**cfg, "preference": None}, reward_fn=gold)
    assert no_gold["rm/label_accuracy"] == 0.625 and "rm/gold_accuracy" not in no_gold and "gold/mean" not in no_gold


def test_bad_input_is_an_error_naming_it(models, prompts, tmp_path):
    policy, _ = models
    with pytest.raises(ConfigError, match="pairs"):
        evaluate(base(policy, prompts, pairs=str(tmp_path / "pairs.jsonl")))
    with pytest.raises(ConfigError, match="preference"):
        evaluate(base(policy, prompts, preference="grumpy"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts: .*bad\.jsonl, line 2"):
        evaluate(base(policy, bad))
    with pytest.raises(ConfigError, match="num_prompts"):
        evaluate(base(policy, prompts, num_prompts=0))
