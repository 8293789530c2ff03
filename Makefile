# The two README commands: `make demo` and `make test`. Both install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixrank-installed

.PHONY: setup test lint format demo bench clean

setup: $(STAMP)

# Re-installs only when a lock file, pyproject.toml or a C extension (setup.py) changes.
$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml setup.py ranking/data/_fastrows.c serving/_fastproto.c kernels/cpu/mixer_blocks.cpp
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/mixrank demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
