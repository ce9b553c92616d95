#!/usr/bin/env bash
# Creates the virtual environment .venv/ and installs Rufus into it from this checkout.
# Run it as often as you like: when pyproject.toml, constraints/ and this script are unchanged
# since the last successful run, it returns at once.
#
# The one place where the torch build is chosen: with an NVIDIA GPU (nvidia-smi lists one) the
# CUDA build from constraints/gpu.txt, otherwise the CPU build from constraints/cpu.txt, installed
# first so that no later requirement pulls the multi-GB CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${RUFUS_VENV:-.venv}
python=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    constraints=constraints/gpu.txt
else
    constraints=constraints/cpu.txt
fi

stamp="$venv/.rufus-setup-stamp"
want=$(cat pyproject.toml "$constraints" scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "setup: creating $venv and installing rufus (torch from $constraints)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c "$constraints" torch
"${pip[@]}" install -c "$constraints" -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done" >&2
