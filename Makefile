# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_TEST := $(VENV)/.installed-test
STAMP_DOCS := $(VENV)/.installed-docs
STAMP_DEMO := $(VENV)/.installed
STAMP_DIST := $(VENV)/.installed-dist
# A clean environment that gets only the built wheel (see `dist`).
WHEEL_VENV := build/wheel-venv
# The lowest cachelib that setup.cfg accepts, tested in a venv of its own.
CACHELIB_LOWEST := 0.15.0
LOWEST_VENV := build/cachelib-lowest-venv
# `pip -qq` shows errors only: no setuptools banner about editable installs.
PIP := $(BIN)/python -m pip install -qq

.PHONY: demo test test-cachelib-lowest lint docs dist bench clean

# The set-up steps of `make demo` run silently: a newcomer sees the server.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip

$(STAMP_DEMO): $(BIN)/python setup.cfg pyproject.toml
	@$(PIP) -e .
	@touch $@

$(STAMP_DOCS): $(BIN)/python setup.cfg pyproject.toml
	$(PIP) -e '.[docs]'
	touch $@ $(STAMP_DEMO)

$(STAMP_TEST): $(BIN)/python setup.cfg pyproject.toml
	$(PIP) -e '.[test,docs]'
	touch $@ $(STAMP_DOCS) $(STAMP_DEMO)

$(STAMP_DIST): $(BIN)/python
	$(PIP) build twine
	touch $@

## Serve the example shop on http://127.0.0.1:5000 with the filesystem store.
demo: $(STAMP_DEMO)
	@$(BIN)/flask --app examples/shop/app.py run --host 127.0.0.1 --port 5000

## Install the test extras, start the servers that are installed, run everything:
## the test suite (on the newest cachelib, then the cachelib tests again on
## the lowest one setup.cfg accepts), ruff, mypy --strict, the docs with
## warnings as errors, and the sdist and wheel (built, checked, installed in
## a clean venv).
test: lint docs dist
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-cachelib-lowest

## The tests that touch cachelib, in a venv with cachelib==$(CACHELIB_LOWEST).
test-cachelib-lowest:
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -qq -e '.[test]' 'cachelib==$(CACHELIB_LOWEST)'
	$(LOWEST_VENV)/bin/python -c 'from importlib.metadata import version as v; assert v("cachelib") == "$(CACHELIB_LOWEST)", v("cachelib")'
	$(LOWEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/test_cachelib.py tests/test_backends.py tests/test_contract.py -k 'simple or redis or memcached or cachelib'

## Benchmarks (benchmarks/README.md): per-request cost, throughput, scale.
bench: $(STAMP_DEMO)
	$(BIN)/python -m pip install --quiet 'Flask-Session>=0.8,<0.9' flask-sqlalchemy msgspec redis pymemcache psycopg2-binary 'psycopg[binary]' gunicorn
	$(BIN)/python benchmarks/run.py
	@command -v wrk >/dev/null || echo "wrk is not installed: throughput.py uses its slower asyncio client (Debian: apt-get install wrk)"
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/scale.py

lint: $(STAMP_TEST)
	$(BIN)/ruff check flask_serverside tests examples benchmarks
	$(BIN)/mypy

## The docs only need the docs extras; open docs/_build/html/index.html.
docs: $(STAMP_DOCS)
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

## Build the sdist and the wheel into dist/, check them with twine, install
## the wheel alone into a clean venv and import it from outside the checkout.
dist: $(STAMP_DIST)
	rm -rf build dist
	$(BIN)/python -m build -q --outdir dist .
	$(BIN)/twine check --strict dist/*
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -qq dist/*.whl
	cd / && $(CURDIR)/$(WHEEL_VENV)/bin/python -c 'import flask_serverside as m, pathlib as p; assert "site-packages" in m.__file__, m.__file__; assert (p.Path(m.__file__).parent / "py.typed").exists(); print("wheel OK:", m.__name__, m.__version__, "from", m.__file__)'

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build
