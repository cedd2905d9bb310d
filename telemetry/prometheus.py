"""The Prometheus side of the pipeline: a reader, its registry and ``/metrics``.

The reader's collector goes on a :class:`CollectorRegistry` of its own (the
``registry=`` argument of ``PrometheusMetricReader``), never on
prometheus_client's global ``REGISTRY``, which would add ``python_*``,
``process_*`` and ``python_gc_*`` families that are not StreamBus metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric

_logger = logging.getLogger(__name__)

_SERVER_STOP_TIMEOUT_S = 2.0


class MetricsEndpointError(OSError):
    """The ``/metrics`` endpoint could not be opened on the configured host:port."""


class _SerialRegistry(CollectorRegistry):
    """A registry whose collections run one at a time.

    The exporter's collector passes each batch of SDK data from its
    ``collect()`` to the scrape that asked for it through a shared queue. The
    HTTP server answers each request on its own thread, so two scrapes at once
    could take each other's batch (a narrow window; not seen in practice): one
    scrape would then emit every family twice, an invalid exposition, and the
    other nothing. Collecting under a lock rules that out.
    """

    def __init__(self) -> None:
        super().__init__()
        self._collect_lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._collect_lock:
            return list(super().collect())


def new_reader() -> tuple[PrometheusMetricReader, CollectorRegistry]:
    """A reader registered on a fresh registry, emitting StreamBus metrics only.

    ``disable_target_info=True`` drops the ``target_info`` family (resource
    attributes belong to the OTLP side); ``scope_info_enabled=False`` drops the
    ``otel_scope_name``/``otel_scope_version``/``otel_scope_schema_url`` labels
    from every series.
    """
    registry = _SerialRegistry()
    reader = PrometheusMetricReader(
        disable_target_info=True,
        scope_info_enabled=False,
        registry=registry,
    )
    return reader, registry


def exposition_text(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``registry``."""
    return generate_latest(registry).decode("utf-8")


class MetricsServer:
    """prometheus_client's HTTP server for one registry, stoppable.

    It answers ``/metrics`` (and, being prometheus_client's, any other path
    but ``/favicon.ico``) with the registry's exposition, negotiating
    OpenMetrics and gzip from the request headers.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            message = f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}"
            if exc.errno is None:
                raise MetricsEndpointError(message) from exc
            raise MetricsEndpointError(exc.errno, message) from exc
        self._server: WSGIServer = server
        self._thread = thread
        bound = server.server_address
        self.address: tuple[str, int] = (str(bound[0]), int(bound[1]))

    def stop(self, timeout_s: float = _SERVER_STOP_TIMEOUT_S) -> None:
        """Stop accepting scrapes and close the socket (bounded by ``timeout_s``)."""
        # shutdown() waits for serve_forever() to notice, which takes up to its
        # 0.5 s poll interval; do it on a helper thread so a wedged server
        # cannot hold the caller past the timeout.
        stopper = threading.Thread(
            target=self._server.shutdown, name="streambus-metrics-stop", daemon=True
        )
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            _logger.warning("/metrics server on %s:%d did not stop in time", *self.address)
        self._server.server_close()
        self._thread.join(max(0.0, timeout_s))
