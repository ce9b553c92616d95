"""The Hugging Face engine: `generate` (or the compiled static-cache decoder) on the trained model itself.

On the trained model it holds no copy of the weights: the trainer's optimiser steps change what it
samples from, so nothing is sent to it, and `sleep` and `wake` have nothing to do. As a rollout
engine of its own (a Ray actor, `ray.engines`) it holds a copy that `update_weights` overwrites.
A sharded policy (fsdp, ZeRO-3) decodes from its gathered full weights (`rufus.distributed.gathered`),
with no collective per token.

A call's `Sampling.seed` seeds a generator forked from the process's global one for that call only, so
the responses depend on (seed, prompts, weights) and not on what else the process drew before: the
same on one process or on a Ray worker, and after a resume.
"""

from __future__ import annotations

import contextlib

import torch

from rufus.rollout.engines import Generated, Sampling


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, *, device: torch.device | str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generated:
        from rufus.distributed import gathered
        from rufus.rollout.generate import generate_responses

        if not prompt_ids:
            return Generated([], [], [] if sampling.logprobs else None)
        with seeded(sampling.seed, self.device), gathered(self.model):
            ro = generate_responses(
                self.model,
                self.tokenizer,
                [None] * len(prompt_ids),
                prompt_ids,
                sampling.as_generation(),
                device=self.device,
            )
            logprobs = None
            if sampling.logprobs:
                from rufus.rollout.logprobs import batched_logprobs

                # temperature 0 (greedy) reports the model's own distribution, as for the trainer
                lp = batched_logprobs(
                    self.model, ro.input_ids, ro.attention_mask, ro.prompt_length, sampling.temperature, 16
                )
                logprobs = [row[m.bool()].tolist() for row, m in zip(lp.cpu(), ro.response_mask.cpu())]
        masks = ro.response_mask.cpu().bool()
        responses = [ids[m].tolist() for ids, m in zip(ro.response_ids.cpu(), masks)]
        reasons = ["stop" if eos else "length" for eos in ro.has_eos.tolist()]
        return Generated(responses, reasons, logprobs)

    def update_weights(self, named_tensors) -> None:
        """Load full weights by name into the engine's model: for an engine with its own copy (a Ray
        actor of its own, `ray.engines`). An engine on the trained model is never sent any."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"hf engine: the model has no weight {name!r}")
                state[name].copy_(tensor.to(state[name].device, state[name].dtype))

    def sleep(self) -> None:
        """Nothing to free: the weights are the trainer's."""

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Draw from a generator seeded with `seed` inside the block, leaving the global one as it was."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield
