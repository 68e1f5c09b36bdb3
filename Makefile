# Two entry points, each does all of its own set-up on a fresh machine:
#   make test   install into .venv, lint, doctests, unit tests, notebooks
#   make demo   install into .venv, fine-tune the small model on the embedded data
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint unit notebooks demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,notebooks,bench]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: install
	$(PY) -m pytest -q -n 2 jaxnll tests

notebooks: install
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  $(PY) -m pytest -q -o addopts="" --nbmake --nbmake-timeout=600 -p no:cacheprovider notebooks; \
	else echo "no notebooks yet"; fi

test: lint unit notebooks

demo: install
	$(VENV)/bin/jaxnll train --out runs/demo

bench: install
	$(VENV)/bin/jaxnll bench --quick --out bench/results

clean:
	rm -rf $(VENV) runs .pytest_cache
