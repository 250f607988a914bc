# The two commands a newcomer needs (see README.md):
#   make demo   set up .venv and run the main job (configs/demo.py) on the
#               embedded SmolLM2; WORKDIR=... picks the run directory
#   make test   set up .venv with the test oracles and run the test suite
PY := .venv/bin/python
WORKDIR ?= workdirs/demo

.PHONY: setup setup-test demo test test-slow test-all

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(PY) -m purld_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: setup-test
	$(PY) -m pytest -q -m "not slow" tests

test-slow: setup-test
	$(PY) -m pytest -q -m slow tests

test-all: setup-test
	$(PY) -m pytest -q tests
