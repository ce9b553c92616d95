"""The KV-cache generation path gives exactly what recomputing every position gives (greedy)."""

from __future__ import annotations

import pytest
import torch

from rufus.config import GenerationSection
from rufus.data.sft import encode_prompt
from rufus.models.loading import load_causal_lm, load_tokenizer
from rufus.rollout.generate import generate_responses
from tests.helpers import make_tiny_model_dir


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_generation_equals_no_cache_generation_greedy(tmp_path, arch):
    path = make_tiny_model_dir(tmp_path / arch, arch=arch)
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer=tokenizer, dtype=torch.float32).eval()
    # prompts of different lengths: left padding and position ids are part of what is checked
    prompts = ["What is 3 plus 4?", "Hi", "Tell me about owls and the night, please.", "Sum 12 and 30."]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    assert len({len(i) for i in ids}) > 1
    gen = GenerationSection(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    cached = generate_responses(model, tokenizer, prompts, ids, gen, use_cache=True)
    plain = generate_responses(model, tokenizer, prompts, ids, gen, use_cache=False)
    assert torch.equal(cached.input_ids, plain.input_ids)
    assert torch.equal(cached.response_mask, plain.response_mask)
    assert cached.completions == plain.completions
    # and greedy really is the argmax of a full forward pass at every step (row by row, no padding)
    for row, prompt_ids in enumerate(ids):
        seq = torch.tensor([prompt_ids])
        for _ in range(gen.max_new_tokens):
            logits = model(input_ids=seq).logits[0, -1]
            logits[tokenizer.pad_token_id] = -float("inf")  # the sampler never emits the pad id
            nxt = logits.argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        width = cached.input_ids.shape[1] - cached.prompt_length
        assert cached.input_ids[row, cached.prompt_length :].tolist() == seq[0, len(prompt_ids) :].tolist()[:width]
