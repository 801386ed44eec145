# Entry points: `make demo`, `make test` and `make test-fast` (no slow, distributed or resume tests).
# Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU torch where the machine has no NVIDIA GPU; override with `make TORCH_SPEC=torch ...`.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo "torch>=2.1"; else echo "torch==2.13.0"; fi)
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlsurv demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check vlsurv qa_extraction tests scripts benchmarks
	$(PY) -m ruff format --check vlsurv qa_extraction tests scripts benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m ruff check vlsurv qa_extraction tests scripts benchmarks
	$(PY) -m ruff format --check vlsurv qa_extraction tests scripts benchmarks
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not distributed and not resume"

lint: $(STAMP)
	$(PY) -m ruff check vlsurv qa_extraction tests scripts benchmarks
	$(PY) -m ruff format --check vlsurv qa_extraction tests scripts benchmarks

clean:
	rm -rf $(VENV) runs
