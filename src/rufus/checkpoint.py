"""Atomic checkpoints and exact resume.

A checkpoint holds what a run needs to continue as if it had never stopped: the trainable weights
(safetensors), the optimiser and scheduler state, every process's random-number-generator state and
the step reached. It is written into a temporary directory and renamed into place only when
complete, so a run killed mid-save leaves the previous checkpoint intact and no half-written one.
Loading uses `weights_only` unpickling: a checkpoint file cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rufus.distributed import checkpoint_engine

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (requires_grad), and frozen ones that still change during a run
    (marked `p.rufus_checkpoint = True`: ILQL's Polyak-averaged target heads), by name; other frozen
    weights come from the base model."""
    return {
        n: p.detach().contiguous().cpu()
        for n, p in model.named_parameters()
        if p.requires_grad or getattr(p, "rufus_checkpoint", False)
    }


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def _set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    accelerator,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict | None = None,
    state: dict | None = None,
    keep: int = 0,
) -> Path:
    """Write checkpoint `step` atomically; every process must call this (each saves its RNG state).

    `models` are unwrapped models by name (their trainable parameters are saved), `optimizers` and
    `schedulers` by name, `state` extra JSON-serialisable trainer state (e.g. a KL controller).
    Keeps the newest `keep` checkpoints (0 = all).
    """
    tmp = temporary_dir(output_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_parts(tmp, accelerator=accelerator, models=models, optimizers=optimizers, schedulers=schedulers)
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        final = commit(output_dir, step, num_processes=accelerator.num_processes, state=state, keep=keep)
    accelerator.wait_for_everyone()
    return final or checkpoint_dir(output_dir) / f"step-{step:07d}"


def temporary_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint `step` is written before `commit` renames it into place."""
    return checkpoint_dir(output_dir) / f".tmp-step-{step:07d}"


def save_parts(
    tmp: Path,
    *,
    accelerator,
    models: dict[str, torch.nn.Module],
    optimizers: dict | None = None,
    schedulers: dict | None = None,
    rng_tag: str = "",
) -> None:
    """Write one process group's part of a checkpoint into the temporary directory `tmp`: its models,
    optimisers and schedulers by name, and each process's RNG state as ``rng-{rng_tag}{rank}``. Every
    process of the group calls this. Several groups (Ray-placed roles) each write their own names."""
    rank = accelerator.process_index
    sharded = {name: engine for name, model in models.items() if (engine := checkpoint_engine(model))}
    for name, engine in sorted(sharded.items()):  # every process writes its own shards (a collective)
        if engine == "zero":
            from rufus.distributed import deepspeed

            deepspeed.save_checkpoint(tmp / f"{name}.zero", models[name])
        else:
            _save_sharded(tmp / f"{name}.dcp", models[name], (optimizers or {}).get(name))
    if accelerator.is_main_process:
        for name, model in models.items():
            if name not in sharded:
                save_file(trainable_state(model), tmp / f"{name}.safetensors")
        for name, optimizer in (optimizers or {}).items():
            if name not in sharded:
                torch.save(optimizer.state_dict(), tmp / f"{name}.optimizer.pt")
        for name, scheduler in (schedulers or {}).items():
            torch.save(scheduler.state_dict(), tmp / f"{name}.scheduler.pt")
    meta, tensors = _rng_state()
    (tmp / f"rng-{rng_tag}{rank}.json").write_text(json.dumps(meta))
    save_file(tensors, tmp / f"rng-{rng_tag}{rank}.safetensors")


def commit(output_dir: str | os.PathLike, step: int, *, num_processes: int, state: dict | None, keep: int) -> Path:
    """Finish checkpoint `step` once every part is in its temporary directory: write state.json, rename
    the directory into place (replacing an older one of the same step), keep the newest `keep` (0 = all)."""
    tmp, final = temporary_dir(output_dir, step), checkpoint_dir(output_dir) / f"step-{step:07d}"
    info = {"step": step, "num_processes": num_processes, "state": state or {}}
    (tmp / "state.json").write_text(json.dumps(info, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    accelerator,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict | None = None,
    rng_tag: str = "",
) -> dict:
    """Restore what `save_checkpoint` wrote into the given objects; return {"step", "state", ...}.
    `rng_tag`: the RNG files of this process group (`save_parts`)."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    info = json.loads((path / "state.json").read_text())
    sharded = {name: engine for name, model in models.items() if (engine := checkpoint_engine(model))}
    for name, engine in sorted(sharded.items()):
        if engine == "zero":
            from rufus.distributed import deepspeed

            deepspeed.load_checkpoint(path / f"{name}.zero", models[name])
        else:
            _load_sharded(path / f"{name}.dcp", models[name], (optimizers or {}).get(name))
    for name, model in models.items():
        if name in sharded:
            continue
        weights = load_file(path / f"{name}.safetensors")
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        unexpected = [n for n in weights if n not in params]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for n, tensor in weights.items():
                params[n].copy_(tensor)
    for name, optimizer in (optimizers or {}).items():
        if name in sharded:
            continue
        optimizer.load_state_dict(torch.load(path / f"{name}.optimizer.pt", weights_only=True, map_location="cpu"))
    for name, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(torch.load(path / f"{name}.scheduler.pt", weights_only=True))
    rank = accelerator.process_index
    rng = path / f"rng-{rng_tag}{rank}"
    if info.get("num_processes") == accelerator.num_processes and rng.with_suffix(".json").exists():
        _set_rng_state(json.loads(rng.with_suffix(".json").read_text()), load_file(rng.with_suffix(".safetensors")))
    return info


# --- sharded models: torch.distributed.checkpoint, each process writing and reading its own shards ---


def _save_sharded(directory: Path, model, optimizer) -> None:
    """The trainable parameters of a sharded model and its optimiser's state, as distributed-checkpoint
    shards in `directory` (loadable on another number of processes: DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(directory))


def _load_sharded(directory: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])


def _sharded_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)  # frozen weights come from the base model
    state = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:  # accelerate's wrapper holds the torch optimiser as .optimizer
        state["optimizer"] = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    return state
