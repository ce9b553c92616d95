"""How a model is placed across processes: one small module per engine behind one interface.

``strategy`` (every trainer's key) picks the engine:

``ddp`` (the default)
    every process holds a full copy of every model; accelerate wraps the trained one in
    DistributedDataParallel, which all-reduces (averages) the gradients.
``fsdp``
    PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023): each transformer block
    and the model's remaining parameters are sharded over the processes; parameters, gradients and
    optimiser state live in shards (`rufus.distributed.fsdp`).
``zero1``, ``zero2``, ``zero3``
    DeepSpeed ZeRO stage 1, 2 or 3: optimiser state, then gradients, then parameters partitioned over
    the processes (`rufus.distributed.deepspeed`; the ``deepspeed`` extra).

Frozen models (a reference, the reward models) are sharded under fsdp when ``shard_frozen`` (not
best-of-n's reward models: its processes score different numbers of samples), and replicated under
ZeRO.

Trainers ask this module to shard a model before its optimiser is built (`shard`), to prepare
model and optimiser (`prepare`), to skip the gradient synchronisation of early micro-batches
(`no_sync`), and for the full weights to save (`unsharded`); they never branch on the engine.
Whatever the engine, an update equals the single-process update on the same global batch: the
gradients are averaged over processes as DDP averages them, and the losses are normalised by the
global batch (`tests/trainers/test_strategies.py` checks the weights).
"""

from __future__ import annotations

import contextlib

import torch

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")

# a model shard() left for prepare() to hand to DeepSpeed with the optimiser -> the engine's settings
_ZERO: dict[int, dict] = {}


def is_sharded(model) -> bool:
    """Whether `model`'s parameters are split over the processes (fsdp, ZeRO-3), so that each of its
    forwards is a collective."""
    from rufus.distributed import fsdp

    return fsdp.is_fsdp(model) or _zero_engine(model) is not None and _deepspeed().is_zero3(model)


def _deepspeed():
    from rufus.distributed import deepspeed

    return deepspeed


def _zero_engine(model):
    """The DeepSpeed engine of `model`, or None (also when deepspeed is not installed)."""
    import sys

    if model is None or "deepspeed" not in sys.modules:
        return None
    return _deepspeed().engine_of(model)


def shard(cfg, acc, model: torch.nn.Module, *, trained: bool = True) -> torch.nn.Module:
    """Place `model` per ``cfg.strategy`` before its optimiser is built; returns the model to use.

    `trained` False is a frozen model (a reference or reward model): under fsdp it is sharded too
    when ``cfg.shard_frozen`` (less memory per process, one all-gather per block at each forward),
    and replicated otherwise. Under ddp nothing happens here (accelerate wraps the model in
    `prepare`). With one process nothing is sharded either: there is nothing to shard over.
    """
    strategy = getattr(cfg, "strategy", "ddp")
    if strategy == "ddp" or acc.num_processes == 1:
        return model
    if strategy in ("zero1", "zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            from rufus.config import ConfigError

            raise ConfigError(f"strategy={strategy} needs DeepSpeed: pip install -e .[deepspeed]")
        if trained:  # partitioned by DeepSpeed with its optimiser, in prepare()
            _ZERO[id(model)] = dict(
                stage=int(strategy[-1]),
                compute_dtype=_compute_dtype(cfg),
                max_grad_norm=cfg.max_grad_norm,
                offload=cfg.offload,
            )
        return model
    if strategy == "fsdp":
        if not trained and not cfg.shard_frozen:
            return model
        from rufus.distributed import fsdp

        return fsdp.shard(model, compute_dtype=_compute_dtype(cfg), trained=trained, offload=cfg.offload and trained)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def is_strategy(cfg, acc, name: str) -> bool:
    """Whether this run shards with `name` (several processes, and ``strategy`` set to it)."""
    return getattr(cfg, "strategy", "ddp") == name and acc.num_processes > 1


def uses_master_weights(cfg, acc) -> bool:
    """Whether bfloat16 runs keep Rufus's own float32 master weights (`rufus.precision`). A sharded
    model keeps float32 shards and computes in bfloat16 by the engine's mixed-precision policy
    instead, which is the same arithmetic: bfloat16 products, float32 updates."""
    return getattr(cfg, "strategy", "ddp") == "ddp" or acc.num_processes == 1


def prepare(acc, model, optimizer):
    """(model, optimizer) ready for the loop: accelerate's preparation for a ddp model (DDP wrapping
    when several processes run), the optimiser alone for a sharded one (FSDP2 already communicates)."""
    settings = _ZERO.pop(id(model), None)
    if settings is not None:
        return _deepspeed().initialize(model, optimizer, **settings)
    from rufus.distributed import fsdp

    if fsdp.is_fsdp(model):
        return model, acc.prepare(optimizer)
    return acc.prepare(model, optimizer)


def backward(acc, model, loss: torch.Tensor) -> None:
    """loss.backward() the way `model`'s engine needs it (DeepSpeed's engine reduces into partitions)."""
    engine = _zero_engine(model)
    if engine is not None:
        engine.backward(loss)
    else:
        acc.backward(loss)


def step(model) -> float | None:
    """A ZeRO model's optimiser step (clipping, update, zeroing) through its engine; returns the
    pre-clip gradient norm. None for the others: the caller steps its optimiser."""
    engine = _zero_engine(model)
    return None if engine is None else _deepspeed().step(engine)


@contextlib.contextmanager
def no_sync(acc, model):
    """Skip the gradient synchronisation of this backward pass (all but a step's last micro-batch)."""
    from rufus.distributed import fsdp

    if fsdp.is_fsdp(model):
        with fsdp.no_sync(model):
            yield
        return
    engine = _zero_engine(model)
    if engine is not None:
        with _deepspeed().no_sync(engine):
            yield
        return
    with acc.no_sync(model):
        yield


@contextlib.contextmanager
def gathered(model):
    """Hold a sharded model's full weights on every process for the duration (decoding): each process
    then runs its own forwards, as many as its responses need, with no collective per token (the
    "gather for generation" of DeepSpeed-Chat's hybrid engine and OpenRLHF). Under fsdp; a no-op
    otherwise (a ZeRO-3 model decodes in lockstep instead: `decodes_in_lockstep`)."""
    from rufus.distributed import fsdp

    if not fsdp.is_fsdp(model):
        yield
        return
    with fsdp.gathered(model):
        yield


def decodes_in_lockstep(model) -> bool:
    """Whether decoding from `model` must run in lockstep across processes: ZeRO-3 gathers each
    block's parameters inside the forward (its hooks would fight a gather around the whole model), so
    every process runs the forwards until all have finished (`generate(synced_gpus=True)`)."""
    return _zero_engine(model) is not None and _deepspeed().is_zero3(model)


def unsharded(model):
    """A plain copy of `model` with its full weights on the main process (None on the others; a
    collective for a sharded model), or `model` itself when it is not sharded: what to save."""
    if _zero_engine(model) is not None:
        return _deepspeed().unsharded_copy(model)
    if not is_sharded(model):
        return model
    from rufus.distributed import fsdp

    return fsdp.unsharded_copy(model)


def checkpoint_engine(model) -> str | None:
    """How `model`'s training state is checkpointed: "fsdp" (torch.distributed.checkpoint shards),
    "zero" (DeepSpeed's own partitioned checkpoint), or None (Rufus's single-file checkpoint)."""
    from rufus.distributed import fsdp

    if fsdp.is_fsdp(model):
        return "fsdp"
    return "zero" if _zero_engine(model) is not None else None


def lockstep(acc, model, chunks: list, filler):
    """`chunks` (this process's batches for `model`), padded with `filler` to the longest count over
    the processes when `model` is sharded, as (chunk, real) pairs. A sharded model's forward is a
    collective (each block all-gathers its shards), so every process must run as many as the others;
    the padding forwards are run and their results dropped (`real` False)."""
    count = len(chunks)
    if is_sharded(model):
        import torch.distributed as dist

        n = torch.tensor([count], device=acc.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        count = int(n.item())
    return [(c, True) for c in chunks] + [(filler, False)] * (count - len(chunks))


def filled_skeleton(skeleton: torch.nn.Module, state: dict[str, torch.Tensor], model, engine: str):
    """A CPU copy of `skeleton` (an unsharded copy of `model` on the meta device, taken before it was
    sharded) holding `state`, the gathered weights: what the engines hand to `save_pretrained`."""
    import copy

    from transformers import PreTrainedModel

    whole = copy.deepcopy(skeleton).to_empty(device="cpu")
    state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}
    missing, unexpected = whole.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(
            f"{engine}: gathered weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    for name, m in whole.named_modules():
        if isinstance(m, PreTrainedModel):
            m.config = model.get_submodule(name).config  # what the run wrote there (a reward model's gain)
            m.tie_weights()  # materialising on CPU untied the tied weights (e.g. head = embeddings)
    return whole


def grad_norm_value(norm) -> float:
    """A clipped gradient norm as a float (a sharded model's norm is a DTensor over the processes)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _compute_dtype(cfg) -> torch.dtype:
    from accelerate import PartialState

    from rufus.models.loading import resolve_dtype

    return resolve_dtype(cfg.dtype, PartialState().device)
