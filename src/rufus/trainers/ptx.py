"""PPO-ptx: the pretraining language-model loss mixed into the PPO update (InstructGPT, Ouyang et al.
2022, eq. 2: objective = RL objective + gamma * E_pretrain[log pi(x)]), which keeps the policy good at
the text it was trained on while RL moves it.

Each minibatch draws `ptx.batch_size` examples from `ptx.data` with a seed of (seed, step, epoch,
minibatch), so a resumed run draws the same; the minibatch's micro-batches share them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rufus.config import ConfigError, opt


@dataclass
class PtxSection:
    """PPO-ptx: mix in the language-model loss on pretraining / SFT text (InstructGPT eq. 2)."""

    coef: float = opt(0.0, "gamma: weight of the LM loss (0 = off)", ge=0)
    data: str | None = opt(None, "SFT-format file (prompt + completion or messages) for the LM loss")
    batch_size: int = opt(4, "LM examples per optimiser step", ge=1)


def load_ptx_data(cfg, tokenizer) -> list[dict] | None:
    """The tokenised ptx text (SFT examples, truncated to data.max_length), or None when ptx.coef is 0."""
    from rufus.data.loading import load_records
    from rufus.data.sft import tokenize_sft

    if cfg.ptx.coef <= 0:
        return None
    if not cfg.ptx.data:
        raise ConfigError("ptx.coef > 0 needs ptx.data (an SFT-format file)")
    from rufus.data.readers import options_from

    records = load_records(cfg.ptx.data, kind="sft", key="ptx.data", options=options_from(cfg.data, tokenizer))
    return tokenize_sft(records, tokenizer, max_length=cfg.data.max_length, truncation="truncate", key="ptx.data")


def ptx_loss(cfg, acc, policy, ptx: list[dict], step: int, micro) -> torch.Tensor:
    """This micro-batch's share of the minibatch's LM loss on ptx text: the loss of its examples / the
    number of micro-batches (`micro`: an `online.Micro`), so the shares add up to the minibatch's loss."""
    from rufus.data.sft import SFTCollator
    from rufus.losses.sft import sft_loss

    g = torch.Generator().manual_seed(cfg.seed * 104729 + step * 1009 + micro.epoch * 101 + micro.start)
    idx = torch.randint(len(ptx), (cfg.ptx.batch_size,), generator=g).tolist()[micro.index :: micro.count]
    if not idx:
        return torch.zeros((), device=acc.device)
    pad_id = acc.unwrap_model(policy).config.pad_token_id
    batch = {n: t.to(acc.device) for n, t in SFTCollator(pad_id)([ptx[i] for i in idx]).items()}
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss, _ = sft_loss(logits, batch["labels"])
    return loss / micro.count
