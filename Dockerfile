# syntax=docker/dockerfile:1
# asr-server for NVIDIA GPUs: ONNX Runtime on CUDA 12 with cuDNN 9, models on the /models volume.
#   docker build -t asr-server .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 10095:10095 \
#       -v asr-models:/models -v asr-data:/data asr-server
# The first start runs `asr-server models pull` when the model files are absent (see models/README.md):
# pre-exported ONNX files where the hub has them. WITH_TORCH=1 (the default) also installs the torch lock,
# which exports the fp32 SenseVoice a GPU wants when the hub has only the int8 graph (and which the torch
# backend uses); `--build-arg WITH_TORCH=0` builds a much smaller image that serves ONNX files only.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG WITH_TORCH=1
# WITH_RAY=1 adds Ray Serve (requirements/ray.txt): the image of a Ray cluster's nodes (docs/ray.md).
ARG WITH_RAY=0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 22.04 ships Python 3.11 in jammy-updates; libopus0 decodes the devices' audio.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libopus0 python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md requirements.txt ./
COPY requirements ./requirements
COPY asr_server ./asr_server

# Exactly the locks' versions, nothing resolved again. The GPU lock carries onnxruntime-gpu in place of
# onnxruntime (both install the module `onnxruntime`); every package the locks share has one version.
RUN pip install --require-hashes --no-deps -r requirements/build.txt \
    && if [ "$WITH_TORCH" = "1" ]; then \
           pip install --require-hashes --no-deps -r requirements/torch.txt && pip uninstall -y onnxruntime; \
       fi \
    && if [ "$WITH_RAY" = "1" ]; then \
           pip install --require-hashes --no-deps -r requirements/ray.txt && pip uninstall -y onnxruntime; \
       fi \
    && pip install --require-hashes --no-deps -r requirements/gpu.txt \
    && pip install --no-deps --no-build-isolation /app \
    && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"

COPY config.yaml ./config.yaml
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/asr-server-entrypoint

RUN groupadd --system --gid 10001 asr \
    && useradd --system --uid 10001 --gid asr --create-home --home-dir /home/asr --shell /usr/sbin/nologin asr \
    && mkdir -p /models /data \
    && chown asr:asr /models /data
COPY --chown=asr:asr models/README.md /models/README.md

# Paths on the volumes; hub caches on /models too, so an interrupted first pull resumes after a restart.
# engine.device=cuda (not auto) makes a missing GPU a loud warning rather than a quiet CPU run.
ENV ASR_SERVER__ASR__MODEL_DIR=/models/SenseVoiceSmall \
    ASR_SERVER__SPEAKER__MODEL=/models/campplus/campplus.onnx \
    ASR_SERVER__SPEAKER__DB=/data/voiceprints.sqlite \
    ASR_SERVER__ENGINE__DEVICE=cuda \
    HF_HOME=/models/.cache/huggingface \
    MODELSCOPE_CACHE=/models/.cache/modelscope

USER 10001:10001
VOLUME ["/models", "/data"]
# 8000 device WebSocket (xiaozhi), 8001 HTTP API (/v1/audio/transcriptions, /healthz, /metrics),
# 8004 /healthz, /readyz, /metrics alone (http.health_port: they answer while the API port is full;
# publish it to your scraper only), 10095 FunASR-runtime-compatible WebSocket.
EXPOSE 8000 8001 8004 10095

# The first start may spend minutes pulling and exporting the models: a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8004/healthz', timeout=4)"]

ENTRYPOINT ["asr-server-entrypoint"]
CMD ["serve"]
