"""This machine's matrix-product peak (GFLOP/s), float32 and bfloat16, at the benchmark models' shapes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peak.py [--json] [--reps 15]

`vs_trl.py` divides each run's FLOP/s (common.flops_per_step / median step time) by the peak of
the dtype the run computed in, so "share of peak" says how much of the machine a trainer used.
Shapes are (M, K, N) products, M rows (tokens) times a K x N weight:
  training: a batch of 16 sequences of 64-80 tokens through the models' projections
  decoding: 16 rows (one new token for each of 16 sequences), where bf16 buys little on CPU
Each shape: warm-up, then the median of `--reps` timings, each timing a loop of enough products
to last ~25 ms. The peak of a dtype is its best shape. --json writes benchmarks/.cache/peak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

TRAINING = [
    (1024, 256, 1024),
    (1024, 1024, 256),
    (1024, 512, 512),
    (1024, 512, 2048),
    (1152, 512, 2048),
    (1280, 2048, 512),
]
DECODING = [(16, 256, 1024), (16, 512, 2048), (16, 2048, 512)]


def gflops(m: int, k: int, n: int, dtype, reps: int) -> float:
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    t0 = time.perf_counter()
    torch.matmul(a, b, out=out)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.025 / once))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * m * k * n / statistics.median(times) / 1e9


def measure(reps: int = 15) -> dict:
    import torch

    result = {
        "float32": 0.0,
        "bfloat16": 0.0,
        "shapes": {},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for kind, shapes in (("training", TRAINING), ("decoding", DECODING)):
        for m, k, n in shapes:
            row = {"kind": kind}
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                row[name] = round(gflops(m, k, n, dtype, reps), 1)
                result[name] = max(result[name], row[name])
            result["shapes"][f"{m}x{k}x{n}"] = row
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="write benchmarks/.cache/peak.json")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    res = measure(args.reps)
    print(
        f"matrix-product GFLOP/s, torch {res['torch']}, {res['threads']} threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    print(f"{'shape MxKxN':>16} {'kind':>9} {'float32':>9} {'bfloat16':>9} {'bf16/fp32':>9}")
    for shape, row in res["shapes"].items():
        print(
            f"{shape:>16} {row['kind']:>9} {row['float32']:>9.1f} {row['bfloat16']:>9.1f} "
            f"{row['bfloat16'] / row['float32']:>9.2f}"
        )
    print(f"{'peak':>16} {'':>9} {res['float32']:>9.1f} {res['bfloat16']:>9.1f}")
    if args.json:
        path = common.CACHE / "peak.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
