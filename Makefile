# The two commands of the README: `make serve` and `make test`. Each creates .venv if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env serve test lint protos bench

env:
	@scripts/bootstrap.sh

serve: env
	$(VENV)/bin/internvl-mesh serve $(ARGS)

test: env
	$(VENV)/bin/pytest -q --durations=25 $(PYTEST_ARGS)

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos: env
	scripts/gen_protos.sh
