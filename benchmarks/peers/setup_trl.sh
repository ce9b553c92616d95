#!/usr/bin/env bash
# The peer's (Hugging Face TRL's) virtual environments for the side-by-side benchmark.
#
#   bash benchmarks/peers/setup_trl.sh            # idempotent: a venv already at its pins is left alone
#
# benchmarks/.venvs/trl1    TRL 1.x   -> sft, rm, dpo, grpo
# benchmarks/.venvs/trl029  TRL 0.29  -> ppo (trl.experimental.ppo.PPOTrainer, the actor-critic PPO TRL 1.x dropped)
#
# torch is always pinned: an unpinned torch would pull the CUDA build (GBs); 2.13.0 resolves to the
# local CPU wheel here. The project's own .venv is never touched. PYTHON picks the interpreter (>= 3.11).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$(cd "$HERE/.." && pwd)/.venvs"
PYTHON="${PYTHON:-python3}"

TORCH=2.13.0
TRANSFORMERS=5.23.0
ACCELERATE=1.15.0
DATASETS=5.2.0
TRL1=1.16.0
TRL029=0.29.1

# name, then its pins
make_venv() {
    local name="$1"; shift
    local dir="$VENVS/$name" stamp="$VENVS/$name/.pins"
    local want="$*"
    if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
        && "$dir/bin/python" -c "import torch, transformers, accelerate, datasets, trl" 2>/dev/null; then
        echo "== $name: already at its pins"
    else
        echo "== $name: installing $want"
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir"
        "$dir/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
        "$dir/bin/python" -m pip install -q "$@" 2>&1 | grep -v '^WARNING: Location' || true
        "$dir/bin/python" -c "import torch, transformers, accelerate, datasets, trl"  # fail loudly if it did not install
        echo "$want" > "$stamp"
    fi
    "$dir/bin/python" - <<'EOF'
import importlib.metadata as md, sys
print("   python", sys.version.split()[0], "|",
      ", ".join(f"{p} {md.version(p)}" for p in ("trl", "torch", "transformers", "accelerate", "datasets", "numpy")))
EOF
}

mkdir -p "$VENVS"
make_venv trl1 "torch==$TORCH" "trl==$TRL1" "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" \
    "datasets==$DATASETS"
make_venv trl029 "torch==$TORCH" "trl==$TRL029" "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" \
    "datasets==$DATASETS"
