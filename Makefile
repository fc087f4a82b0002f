# `make test` and `make demo` do any missing set-up first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test chaos lint bench demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The chaos suite with its long variants (longer faults, more load); `make test` runs the short ones.
chaos: setup
	$(PY) -m pytest tests/chaos --chaos-long $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Benchmarks (not part of the test suite): throughput table, then peak memory of a round trip.
bench: setup
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/bench.py --memory

# Reserved: the embedded demo (issue 8).
demo: setup
	@echo "make demo: not built yet (see issue 8)"; exit 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
