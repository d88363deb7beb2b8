# Two commands on a fresh machine: `make demo` runs the built-in demo, `make test` the tests.
# Both create .venv when it is missing and install the tested set: the exact versions in
# constraints.txt (pyproject.toml keeps only floors, so kd_dist still installs beside other
# packages). TORCH_SPEC picks the torch build installed first: the CPU wheel here; on a CUDA
# machine TORCH_SPEC=torch (PyPI's Linux wheels are CUDA builds; the constraints keep its version).
#
# `make test-latest` runs the same suite against the newest releases the floors allow, in a
# virtual environment of its own (.venv-latest, made anew each time): how an upstream break is
# found before a user finds it. When it passes, `make constraints` makes its versions the
# tested set (see the README's "Tested versions").
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS := constraints.txt
BIN := $(VENV)/bin
LATEST_BIN := $(LATEST_VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test test-latest constraints lint format clean

$(BIN)/kd-dist: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" -c $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c $(CONSTRAINTS)
	touch $@

install: $(BIN)/kd-dist

demo: install
	$(BIN)/kd-dist demo --output_dir demo_output

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# KD_DIST_CONSTRAINTS: tests/test_packaging.py checks that the installed versions are the pinned ones.
test: lint
	KD_DIST_CONSTRAINTS=$(CONSTRAINTS) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LATEST_BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LATEST_BIN)/python -m pip install --quiet -e ".[dev]"
	$(LATEST_BIN)/ruff check .
	$(LATEST_BIN)/ruff format --check .
	$(LATEST_BIN)/python -m pytest $(PYTEST_ARGS)
	@# Only once the suite passed; without local labels (torch's +cpu), which PyPI's wheels lack.
	$(LATEST_BIN)/python -m pip freeze --exclude-editable \
		| sed -E 's/^([^ ]+==[^+ ]+)[+].*$$/\1/' > $(LATEST_VENV)/versions.txt

# After a green `make test-latest`: its versions become the tested set (the header is kept; edit
# its date).
constraints:
	@test -f $(LATEST_VENV)/versions.txt || (echo "no green make test-latest to take versions from" && exit 1)
	(sed -n '/^#/p' $(CONSTRAINTS); echo; cat $(LATEST_VENV)/versions.txt) > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(LATEST_VENV) demo_output .pytest_cache .ruff_cache *.egg-info
