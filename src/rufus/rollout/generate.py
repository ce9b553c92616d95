"""Sampling responses with Hugging Face `generate` (batched, KV cache).

`generate_responses` is the backend interface: prompts as token ids in, a `Rollout` with the
sampled sequences and response mask out. A faster backend (vLLM on GPU) implements the same
function; the trainers only depend on its signature.
"""

from __future__ import annotations

import torch

from rufus.rollout.record import Rollout


def left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and attention mask."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_id: int | None, generated: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) mask of the tokens up to and including the first EOS, and (B,) has_eos.

    `generated` (B, A) marks positions the sampler actually produced (generate pads finished rows).
    """
    valid = torch.ones_like(response_ids, dtype=torch.bool) if generated is None else generated.bool()
    if eos_token_id is None:
        return valid.long(), torch.zeros(response_ids.shape[0], dtype=torch.bool)
    is_eos = (response_ids == eos_token_id) & valid
    # position of the first EOS, or A when there is none
    after = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # number of EOS strictly before t
    mask = (after == 0) & valid
    return mask.long(), is_eos.any(-1)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list,
    prompt_ids: list[list[int]],
    gen,
    *,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> Rollout:
    """Sample one response per prompt with the settings in `gen` (a `rufus.config.GenerationSection`).

    stop_at_eos=False samples exactly max_new_tokens (the fixed-length "EOS trick" of N+ details
    D23): the response mask still ends at the first EOS, so what follows it never counts.
    `use_cache=False` recomputes every position at every step (for checking the KV cache only).
    """
    from transformers import GenerationConfig

    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    greedy = gen.temperature <= 0
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=0 if gen.stop_at_eos else gen.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else gen.temperature,
        # explicit 0 and 1.0 switch the filters off; None would let transformers fill in its own
        # defaults (top_k=50, or a hub model's generation_config)
        top_k=gen.top_k,
        top_p=gen.top_p,
        eos_token_id=tokenizer.eos_token_id if gen.stop_at_eos else None,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[tokenizer.pad_token_id],  # the pad id marks "not generated" below
        use_cache=use_cache,
    )
    was_training = model.training
    model.eval()
    P = ids.shape[1]
    if getattr(model, "decodes_itself", False):  # a policy that is not a plain LM (ILQL's perturbed logits)
        response = sample_static(
            model,
            ids,
            mask,
            gen,
            tokenizer.pad_token_id,
            tokenizer.eos_token_id if gen.stop_at_eos else None,
            compiled=False,
        )
    elif use_cache and has_compiled_blocks(model):
        response = sample_static(
            getattr(model, "policy", model),
            ids,
            mask,
            gen,
            tokenizer.pad_token_id,
            tokenizer.eos_token_id if gen.stop_at_eos else None,
        )
    else:
        # compiled blocks would recompile at every cache length: generate runs them eagerly
        from rufus.distributed import decodes_in_lockstep

        synced = {"synced_gpus": True} if decodes_in_lockstep(model) else {}
        with torch.compiler.set_stance("force_eager"):
            response = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **synced)[:, P:]
    if was_training:
        model.train()
    if response.shape[1] < gen.max_new_tokens:  # every row stopped early: keep a fixed width A
        pad = torch.full(
            (response.shape[0], gen.max_new_tokens - response.shape[1]),
            tokenizer.pad_token_id,
            dtype=response.dtype,
            device=response.device,
        )
        response = torch.cat([response, pad], dim=1)
    # generate pads rows that finished; the pad id is never sampled, so the tokens before a row's
    # first pad are the ones it generated
    generated = torch.cumprod((response != tokenizer.pad_token_id).long(), dim=-1)
    response_mask, has_eos = response_mask_from_ids(response, tokenizer.eos_token_id, generated)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    input_ids = torch.cat([ids, response], dim=1)
    attention_mask = torch.cat([mask, response_mask], dim=1)
    completions = tokenizer.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(response, response_mask)], skip_special_tokens=True
    )
    return Rollout(
        prompts=list(prompts),
        completions=completions,
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_length=P,
        response_mask=response_mask,
        has_eos=has_eos,
    )


def has_compiled_blocks(model) -> bool:
    """True when `models.loading.compile_blocks` compiled this model's transformer blocks."""
    return any(getattr(m, "_rufus_compiled", False) for m in model.modules())


def pick_tokens(logits: torch.Tensor, gen, pad_token_id: int) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: the pad token suppressed, then greedy (temperature <= 0)
    or sampled after temperature, top-k (0 = off) and top-p (1.0 = off; the smallest set of most
    likely tokens whose mass reaches top_p, at least one) -- the order `generate` applies them in."""
    logits = logits.float().clone()
    logits[:, pad_token_id] = float("-inf")
    if gen.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / gen.temperature
    if gen.top_k and gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p is not None and gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop = mass_before >= gen.top_p  # the first token always stays (mass before it is 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def _last_logits(model, input_ids, attention_mask, position_ids, cache_position, cache):
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        cache_position=cache_position,
        use_cache=True,
    )
    return out.logits[:, -1]


@torch.no_grad()
def sample_static(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    gen,
    pad_token_id: int,
    eos_token_id: int | None,
    *,
    compiled: bool = True,
) -> torch.Tensor:
    """(B, A) sampled tokens (pad after a row's EOS) through a static KV cache and a compiled decode step.

    The path for models with compiled blocks (`compile=true`): the prompt is encoded eagerly into a
    `StaticCache` of fixed length P + A, then each new token is one call of a `torch.compile`d
    single-token forward whose shapes never change, so it compiles once per (batch, length) and
    runs without Python overhead per operation. The cache and the compiled step are kept on the
    model and reused. Same distribution as `generate` (pick_tokens); different random draws.
    `eos_token_id` None samples all A tokens. `compiled=False` runs the decode step eagerly (a
    model `generate` cannot drive, such as ILQL's policy, gets the same loop without compiling).
    """
    from transformers import StaticCache

    from rufus.rollout.logprobs import position_ids_from_mask

    B, P = ids.shape
    A = gen.max_new_tokens
    state = model.__dict__.setdefault("_rufus_decoder", {})
    key = (B, P + A, ids.device.type)
    cache = state.get(key)
    if cache is None:
        cache = state[key] = StaticCache(config=model.config, max_cache_len=P + A)
    else:
        cache.reset()
    if "step" not in state:
        state["step"] = torch.compile(_last_logits, dynamic=False) if compiled else _last_logits
    full_mask = torch.cat([mask, torch.ones((B, A), dtype=mask.dtype, device=mask.device)], dim=1)
    with torch.compiler.set_stance("force_eager"):
        logits = _last_logits(
            model, ids, full_mask, position_ids_from_mask(mask), torch.arange(P, device=ids.device), cache
        )
    next_position = mask.sum(-1, keepdim=True)  # (B, 1) each row's first response position
    out = torch.full((B, A), pad_token_id, dtype=torch.long, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(A):
        tokens = torch.where(done, pad_token_id, pick_tokens(logits, gen, pad_token_id))
        out[:, t] = tokens
        if eos_token_id is not None:
            done |= tokens == eos_token_id
            if bool(done.all()):
                break
        if t < A - 1:
            logits = state["step"](
                model, tokens[:, None], full_mask, next_position + t, torch.tensor([P + t], device=ids.device), cache
            )
    return out
