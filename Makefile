# The two README commands: `make demo` and `make test`. Both install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixrank-installed

.PHONY: setup test lint format demo bench clean prometheus

setup: $(STAMP) prometheus

# A Prometheus server and promtool for tests/test_prometheus.py (the dashboard and alert rules
# read through a real Prometheus): Debian's package, installed where apt is available (as root)
# and they are missing; elsewhere those tests skip.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's prometheus (server and promtool)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null) || \
	      echo "make: could not install prometheus: tests/test_prometheus.py will skip"; \
	  else \
	    echo "make: no prometheus and no apt as root: tests/test_prometheus.py will skip"; \
	  fi; \
	fi

# Re-installs only when a lock file, pyproject.toml or a C extension (setup.py) changes.
$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml setup.py ranking/data/_fastrows.c serving/_fastproto.c kernels/cpu/mixer_blocks.cpp kernels/cpu/int8_blocks.cpp kernels/cpu/simd.h
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
