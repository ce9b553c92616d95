# Common tasks; each target runs the command the README gives. `make help` lists them.
.PHONY: help setup test test-slow lint bench

# Named PY, not PYTHON: scripts/setup.sh reads PYTHON as the interpreter that creates the venv.
PY := .venv/bin/python

# List the targets.
help:
	@awk '/^# /{c=substr($$0,3)} /^[a-z-]+:/{sub(":.*","");printf "  %-10s %s\n",$$0,c;c=""}' Makefile

# Create .venv and install Rufus with its test tools (CPU or CUDA torch, chosen by the script).
setup:
	scripts/setup.sh

# Run the default test suite (slow end-to-end checks skipped).
test:
	$(PY) -m pytest -q

# Run only the slow end-to-end checks.
test-slow:
	$(PY) -m pytest -q -m slow

# Lint and check formatting.
lint:
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts

# Rufus against TRL, seconds per step and memory (about 40 minutes on 2 cores); pass flags in ARGS.
bench:
	$(PY) benchmarks/vs_trl.py $(ARGS)
