# `make test` and `make demo` do all set-up on a fresh machine: a virtual environment, the pinned
# torch, and an editable install that builds the C++ extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Rebuild the extension whenever a kernel source or the build description changes.
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: install test demo bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[test,ray,slurm]'
	touch $@

test: install
	$(PY) -m pytest tests -q

demo: install
	$(VENV)/bin/mnn-fast demo

bench: install
	$(PY) -m pytest bench --benchmark-columns=min,median,rounds -q

bench-quick: install
	MNN_BENCH_QUICK=1 $(PY) -m pytest bench --benchmark-columns=min,median,rounds -q

clean:
	rm -rf build *.egg-info mnn_fast/_C*.so
