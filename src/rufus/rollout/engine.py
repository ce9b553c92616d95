"""The rollout step: the one function every online trainer samples through.

PPO, GRPO, RLOO, online DPO and best-of-n all call `sample_rollout`; nothing else in a trainer knows
how responses are generated. It asks a rollout engine (`rufus.rollout.engines`: Hugging Face
`generate` by default, vLLM as an option) for response tokens and builds the `Rollout` from them.
"""

from __future__ import annotations

import torch

from rufus.rollout.engines import Generated, RolloutEngine, Sampling
from rufus.rollout.record import Rollout


def sample_rollout(
    engine: RolloutEngine,
    tokenizer,
    rows: list[dict],
    n: int,
    generation,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> Rollout:
    """n sampled responses to each prompt row, as one Rollout of len(rows) * n sequences.

    rows        tokenised prompts, as `data.prompts.tokenize_prompts` makes them:
                {"prompt": str or chat messages, "ids": list[int] (the encoded prompt),
                 "extra": {column: value} (other dataset columns, passed on to reward functions)}
    n           samples per prompt; prompt i's samples are rows i*n .. i*n + n - 1
    generation  a `GenerationSection` section: max_new_tokens, temperature, top_k, top_p, stop_at_eos
    seed        the call's sampling seed (None: the process's global generator)

    Returns a Rollout with, for the B = len(rows) * n sequences:
      prompts, extra      each row's prompt and extra columns, repeated n times
      completions         (B,) the responses as text, special tokens removed
      input_ids           (B, T) token ids: prompt (left-padded) then response (right-padded to A =
                          max_new_tokens)
      attention_mask      (B, T), response_mask (B, A): the masks; a response ends at its first EOS
      has_eos             (B,) whether it ended with EOS within max_new_tokens
      logprobs            None: pi_old is recomputed by the trainer's teacher-forced pass, in the same
                          micro-batches as its first update, so that the first PPO ratio is exactly 1
                          (an engine's own sampling logprobs differ from the trainer's in the last bits)
    """
    repeated = [row for row in rows for _ in range(n)]
    generated = engine.generate([r["ids"] for r in repeated], Sampling.from_generation(generation, seed=seed))
    return rows_rollout(repeated, generated, tokenizer, generation.max_new_tokens).to(device)


def rows_rollout(repeated: list[dict], generated: Generated, tokenizer, width: int) -> Rollout:
    """The Rollout of prompt rows (each already repeated n times) and an engine's responses to them."""
    prompt_ids = [r["ids"] for r in repeated]
    ro = build_rollout([r["prompt"] for r in repeated], prompt_ids, generated, tokenizer, width)
    ro.extra = {k: [r["extra"][k] for r in repeated] for k in (repeated[0].get("extra", {}) if repeated else {})}
    return ro


def build_rollout(prompts: list, prompt_ids: list[list[int]], generated: Generated, tokenizer, width: int) -> Rollout:
    """The Rollout of N prompts and an engine's N responses: prompts left-padded to the longest (P),
    responses right-padded to `width` (A) with the pad token."""
    from rufus.rollout.generate import left_pad

    pad = tokenizer.pad_token_id
    N = len(prompt_ids)
    ids, mask = left_pad(prompt_ids, pad) if N else (torch.zeros((0, 0), dtype=torch.long),) * 2
    response = torch.full((N, width), pad, dtype=torch.long)
    response_mask = torch.zeros((N, width), dtype=torch.long)
    for i, tokens in enumerate(generated.response_ids):
        if len(tokens) > width:
            raise ValueError(f"the engine returned {len(tokens)} tokens for response {i}; at most {width} were asked")
        response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        response_mask[i, : len(tokens)] = 1
    has_eos = torch.tensor([r == "stop" for r in generated.finish_reasons], dtype=torch.bool)
    completions = tokenizer.batch_decode(generated.response_ids, skip_special_tokens=True)
    return Rollout(
        prompts=list(prompts),
        completions=completions,
        input_ids=torch.cat([ids, response], dim=1),
        attention_mask=torch.cat([mask, response_mask], dim=1),
        prompt_length=ids.shape[1],
        response_mask=response_mask,
        has_eos=has_eos,
    )
