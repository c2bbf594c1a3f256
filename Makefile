# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/digits_demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-slow lint bench clean

install: $(STAMP)

# Re-installs only when the pinned requirements or setup.py change, so a second run takes seconds.
$(STAMP): setup.py requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,tpu,export]'
	touch $(STAMP)

demo: install
	$(PY) -m mixer.main --config=configs/digits.py --workdir=$(WORKDIR)

# The whole suite: fast tests first, then the slow end-to-end ones.
test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mixer configs tests launch

bench: install
	$(PY) -m mixer.benchmarks.run

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
