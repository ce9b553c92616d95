"""Peak memory per process of an SFT and a PPO step on the "small" model, per strategy and base precision.

    .venv/bin/python benchmarks/memory.py [--model small] [--runs sft,ppo] [--configs ddp,fsdp,...]

Every configuration is a real `rufus sft` / `rufus ppo` run of 2 optimiser steps: two CPU processes
of one gloo group on 127.0.0.1 for the strategies, one process for the quantized bases. Each process reports
its peak resident set size (`ru_maxrss`) when its run ends; the table gives the larger of the two,
and the same for a process that only imports Rufus and torch (the floor every row stands on), so
"above floor" is what the run itself added: weights, gradients, optimiser state, activations,
buffers of the engine. Configurations:

  ddp            every process holds everything (the baseline)
  fsdp           FSDP2: parameters, gradients, optimiser state sharded
  zero2 / zero3  DeepSpeed ZeRO-2 (optimiser state + gradients) / ZeRO-3 (+ parameters)
  zero3+offload  ZeRO-3 with optimiser state and parameters in CPU memory (on a CPU-only machine the
                 "offload" moves nothing off a device, so expect no saving here; on a GPU it is the
                 point)
  4bit / 8bit    one process, a bitsandbytes nf4 / int8 base with LoRA r=16 (what trains: adapters)
  bf16           one process, the same LoRA run on a bfloat16 base (the comparison for the two above)

The work per step: SFT 16 sequences of 64 tokens; PPO 8 prompts, 16 new tokens, 1 epoch, a separate
critic, a frozen reference and a reward model of the policy's size. Prints one table (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CONFIGS = {  # name -> (processes, extra overrides)
    "ddp": (2, ["strategy=ddp"]),
    "fsdp": (2, ["strategy=fsdp"]),
    "zero2": (2, ["strategy=zero2"]),
    "zero3": (2, ["strategy=zero3"]),
    "zero3+offload": (2, ["strategy=zero3", "offload=true"]),
    "bf16": (1, ["dtype=bfloat16", "lora.r=16", "lora.alpha=32"]),
    "8bit": (1, ["quantization=8bit", "lora.r=16", "lora.alpha=32"]),
    "4bit": (1, ["quantization=4bit", "lora.r=16", "lora.alpha=32"]),
}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once; a sharded parameter
    counts its local shard): weights, gradients, optimiser state and any engine buffers."""
    import gc

    import torch

    tensors = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module):
            # gradients made by autograd have no Python object until asked for
            tensors += [p.grad for p in obj.parameters(recurse=False) if p.grad is not None]
        elif isinstance(obj, torch.Tensor):
            tensors.append(obj)
    seen, total = set(), 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # a DTensor's shard
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if storage.device.type == "meta" or storage.data_ptr() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def worker(argv: list[str]) -> int:
    """Run `rufus <argv>` in this process; print its peak RSS and the largest live tensor memory seen
    at an optimiser step (gradients and optimiser state both present, activations freed) as JSON."""
    sys.path.insert(0, str(HERE.parent / "src"))
    at_step = [0]
    if argv == ["floor"]:
        import torch  # noqa: F401

        import rufus.trainers.sft  # noqa: F401

        code = 0
    else:
        from rufus.cli import main
        from rufus.trainers import common as trainer_common

        step = trainer_common.clip_and_step

        def measured(*a, **kw):
            at_step[0] = max(at_step[0], live_tensor_bytes())
            return step(*a, **kw)

        trainer_common.clip_and_step = measured
        code = main(argv)
    rank = int(os.environ.get("RANK", "0"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {"rank": rank, "peak_mb": peak_mb, "tensors_mb": at_step[0] / 2**20, "code": code}
    out = os.environ.get("RUFUS_MEMORY_OUT")  # one file per process: their stdout lines may interleave
    if out:
        Path(out, f"rank-{rank}.json").write_text(json.dumps(row))
    return code


def run_config(command: str, model: str, name: str, out: Path) -> dict:
    nproc, extra = CONFIGS[name]
    args = [command, f"model={model}", f"output_dir={out}", "overwrite=true", "max_steps=2", "progress=false"]
    args += ["log_every=1", "save_every=0", "data.max_length=256", "seed=0"]
    if command == "sft":
        args += [f"data.train={common.data_path('sft')}", "batch_size=16"]
    else:
        args += [
            f"data.train={common.data_path('prompts')}",
            "batch_size=8",
            "generation.max_new_tokens=16",
            "generation.stop_at_eos=false",
            f"reward.model=[{model}]",
            "reward.scale=false",
            "ppo.epochs=1",
        ]
    if not any(a.startswith("dtype=") for a in extra):
        args.append("dtype=float32")
    return launch(args + extra, nproc)


def launch(args: list[str], nproc: int) -> dict:
    """Run the worker as `nproc` processes of one gloo group on 127.0.0.1 (rufus.distributed.local)."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from rufus.distributed.local import spawn

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    with tempfile.TemporaryDirectory() as out:
        env["RUFUS_MEMORY_OUT"] = out
        done = spawn(cmd, nproc, env=env, timeout=1800)
        rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    if done.returncode != 0 or not rows or any(r["code"] for r in rows):
        failed = next((o for o in done.outputs if "Error" in o), done.outputs[0])
        tail = failed.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:100]}
    return {
        "peak_mb": max(r["peak_mb"] for r in rows),
        "tensors_mb": max(r["tensors_mb"] for r in rows),
        "processes": len(rows),
    }


def base_weights(model: str) -> dict[str, float]:
    """MB of a base model's weights and buffers once loaded, per precision (each storage counted once;
    bitsandbytes keeps an int8 weight's data and its CB attribute in one storage)."""
    import torch

    sys.path.insert(0, str(HERE.parent / "src"))
    from rufus.models.loading import load_causal_lm

    out = {}
    for name, kwargs in (
        ("float32", dict(dtype=torch.float32)),
        ("bf16", dict(dtype=torch.bfloat16)),
        ("8bit", dict(dtype=torch.float32, quantization="8bit")),
        ("4bit", dict(dtype=torch.float32, quantization="4bit")),
    ):
        loaded = load_causal_lm(model, **kwargs)
        seen, total = set(), 0
        for t in list(loaded.parameters()) + list(loaded.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        for m in loaded.modules():  # 4-bit: the quantization constants (absmax, double-quantized)
            state = getattr(getattr(m, "weight", None), "quant_state", None)
            for t in _tensors_of(state):
                if t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        out[name] = total / 2**20
        del loaded
    return out


def _tensors_of(obj, depth: int = 0) -> list:
    import torch

    if obj is None or depth > 3:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for v in vars(obj).values() for t in _tensors_of(v, depth + 1)] if hasattr(obj, "__dict__") else []


def print_base(model_name: str, model: str) -> None:
    sizes = base_weights(model)
    print(f"\nThe base's weights in memory, MB ({model_name} model as loaded: quantized linear layers, the rest ")
    print("in the load dtype)\n")
    print("| base | weights and buffers |")
    print("| --- | --- |")
    for name, mb in sizes.items():
        print(f"| {name} | {mb:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(common.MODELS), default="small")
    p.add_argument("--runs", default="sft,ppo")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--base-only", action="store_true", help="only the table of the base's weights per precision")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        sys.exit(worker(args.worker))
    common.prepare()
    model = str(common.model_dir(args.model))
    if args.base_only:
        print_base(args.model, model)
        return
    floor = launch(["floor"], 1)["peak_mb"]
    runs = args.runs.split(",")
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            for command in runs:
                result = run_config(command, model, name, Path(tmp) / f"{command}-{name}")
                table[(name, command)] = result
                print(f"{name:<14} {command:<4} {json.dumps(result)}", file=sys.stderr, flush=True)
    print(
        f"\nMemory per process, MB ({args.model} model). 'tensors': live tensor storage at an optimiser step "
        f"(weights, gradients, optimiser state, engine buffers); 'peak RSS': the process's peak resident set, "
        f"including loading and saving (a process that only imports: {floor:.0f} MB)\n"
    )
    print("| config | processes | " + " | ".join(f"{c} tensors | {c} peak RSS" for c in runs) + " |")
    print("| --- | --- | " + " | ".join("--- | ---" for _ in runs) + " |")
    for name in args.configs.split(","):
        cells = []
        for command in runs:
            r = table[(name, command)]
            cells += [f"{r['tensors_mb']:.0f}", f"{r['peak_mb']:.0f}"] if "peak_mb" in r else [r["error"], ""]
        print(f"| {name} | {CONFIGS[name][0]} | " + " | ".join(cells) + " |")
    print_base(args.model, model)


if __name__ == "__main__":
    main()
