"""bfloat16 compute with float32 master weights (rufus.precision)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rufus.precision import MasterWeights


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_masters_are_the_float32_weights_and_the_model_computes_in_bfloat16():
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.lm_head.weight.requires_grad_(False)  # a frozen parameter: cast, but no master
    mw = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(mw.parameters()) == len(original) - 1
    for (name, param), (p, master) in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], mw.pairs):
        assert p is param and master.dtype == torch.float32
        assert torch.equal(master, original[name])  # the exact float32 values, not the rounded ones
        assert torch.equal(param, original[name].to(torch.bfloat16))
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16


def test_updates_below_half_an_ulp_accumulate_in_the_master():
    """A weight of 1.0 in bfloat16 has an ulp of 2^-7 = 0.0078125. SGD steps of lr * g = 0.001 each
    round away on a bfloat16 weight (1 - 0.001 rounds to 1), but the float32 master moves by 0.001 a
    step, so after 10 steps it is 0.99 and the model's weight is bfloat16(0.99) = 0.98828125."""
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    plain = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight.fill_(1.0)
    mw = MasterWeights(layer)
    opt, opt_plain = torch.optim.SGD(mw.parameters(), lr=0.001), torch.optim.SGD(plain.parameters(), lr=0.001)
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    for _ in range(10):
        layer(x).sum().backward()  # d(w x)/dw = x = 1
        mw.grads_to_master()
        opt.step()
        mw.master_to_model()
        opt.zero_grad()
        plain(x).sum().backward()
        opt_plain.step()
        opt_plain.zero_grad()
    assert mw.parameters()[0].item() == pytest.approx(0.99, abs=1e-6)
    assert layer.weight.item() == 0.98828125
    assert plain.weight.item() == 1.0  # every update was lost


def test_bfloat16_training_tracks_float32_on_the_same_batches():
    """20 AdamW steps on the same two random batches (so there is something to learn): the
    bfloat16-compute losses stay within 3% of the float32 run's at every step, and both fall by the
    same amount to within 10%."""
    torch.manual_seed(1)
    batches = [torch.randint(0, 128, (8, 32)) for _ in range(2)] * 10
    fp32, bf16 = tiny_llama(), tiny_llama()
    mw = MasterWeights(bf16)
    opt32 = torch.optim.AdamW(fp32.parameters(), lr=3e-3)
    opt16 = torch.optim.AdamW(mw.parameters(), lr=3e-3)
    losses32, losses16 = [], []
    for ids in batches:
        loss = fp32(input_ids=ids, labels=ids).loss
        loss.backward()
        opt32.step()
        opt32.zero_grad()
        losses32.append(loss.item())
        loss = bf16(input_ids=ids, labels=ids).loss
        loss.backward()
        mw.grads_to_master()
        torch.nn.utils.clip_grad_norm_(mw.parameters(), 1e9)  # clipping works on the masters
        opt16.step()
        mw.master_to_model()
        opt16.zero_grad()
        losses16.append(loss.float().item())
    for a, b in zip(losses32, losses16):
        assert b == pytest.approx(a, rel=0.03)
    drop32, drop16 = losses32[0] - losses32[-1], losses16[0] - losses16[-1]
    assert drop32 > 0.3 and drop16 == pytest.approx(drop32, rel=0.1)


def test_state_dict_round_trip_restores_the_low_bits():
    model, other = tiny_llama(0), tiny_llama(1)
    mw, mw_other = MasterWeights(model), MasterWeights(other)
    mw_other.load_state_dict(mw.state_dict())
    for (p, m), (q, n) in zip(mw.pairs, mw_other.pairs):
        assert torch.equal(m, n) and torch.equal(p, q)
    with pytest.raises(ValueError, match="checkpoint has"):
        mw.load_state_dict({"masters": mw.state_dict()["masters"][:-1]})
