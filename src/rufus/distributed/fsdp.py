"""FSDP2: parameters, gradients and optimiser state sharded over the processes (`fully_shard`).

Each transformer block (the classes a Hugging Face model lists in ``_no_split_modules``, e.g.
``LlamaDecoderLayer``) becomes one FSDP unit, and the root takes the rest (embeddings, final norm,
head). A forward all-gathers one block's parameters at a time and frees them after; the backward
reduce-scatters the gradients, averaged over the processes like DDP's all-reduce, so each process
updates only its shard with the optimiser state of that shard (Zhao et al. 2023, "PyTorch FSDP";
FSDP2 shards each parameter along dim 0 as a DTensor). Names of parameters do not change.

bfloat16 runs keep float32 shards and compute in bfloat16 (``MixedPrecisionPolicy(param_dtype=
bfloat16, reduce_dtype=float32)``): the arithmetic of Rufus's own float32 master weights
(`rufus.precision`), which a sharded model does not use.

Checked here on CPU with gloo (torch 2.13): two processes give the single-process SGD update to
3e-8, so the gradients are averaged, not summed (PyTorch issue 162338 reported sums with gloo in an
earlier release; `tests/trainers/test_strategies.py` would catch a return of it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref

import torch

log = logging.getLogger(__name__)

# model -> an unsharded copy on the meta device (main process only), to rebuild and save the full
# model from the gathered state dict
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def block_classes(model) -> set[str]:
    """Class names of the transformer blocks to shard one by one (HF's ``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(
    model: torch.nn.Module, *, compute_dtype: torch.dtype, trained: bool = True, offload: bool = False
) -> torch.nn.Module:
    """Shard `model` in place over all processes; return it. A trained model keeps float32 shards
    (bfloat16 compute by the policy); a frozen one keeps its dtype. The main process keeps an
    unsharded skeleton of a trained model on the meta device (no memory) to save it later
    (`unsharded_copy`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh}
    if trained and compute_dtype == torch.bfloat16:
        model.to(torch.float32)  # float32 shards; bfloat16 compute by the policy
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload and device.type != "cpu":  # on a CPU-only machine the shards are in CPU memory already
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if trained and dist.get_rank() == 0:
        _SKELETONS[model] = copy.deepcopy(model).to("meta")
    blocks = block_classes(model)
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        log.warning(
            "fsdp: %s lists no transformer blocks (_no_split_modules); sharding it as one unit", type(model).__name__
        )
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def no_sync(model):
    """Accumulate gradients locally: no reduce-scatter until the context ends."""
    roots = _roots(model)
    for m in roots:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in roots:
            m.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(model):
    """All-gather every unit's parameters once, keep them through any number of forwards, free them
    after (`distributed.gathered`)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        roots = set(map(id, _roots(model)))
        for m in units:  # fully_shard's default: the root keeps its parameters between forward and backward
            m.set_reshard_after_forward(id(m) not in roots, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """Every weight, gathered to the main process on CPU (a collective); None on the others."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def unsharded_copy(model) -> torch.nn.Module | None:
    """On the main process: a plain (unsharded) copy of `model` holding its current full weights, on
    CPU, ready for `save_pretrained`; None on the others. A collective: every process calls it."""
    state = full_state_dict(model)
    if state is None:
        return None
    from rufus.distributed import filled_skeleton

    return filled_skeleton(_SKELETONS[model], state, model, "fsdp")


def _roots(model) -> list:
    """The outermost FSDP modules of `model` (setting one recurses into the units inside it)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return [model]
    out, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule) and not any(name.startswith(p + ".") for p in inside):
            out.append(m)
            inside.add(name)
    return out
