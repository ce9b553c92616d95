"""How a model is placed across processes: one small module per engine behind one interface.

``strategy`` (every trainer's key) picks the engine:

``ddp`` (the default)
    every process holds a full copy of every model; accelerate wraps the trained one in
    DistributedDataParallel, which all-reduces (averages) the gradients.
``fsdp``
    PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023): each transformer block
    and the model's remaining parameters are sharded over the processes; parameters, gradients and
    optimiser state live in shards (`rufus.distributed.fsdp`).

Trainers ask this module to shard a model before its optimiser is built (`shard`), to prepare
model and optimiser (`prepare`), to skip the gradient synchronisation of early micro-batches
(`no_sync`), and for the full weights to save (`full_state_dict`); they never branch on the engine.
Whatever the engine, an update equals the single-process update on the same global batch: the
gradients are averaged over processes as DDP averages them, and the losses are normalised by the
global batch (`tests/trainers/test_strategies.py` checks the weights).
"""

from __future__ import annotations

import contextlib

import torch

STRATEGIES = ("ddp", "fsdp")


def is_sharded(model) -> bool:
    """Whether `model` (or a module inside it) was sharded by `shard`."""
    from rufus.distributed import fsdp

    return fsdp.is_fsdp(model)


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
    return not (getattr(cfg, "strategy", "ddp") == "fsdp" and acc.num_processes > 1)


def prepare(acc, model, optimizer):
    """(model, optimizer) ready for the loop: accelerate's preparation for a ddp model (DDP wrapping
    when several processes run), the optimiser alone for a sharded one (FSDP2 already communicates)."""
    if is_sharded(model):
        return model, acc.prepare(optimizer)
    return acc.prepare(model, optimizer)


@contextlib.contextmanager
def no_sync(acc, model):
    """Skip the gradient synchronisation of this backward pass (all but a step's last micro-batch)."""
    if is_sharded(model):
        from rufus.distributed import fsdp

        with fsdp.no_sync(model):
            yield
        return
    with acc.no_sync(model):
        yield


@contextlib.contextmanager
def gathered(model):
    """Hold a sharded model's full weights on every process for the duration (decoding): each process
    then runs its own forwards, as many as its responses need, with no collective per token (the
    "gather for generation" of DeepSpeed-Chat's hybrid engine and OpenRLHF). A no-op when unsharded."""
    if not is_sharded(model):
        yield
        return
    from rufus.distributed import fsdp

    with fsdp.gathered(model):
        yield


def unsharded(model):
    """A plain copy of `model` with its full weights on the main process (None on the others; a
    collective for a sharded model), or `model` itself when it is not sharded: what to save."""
    if not is_sharded(model):
        return model
    from rufus.distributed import fsdp

    return fsdp.unsharded_copy(model)


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, gathered on the main process (a collective: every process calls
    it); None on the others. For an unsharded model: its own state dict, on every process."""
    if is_sharded(model):
        from rufus.distributed import fsdp

        return fsdp.full_state_dict(model)
    return model.state_dict()


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


def grad_norm_value(norm) -> float:
    """A clipped gradient norm as a float (a sharded model's norm is a DTensor over the processes)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _compute_dtype(cfg) -> torch.dtype:
    from accelerate import PartialState

    from rufus.models.loading import resolve_dtype

    return resolve_dtype(cfg.dtype, PartialState().device)
