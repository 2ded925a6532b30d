# The two commands: `make test` and (from the MAFT-loop issue on) `make demo`.
# Both bootstrap .venv from the requirements files when it is missing or stale.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: test demo venv clean-venv
DEMO_DIR ?= runs/demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-tasks.txt requirements-test.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Byte-compiled at install on purpose (68 of its 134 s): with --no-compile and
	# PYTHONDONTWRITEBYTECODE set, as on these machines, every test process
	# compiled jax, torch and transformers from source again (import 8 s, not 4).
	$(PY) -m pip install -q -r requirements.txt -r requirements-tasks.txt -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# MAFT end to end on CPU: builds the tiny base once (cached in $(DEMO_DIR)), then
# debates, selects, finetunes and evaluates; resumes if interrupted.
demo: $(STAMP)
	$(PY) -m launch.train --config=configs/demo.py --workdir=$(DEMO_DIR)

clean-venv:
	rm -rf $(VENV)
