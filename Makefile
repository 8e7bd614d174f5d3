# `make test` and `make demo` do all set-up on a fresh machine: a virtual environment, the pinned
# torch, and an editable install that builds the C++ extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Rebuild the extension whenever a kernel source or the build description changes.
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/python/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml \
	mnn_fast/_version.py
# pytest-xdist workers: one per core. Each worker runs torch at one intra-op thread (tests/conftest.py);
# tests that claim something at a thread count set it themselves.
TEST_WORKERS ?= auto

.PHONY: install test demo docs bench bench-quick check-package clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[test,docs,ray,slurm]'
	touch $@

test: install docs
	$(PY) -m pytest tests -q -n $(TEST_WORKERS)

demo: install
	$(VENV)/bin/mnn-fast demo

# The documentation site (Sphinx, furo, MyST): warnings are errors; nothing is fetched at build time.
docs: install
	rm -rf docs/_build docs/generated
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

bench: install
	mkdir -p bench/results
	MNN_BENCH_COMMAND="make bench" $(PY) -m pytest bench --benchmark-columns=min,median,rounds -q \
		--benchmark-json=bench/results/pytest-benchmark.json

bench-quick: install
	mkdir -p bench/results
	MNN_BENCH_QUICK=1 MNN_BENCH_COMMAND="make bench-quick" $(PY) -m pytest bench --benchmark-columns=min,median,rounds -q \
		--benchmark-json=bench/results/pytest-benchmark.json

# Copies the last run's tables (bench/results/*.json) into docs/benchmarks/ and renders docs/benchmarks.md
# and the README's speed table from them; `$(PY) bench/render_docs.py --check` says whether they are current.
.PHONY: bench-docs
bench-docs:
	$(PY) bench/render_docs.py --update-from bench/results

# The package as a user installs it: sdist, wheel from the sdist, a fresh venv outside the tree.
check-package: install
	bash .ci/check_package.sh

clean:
	rm -rf build *.egg-info mnn_fast/_C*.so mnn_fast/_serving*.so docs/_build docs/generated
