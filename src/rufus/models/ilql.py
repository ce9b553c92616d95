"""ILQL's model: a causal LM with a value head, two Q heads over the vocabulary and their targets.

Snell et al. 2022 (arXiv 2206.11871), Sec. 4: the heads read the language model's last hidden
state at every position. Each head is a two-layer MLP (hidden -> hidden -> out, ReLU), the value
head's output one number, the Q heads' one number per vocabulary token. The target Q heads are
copies that never train; `ILQLHeads.sync_targets` moves them toward the online heads by Polyak
averaging (Qhat <- (1 - rate) Qhat + rate Q).

Saved next to the language model (which `AutoModelForCausalLM.from_pretrained` loads as it is):

    final/model.safetensors, config.json, tokenizer files   the language model pi_beta
    final/ilql_heads.safetensors                              v_head, q_heads.{0,1}, target_q_heads.{0,1}
    final/ilql.json                                           sizes, the training settings, the default beta

`load_ilql` gives the whole `ILQLModel` back; `load_ilql_policy` wraps it as the decoding policy
(logits log pi_beta + beta (min_i Qhat_i - V)), which `rufus generate` and `rufus eval` use for
any model directory holding `ilql.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

HEADS_FILE = "ilql_heads.safetensors"
META_FILE = "ilql.json"


def _mlp(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


class ILQLHeads(nn.Module):
    """V(s), Q_1(s, .), Q_2(s, .) and the target Qhat_1, Qhat_2 from hidden states (..., hidden)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_q: int = 2):
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.v_head = _mlp(hidden_size, 1)
        self.q_heads = nn.ModuleList(_mlp(hidden_size, vocab_size) for _ in range(num_q))
        self.target_q_heads = nn.ModuleList(_mlp(hidden_size, vocab_size) for _ in range(num_q))
        self.target_q_heads.load_state_dict(self.q_heads.state_dict())
        self.target_q_heads.requires_grad_(False)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """(...) V(s)."""
        return self.v_head(hidden).squeeze(-1)

    def q(self, hidden: torch.Tensor) -> torch.Tensor:
        """(H, ..., vocab) Q_i(s, .) of the online heads."""
        return torch.stack([head(hidden) for head in self.q_heads])

    def target_q(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., vocab) min_i Qhat_i(s, .): what decoding uses (no gradient)."""
        hidden = hidden.to(self.target_q_heads[0][0].weight.dtype)  # the targets stay float32
        with torch.no_grad():
            return torch.stack([head(hidden) for head in self.target_q_heads]).min(dim=0).values

    def target_q_taken(self, hidden: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(H, ...) Qhat_i(s, a) for the given tokens only: the output layer's rows of those tokens,
        so no (..., vocab) tensor is built for the targets."""
        out = []
        hidden = hidden.to(self.target_q_heads[0][0].weight.dtype)  # the targets stay float32
        with torch.no_grad():
            for head in self.target_q_heads:
                inner = head[1](head[0](hidden))  # (..., hidden)
                last = head[2]
                out.append((inner * last.weight[actions]).sum(-1) + last.bias[actions])
        return torch.stack(out)

    @torch.no_grad()
    def sync_targets(self, rate: float, sources: list[torch.Tensor] | None = None) -> None:
        """Qhat <- (1 - rate) Qhat + rate Q (rate 1: copy). `sources`: the online heads' values to
        follow, in `q_heads.parameters()` order (a trainer passes their float32 masters)."""
        online = list(self.q_heads.parameters()) if sources is None else sources
        for target, source in zip(self.target_q_heads.parameters(), online, strict=True):
            target.lerp_(source.to(target.dtype), rate)


class ILQLModel(nn.Module):
    """The trained whole: `policy` (a causal LM, peft-wrapped under LoRA) and its `heads`."""

    def __init__(self, policy, heads: ILQLHeads):
        super().__init__()
        self.policy, self.heads = policy, heads

    @property
    def config(self):
        return self.policy.config

    def hidden(self, input_ids, attention_mask, position_ids=None, **kwargs):
        """(the LM's output, last hidden states (B, T, hidden) after the final norm, in the heads' dtype)."""
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            **kwargs,
        )
        return out, out.hidden_states[-1].to(self.heads.v_head[0].weight.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int):
        """What the losses need at the response tokens of (B, P + A) sequences (prompts left-padded
        to P, as rollouts are):
        logits (B, A, V) of the LM; q (H, B, A, V) Q_i(s_t, .); target_q_taken (H, B, A)
        Qhat_i(s_t, a_t); values (B, A) V(s_t). Position P - 1 + t holds the state s_t in which
        response token t is chosen."""
        from rufus.rollout.logprobs import position_ids_from_mask

        P = prompt_length
        out, hidden = self.hidden(
            input_ids, attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False
        )
        states = hidden[:, P - 1 : -1]  # (B, A, hidden) s_t
        actions = input_ids[:, P:]  # (B, A) a_t
        return (
            out.logits[:, P - 1 : -1],
            self.heads.q(states),
            self.heads.target_q_taken(states, actions),
            self.heads.values(states),
        )


class ILQLPolicy(nn.Module):
    """ILQL's decoding policy as a causal LM whose logits are log pi_beta + beta (min_i Qhat_i - V).

    A forward takes what a causal LM's does (KV cache included) and returns an output whose
    `logits` are the perturbed ones, so the sampling loop, the log-probabilities of its samples and
    the KL to a reference all see the policy that is actually decoded. `generate_responses` samples
    from it with its own loop (`decodes_itself`), not `model.generate`."""

    decodes_itself = True

    def __init__(self, model: ILQLModel, beta: float):
        super().__init__()
        self.model, self.beta = model, float(beta)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        from rufus.losses.ilql import perturbed_logits

        heads = self.model.heads
        out, hidden = self.model.hidden(input_ids, attention_mask, position_ids=position_ids, **kwargs)
        target = heads.target_q(hidden)
        out.logits = perturbed_logits(out.logits, target, heads.values(hidden), self.beta)
        out.hidden_states = None
        return out


def is_ilql_dir(name: str | os.PathLike) -> bool:
    """Whether `name` is a local model directory saved by `rufus ilql` (it holds ilql.json)."""
    return (Path(os.path.expanduser(str(name))) / META_FILE).is_file()


def save_heads(heads: ILQLHeads, path: str | os.PathLike, meta: dict) -> None:
    """Write `heads` and `meta` (plus the head sizes) into the model directory `path`, each file
    written under a temporary name and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
    tmp = path / f".{HEADS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / HEADS_FILE)
    info = {"hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size, "num_q": len(heads.q_heads), **meta}
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path / META_FILE)


def load_heads(path: str | os.PathLike) -> tuple[ILQLHeads, dict]:
    """(heads, meta) from a directory saved by `save_heads`; safetensors only, no code runs."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(path)))
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    heads = ILQLHeads(meta["hidden_size"], meta["vocab_size"], meta.get("num_q", 2))
    heads.load_state_dict(load_file(str(path / HEADS_FILE)))
    return heads, meta


def load_ilql(name: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype = torch.float32, **kwargs) -> ILQLModel:
    """The language model and its heads (float32 heads; the LM in `dtype`) from a `rufus ilql` final/."""
    return _load(name, tokenizer=tokenizer, dtype=dtype, **kwargs)[0]


def _load(name, **kwargs) -> tuple[ILQLModel, dict]:
    from rufus.models.loading import load_causal_lm

    policy = load_causal_lm(str(name), **kwargs)
    heads, meta = load_heads(name)
    return ILQLModel(policy, heads), meta


def load_ilql_policy(name: str | os.PathLike, *, beta: float | None = None, **kwargs) -> ILQLPolicy:
    """The decoding policy of a `rufus ilql` model; `beta` None = the beta saved with it."""
    model, meta = _load(name, **kwargs)
    return ILQLPolicy(model, meta.get("beta", 1.0) if beta is None else beta)


def load_decoding_model(
    name: str, *, tokenizer=None, dtype: torch.dtype = torch.float32, beta: float | None = None, **kwargs
):
    """What to sample from for `name`: ILQL's perturbed policy for a `rufus ilql` model (at `beta`,
    None = the saved one), else the causal LM itself (then `beta` must be None)."""
    from rufus.config import ConfigError
    from rufus.models.loading import load_causal_lm

    if is_ilql_dir(name):
        return load_ilql_policy(name, beta=beta, tokenizer=tokenizer, dtype=dtype, **kwargs)
    if beta is not None:
        raise ConfigError(f"ilql_beta: {name} is not a model saved by rufus ilql (no {META_FILE})")
    return load_causal_lm(name, tokenizer=tokenizer, dtype=dtype, **kwargs)
