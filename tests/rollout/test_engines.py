"""The rollout-engine interface (rufus.rollout.engines) with the hf engine: seeded, reproducible sampling
that leaves the global generator alone; greedy outputs equal `generate`'s; finish reasons and logprobs
as the interface promises; the Rollout built from any engine's tokens; the weights an engine is sent."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rufus.config import GenerationSection
from rufus.rollout.engine import build_rollout, sample_rollout
from rufus.rollout.engines import Generated, Sampling, make_engine, policy_weights
from rufus.rollout.generate import generate_responses


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return model, tok


def prompts(tok, n=6):
    texts = [f"what is {i} plus {i + 1}?" for i in range(n)]
    return [tok(t)["input_ids"] for t in texts]


def test_greedy_equals_generate(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompts(tok)
    gen = GenerationSection(max_new_tokens=10, temperature=0)
    engine = make_engine("hf", model, tok)
    got = engine.generate(ids, Sampling.from_generation(gen))
    ro = generate_responses(model, tok, [None] * len(ids), ids, gen)
    want = [row[m.bool()].tolist() for row, m in zip(ro.response_ids, ro.response_mask)]
    assert got.response_ids == want
    assert all(1 <= len(r) <= 10 for r in got.response_ids)


def test_a_seed_fixes_the_samples_and_leaves_the_global_generator_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompts(tok)
    engine = make_engine("hf", model, tok)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = engine.generate(ids, Sampling(max_tokens=12, temperature=1.0, seed=7))
    assert torch.equal(torch.get_rng_state(), before)  # the call drew from its own generator
    b = engine.generate(ids, Sampling(max_tokens=12, temperature=1.0, seed=7))
    c = engine.generate(ids, Sampling(max_tokens=12, temperature=1.0, seed=8))
    assert a.response_ids == b.response_ids
    assert a.response_ids != c.response_ids  # 6 sampled responses of up to 12 tokens from a random model


def test_finish_reasons_and_the_engines_logprobs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompts(tok)
    engine = make_engine("hf", model, tok)
    for stop in (True, False):
        got = engine.generate(ids, Sampling(max_tokens=8, temperature=0.7, seed=3, stop_at_eos=stop, logprobs=True))
        for prompt, response, reason, lps in zip(ids, got.response_ids, got.finish_reasons, got.logprobs, strict=True):
            ends = response[-1] == tok.eos_token_id
            assert reason == ("stop" if ends else "length")
            assert tok.eos_token_id not in response[:-1]  # a response ends at its first EOS
            assert reason == "stop" or len(response) == 8
            # naive reference: one forward over prompt + response, log-softmax of logits / temperature
            full = torch.tensor([prompt + response])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt) - 1 : -1] / 0.7
            want = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(lps), want, atol=1e-5)


class FixedEngine:
    """An engine that answers with given tokens (what a vLLM engine would hand back)."""

    name = "fixed"

    def __init__(self, responses, reasons):
        self.responses, self.reasons, self.calls = responses, reasons, []

    def generate(self, prompt_ids, sampling):
        self.calls.append((prompt_ids, sampling))
        return Generated(self.responses, self.reasons)


def test_the_rollout_from_an_engines_tokens(model_and_tokenizer):
    _, tok = model_and_tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [{"prompt": "p0", "ids": [5, 6, 7], "extra": {"x": 0}}, {"prompt": "p1", "ids": [8], "extra": {"x": 1}}]
    engine = FixedEngine([[11, 12, eos], [13, 14, 15, 16], [17], [eos]], ["stop", "length", "length", "stop"])
    gen = GenerationSection(max_new_tokens=4, temperature=0.5, top_k=3, top_p=0.9, stop_at_eos=False)
    ro = sample_rollout(engine, tok, rows, 2, gen, seed=99)
    ((asked, sampling),) = engine.calls
    assert asked == [[5, 6, 7], [5, 6, 7], [8], [8]]  # each prompt n times, in order
    assert sampling == Sampling(4, 0.5, 3, 0.9, False, 99, False)
    assert ro.prompt_length == 3
    assert ro.input_ids.tolist() == [
        [5, 6, 7, 11, 12, eos, pad],
        [5, 6, 7, 13, 14, 15, 16],
        [pad, pad, 8, 17, pad, pad, pad],
        [pad, pad, 8, eos, pad, pad, pad],
    ]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7, [0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]]
    assert ro.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert ro.has_eos.tolist() == [True, False, False, True]
    assert ro.prompts == ["p0", "p0", "p1", "p1"] and ro.extra == {"x": [0, 0, 1, 1]}
    assert ro.completions[3] == ""  # the EOS alone decodes to nothing
    with pytest.raises(ValueError, match="at most 4"):
        build_rollout(["p"], [[5]], Generated([[1, 2, 3, 4, 5]], ["length"]), tok, 4)


def test_an_unknown_engine_is_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        make_engine("sglang", model, tok)


def test_the_weights_an_engine_is_sent_have_lora_merged_under_the_base_names(tiny_model):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = set(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a non-zero adapter
    W = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * (8 / 4)
    sent = dict(policy_weights(model))
    assert set(sent) == names
    assert torch.allclose(sent["model.layers.0.self_attn.q_proj.weight"], W + delta, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, W)  # unmerged again afterwards
    assert math.isclose(float(sent["model.embed_tokens.weight"].sum()), float(base.model.embed_tokens.weight.sum()))
