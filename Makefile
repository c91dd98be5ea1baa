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

.PHONY: demo test lint benchmark docs clean

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	@echo "Installing lightning-unlearn and its test dependencies into $(VENV) (editable, pinned by constraints.txt; torch is large: this takes a few minutes the first time) ..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip -c constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The demo: MF on MovieLens-100K, then two comparisons of every unlearning method from that model
# (1% of interactions, then 1% of users). W&B logs offline unless `make demo WANDB_OFFLINE=false`.
WANDB_OFFLINE ?= true
DEMO_WANDB := --trainer.logger.init_args.offline=$(WANDB_OFFLINE)
demo: $(BIN)/.installed
	$(BIN)/lightning-unlearn compare -c recipes/ml100k/demo_interactions.yaml $(DEMO_WANDB)
	$(BIN)/lightning-unlearn compare -c recipes/ml100k/demo_users.yaml $(DEMO_WANDB) \
	    --ckpt_path runs/ml100k_demo_interactions/checkpoints/best.ckpt
	@echo "Demo done: the tables above are also in runs/ml100k_demo_interactions/ and runs/ml100k_demo_users/ (compare.json, compare.csv)."
	@if [ "$(WANDB_OFFLINE)" = true ]; then \
	    runs=$$(for kind in interactions users; do readlink -f runs/ml100k_demo_$$kind/wandb/latest-run; done | tr '\n' ' '); \
	    echo "W&B offline runs: $$runs"; \
	    echo "Upload them with: $(BIN)/wandb login && $(BIN)/wandb sync $$runs"; fi

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# Lint (pyflakes, syntax, import order; .ci/ruff.toml): .ci/run runs it before the tests.
lint: $(BIN)/.installed
	$(BIN)/python -m ruff check --config .ci/ruff.toml lightning_unlearn tests docs/conf.py

benchmark: $(BIN)/.installed
	$(BIN)/python tests/benchmarks/bench_training.py

# The docs: Sphinx (pinned in constraints.txt) from the `docs` extra; every warning is an error.
$(BIN)/.docs-installed: $(BIN)/.installed setup.cfg constraints.txt
	@echo "Installing Sphinx (the docs extra) into $(VENV) ..."
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $@

docs: $(BIN)/.docs-installed
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) runs
