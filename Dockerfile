# onnxzip: the API and its workers, on a GPU box (CPU-only hosts work too: onnxruntime falls back).
# CUDA 13 runtime + cuDNN 9 is what the pinned onnxruntime-gpu 1.31 needs for its CUDA provider.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

# A virtualenv keeps the system Python untouched (Ubuntu 24.04 refuses system-wide pip installs).
RUN python3 -m venv /opt/onnxzip
ENV PATH=/opt/onnxzip/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY onnxzip ./onnxzip
COPY service ./service
# The same install the README gives for a scale-out box; onnxruntime-gpu is pinned to the CUDA above.
# Distillation (--distill) needs PyTorch: build with ONNXZIP_EXTRAS=scale,distill (PyPI's torch wheel brings
# its own CUDA libraries and trains on the GPU when the container has one; about 3 GB more in the image).
ARG ONNXZIP_EXTRAS=scale
RUN pip install ".[${ONNXZIP_EXTRAS}]" "onnxruntime-gpu==1.31.1"

RUN useradd --create-home --uid 10001 onnxzip && mkdir -p /data && chown onnxzip /data
USER onnxzip
WORKDIR /home/onnxzip
ENV ONNXZIP_DATA_DIR=/data ONNXZIP_HOST=0.0.0.0 ONNXZIP_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["onnxzip", "serve", "--host", "0.0.0.0", "--port", "8000"]
