# Fresh machine:  make demo   (set-up + the whole pipeline on the embedded data)
#                 make test   (set-up + the test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.sdca-installed
SOURCES := pyproject.toml setup.py constraints.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: setup test doctor clean

setup: $(STAMP)

# torch first, from the pinned constraints, then the package in editable mode against that torch
# (no build isolation: the extension must be compiled against the installed torch, not a fresh one).
$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q 'setuptools>=64' wheel
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

doctor: setup
	$(BIN)/sdca doctor

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build *.egg-info sdca/_C*.so
