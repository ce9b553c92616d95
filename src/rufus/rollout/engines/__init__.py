"""Rollout engines: what samples the responses, behind one small interface.

Every online trainer samples through `rufus.rollout.engine.sample_rollout`, which asks an engine for
response tokens and builds the `Rollout` from them. An engine:

    generate(prompt_ids, sampling) -> Generated
        prompt_ids  list of N prompts as token ids
        sampling    a `Sampling`: max_tokens, temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
                    stop_at_eos, seed (one seed for the call: the same seed, prompts and weights give
                    the same responses), logprobs (also return the engine's own per-token logprobs)
        returns     each response's token ids up to and including its first EOS, its finish reason
                    ("stop": ended with EOS; "length": max_tokens reached), and, when asked, the
                    engine's log-probability of each sampled token
    update_weights(named_tensors)
        load new policy weights (full, unsharded tensors by parameter name) after an optimiser step;
        a no-op for an engine that decodes from the trained model itself
    sleep() / wake()
        free the engine's memory (weights, KV cache) while the trainer updates, and take it back
    close()
        shut the engine down at the end of a run

Engines (`rollout.engine`):

``hf`` (the default, `rufus.rollout.engines.hf`)
    Hugging Face `generate`, or the compiled static-cache decoder when the model's blocks are compiled,
    on the trained model itself: nothing to copy, nothing to sync.
``vllm`` (`rufus.rollout.engines.vllm`, the ``vllm`` extra)
    a vLLM engine in the trainer's process holding its own copy of the policy; the trainer pushes the
    weights after every optimiser step.

The trainer always recomputes log pi_old with its own teacher-forced pass (`rufus.rollout.logprobs`),
whatever the engine: an engine's sampling logprobs differ from the trainer's in the last bits (other
kernels, other batching), and the first PPO ratio must be exactly 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one `generate` call, mapped one to one onto each engine's own."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_at_eos: bool = True  # False: always max_tokens tokens (the response still ends at its first EOS)
    seed: int | None = None  # None: the process's global generator
    logprobs: bool = False  # also return the engine's per-token logprobs

    @classmethod
    def from_generation(cls, gen, *, seed: int | None = None, logprobs: bool = False) -> Sampling:
        """From a `rufus.config.GenerationSection`."""
        return cls(gen.max_new_tokens, gen.temperature, gen.top_k, gen.top_p, gen.stop_at_eos, seed, logprobs)

    def as_generation(self):
        from rufus.config import GenerationSection

        return GenerationSection(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_at_eos=self.stop_at_eos,
        )


@dataclass
class Generated:
    """What an engine returns for N prompts."""

    response_ids: list[list[int]]  # (N,) sampled tokens, up to and including the first EOS
    finish_reasons: list[str]  # (N,) "stop" (ended with EOS) or "length" (max_tokens reached)
    logprobs: list[list[float]] | None = None  # (N,) the engine's log-probability of each token, if asked


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generated: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def make_engine(name: str, model, tokenizer, *, device: torch.device | str = "cpu", **options) -> RolloutEngine:
    """The engine called `name` for the policy `model` (the trained model; an engine with its own copy
    of the weights starts from it). `options`: the engine's own settings (`rollout.*`)."""
    if name == "hf":
        from rufus.rollout.engines.hf import HFEngine

        return HFEngine(model, tokenizer, device=device)
    if name == "vllm":
        from rufus.rollout.engines.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, device=device, **options)
    raise ValueError(f"rollout.engine: unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


def policy_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The policy's full weights as (name, tensor) under the base model's parameter names, as an engine
    that loads a Hugging Face checkpoint expects them: each LoRA layer's weight with its active
    adapters' update added (W + scale * B A, computed aside: the trained model is not touched, so its
    frozen base weights never drift by a merge and unmerge), a value head or other trainer-side
    wrapper left out."""
    model = getattr(model, "policy", model)  # a shared actor-critic: its policy
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    merged: dict[str, torch.Tensor] = {}
    for prefix, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
            weight = module.base_layer.weight.detach()
            for adapter in getattr(module, "active_adapters", []):
                if adapter in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{prefix}.weight"] = weight
    out = {}
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if "lora_" in name or ".original_module." in name:
                continue
            name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            out[name] = merged.get(name, tensor).detach().clone()
    return list(out.items())


def finish_reason(ids: list[int], eos_token_id: int | None) -> str:
    return "stop" if eos_token_id is not None and ids and ids[-1] == eos_token_id else "length"


def cut_at_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """The tokens up to and including the first EOS (all of them when there is none)."""
    if eos_token_id is not None and eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    return list(ids)
