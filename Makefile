# The README's two commands. Each one installs what it needs first (tools/bootstrap.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
RECSYS := $(VENV)/bin/recsys
PYTEST_ARGS ?=

.PHONY: demo test install lint bench-data clean

install:
	bash tools/bootstrap.sh

demo: install
	$(RECSYS) data synth specs/quickstart.toml
	$(RECSYS) data inspect specs/quickstart.toml

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench-data: install
	$(RECSYS) bench data --out bench-results

clean:
	rm -rf data/quickstart bench-results .pytest_cache
