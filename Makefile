# The README's two commands. Each one installs what it needs first (tools/bootstrap.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
RECSYS := $(VENV)/bin/recsys
PYTEST_ARGS ?=

.PHONY: demo test install lint bench clean

install:
	bash tools/bootstrap.sh

demo: install
	$(RECSYS) data synth specs/quickstart.toml
	$(RECSYS) data inspect specs/quickstart.toml

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# the benchmarks, then the README's results section rewritten from their output
bench: install
	$(RECSYS) bench data --out bench-results
	$(PY) tools/update_readme.py bench-results

clean:
	rm -rf data/quickstart bench-results .pytest_cache
