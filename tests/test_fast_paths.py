"""The speed paths change speed only: attention choice, compiled blocks, the fused optimiser."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rufus.models.loading import compile_blocks, default_attention
from rufus.rollout.logprobs import position_ids_from_mask


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in rollouts
    mask[1, :1] = 0
    return ids, mask


def test_default_attention_is_eager_for_bfloat16_on_cpu_only():
    assert default_attention("sdpa", torch.bfloat16) == "sdpa"  # the user's choice always wins
    assert default_attention(None, torch.float32) is None
    expected = None if torch.cuda.is_available() else "eager"
    assert default_attention(None, torch.bfloat16) == expected


def test_eager_and_sdpa_attention_give_the_same_logits_on_padded_batches():
    ids, mask = padded_batch()
    logits = {}
    for attn in ("eager", "sdpa"):
        model = tiny_llama(attn).eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        logits[attn] = out.logits
    real = mask.bool()
    assert torch.allclose(logits["eager"][real], logits["sdpa"][real], atol=1e-5)


def test_compiled_blocks_match_eager_forward_backward_and_generation():
    """compile_blocks compiles every decoder layer; logits and gradients agree with the eager model,
    and generation (which runs the blocks eagerly) gives the same greedy tokens."""
    ids, mask = padded_batch()
    plain, compiled = tiny_llama(), tiny_llama()
    assert compile_blocks(compiled) == 2
    results = []
    for model in (plain, compiled):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        loss = (out.logits.float().log_softmax(-1)[..., 5] * mask).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.logits.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-4, rtol=1e-4)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-4, rtol=1e-3), name

    from types import SimpleNamespace

    from rufus.rollout.generate import generate_responses

    tokenizer = SimpleNamespace(
        pad_token_id=0, eos_token_id=2, batch_decode=lambda rows, **kw: [" ".join(map(str, r)) for r in rows]
    )
    gen = SimpleNamespace(max_new_tokens=6, stop_at_eos=False, temperature=0.0, top_k=0, top_p=1.0)
    prompts = [[5, 6, 7], [8, 9]]
    a = generate_responses(plain, tokenizer, ["a", "b"], prompts, gen)
    b = generate_responses(compiled, tokenizer, ["a", "b"], prompts, gen)
    assert torch.equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_adamw_step_equals_the_textbook_update(dtype):
    """make_optimizer's AdamW (fused kernel; float32 masters in bfloat16) against AdamW written out:
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),
    with decoupled weight decay w -= lr wd w on matrices only."""
    from types import SimpleNamespace

    from rufus.precision import master_weights_of
    from rufus.trainers.common import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SimpleNamespace(
        dtype=dtype,
        lr=1e-2,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_eps=1e-8,
        warmup_steps=0,
        warmup_ratio=0.0,
        scheduler="constant",
    )
    optimizer, _ = make_optimizer(cfg, model, max_steps=10)
    inner = getattr(optimizer, "optimizer", optimizer)
    assert all(group.get("fused") for group in inner.param_groups)
    masters = master_weights_of(optimizer)
    x = torch.randn(16, 8)
    state = {n: (torch.zeros_like(w), torch.zeros_like(w), w.clone()) for n, w in start.items()}
    for t in range(1, 4):
        loss = model(x.to(next(model.parameters()).dtype)).float().pow(2).mean()
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        if masters:
            masters.grads_to_master()
        optimizer.step()
        if masters:
            masters.master_to_model()
        optimizer.zero_grad(set_to_none=True)
        for n, (m, v, w) in state.items():
            g = grads[n]
            m.mul_(0.9).add_(0.1 * g)
            v.mul_(0.99).add_(0.01 * g * g)
            if w.ndim >= 2:
                w.mul_(1 - 1e-2 * 0.1)
            w.sub_(1e-2 * (m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8))
    updated = (
        dict(zip([n for n, _ in model.named_parameters()], masters.parameters()))
        if masters
        else dict(model.named_parameters())
    )
    for n, (_, _, w) in state.items():
        assert torch.allclose(updated[n].detach(), w, atol=1e-5, rtol=1e-4), n
        assert not torch.equal(updated[n].detach(), start[n])


def test_auto_dtype_falls_back_to_float32_with_one_notice_on_cpus_without_amx(monkeypatch, caplog):
    import logging

    import rufus.models.loading as loading

    monkeypatch.setattr(loading, "amx_available", lambda: False)
    monkeypatch.setattr(loading, "_NOTICES", set())
    with caplog.at_level(logging.WARNING, logger="rufus.models.loading"):
        assert loading.resolve_dtype("auto", "cpu") == torch.float32
        assert loading.resolve_dtype("auto", "cpu") == torch.float32
    notices = [r for r in caplog.records if "no AMX" in r.getMessage()]
    assert len(notices) == 1
    monkeypatch.setattr(loading, "amx_available", lambda: True)
    assert loading.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert loading.resolve_dtype("float32", "cpu") == torch.float32  # an explicit choice is kept


def test_pick_tokens_filters_like_the_definitions():
    """top-k keeps the k largest logits; top-p keeps the fewest most likely tokens whose mass reaches
    p; the pad token is never picked; temperature 0 is the argmax. Checked against a naive loop."""
    from types import SimpleNamespace

    from rufus.rollout.generate import pick_tokens

    torch.manual_seed(0)
    logits = torch.randn(3, 10) * 2
    logits[0, 4] = 50.0  # row 0: the pad token (4) is by far the most likely
    pad = 4
    greedy = pick_tokens(logits, SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0), pad)
    masked = logits.clone()
    masked[:, pad] = float("-inf")
    assert torch.equal(greedy, masked.argmax(-1))

    def allowed_naive(row, k, p):
        order = sorted(range(10), key=lambda j: -float(masked[row, j]))
        order = [j for j in order if j != pad]
        if k:
            order = order[:k]
        probs = torch.softmax(torch.tensor([float(masked[row, j]) for j in order]), 0).tolist()
        kept, mass = [], 0.0
        for j, q in zip(order, probs):
            kept.append(j)
            mass += q
            if mass >= p:
                break
        return set(kept)

    for k, p in ((3, 1.0), (0, 0.6), (5, 0.5)):
        gen = SimpleNamespace(temperature=1.0, top_k=k, top_p=p)
        seen = [set() for _ in range(3)]
        for _ in range(300):
            for row, tok in enumerate(pick_tokens(logits, gen, pad).tolist()):
                seen[row].add(tok)
        for row in range(3):
            assert seen[row] == allowed_naive(row, k, p), (k, p, row)


def test_static_cache_decoding_equals_generate_under_greedy():
    """compile=true models decode through a static cache with a compiled step: greedy tokens equal
    those of transformers' generate (left-padded prompts of different lengths, stop at EOS)."""
    from types import SimpleNamespace

    from rufus.rollout.generate import generate_responses, has_compiled_blocks

    plain, compiled = tiny_llama("eager"), tiny_llama("eager")
    compile_blocks(compiled)
    assert has_compiled_blocks(compiled) and not has_compiled_blocks(plain)
    tokenizer = SimpleNamespace(
        pad_token_id=0, eos_token_id=2, batch_decode=lambda rows, **kw: [" ".join(map(str, r)) for r in rows]
    )
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    for stop in (False, True):
        gen = SimpleNamespace(max_new_tokens=7, stop_at_eos=stop, temperature=0.0, top_k=0, top_p=1.0)
        a = generate_responses(plain, tokenizer, ["a", "b", "c"], prompts, gen)
        b = generate_responses(compiled, tokenizer, ["a", "b", "c"], prompts, gen)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert compiled.__dict__["_rufus_decoder"]  # the static path ran and kept its cache
