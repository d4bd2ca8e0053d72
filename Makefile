# ddpm-lightning: set-up, tests and the main job. Every target works from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all train lint gpu-check clean

# (Re)install when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## make test: set up, then run the default test suite (slow checks excluded)
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

## make test-all: the default suite plus the slow checks
test-all: $(STAMP)
	$(PY) -m pytest -q

## make train: set up, then train the default CPU recipe on the embedded offline data
train: $(STAMP)
	$(PY) train.py $(ARGS)

## make gpu-check: the prepared check on one CUDA GPU (<= 8 min, start-up included); writes gpu_check.json
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py --out gpu_check.json

lint: $(STAMP)
	$(VENV)/bin/ruff check ddpm_lightning tests tools train.py sample.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
