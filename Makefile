# `make test` and `make demo` do any missing set-up first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Reserved: the embedded demo (issue 8).
demo: setup
	@echo "make demo: not built yet (see issue 8)"; exit 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
