# Set-up and everyday commands. Each target creates or refreshes .venv when needed.
# torch is pinned by constraints.txt (2.13.0: a CPU wheel on this machine's disk).

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-slow bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Tests run in a random order (pytest-randomly); the seed is printed, and SEED=N repeats an order.
SEED ?= $(shell date +%s)

test: $(STAMP)
	@echo "test order seed: $(SEED) (make test SEED=$(SEED) repeats this order)"
	$(PY) -m pytest -n 2 -q -p randomly --randomly-seed=$(SEED)

test-slow: $(STAMP)
	@echo "test order seed: $(SEED) (make test-slow SEED=$(SEED) repeats this order)"
	$(PY) -m pytest -n 2 -q -m slow -p randomly --randomly-seed=$(SEED)

bench: $(STAMP)
	$(PY) benchmarks/run.py
