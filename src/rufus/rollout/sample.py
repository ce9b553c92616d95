"""Sampling k responses per prompt from a saved model: the comparisons the pipeline collects and the
responses a studio round shows people."""

from __future__ import annotations

from typing import Any


def sample_responses(
    model_path: str,
    prompts: list[Any],
    k: int,
    generation,
    *,
    batch_size: int = 64,
    seed: int = 0,
    dtype: str = "auto",
    progress: bool = True,
    desc: str = "sample",
    trust_remote_code: bool = False,
) -> list[list[str]]:
    """`k` sampled responses (text) to each prompt (a string or a message list): one list per prompt.

    `generation` is a `rufus.config.GenerationSection` (max_new_tokens, temperature, top_k, top_p,
    stop_at_eos); `batch_size` bounds the sequences per generate call.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from rufus.data.sft import encode_prompt
    from rufus.models.ilql import load_decoding_model
    from rufus.models.loading import load_tokenizer, resolve_dtype
    from rufus.rollout.generate import generate_responses

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    # a rufus ilql policy answers with its heads (beta-perturbed logits at its saved beta)
    model = (
        load_decoding_model(
            model_path, tokenizer=tokenizer, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
        )
        .to(device)
        .eval()
    )
    set_seed(seed)
    out: list[list[str]] = []
    per_call = max(1, batch_size // k) if k <= batch_size else 1
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(prompts), per_call):
        group = prompts[start : start + per_call]
        rep = [p for p in group for _ in range(k)]  # prompt g's samples at g*k .. g*k+k-1
        ro = generate_responses(
            model, tokenizer, rep, [encode_prompt(tokenizer, p) for p in rep], generation, device=device
        )
        out += [ro.completions[g * k : (g + 1) * k] for g in range(len(group))]
        bar.update(len(group))
    bar.close()
    return out
