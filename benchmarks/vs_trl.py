"""Rufus against TRL on this machine: seconds per step, tokens/s, peak memory, share of peak FLOP/s.

    .venv/bin/python benchmarks/vs_trl.py [--algos sft,rm,dpo,grpo,ppo] [--models tiny,small]
                                          [--steps 8] [--warmup 2] [--skip-peer]

1. the shared models and data (common.prepare), the machine's matmul peak (peak.py, once), and the
   peer's virtual environments (peers/setup_trl.sh, once; TRL 1.x, and TRL 0.29 for PPO);
2. for each (algo, model) and each precision (float32, bf16, bf16+compile): the peer, then Rufus, each in its own
   process with OMP_NUM_THREADS=2 (so peak RSS is per run), one process at a time;
3. one table (also benchmarks/.cache/table.md), two rows per (algo, model):
     float32  both sides in float32
     best     each side's fastest of its float32, bf16 and bf16+compile runs (in brackets: the dtype
              it used, +c when compiled; compile time falls in the warm-up steps)
   s/step is the median after the warm-up steps, "% peak" the run's FLOP/s (common.flops_per_step)
   over peak.json's peak for the dtype the run computed in, and "rufus x" = peer s/step / Rufus
   s/step (above 1: Rufus is faster). Raw RESULT rows go to benchmarks/.cache/results.jsonl.
A run that fails shows "failed" (its log is in benchmarks/.cache/logs/) and the driver goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

VENVS = HERE / ".venvs"
PRECISIONS = ("float32", "bf16", "bf16+compile")


def peer_python(algo: str) -> Path:
    """TRL 1.x has no PPO trainer any more; PPO runs on the last TRL that has one (0.29)."""
    return VENVS / ("trl029" if algo == "ppo" else "trl1") / "bin" / "python"


def busy_cpu_seconds() -> float:
    """CPU-seconds all processes on this machine have used since boot (user + nice + system + irq)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_until_idle(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most `max_wait` s) until other work uses under `threshold` cores; returns their use.

    With OMP_NUM_THREADS=2 on two cores, one core taken by another process slows a run several-fold
    (OpenMP threads wait on each other), so timings taken on a busy machine mean little.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_cpu_seconds(), time.monotonic()
        time.sleep(2.0)
        load = (busy_cpu_seconds() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() > deadline:
            return load
        time.sleep(5.0)


def run_one(
    side: str, algo: str, model: str, precision: str, steps: int, warmup: int, timeout: int, idle_wait: float = 0.0
) -> dict:
    if side == "rufus":
        cmd = [sys.executable, str(HERE / "rufus_run.py")]
    else:
        cmd = [str(peer_python(algo)), str(HERE / "peers" / "trl_run.py")]
    cmd += [
        "--algo",
        algo,
        "--model",
        model,
        "--precision",
        precision.removesuffix("+compile"),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ] + (["--compile"] if precision.endswith("+compile") else [])
    env = dict(
        os.environ,
        OMP_NUM_THREADS="2",
        MKL_NUM_THREADS="2",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    logs = common.CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{side}-{algo}-{model}-{precision}.log"
    print(f"  {side:>5} {algo} {model} {precision} ...", end=" ", flush=True)
    if idle_wait > 0:
        wait_until_idle(idle_wait)
    t0 = time.perf_counter()
    busy0, mine0 = busy_cpu_seconds(), children_cpu_seconds()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\n(timed out after {timeout}s)"
        rc = -1
    except OSError as e:  # e.g. the peer's environment is missing
        output, rc = f"cannot run {cmd[0]}: {e}", -1
    log_path.write_text(" ".join(cmd) + "\n\n" + output)
    wall = time.perf_counter() - t0
    # cores used by other processes while this one ran (machine-wide CPU time minus the run's own)
    others = max(0.0, (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - mine0)) / max(wall, 1e-9)
    contended = others > 0.25
    rows = [json.loads(line[len("RESULT ") :]) for line in output.splitlines() if line.startswith("RESULT ")]
    if rc != 0 or not rows:
        print(f"failed (rc {rc}, {wall:.0f}s; log {log_path.relative_to(REPO)})", flush=True)
        return {
            "side": side,
            "impl": side,
            "algo": algo,
            "model": model,
            "precision": precision,
            "failed": True,
            "rc": rc,
            "log": str(log_path.relative_to(REPO)),
            "error": output.strip().splitlines()[-1:] or [""],
            "other_cores": round(others, 2),
        }
    row = dict(rows[-1], side=side, other_cores=round(others, 2))  # side: "peer" or "rufus", whatever its impl
    busy = f"; machine busy: other work used {others:.1f} cores" if contended else ""
    print(f"{row['median_s']:.3f} s/step ({wall:.0f}s{busy})", flush=True)
    return row


def rufus_version(rows: list[dict]) -> str:
    return next((r["version"] for r in rows if r["side"] == "rufus" and not r.get("failed")), "?")


def dtype_of(row: dict) -> str:
    used = str(row.get("dtype_used", row.get("precision", "float32"))).lower()
    return "bfloat16" if "bf" in used else "float32"


def pick(rows: list[dict], side: str, algo: str, model: str, mode: str) -> dict | None:
    """The row of `side` shown on the table's `mode` line ("float32" or "best"); None if not run."""
    mine = [r for r in rows if r["side"] == side and r["algo"] == algo and r["model"] == model]
    if mode == "float32":
        mine = [r for r in mine if r["precision"] == "float32"]
    if not mine:
        return None
    ok = [r for r in mine if not r.get("failed")]
    return min(ok, key=lambda r: r["median_s"]) if ok else mine[0]


def table(rows: list[dict], algos, models, peak: dict, peer_label: str) -> str:
    head = [
        "algo",
        "model",
        "precision",
        f"{peer_label} s/step",
        "rufus s/step",
        f"{peer_label} tok/s",
        "rufus tok/s",
        f"{peer_label} RSS MB",
        "rufus RSS MB",
        f"{peer_label} % peak",
        "rufus % peak",
        "rufus x",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]

    def cells(r, mode):
        if r is None:
            return ["skipped"] * 4
        if r.get("failed"):
            return ["failed"] * 4
        share = r["flops_per_s"] / 1e9 / peak[dtype_of(r)] if peak.get(dtype_of(r)) else float("nan")
        tag = ""
        if mode == "best":
            tag = f" ({'bf16' if dtype_of(r) == 'bfloat16' else 'fp32'}{'+c' if 'compile' in r['precision'] else ''})"
        if r.get("other_cores", 0) > 0.25:
            tag += " *"  # timed while other work used the CPU
        return [
            f"{r['median_s']:.3f}{tag}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{100 * share:.1f}%",
        ]

    for algo in algos:
        for model in models:
            for mode in ("float32", "best"):
                p, r = pick(rows, "peer", algo, model, mode), pick(rows, "rufus", algo, model, mode)
                pc, rc = cells(p, mode), cells(r, mode)
                ratio = "-"
                if p and r and not p.get("failed") and not r.get("failed"):
                    ratio = f"{p['median_s'] / r['median_s']:.2f}"
                lines.append(
                    "| "
                    + " | ".join([algo, model, mode, pc[0], rc[0], pc[1], rc[1], pc[2], rc[2], pc[3], rc[3], ratio])
                    + " |"
                )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default=",".join(common.ALGOS))
    p.add_argument("--models", default="tiny,small")
    p.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help="float32,bf16,bf16+compile (best is the fastest of those run; +compile: torch.compile on "
        "both sides, TRL's torch_compile=True and Rufus's compile=true)",
    )
    p.add_argument("--steps", type=int, default=8, help="optimiser steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--skip-peer", action="store_true", help="run Rufus only")
    p.add_argument(
        "--reuse-peer",
        action="store_true",
        help="take the peer's rows from the last results.jsonl instead of running the peer again "
        "(the peer does not change when Rufus does); Rufus runs afresh",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds before one run counts as failed")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=900,
        help="before each run, wait up to this many seconds for other work to leave the CPU (0 = never)",
    )
    args = p.parse_args(argv)
    algos = [a for a in args.algos.split(",") if a]
    models = [m for m in args.models.split(",") if m]
    precisions = [x for x in args.precisions.split(",") if x]
    for name, values, allowed in (
        ("algos", algos, common.ALGOS),
        ("models", models, common.MODELS),
        ("precisions", precisions, PRECISIONS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")

    # 1. models and data, the machine's peak, the peer's environments
    common.prepare()
    peak_path = common.CACHE / "peak.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    if not peak_path.exists():
        print("measuring the matmul peak (benchmarks/peak.py) ...", flush=True)
        subprocess.run([sys.executable, str(HERE / "peak.py"), "--json"], cwd=REPO, env=env, check=True)
    peak = json.loads(peak_path.read_text())
    run_peer = not args.skip_peer
    if run_peer and not all((VENVS / v / "bin" / "python").exists() for v in ("trl1", "trl029")):
        setup = HERE / "peers" / "setup_trl.sh"
        print(f"setting up the peer's environments ({setup.relative_to(REPO)}) ...", flush=True)
        if not setup.exists() or subprocess.run(["bash", str(setup)], cwd=REPO).returncode != 0:
            print("peer set-up failed; its runs will show as failed", flush=True)

    # 2. the runs: peer then Rufus, per precision, one process at a time
    rows = []
    stored = {}
    if args.reuse_peer:
        results = common.CACHE / "results.jsonl"
        previous = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
        stored = {(r["algo"], r["model"], r["precision"]): r for r in previous if r["side"] == "peer"}
        run_peer = False
    for algo in algos:
        for model in models:
            print(f"{algo} {model}", flush=True)
            for precision in precisions:
                if (algo, model, precision) in stored:
                    rows.append(dict(stored[(algo, model, precision)], reused=True))
                    print(
                        f"   peer {algo} {model} {precision} ... {rows[-1].get('median_s', float('nan')):.3f} s/step "
                        f"(stored row)",
                        flush=True,
                    )
                elif run_peer:
                    rows.append(
                        run_one("peer", algo, model, precision, args.steps, args.warmup, args.timeout, args.idle_wait)
                    )
                rows.append(
                    run_one("rufus", algo, model, precision, args.steps, args.warmup, args.timeout, args.idle_wait)
                )

    # 3. raw rows and the table
    (common.CACHE / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peer_versions = sorted({f"{r['impl']} {r['version']}" for r in rows if r["side"] == "peer" and not r.get("failed")})
    md = table(rows, algos, models, peak, "trl")
    reused = (
        " (peer rows from an earlier run of this script, --reuse-peer)" if any(r.get("reused") for r in rows) else ""
    )
    header = (
        f"Rufus {rufus_version(rows)} vs peer ({', '.join(peer_versions) or 'not run'}{reused}), "
        f"{datetime.date.today()}: {args.steps} steps, median of "
        f"the last {args.steps - args.warmup}, OMP_NUM_THREADS=2. Peak (peak.json): float32 "
        f"{peak['float32']:.0f}, bfloat16 {peak['bfloat16']:.0f} GFLOP/s. rufus x = peer s/step / Rufus s/step."
    )
    text = header + "\n\n" + md + "\n"
    if any(r.get("other_cores", 0) > 0.25 for r in rows):
        text += (
            "\n* timed while other processes used more than a quarter of a core (see other_cores in "
            "results.jsonl): with two threads on two cores such a run can be several times slower; rerun it.\n"
        )
    (common.CACHE / "table.md").write_text(text)
    print("\n" + text)
    print(f"rows: {common.CACHE / 'results.jsonl'}; table: {common.CACHE / 'table.md'}")


if __name__ == "__main__":
    main()
