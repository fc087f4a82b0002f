# `make test` and `make demo` do any missing set-up first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast chaos lint bench demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The pure tests (no Mooncake process, server or browser; the client on its in-memory store): for while you work.
test-fast: setup
	$(PY) -m pytest -m pure $(PYTEST_ARGS)

# The chaos suite with its long variants (longer faults, more load); `make test` runs the short ones.
chaos: setup
	$(PY) -m pytest tests/chaos --chaos-long $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Benchmarks (not part of the test suite): throughput table, peak memory of a round trip, then an RL batch through
# TransferQueue on SimpleStorage, TQ's stock MooncakeStore and ours.
bench: setup
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/bench.py --memory
	$(PY) bench/tq_batch.py $(TQ_BENCH_ARGS)

# Everything on this machine: master, two storage processes, the faulty workload, the dashboard on
# http://127.0.0.1:8501; Ctrl-C, SIGTERM or SIGHUP stops it and all it started. Options:
# make demo DEMO_ARGS="--duration 60 --fault-rate 0.01". `exec`: make's child is the demo itself, whatever
# DEMO_ARGS holds (no shell in between that a SIGTERM would end first), and make waits for it to finish stopping.
demo: setup
	exec $(VENV)/bin/tq-mooncake demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
