# Entry points, each does all of its own set-up on a fresh machine:
#   make test       install into .venv, lint, API docs, doctests, unit tests, notebooks
#   make test-fast  lint + the library's tests only (no training, command line, benchmarks,
#                   notebooks or deviceless compiles): the quick answer while working
#   make demo       install the application (.[train]) into .venv, fine-tune the small model
#   make test-min   the library tests on the lowest versions pyproject.toml allows (.venv-min)
#   make aot        the deviceless TPU / GPU compiles (tests/test_aot.py) in .venv-aot (part of
#                   make test): libtpu and the CUDA plugin live there only, so .venv (make demo,
#                   a library user) never loads them nor prints their warnings
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TRAIN_STAMP := $(VENV)/.installed-train

MIN_VENV  := .venv-min
MIN_PY    := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed
# The [aot] extra (libtpu, jax-cuda12-plugin, ptxas) in an environment of its own.
AOT_VENV  := .venv-aot
AOT_PY    := $(AOT_VENV)/bin/python
AOT_STAMP := $(AOT_VENV)/.installed
AOT_TESTS := tests/test_aot.py
# No accelerator: both compilers run on the CPU host (see DESIGN.md, Deviceless compilation).
AOT_ENV   := JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 \
  TF_CPP_MIN_LOG_LEVEL=3
# The library's tests: they need jax, numpy, jaxtyping and the test tools only (no flax).
LIBRARY_TESTS := tests/test_spans.py tests/test_nll.py tests/test_fused.py tests/test_distill.py \
  tests/test_imports.py
# The application's modules, left out of the library's doctests.
APPLICATION := jaxnll/train jaxnll/bench jaxnll/cli.py

.PHONY: install test test-fast lint docs unit notebooks aot demo bench test-min clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,test,notebooks,bench,docs]"
	touch $(STAMP)

$(TRAIN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train]"
	touch $(TRAIN_STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: install
	$(PY) -m sphinx -W --keep-going -E -q -b html docs docs/_build/html

# Two workers; --dist worksteal hands each one half of the tests in file order and moves the
# rest of a file only when the other runs out, so a file's module-scoped runs (test_preference,
# test_teacher, test_faults ...) and the shapes its tests share compile on one worker, not on
# both as with the default (--dist load deals out small chunks).  The slowest tests are listed.
PYTEST_N2 := -n 2 --dist worksteal --durations=20

unit: install
	$(PY) -m pytest -q $(PYTEST_N2) -m "not default_compile" jaxnll tests --ignore=$(AOT_TESTS)
	XLA_FLAGS=--xla_backend_optimization_level=2 $(PY) -m pytest -q -m default_compile tests \
	  --ignore=$(AOT_TESTS)

# The library lane: tests marked `app` (tests/conftest.py) are left out.
test-fast: lint
	$(PY) -m pytest -q $(PYTEST_N2) -m "not app" jaxnll tests --ignore=$(AOT_TESTS)

notebooks: install
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  $(PY) -m pytest -q -o addopts="" -n 2 --nbmake --nbmake-timeout=600 -p no:cacheprovider notebooks; \
	else echo "no notebooks yet"; fi

test: lint docs unit notebooks aot

$(AOT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(AOT_VENV)
	$(AOT_PY) -m pip install --quiet --upgrade pip
	$(AOT_PY) -m pip install --quiet -e ".[aot,train,test]"
	touch $(AOT_STAMP)

# Compile-only figures: "compiled for TARGET, not run".  The import check first, so that
# the file fails here (never skips) if the extra did not install.
aot: $(AOT_STAMP)
	$(AOT_ENV) $(AOT_PY) -c "import libtpu, jax_cuda12_plugin"
	$(AOT_ENV) $(AOT_PY) -m pytest -q -p no:cacheprovider $(AOT_TESTS)

# The floors of the core dependencies and of [test], exactly (tools/min_requirements.py), in
# an environment of their own; rebuilt whenever pyproject.toml changes.
$(MIN_STAMP): pyproject.toml tools/min_requirements.py
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install --quiet --upgrade pip
	$(MIN_PY) -m pip install --quiet "tomli; python_version < '3.11'"
	$(MIN_PY) tools/min_requirements.py --extra test > $(MIN_VENV)/requirements.txt
	$(MIN_PY) -m pip install --quiet --only-binary=:all: -r $(MIN_VENV)/requirements.txt
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_PY) -m pip freeze | grep -iE '^(jax|jaxlib|numpy|jaxtyping)=='
	$(MIN_PY) -m pytest -q -n 2 -p no:cacheprovider jaxnll $(LIBRARY_TESTS) \
	  $(addprefix --ignore=,$(APPLICATION))

demo: $(TRAIN_STAMP)
	$(VENV)/bin/jaxnll train --pack --out runs/demo

bench: install
	$(VENV)/bin/jaxnll bench --quick --out bench/results

clean:
	rm -rf $(VENV) $(MIN_VENV) $(AOT_VENV) runs .pytest_cache docs/_build
