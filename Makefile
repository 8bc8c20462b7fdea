# The two commands of the README:
#   make demo   - set up .venv and run the main job on the embedded default dataset (digits)
#   make test   - set up .venv and run the whole test suite (what CI runs)
#   make test-fast - the tests not marked slow, for iterating (a few minutes on 2 cores)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/digits
# Pinned so every machine (and CI) resolves the same stack.  tf-keras and tensorflow-serving-api
# declare a dependency on the full `tensorflow` wheel; next to tensorflow-cpu they only need their
# own files, hence --no-deps (otherwise pip would install a second TensorFlow over the first).
NODEPS_PKGS := tf-keras==2.21.0 tensorflow-serving-api==2.21.0

.PHONY: venv test test-fast demo bazel-test benchmark format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip install -q --no-deps $(NODEPS_PKGS)
	touch $@

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 -q tests
	# Bazel smoke: builds every BUILD target and runs two of them (the full `make bazel-test`
	# would run the suite a second time, beyond the CI budget).
	bash tools/bazel_test.sh //:build_file_test //:schedules_test

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow" tests

demo: venv
	$(PY) run.py --config=configs/digits.py --workdir=$(WORKDIR) --mode=train
	$(PY) run.py --workdir=$(WORKDIR) --mode=sample
	$(PY) run.py --workdir=$(WORKDIR) --mode=eval
	$(PY) run.py --workdir=$(WORKDIR) --mode=export

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bazel-test: venv
	bash tools/bazel_test.sh

# Side by side with the PyTorch reference (tools/benchmark_reference.py, run under a torch Python):
#   make benchmark BENCH_ARGS="--reference=/path/to/improved-diffusion --reference_python=/path/to/torch/python"
BENCH_ARGS ?=
benchmark: venv
	$(PY) -m tools.benchmark --what=all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) workdir bazel-*
