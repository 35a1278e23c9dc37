# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) the local virtual environment and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch's CPU build; the tests run real gloo all-to-all collectives with it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.epwatch-installed

.PHONY: demo test lint protos dashboards venv system-deps bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e '.[test,torch]'
	touch $(STAMP)

venv: $(STAMP)

# Debian's prometheus (promtool + server), alertmanager and chromium for the integration tests.
# Installed when absent and we are root; otherwise those tests skip and say how.
system-deps:
	@deploy/install-system-deps.sh

demo: $(STAMP)
	$(VENV)/bin/epwatch demo

test: $(STAMP) system-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m epwatch.dashboards.generate --check

protos: $(STAMP)
	$(PY) -m epwatch.protos.generate

dashboards: $(STAMP)
	$(PY) -m epwatch.dashboards.generate

bench: $(STAMP)
	$(PY) bench/simulate.py
	$(PY) bench/ingest.py
	$(PY) bench/hook_overhead.py
	$(PY) bench/agent_footprint.py
	$(PY) bench/report.py
	$(PY) bench/diagnosis_suite.py
	$(PY) bench/diagnosis_suite.py --probe counters
	$(PY) bench/counter_probe.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
