"""Fixed-seed runs of the online trainers on a tiny model, their logged metrics written as JSON.

A refactoring of the trainers must leave these numbers as they were (within float tolerance):

    python scripts/fixed_seed_metrics.py --out before.json      # on the old code
    python scripts/fixed_seed_metrics.py --out after.json       # on the new code
    python scripts/fixed_seed_metrics.py --compare before.json after.json

Timing keys (time/..., tokens_per_s) are left out; everything else a trainer logs is kept. Keys
renamed in between (config and metrics) are matched through OLD_CONFIG_KEYS and `renamed` below.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# config keys as the code before the one-name-per-concept renames spelled them
OLD_CONFIG_KEYS = {("grpo", "epochs"): "iterations", ("rloo", "group_size"): "k", ("bon", "group_size"): "n"}
# logged keys renamed then: old -> new
RENAMED = {
    "entropy": "policy/entropy",
    "approx_kl": "policy/approx_kl",
    "clipfrac": "policy/clipfrac",
    "ratio_mean": "policy/ratio_mean",
    "ratio_max": "policy/ratio_max",
    "kl": "policy/ref_kl",
    "ppo/updates": "policy/updates",
    "reward/raw": "score/raw",
    "reward/no_eos": "response/no_eos",
    "reward/digit_fraction": "score/digit_fraction",
    "bon/score_mean": "score/mean",
    "bon/score_std": "score/std",
    "bon/score_best": "score/kept",
    "online/score_mean": "score/mean",
    "online/score_chosen": "score/chosen",
    "online/score_rejected": "score/rejected",
    "online/response_length": "response/length",
}
# dropped then: the reward pipeline's one-process score mean and std (score/mean, score/std now)
DROPPED = {"reward/score", "reward/score_std"}


def renamed(run: str, key: str) -> str | None:
    """The new name of an old logged key (None: no longer logged). GRPO's and RLOO's reward/mean and
    reward/std were the score's; reward/... is now the KL-penalised reward in every trainer."""
    if key in DROPPED:
        return None
    if run.startswith(("grpo", "rloo", "reinforce")) and key in ("reward/mean", "reward/std"):
        return key.replace("reward/", "score/")
    return RENAMED.get(key, key)


def with_old_keys(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for (section, new), old in OLD_CONFIG_KEYS.items():
        if new in cfg.get(section, {}):
            cfg[section][old] = cfg[section].pop(new)
    return cfg


def digit_fraction(prompts, completions, **kw):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def runs(model: str, prompts: str, sft: str, out: Path) -> dict[str, tuple[str, dict]]:
    base = {
        "model": model,
        "data": {"train": prompts, "max_length": 40},
        "generation": {"max_new_tokens": 8},
        "batch_size": 4,
        "lr": 2e-3,
        "max_steps": 3,
        "dtype": "float32",
        "progress": False,
        "seed": 0,
        "log_every": 1,
    }

    def cfg(name, **sections):
        c = json.loads(json.dumps(base))
        for k, v in sections.items():
            if isinstance(v, dict):
                c.setdefault(k, {}).update(v)
            else:
                c[k] = v
        c["output_dir"] = str(out / name)
        return c

    return {
        "ppo": ("ppo", cfg("ppo", ppo={"epochs": 2, "minibatches": 2}, kl={"coef": 0.05})),
        "ppo_ptx_shared": (
            "ppo",
            cfg(
                "ppo_ptx_shared",
                ppo={"epochs": 2, "target_kl": 0.5},
                critic={"shared": True},
                ptx={"coef": 0.5, "data": sft, "batch_size": 2},
            ),
        ),
        "ppo_lora_adaptive": (
            "ppo",
            cfg("ppo_lora_adaptive", lora={"r": 4}, lr=1e-2, kl={"coef": 0.1, "target": 1.0, "horizon": 100}),
        ),
        "grpo": ("grpo", cfg("grpo", grpo={"group_size": 4}, kl={"coef": 0.04})),
        "grpo_multi": (
            "grpo",
            cfg(
                "grpo_multi",
                grpo={
                    "group_size": 4,
                    "epochs": 2,
                    "minibatches": 2,
                    "loss_aggregation": "constant",
                    "scale_rewards": False,
                    "clip_high": 0.28,
                },
                kl={"coef": 0.04},
            ),
        ),
        "rloo": ("rloo", cfg("rloo", rloo={"group_size": 4}, kl={"coef": 0.05})),
        "reinforce_pp": ("rloo", cfg("reinforce_pp", rloo={"group_size": 4, "advantage": "reinforce_pp", "epochs": 2})),
        "reinforce_pp_baseline": (
            "rloo",
            cfg("reinforce_pp_baseline", rloo={"group_size": 4, "advantage": "reinforce_pp_baseline"}),
        ),
        "dpo_online": ("dpo", cfg("dpo_online", dpo={"rounds": 2, "prompts_per_round": 8}, max_steps=2)),
        "bon": ("bon", cfg("bon", bon={"group_size": 4, "rounds": 2, "prompts_per_round": 8}, max_steps=2)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the metrics of every run here (JSON)")
    ap.add_argument("--only", nargs="*", help="run only these")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare, rtol=args.rtol))

    from tests.helpers import arithmetic_prompts, sft_rows, tiny_corpus, write_jsonl

    import rufus
    import rufus.config
    from rufus.models.tiny import build_tiny

    trainers = {
        "ppo": rufus.train_ppo,
        "grpo": rufus.train_grpo,
        "rloo": rufus.train_rloo,
        "dpo": rufus.train_dpo,
        "bon": rufus.train_bon,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(build_tiny(tmp / "model", tiny_corpus(), vocab_size=300))
        prompts = str(write_jsonl(tmp / "prompts.jsonl", arithmetic_prompts()))
        sft = str(write_jsonl(tmp / "sft.jsonl", sft_rows(8)))
        for name, (algo, cfg) in runs(model, prompts, sft, tmp / "runs").items():
            if args.only and name not in args.only:
                continue
            try:
                result = trainers[algo](cfg, reward_fn=digit_fraction)
            except rufus.config.ConfigError as e:  # the code before the renames
                if "unknown key" not in str(e):
                    raise
                result = trainers[algo](with_old_keys(cfg), reward_fn=digit_fraction)
            results[name] = [
                {k: v for k, v in row.items() if not (k.startswith("time/") or k == "tokens_per_s")}
                for row in result.metrics
            ]
            print(name, json.dumps(results[name][-1], sort_keys=True), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def compare(before: str, after: str, rtol: float) -> int:
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'after' if name in b else 'before'}")
            continue
        worst, missing = 0.0, set()
        for step, (ra, rb) in enumerate(zip(a[name], b[name], strict=True), 1):
            ra = {renamed(name, k): v for k, v in ra.items() if renamed(name, k)}
            missing |= set(ra) ^ set(rb)
            for k in set(ra) & set(rb):
                x, y = ra[k], rb[k]
                if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                    d = abs(x - y) / max(abs(x), abs(y), 1e-6)
                    if d > rtol:
                        print(f"{name} step {step} {k}: {x} -> {y}")
                        bad += 1
                    worst = max(worst, d if not math.isnan(d) else 0.0)
        print(
            f"{name}: {len(a[name])} rows, largest relative difference {worst:.2e}"
            + (f"; keys in one only: {sorted(missing)}" if missing else "")
        )
    return 1 if bad else 0


if __name__ == "__main__":
    main()
