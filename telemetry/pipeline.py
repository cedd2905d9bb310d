"""Build, install and stop the OpenTelemetry SDK pipeline of a StreamBus process.

:func:`start_pipeline` gives the broker a ``MeterProvider`` and a
``TracerProvider``. When the process already runs SDK providers (say under
``opentelemetry-instrument``), those are used as they are; otherwise the
pipeline builds its own: metrics pulled by Prometheus from ``/metrics`` (and
pushed over OTLP when ``OTEL_METRICS_EXPORTER`` asks), spans batched to the
exporters ``OTEL_TRACES_EXPORTER`` names, and, when ``OTEL_LOGS_EXPORTER`` names
an OTLP exporter, a global ``LoggerProvider`` batching log records to it (the
audit log forwards its events there through the OTel logs API). Nothing here may stall or break the
broker: exporters have bounded timeouts, :meth:`Pipeline.shutdown` has a
deadline, and failures inside telemetry are logged and dropped.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from opentelemetry import _logs, metrics, trace
from opentelemetry.sdk._logs import LoggerProvider as SdkLoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry

from telemetry.exporters import (
    log_exporters_from_env,
    metric_exporters_from_env,
    span_exporters_from_env,
)
from telemetry.prometheus import MetricsEndpointError, MetricsServer, exposition_text, new_reader
from telemetry.resource import build_resource
from telemetry.views import latency_views
from telemetry.web_config import WebConfig

_logger = logging.getLogger(__name__)

#: ``TelemetryConfig.metrics_port`` value asking for any free port (the bound
#: one is reported in ``Pipeline.metrics_address``); ``0`` means no endpoint.
ANY_FREE_PORT = -1

_MAX_PORT = 65535


@dataclass(frozen=True)
class TelemetryConfig:
    """What the pipeline needs to know; everything else comes from ``OTEL_*``."""

    metrics_host: str = "0.0.0.0"
    #: Port of ``/metrics``; ``0`` = no endpoint, :data:`ANY_FREE_PORT` = any free port.
    metrics_port: int = 9090
    #: ``service.name``; ``OTEL_SERVICE_NAME`` (or ``OTEL_RESOURCE_ATTRIBUTES``) wins when set.
    service_name: str = "streambus"
    #: ``service.instance.id``, unless the environment sets one.
    broker_id: str = "1"
    #: False: no TracerProvider is built and the broker's spans are API no-ops.
    tracing: bool = True
    #: TLS and basic auth for ``/metrics`` (Prometheus' web config); None: plain HTTP, open.
    web_config: WebConfig | None = None

    def __post_init__(self) -> None:
        if not ANY_FREE_PORT <= self.metrics_port <= _MAX_PORT:
            raise ValueError(
                f"metrics_port must be 0..{_MAX_PORT} or ANY_FREE_PORT, not {self.metrics_port}"
            )


class Pipeline:
    """The providers the broker records through, and how to stop them.

    ``meter_provider``/``tracer_provider`` are the ones to hand to the broker.
    ``owns_meter_provider``/``owns_tracer_provider`` tell whether this pipeline
    built each one (False: an SDK provider the process already had, or, for
    traces with ``tracing=False``, the API's no-op provider); ``owns_providers``
    is True when it built either. ``metrics_address`` is the bound
    ``(host, port)`` of ``/metrics``, or None when there is no endpoint.
    """

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider,
        tracer_provider: trace.TracerProvider,
        owned_meter_provider: SdkMeterProvider | None = None,
        owned_tracer_provider: SdkTracerProvider | None = None,
        owned_logger_provider: SdkLoggerProvider | None = None,
        registry: CollectorRegistry | None = None,
        server: MetricsServer | None = None,
        exporters: tuple[SpanExporter | MetricExporter | LogRecordExporter, ...] = (),
    ) -> None:
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self.owns_meter_provider = owned_meter_provider is not None
        self.owns_tracer_provider = owned_tracer_provider is not None
        #: The SDK LoggerProvider built here (OTEL_LOGS_EXPORTER), or None.
        self.logger_provider = owned_logger_provider
        self.owns_providers = (
            self.owns_meter_provider
            or self.owns_tracer_provider
            or owned_logger_provider is not None
        )
        self.metrics_address: tuple[str, int] | None = server.address if server else None
        self._owned_meter_provider = owned_meter_provider
        self._owned_tracer_provider = owned_tracer_provider
        self._registry = registry
        self._server = server
        self._exporters = exporters
        self._lock = threading.Lock()
        self._shut_down = False
        if self.owns_providers or server is not None:
            atexit.register(self._shutdown_at_exit)

    def collect_prometheus_text(self) -> str:
        """The exposition ``/metrics`` serves (or would, with no endpoint); "" without a reader."""
        if self._registry is None:
            return ""
        try:
            return exposition_text(self._registry)
        except Exception:
            _logger.exception("collecting metrics for Prometheus failed")
            return ""

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop ``/metrics``, flush and stop what this pipeline built, within ``timeout_s``.

        Idempotent. Providers the pipeline did not build are left running. When
        an exporter is still retrying an unreachable collector at the deadline,
        its export is abandoned (the exporter is shut down, which ends its
        retry wait) and this returns anyway.
        """
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        atexit.unregister(self._shutdown_at_exit)
        deadline = time.monotonic() + max(0.0, timeout_s)

        def remaining_s() -> float:
            return max(0.0, deadline - time.monotonic())

        if self._server is not None:
            try:
                self._server.stop(remaining_s())
            except Exception:
                _logger.exception("stopping the /metrics server failed")

        steps: list[tuple[str, Callable[[], object]]] = []
        if (tracer_provider := self._owned_tracer_provider) is not None:
            steps.append(("tracer provider", tracer_provider.shutdown))
        if (meter_provider := self._owned_meter_provider) is not None:
            timeout_millis = remaining_s() * 1000

            def stop_meter_provider() -> None:
                meter_provider.shutdown(timeout_millis=timeout_millis)

            steps.append(("meter provider", stop_meter_provider))
        if (logger_provider := self.logger_provider) is not None:
            steps.append(("logger provider", logger_provider.shutdown))
        threads = [_start_guarded(name, step) for name, step in steps]
        for thread in threads:
            thread.join(remaining_s())
        late = [thread.name for thread in threads if thread.is_alive()]
        if late:
            _logger.warning(
                "telemetry shutdown hit its %.1f s deadline (%s); abandoning unsent telemetry",
                timeout_s,
                ", ".join(late),
            )
            for exporter in self._exporters:
                try:
                    exporter.shutdown()
                except Exception:
                    _logger.exception("aborting exporter %r failed", exporter)

    def _shutdown_at_exit(self) -> None:
        self.shutdown()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _start_guarded(name: str, step: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        try:
            step()
        except Exception:
            _logger.exception("shutting down the %s failed", name)

    thread = threading.Thread(target=run, name=f"streambus-telemetry-stop-{name}", daemon=True)
    thread.start()
    return thread


def start_pipeline(config: TelemetryConfig, *, set_global: bool = True) -> Pipeline:
    """Give the process its telemetry pipeline (see the module docstring).

    Raises :class:`~telemetry.prometheus.MetricsEndpointError` (an ``OSError``)
    when ``/metrics`` cannot be bound on ``metrics_host:metrics_port``.
    ``set_global`` installs the providers built here as the global ones;
    OpenTelemetry allows that once per process.
    """
    existing_meter_provider = metrics.get_meter_provider()
    existing_tracer_provider = trace.get_tracer_provider()
    reuse_meter_provider = isinstance(existing_meter_provider, SdkMeterProvider)
    reuse_tracer_provider = config.tracing and isinstance(
        existing_tracer_provider, SdkTracerProvider
    )
    if reuse_meter_provider:
        _logger.info(
            "using the process's existing OpenTelemetry SDK MeterProvider; "
            "StreamBus builds no metrics pipeline and serves no /metrics endpoint of its own"
        )
    if reuse_tracer_provider:
        _logger.info(
            "using the process's existing OpenTelemetry SDK TracerProvider; "
            "StreamBus builds no trace pipeline of its own"
        )
    build_tracer_provider = config.tracing and not reuse_tracer_provider
    resource = (
        build_resource(config.service_name, config.broker_id)
        if build_tracer_provider or not reuse_meter_provider
        else None
    )

    meter_provider: metrics.MeterProvider = existing_meter_provider
    owned_meter_provider: SdkMeterProvider | None = None
    registry: CollectorRegistry | None = None
    exporters: list[SpanExporter | MetricExporter | LogRecordExporter] = []
    if resource is not None and not reuse_meter_provider:
        reader, registry = new_reader()
        metric_exporters = metric_exporters_from_env()
        exporters.extend(metric_exporters)
        readers: list[MetricReader] = [reader]
        readers.extend(PeriodicExportingMetricReader(exporter) for exporter in metric_exporters)
        owned_meter_provider = SdkMeterProvider(
            metric_readers=readers,
            resource=resource,
            views=latency_views(),
            shutdown_on_exit=False,  # Pipeline.shutdown runs at exit, with a deadline
        )
        meter_provider = owned_meter_provider

    tracer_provider: trace.TracerProvider = trace.NoOpTracerProvider()
    owned_tracer_provider: SdkTracerProvider | None = None
    if reuse_tracer_provider:
        tracer_provider = existing_tracer_provider
    elif resource is not None and build_tracer_provider:
        # The sampler is left to the SDK, which reads OTEL_TRACES_SAMPLER[_ARG].
        owned_tracer_provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
        for span_exporter in span_exporters_from_env():
            exporters.append(span_exporter)
            owned_tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        tracer_provider = owned_tracer_provider

    owned_logger_provider = _logger_provider(config, exporters)

    def assemble(server: MetricsServer | None) -> Pipeline:
        return Pipeline(
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
            owned_meter_provider=owned_meter_provider,
            owned_tracer_provider=owned_tracer_provider,
            owned_logger_provider=owned_logger_provider,
            registry=registry,
            server=server,
            exporters=tuple(exporters),
        )

    server: MetricsServer | None = None
    if registry is not None and config.metrics_port != 0:
        port = 0 if config.metrics_port == ANY_FREE_PORT else config.metrics_port
        try:
            server = MetricsServer(registry, config.metrics_host, port, config.web_config)
        except MetricsEndpointError:
            assemble(None).shutdown(timeout_s=1.0)  # undo what was built, then report
            raise
        _logger.info(
            "serving Prometheus metrics on %s://%s:%d/metrics", server.scheme, *server.address
        )
    if set_global:
        _install_globals(owned_meter_provider, owned_tracer_provider, owned_logger_provider)
    return assemble(server)


def _logger_provider(
    config: TelemetryConfig, exporters: list[SpanExporter | MetricExporter | LogRecordExporter]
) -> SdkLoggerProvider | None:
    """A LoggerProvider batching to the exporters ``OTEL_LOGS_EXPORTER`` names; None
    without any, or when the process already runs an SDK one (used as it is)."""
    if isinstance(_logs.get_logger_provider(), SdkLoggerProvider):
        _logger.info("using the process's existing OpenTelemetry SDK LoggerProvider")
        return None
    log_exporters = log_exporters_from_env()
    if not log_exporters:
        return None
    provider = SdkLoggerProvider(
        resource=build_resource(config.service_name, config.broker_id), shutdown_on_exit=False
    )
    for log_exporter in log_exporters:
        exporters.append(log_exporter)
        # bounded queue (the SDK's default 2048): a flood of events drops, never blocks
        provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
    return provider


def _install_globals(
    meter_provider: SdkMeterProvider | None,
    tracer_provider: SdkTracerProvider | None,
    logger_provider: SdkLoggerProvider | None,
) -> None:
    if meter_provider is not None:
        metrics.set_meter_provider(meter_provider)
        if metrics.get_meter_provider() is not meter_provider:
            _logger.warning("another global MeterProvider was already set; ours is not global")
    if tracer_provider is not None:
        trace.set_tracer_provider(tracer_provider)
        if trace.get_tracer_provider() is not tracer_provider:
            _logger.warning("another global TracerProvider was already set; ours is not global")
    if logger_provider is not None:
        _logs.set_logger_provider(logger_provider)
        if _logs.get_logger_provider() is not logger_provider:
            _logger.warning("another global LoggerProvider was already set; ours is not global")
