# Two commands on a fresh machine: `make demo` runs the built-in demo, `make test` the tests.
# Both create .venv when it is missing. TORCH_SPEC picks the torch build installed first
# (the CPU wheel here; use e.g. TORCH_SPEC=torch on a CUDA machine).
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test lint format clean

$(BIN)/kd-dist: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/kd-dist

demo: install
	$(BIN)/kd-dist demo --output_dir demo_output

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache *.egg-info
