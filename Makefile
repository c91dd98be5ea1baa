# `make demo` and `make test` create .venv on first use and install the package into it
# (editable, pinned by constraints.txt), then run.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(LIGHTNING_UNLEARN_DATA),)
ifneq ($(wildcard $(SHARED_DATA)),)
export LIGHTNING_UNLEARN_DATA := $(SHARED_DATA)
endif
endif

.PHONY: demo test benchmark docs clean

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip -c constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/lightning-unlearn fit -c recipes/ml100k/mf.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest

benchmark: $(BIN)/.installed
	$(BIN)/python tests/benchmarks/bench_training.py

# The docs: Sphinx (pinned in constraints.txt) from the `docs` extra; every warning is an error.
$(BIN)/.docs-installed: $(BIN)/.installed setup.cfg constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $@

docs: $(BIN)/.docs-installed
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) runs
