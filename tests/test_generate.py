"""`rufus generate`: rows and summary, best-of-n picks the best, and best-of-n's empirical KL to the
sampler stays at or below the analytic bound log n - (n-1)/n (and matches the exact discrete value)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rufus.bon import bon_kl_bound
from rufus.config import ConfigError
from rufus.generate import generate
from tests.helpers import write_jsonl


def digit_share(prompts, completions, **kw):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


# --- the exact best-of-n distribution of a discrete policy ---------------------------------------


def exact_bon(p_sorted: torch.Tensor, n: int) -> torch.Tensor:
    """P(best of n = outcome k) = F(k)^n - F(k-1)^n, outcomes sorted by increasing reward, F the base
    CDF (the best of n is <= k exactly when all n draws are)."""
    F = torch.cumsum(p_sorted, 0).clamp(max=1.0)
    return F**n - torch.cat([F.new_zeros(1), F[:-1]]) ** n


def kl(q: torch.Tensor, p: torch.Tensor) -> float:
    keep = q > 0
    return float((q[keep] * (q[keep] / p[keep]).log()).sum())


def test_exact_bon_kl_matches_the_hand_values():
    # Beirami et al. 2024 (arXiv 2401.01879): K equiprobable outcomes, P(k-th best) = (k/K)^n - ((k-1)/K)^n
    for K, n, want in [(4, 2, 0.1740), (4, 4, 0.5903), (4, 16, 1.3301), (2, 16, 0.6930)]:
        p = torch.full((K,), 1 / K, dtype=torch.float64)
        got = kl(exact_bon(p, n), p)
        assert got == pytest.approx(want, abs=1e-4)
        assert got < bon_kl_bound(n)  # discrete outcomes: strictly below the continuous-reward value
    # many outcomes approach the bound: 1000 equiprobable, n=4
    p = torch.full((1000,), 1e-3, dtype=torch.float64)
    assert kl(exact_bon(p, 4), p) == pytest.approx(bon_kl_bound(4), abs=2e-3)


# --- best-of-n through the real generate() -------------------------------------------------------

K = 4  # generation.top_k: the base policy is the softmax over the model's K most likely next tokens
M = 3000  # best-of-n draws per n


def test_best_of_n_empirical_kl_stays_below_the_analytic_bound(tiny_model, tmp_path):
    """One-token responses: the base distribution p over them is known exactly from the logits, and
    a fixed random score per response makes the rewards distinct. M best-of-n draws through
    generate() give q by counting; the plug-in KL(q || p) must sit at or below log n - (n-1)/n and
    agree with the exact discrete KL from order statistics."""
    from rufus.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), tokenizer=tokenizer).eval()
    text = "a"  # two tokens with bos (cheap to run M * n times); its top K decode to four distinct texts
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()  # (V,) next-token scores
    logits[tokenizer.pad_token_id] = -math.inf  # the sampler never draws pad
    top = torch.topk(logits, K)
    probs = torch.softmax(top.values, 0)  # (K,) p: sampling at temperature 1 from the top K
    # responses are decoded text, so the outcome is the text (two ids with one text are one outcome)
    base: dict[str, float] = {}
    for token, pk in zip(top.indices.tolist(), probs.tolist()):
        key = tokenizer.decode([token], skip_special_tokens=True)
        base[key] = base.get(key, 0.0) + pk
    rng = random.Random(0)
    score = {t: rng.random() for t in sorted(base)}  # distinct rewards, fixed per outcome
    outcomes = sorted(base, key=score.get)  # increasing reward
    p = torch.tensor([base[t] for t in outcomes], dtype=torch.float64)

    def token_reward(prompts, completions, **kw):
        return [score.get(c, -1.0) for c in completions]

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text}] * M)
    bias = (len(outcomes) - 1) / (2 * M)  # E[plug-in KL] - KL for M draws over the outcomes
    for n in (1, 2, 4):
        out = generate(
            {
                "model": str(tiny_model),
                "prompts": str(prompts),
                "best_of": n,
                "batch_size": 1000,
                "generation": {"max_new_tokens": 1, "top_k": K},
                "dtype": "float32",
                "seed": n,
                "progress": False,
                "output": str(tmp_path / f"best_of_{n}.jsonl"),
            },
            reward_fn=token_reward,
        )
        counts = {t: 0 for t in outcomes}
        for row in out["generations"]:
            counts[row["response"]] += 1  # KeyError = sampled outside the top K
        q_hat = torch.tensor([counts[t] for t in outcomes], dtype=torch.float64) / M
        q = exact_bon(p, n)
        estimate, exact, bound = kl(q_hat, p), kl(q, p), bon_kl_bound(n)
        # standard error of the plug-in estimate (delta method): sd of log(q/p) under q, / sqrt(M)
        log_ratio = (q / p).log()
        se = math.sqrt(float((q * log_ratio**2).sum() - (q * log_ratio).sum() ** 2) / M)
        print(f"n={n}: KL estimate {estimate:.4f} +- {se:.4f}, exact {exact:.4f}, bound {bound:.4f}")
        assert out["bon/kl_bound"] == pytest.approx(bound) and out["samples"] == M * n
        assert exact <= bound + 1e-12 and (n == 1 or exact < bound)
        assert abs(estimate - exact) <= 4 * se + bias + 1e-3, (n, estimate, exact, se)
        assert estimate <= bound + 3 * se + bias + 1e-3, (n, estimate, bound, se)
        if n == 1:  # the sampler draws from p itself: the test's p is the distribution generate() uses
            assert 0.5 * float((q_hat - p).abs().sum()) < 0.04
        else:
            assert out["score/best"] > out["score/mean"]


def test_top_k_zero_samples_the_whole_vocabulary(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what is"}] * 3000)
    out = generate(
        {
            "model": str(tiny_model),
            "prompts": str(prompts),
            "batch_size": 1000,
            "dtype": "float32",
            "generation": {"max_new_tokens": 1, "top_k": 0},
            "progress": False,
            "output": str(tmp_path / "out.jsonl"),
        }
    )
    # the untrained model spreads over ~300 tokens almost uniformly; top-50 would cap the outcomes at 50
    assert len({row["response"] for row in out["generations"]}) > 60


# --- rows, summary, errors -----------------------------------------------------------------------


def test_best_of_n_rows_and_summary(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} plus {i} ?"} for i in range(5)])
    out = generate(
        {
            "model": str(tiny_model),
            "prompts": str(prompts),
            "best_of": 3,
            "return_all": True,
            "batch_size": 2,
            "generation": {"max_new_tokens": 6},
            "dtype": "float32",
            "progress": False,
            "output_dir": str(tmp_path / "gen"),
        },
        reward_fn=digit_share,
    )
    rows = [json.loads(x) for x in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert rows == out["generations"] and len(rows) == 5
    assert [r["prompt"] for r in rows] == [f"what is {i} plus {i} ?" for i in range(5)]  # input order
    for r in rows:
        assert len(r["all_responses"]) == len(r["all_scores"]) == 3
        assert r["score"] == max(r["all_scores"]) and r["response"] in r["all_responses"]
    assert out["score/best"] == pytest.approx(sum(r["score"] for r in rows) / 5)
    assert out["score/mean"] == pytest.approx(sum(sum(r["all_scores"]) for r in rows) / 15)
    assert out["bon/kl_bound"] == pytest.approx(math.log(3) - 2 / 3)
    summary = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert summary["best_of"] == 3 and "generations" not in summary
    assert (tmp_path / "gen" / "config.yaml").exists()


def test_single_prompt_without_reward_goes_to_stdout(tiny_model, capsys):
    out = generate(
        {
            "model": str(tiny_model),
            "prompt": "what is one",
            "dtype": "float32",
            "progress": False,
            "generation": {"max_new_tokens": 4},
        }
    )
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert row == out["generations"][0] and set(row) == {"prompt", "response"}
    assert out["output"] == "-" and out["bon/kl_bound"] == 0.0 and "score/mean" not in out


@pytest.mark.parametrize(
    "over, key",
    [({"best_of": 4}, "best_of"), ({"prompts": "x.jsonl"}, "prompts / prompt"), ({"best_of": 0}, "best_of")],
)
def test_bad_settings_are_errors(over, key):
    with pytest.raises(ConfigError, match=key):
        generate({"model": "org/no-such-model", "prompt": "hi", **over})
