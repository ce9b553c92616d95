"""DeepSpeed ZeRO: optimiser state (stage 1), gradients (2) and parameters (3) partitioned over the
processes (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", Sec. 5: P_os, P_os+g, P_os+g+p).

The engine is built from the model and the optimiser Rufus made (`rufus.trainers.common.make_optimizer`,
with its parameter groups and learning-rate schedule); Rufus keeps the loop:

- the global batch, the micro-batches and the loss normalisation stay Rufus's, so DeepSpeed runs with
  one micro-batch per step of its own (``gradient_accumulation_steps: 1``) and Rufus marks the last
  micro-batch of a step as the accumulation boundary (`no_sync` clears it for the others), as
  accelerate does;
- `backward` goes through the engine (it reduces or reduce-scatters the gradients into their
  partitions), `step` through the engine too (clipping at ``max_grad_norm``, the optimiser on each
  process's partition, zeroing);
- bfloat16 runs: the engine holds bfloat16 weights and float32 master partitions (``bf16.enabled``),
  the arithmetic of `rufus.precision`, which a ZeRO model does not use;
- ``offload``: optimiser state (and, for stage 3, parameters) in CPU memory; the torch optimiser Rufus
  built is kept (``zero_force_ds_cpu_optimizer: false``);
- no DeepSpeed C++ extension is compiled: DeepSpeed's communication backend builds a shared-memory
  all-reduce op when it starts (g++, half a minute, once per machine), which serves only its
  inference tensor parallelism (`deepspeed.comm.inference_all_reduce`, under its own launcher);
  Rufus's training reduces through torch.distributed, so the build is skipped (`_skip_shm_op`).

Checked here on CPU with gloo (deepspeed 0.19.8, torch 2.13): stages 2 and 3 on two processes give the
single-process SGD update to 6e-8.
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import torch

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}

# the unwrapped module -> its engine (trainers and checkpoints hold the module)
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_of(model):
    """The DeepSpeed engine of `model` (an engine, or the module inside one), or None."""
    from deepspeed import DeepSpeedEngine

    if isinstance(model, DeepSpeedEngine):
        return model
    return _ENGINES.get(model)


def is_zero3(model) -> bool:
    engine = engine_of(model)
    return engine is not None and engine.zero_optimization_stage() == 3


def initialize(model, optimizer, *, stage: int, compute_dtype: torch.dtype, max_grad_norm: float, offload: bool):
    """(engine, engine's optimiser) for `model` trained by `optimizer` under ZeRO `stage`."""
    import deepspeed
    import torch.distributed as dist

    world = dist.get_world_size()
    zero: dict = {"stage": stage}
    hidden = _hidden_size(model)
    if hidden:  # buckets sized to the model (as transformers' "auto" values), not DeepSpeed's 5e8 elements
        zero["reduce_bucket_size"] = hidden * hidden
        zero["allgather_bucket_size"] = hidden * hidden
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
            zero["stage3_param_persistence_threshold"] = 10 * hidden
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": world,  # Rufus plans the batches; one micro-batch per engine step
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dist.get_rank() == 0:
        _SKELETONS[model] = copy.deepcopy(model).to("meta")
    _skip_shm_op()
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _ENGINES[engine.module] = engine  # engine.module is `model`, its parameters partitioned in place
    return engine, ds_optimizer


def _skip_shm_op() -> None:
    """Start DeepSpeed's torch.distributed backend without its shared-memory all-reduce op (see the
    module's docstring); a DeepSpeed without that hook is left as it is."""
    import importlib

    # (not `from deepspeed.comm import torch`: the package re-exports the torch module under that name)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_torch, "build_shm_op", None)):
        ds_torch.build_shm_op = lambda: None


def _hidden_size(model) -> int | None:
    for m in model.modules():
        size = getattr(getattr(m, "config", None), "hidden_size", None)
        if size:
            return int(size)
    return None


@contextlib.contextmanager
def no_sync(engine):
    """Not the step's last micro-batch: gradients accumulate on each process, no reduction yet."""
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


def step(engine) -> float:
    """Clip, step the optimiser on each partition, zero the gradients; return the pre-clip norm."""
    engine.set_gradient_accumulation_boundary(True)
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def unsharded_copy(model):
    """On the main process: a plain CPU copy of `model` with its full weights; None on the others (a
    collective under stage 3)."""
    import torch.distributed as dist

    engine = engine_of(model)
    module = engine.module if engine is not None else model
    state = None
    if is_zero3(module):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(module.parameters())):
            if dist.get_rank() == 0:
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    elif dist.get_rank() == 0:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if engine is not None and engine.bfloat16_enabled():
        # the module holds bfloat16 copies; the trained values are the optimiser's float32 masters
        # (assembled from every process's partition: a collective, in the same order everywhere)
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in module.named_parameters():
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is not None and state is not None:
                state[name] = master.detach().cpu().clone()
    if dist.get_rank() != 0:
        return None
    from rufus.distributed import filled_skeleton

    return filled_skeleton(_SKELETONS[module], state, module, "deepspeed")


def save_checkpoint(directory, model) -> None:
    """Each process writes its partitions of the weights and optimiser state (a collective)."""
    engine_of(model).save_checkpoint(str(directory), tag="state", client_state={}, save_latest=False)


def load_checkpoint(directory, model) -> None:
    engine_of(model).load_checkpoint(str(directory), tag="state", load_lr_scheduler_states=False)
