"""bfloat16 compute with float32 master weights: mixed precision without autocast.

Autocast keeps float32 parameters and casts each weight to bfloat16 at every matrix product, in
the forward and again in the backward pass; on a CPU with AMX that casting costs about what the
bfloat16 product saves at small widths. Here the model's parameters *are* bfloat16, so every
product runs in bfloat16 with nothing to cast, and the optimiser updates float32 copies of them
(Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.1: the master copy keeps updates that
are smaller than half a bfloat16 ulp of the weight, which a bfloat16 weight would round away):

    mw = MasterWeights(model)                 # trainable parameters -> bfloat16; float32 masters
    optimizer = torch.optim.AdamW(mw.parameters(), lr=...)
    loss.backward()                           # bfloat16 gradients on the model
    mw.grads_to_master()                      # master.grad = float32(param.grad); param.grad = None
    torch.nn.utils.clip_grad_norm_(mw.parameters(), 1.0)
    optimizer.step()
    mw.master_to_model()                      # param = bfloat16(master)
    optimizer.zero_grad()

Frozen parameters are cast to bfloat16 and get no master. Checkpoints must save `state_dict()`
(the masters), since the bfloat16 model alone has lost their low bits. Integer tensors are never
touched: the quantized weights of a bitsandbytes base (`Params4bit`, `Int8Params`; rufus.models.quantization)
keep their storage, and only the float parameters around them (adapters, heads, norms) are managed.
"""

from __future__ import annotations

import torch


class MasterWeights:
    """float32 master copies of a model's trainable parameters, which become `dtype` (module docstring)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (model param, master)
        for param in _unique_parameters(model):
            if not param.is_floating_point():
                continue
            if param.requires_grad:
                master = torch.nn.Parameter(param.detach().to(torch.float32).clone())
                self.pairs.append((param, master))
            param.data = param.data.to(dtype)
        _cast_floating(model, dtype)  # buffers too (e.g. rotary inverse frequencies are recomputed in float32 by HF)
        model._rufus_master_weights = self  # for restore_float32 before the final save

    def parameters(self) -> list[torch.nn.Parameter]:
        """The float32 masters: what the optimiser updates and gradient clipping measures."""
        return [master for _, master in self.pairs]

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Move the model's gradients onto the masters as float32 (a missing gradient stays missing)."""
        dst, src = [], []
        for param, master in self.pairs:
            if param.grad is None:
                master.grad = None
                continue
            if master.grad is None:
                # allocated here and dropped by the optimiser's zero_grad, so the float32 gradients
                # exist only between backward and step, not on top of the activations in backward
                master.grad = torch.empty_like(master)
            dst.append(master.grad)
            src.append(param.grad)
            param.grad = None
        if dst:
            torch._foreach_copy_(dst, src)  # one batched, converting copy

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the updated masters into the model's parameters."""
        if self.pairs:
            torch._foreach_copy_([p for p, _ in self.pairs], [m for _, m in self.pairs])

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"masters": [master.detach().clone() for _, master in self.pairs]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        masters = state["masters"]
        if len(masters) != len(self.pairs):
            raise ValueError(f"master weights: checkpoint has {len(masters)} tensors, the model {len(self.pairs)}")
        for (_, master), saved in zip(self.pairs, masters):
            if saved.shape != master.shape:
                raise ValueError(
                    f"master weights: shape {tuple(saved.shape)} in the checkpoint, {tuple(master.shape)} in the model"
                )
            master.copy_(saved)
        self.master_to_model()


@torch.no_grad()
def _cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` for float parameters and buffers only, without calling the model's `.to`:
    transformers refuses `.to(dtype)` on a bitsandbytes-quantized model, whose integer weights must
    keep their storage (an integer tensor is left as it is)."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters once each (tied embeddings share one tensor)."""
    seen, out = set(), []
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            out.append(param)
    return out


class MasterAdamW(torch.optim.AdamW):
    """AdamW over the float32 masters of a `MasterWeights`, whose state_dict carries the masters
    too, so a checkpoint restores the weights' low bits (the model's own state is bfloat16)."""

    def __init__(self, params, master_weights: MasterWeights, **kwargs):
        super().__init__(params, **kwargs)
        self.master_weights = master_weights

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = self.master_weights.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        masters = state.pop("master_weights", None)
        super().load_state_dict(state)
        if masters is not None:
            self.master_weights.load_state_dict(masters)


def master_weights_of(optimizer) -> MasterWeights | None:
    """The `MasterWeights` behind an optimiser (also through accelerate's wrapper), or None."""
    return getattr(getattr(optimizer, "optimizer", optimizer), "master_weights", None)


@torch.no_grad()
def restore_float32(model: torch.nn.Module) -> None:
    """Put a bfloat16-trained model back in float32 with its masters' exact values (before saving)."""
    mw = getattr(model, "_rufus_master_weights", None)
    if mw is None:
        return
    _cast_floating(model, torch.float32)
    for param, master in mw.pairs:
        param.data = master.detach().clone()
