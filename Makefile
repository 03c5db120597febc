# The README's two commands. Each one installs what it needs first (tools/bootstrap.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
RECSYS := $(VENV)/bin/recsys
PYTEST_ARGS ?=

.PHONY: demo test install lint bench report clean

install:
	bash tools/bootstrap.sh

# generate the synthetic cascade, train the quickstart ranker on 2 processes through torchx
# (local_cwd scheduler, torchrun underneath, gloo), re-evaluate it from its last checkpoint and
# print the metrics table
DEMO_RUN ?= runs/quickstart-demo
TORCHX := $(VENV)/bin/torchx run -s local_cwd apps/components.py
demo: install
	$(RECSYS) data synth specs/quickstart.toml
	rm -rf $(DEMO_RUN)
	$(TORCHX):train -j 1x2 --spec specs/quickstart.toml --run_dir $(DEMO_RUN)
	$(TORCHX):evaluate -j 1x2 --run_dir $(DEMO_RUN)

# two workers, one test file each at a time (a file's shared trained fixtures stay on one worker);
# the ten slowest tests are listed at the end. Keep the whole run under 10 minutes on 2 cores.
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=10 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# the benchmarks, then docs/results.md and the README's summary rewritten from their output
bench: install
	$(RECSYS) bench all --out bench-results
	$(PY) tools/update_readme.py bench-results report

# the quality experiments over seeds (about 30 minutes on 2 cores), then docs/results.md
report: install
	$(RECSYS) report --out report
	$(PY) tools/update_readme.py bench-results report

clean:
	rm -rf data/quickstart bench-results .pytest_cache
