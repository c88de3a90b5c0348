# KOA-Serve: every target that needs Python depends on the virtualenv, so a fresh clone
# needs no manual step. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/koa
RUN ?= runs/oamen
MODEL ?= oamen
WEIGHTS := weights/oamen.ckpt
EXPORT := weights/oamen.pt

.PHONY: help setup lint test test-fast bench-model train evaluate export compare clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## build .venv from requirements.txt (torch from the local wheels)

$(STAMP): requirements.txt
	@scripts/check_java.sh || echo "warning: without Java 17+ TorchServe cannot start (training still works)" >&2
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

test: $(STAMP) lint  ## lint, then the whole test suite (slow tests included; what CI runs)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)  ## the suite without slow tests
	$(PY) -m pytest -q -m "not slow"

bench-model: $(STAMP)  ## parameters, GFLOPs and CPU images/s of every registered model
	$(PY) -m train.bench_model

train: $(STAMP)  ## train OA-MEN on DATA (official protocol) into RUN
	$(PY) -m train.fit --model $(MODEL) --data $(DATA) --out $(RUN)

evaluate: $(STAMP)  ## evaluate the committed weights on DATA's val split
	$(PY) -m train.evaluate --checkpoint $(WEIGHTS) --data $(DATA) --split val --out reports/eval-val

export: $(EXPORT)  ## TorchScript export of the committed weights

$(EXPORT): $(WEIGHTS) | $(STAMP)
	$(PY) -m train.export --checkpoint $(WEIGHTS) --out $@ --images tests/fixtures/knee_kl2.png

compare: $(STAMP)  ## OA-MEN against the paper's baselines (quick budget; see train/compare.py)
	$(PY) -m train.compare --data $(DATA) --out reports/compare --quick

clean:  ## remove build outputs (keeps .venv)
	rm -rf model_store runs/tmp reports logs .pytest_cache .ruff_cache
