"""The rollout step: the one function every online trainer samples through.

PPO, GRPO, RLOO, online DPO and best-of-n all call `sample_rollout`; nothing else in a trainer knows
how responses are generated. Today the engine is Hugging Face `generate` (or the compiled
static-cache decoder, `rollout.generate`); a second engine (vLLM) plugs in here, behind the same
signature, without touching the trainers.
"""

from __future__ import annotations

import torch

from rufus.rollout.record import Rollout


def sample_rollout(
    policy, tokenizer, rows: list[dict], n: int, generation, *, device: torch.device | str = "cpu"
) -> Rollout:
    """n sampled responses to each prompt row, as one Rollout of len(rows) * n sequences.

    rows        tokenised prompts, as `data.prompts.tokenize_prompts` makes them:
                {"prompt": str or chat messages, "ids": list[int] (the encoded prompt),
                 "extra": {column: value} (other dataset columns, passed on to reward functions)}
    n           samples per prompt; prompt i's samples are rows i*n .. i*n + n - 1
    generation  a `GenerationSection` section: max_new_tokens, temperature, top_k, top_p, stop_at_eos

    Returns a Rollout with, for the B = len(rows) * n sequences:
      prompts, extra      each row's prompt and extra columns, repeated n times
      completions         (B,) the responses as text, special tokens removed
      input_ids           (B, T) token ids: prompt (left-padded) then response (right-padded)
      attention_mask      (B, T), response_mask (B, A): the masks; a response ends at its first EOS
      has_eos             (B,) whether it ended with EOS within max_new_tokens
      logprobs            None: pi_old is recomputed by the trainer's teacher-forced pass, in the same
                          micro-batches as its first update, so that the first PPO ratio is exactly 1
                          (an engine's own sampling logprobs differ from the trainer's in the last bits)
    Sampling draws from torch's global generator (seed it for a reproducible rollout).
    """
    from rufus.distributed import gathered
    from rufus.rollout.generate import generate_responses

    repeated = [row for row in rows for _ in range(n)]
    with gathered(policy):  # a sharded policy decodes from its full weights, no collective per token
        ro = generate_responses(
            policy, tokenizer, [r["prompt"] for r in repeated], [r["ids"] for r in repeated], generation, device=device
        )
    ro.extra = {k: [r["extra"][k] for r in repeated] for k in (repeated[0].get("extra", {}) if repeated else {})}
    return ro
