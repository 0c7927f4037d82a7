# Two entry points (see README): `make train` runs the default experiment on the CPU,
# `make test` runs the whole test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MULTIDEVICE_FLAGS := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: venv train test format clean

# Two stamps: `make train` installs only what a run imports; `make test` adds the test and
# parity extras (pytest, torch, transformers) on top.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e .
	touch $@

# torch is installed first and pinned: the parity extra needs the CPU build, and any other
# version would pull CUDA wheels.
$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test,parity]'
	touch $@

train: venv
	$(PY) -m gmpo_jax.main --config=configs/default.py --workdir=workdirs/default

# Single-device tests in parallel workers, then the multi-device tests in their own
# process with 8 simulated CPU devices.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --ignore=tests/multidevice
	$(MULTIDEVICE_FLAGS) $(PY) -m pytest -q tests/multidevice

# pyink (configured in pyproject.toml) over the tree, then ruff's lint rules.
FORMATTED := gmpo_jax tests experiments configs benchmarks
format: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pyink $(FORMATTED)
	$(VENV)/bin/ruff check $(FORMATTED)

clean:
	rm -rf $(VENV) workdirs
