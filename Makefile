# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_TEST := $(VENV)/.installed-test
STAMP_DEMO := $(VENV)/.installed

.PHONY: demo test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_DEMO): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $@ $(STAMP_DEMO)

## Serve the example shop on http://127.0.0.1:5000 with the filesystem store.
demo: $(STAMP_DEMO)
	$(BIN)/flask --app examples/shop/app.py run --host 127.0.0.1 --port 5000

## Install the test extras, start the servers that are installed, run everything:
## the test suite, ruff, mypy --strict, and the docs with warnings as errors.
test: lint docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmarks (benchmarks/README.md): per-request cost, throughput, scale.
bench: $(STAMP_DEMO)
	$(BIN)/python -m pip install --quiet 'Flask-Session>=0.8,<0.9' flask-sqlalchemy msgspec redis pymemcache psycopg2-binary 'psycopg[binary]' gunicorn
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/scale.py

lint: $(STAMP_TEST)
	$(BIN)/ruff check flask_serverside tests examples benchmarks
	$(BIN)/mypy

docs: $(STAMP_TEST)
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build
