# syntax=docker/dockerfile:1
# fluentforward server image: non-root, read-only-root friendly, spool on a volume.
#
#   docker build -t fluentforward:0.1.0 .
#   docker run -p 24224:24224/tcp -p 24224:24224/udp -p 24231:24231 -v ff-spool:/var/lib/fluentforward \
#       fluentforward:0.1.0
#
# Every `fluentforward serve` option can be set as FLUENTFORWARD_<OPTION> (see the README).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: install the package and its wheels into a virtualenv that the runtime stage copies.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/fluentforward
COPY pyproject.toml README.md ./
COPY fluentforward ./fluentforward
RUN /opt/fluentforward/bin/pip install . \
    && /opt/fluentforward/bin/fluentforward --version

# Runtime stage: no compiler, no build tools, no pip cache.
FROM ${PYTHON_IMAGE}
ARG UID=10001
ARG GID=10001
LABEL org.opencontainers.image.title="fluentforward" \
      org.opencontainers.image.description="Fluent Forward receiver: durable spool, W3C trace ids, Grafana Loki." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "${GID}" fluentforward \
    && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
        --home-dir /var/lib/fluentforward --shell /usr/sbin/nologin fluentforward \
    && mkdir -p /var/lib/fluentforward/spool \
    && chown -R "${UID}:${GID}" /var/lib/fluentforward
COPY --from=build /opt/fluentforward /opt/fluentforward
# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (the Helm chart mounts it so).
ENV PATH=/opt/fluentforward/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLUENTFORWARD_LISTEN=0.0.0.0:24224 \
    FLUENTFORWARD_HTTP_LISTEN=0.0.0.0:24231 \
    FLUENTFORWARD_SPOOL_DIR=/var/lib/fluentforward/spool \
    FLUENTFORWARD_LOG_FORMAT=json
USER ${UID}:${GID}
WORKDIR /var/lib/fluentforward
# The spool must outlive the container: acked data lives there until Loki has it.
VOLUME ["/var/lib/fluentforward"]
# 24224/tcp Forward, 24224/udp heartbeats, 24231/tcp /healthz /readyz /metrics.
EXPOSE 24224/tcp 24224/udp 24231/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:24231/healthz', timeout=2)"]
# SIGTERM: stop accepting, spool and ack what was received (within --shutdown-grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fluentforward"]
CMD ["serve"]
