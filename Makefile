# Fresh machine:  make doctor   (set-up + report what this installation can do)
#                 make lint     (set-up + ruff and clang-format checks; CI runs it before the tests)
#                 make test     (set-up + C++ kernel tests + the Python test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.sdca-installed
JOBS   ?= 2
# The ROS 2 wheels, unless a ROS 2 installation is sourced (then its rclpy is used as it is).
comma  := ,
EXTRAS := dev$(if $(ROS_DISTRO),,$(comma)ros)
SOURCES := pyproject.toml setup.py constraints.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: setup test cpp-test py-test lint doctor demo bench system-deps clean

setup: $(STAMP)

# torch first, from the pinned constraints, then the package in editable mode against that torch
# (no build isolation: the extension must be compiled against the installed torch, not a fresh one).
$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q 'setuptools>=64' wheel
	$(PIP) install -q -c constraints.txt torch torchvision
	MAX_JOBS=$(JOBS) $(PIP) install -q -c constraints.txt --no-build-isolation -e '.[$(EXTRAS)]'
	touch $(STAMP)

doctor: setup
	$(BIN)/sdca doctor

# The whole pipeline on the embedded SynthDrive data (CPU, about 10 minutes on 2 cores): runs/demo/report.md
demo: setup
	$(BIN)/sdca demo

# Debian packages for the C++ builds: GoogleTest (kernel tests) and OpenCV with its DNN module (the C++
# consumer in export/). Installed here when we are root.
SYSTEM_PACKAGES := libgtest-dev libopencv-dev cmake
system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $(SYSTEM_PACKAGES) >/dev/null; \
	  else echo "the C++ builds need: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; }

cpp-test: setup system-deps
	cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(abspath $(BIN)/python) >/dev/null
	cmake --build build/cmake -j $(JOBS)
	ctest --test-dir build/cmake --output-on-failure

# SDCA_REQUIRE_EXTENSION=1: a build that silently failed to load is a test failure, not a skipped test;
# SDCA_CONSUMER: the C++ consumer cpp-test built (tests/deploy/test_cpp_consumer.py builds its own without it);
# SDCA_REQUIRE_CONSUMER=1: no OpenCV to build it with is a failure, not a skip; SDCA_REQUIRE_ROS=1: the ROS 2
# node's tests fail rather than skip without rclpy (make setup installs the wheels); DDS discovery on loopback.
py-test: setup
	SDCA_REQUIRE_EXTENSION=1 SDCA_REQUIRE_CONSUMER=1 SDCA_REQUIRE_ROS=1 \
	  SDCA_CONSUMER=$(abspath build/cmake/export/sdca_segment) ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST \
	  $(BIN)/python -m pytest -q tests

test: cpp-test py-test

# ruff (lint and import order; config in pyproject.toml) and clang-format (.clang-format) over the C++ and CUDA.
CXX_SOURCES := $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'export/*.cpp' 'export/*.h' 2>/dev/null)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/clang-format --dry-run -Werror $(CXX_SOURCES)

bench: setup
	$(BIN)/python bench/bench_kernels.py
	$(BIN)/python bench/bench_step.py
	$(BIN)/python bench/bench_infer.py
	$(BIN)/python bench/bench_synthdrive.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_loader.py
	@if [ -f runs/demo/model.onnx ]; then $(BIN)/python bench/bench_quant.py --run runs/demo; \
	  else echo "bench_quant.py needs the demo's model: run make demo first"; fi

clean:
	rm -rf build *.egg-info sdca/_C*.so
