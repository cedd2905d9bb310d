"""The Prometheus side of the pipeline: a reader, its registry and ``/metrics``.

The reader's collector goes on a :class:`CollectorRegistry` of its own (the
``registry=`` argument of ``PrometheusMetricReader``), never on
prometheus_client's global ``REGISTRY``, which would add ``python_*``,
``process_*`` and ``python_gc_*`` families that are not StreamBus metrics.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.metrics_core import Metric

from telemetry.web_config import WebConfig

_logger = logging.getLogger(__name__)

_SERVER_STOP_TIMEOUT_S = 2.0
#: How long a scraper has to finish its TLS handshake; the handshake runs on the
#: connection's own thread, so a silent or plaintext client holds only that thread.
_TLS_HANDSHAKE_TIMEOUT_S = 10.0


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

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        web_config: WebConfig | None = None,
    ) -> None:
        self.scheme = "https" if web_config and web_config.ssl_context else "http"
        try:
            if web_config is None:
                server, thread = start_http_server(port, addr=host, registry=registry)
            else:
                server, thread = _start_guarded_server(registry, host, port, web_config)
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


class _TLSWSGIServer(ThreadingWSGIServer):
    """Threading WSGI server that does each TLS handshake on the connection's thread, with
    the context of that moment (renewed certificates are picked up without a restart)."""

    web_config: WebConfig | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.web_config.ssl_context if self.web_config is not None else None
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_TLS_HANDSHAKE_TIMEOUT_S)
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            # plaintext or a refused certificate: that connection only, no traceback
            _logger.debug("/metrics TLS handshake from %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def _basic_auth_app(
    app: Callable[..., Iterable[bytes]], web_config: WebConfig
) -> Callable[..., Iterable[bytes]]:
    auth = web_config.basic_auth
    headers = list(web_config.headers)
    if auth is None:
        return _with_headers(app, headers) if headers else app

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not auth.allows(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [
                    ("WWW-Authenticate", 'Basic realm="streambus"'),
                    ("Content-Type", "text/plain; charset=utf-8"),
                ],
            )
            return [b"Unauthorized\n"]
        return app(environ, start_response)

    return _with_headers(guarded, headers) if headers else guarded


def _with_headers(
    app: Callable[..., Iterable[bytes]], headers: list[tuple[str, str]]
) -> Callable[..., Iterable[bytes]]:
    """``app`` with the web config's headers added to every answer (401s included)."""

    def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, response_headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*response_headers, *headers], *exc)

        return app(environ, start)

    return answer


def _start_guarded_server(
    registry: CollectorRegistry, host: str, port: int, web_config: WebConfig
) -> tuple[WSGIServer, threading.Thread]:
    class Server(_TLSWSGIServer):
        pass

    Server.web_config = web_config

    if ":" in host:
        Server.address_family = socket.AF_INET6
    app = _basic_auth_app(make_wsgi_app(registry), web_config)
    httpd = make_server(host, port, app, Server, handler_class=_SilentHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="streambus-metrics", daemon=True)
    thread.start()
    return httpd, thread
