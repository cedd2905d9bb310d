# StreamBus broker image.
#
#   docker build -t streambus .
#   docker run --rm -p 9092:9092 -p 9090:9090 -v streambus-data:/data streambus
#
# Kafka clients on 9092, Prometheus /metrics on 9090, logs and metadata in the /data volume.
# Every `streambus serve` option is also an environment variable (STREAMBUS_ADVERTISED_HOST,
# STREAMBUS_NUM_PARTITIONS, ...; see README.md), and the standard OTEL_* variables send traces
# to a collector. deploy/compose.yaml runs it with a collector, Prometheus, Alertmanager,
# Grafana and Jaeger. The entrypoint is the `streambus` command, so other subcommands run too:
#   docker run --rm -v "$PWD:/work" streambus traces /work/spans.json

# A fixed Python patch release on a fixed Debian release: rebuilding gives the same base.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package is built from (pyproject.toml names README.md as its readme).
# pyproject.toml pins every direct dependency to an exact version; pip installs those.
WORKDIR /tmp/streambus-src
COPY pyproject.toml README.md ./
COPY streambus ./streambus
COPY telemetry ./telemetry
RUN pip install . \
    && cd / && rm -rf /tmp/streambus-src

# An unprivileged user owning the data directory. /data is created (and chowned) before the
# VOLUME line so a new named volume starts out owned by this user.
RUN groupadd --system --gid 10001 streambus \
    && useradd --system --uid 10001 --gid streambus --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin streambus \
    && mkdir -p /data \
    && chown streambus:streambus /data
USER streambus:streambus
WORKDIR /data
VOLUME /data

# 9092: the Kafka protocol (STREAMBUS_PORT). 9090: Prometheus /metrics (STREAMBUS_METRICS_PORT).
EXPOSE 9092 9090

# Healthy once the Kafka listener accepts connections. A bare connect-and-close is neither a
# request nor a malformed frame: the broker logs and counts nothing for it. Python only; the
# slim image has no curl or nc.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('STREAMBUS_PORT') or 9092)), timeout=3).close()"]

# SIGTERM (docker stop) shuts the broker down gracefully: in-flight requests finish, logs are
# flushed, exit code 0. It waits up to STREAMBUS_SHUTDOWN_TIMEOUT_S (30 s) for requests, so give
# `docker stop` more than its default 10 s (compose.yaml sets stop_grace_period: 40s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["streambus"]
CMD ["serve", "--data-dir", "/data"]
