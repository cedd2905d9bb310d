"""Exporters chosen from the standard ``OTEL_*`` environment variables.

Only the *choice* is made here; each exporter reads its own endpoint, headers,
timeout and TLS variables (``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_|LOGS_]*``). The
OTLP exporters are imported only when asked for (``PLC0415`` waived): the gRPC
one alone adds about 0.3 s to start-up and is useless without a collector.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from opentelemetry.environment_variables import (
    OTEL_LOGS_EXPORTER,
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)
from opentelemetry.sdk._logs.export import LogRecordExporter
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_LOGS_ENDPOINT,
    OTEL_EXPORTER_OTLP_LOGS_PROTOCOL,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

_logger = logging.getLogger(__name__)

Protocol = Literal["grpc", "http/protobuf"]

_DEFAULT_PROTOCOL: Protocol = "grpc"
# Exporter names as OTEL_*_EXPORTER spells them, with the protocol each implies
# (None: take it from OTEL_EXPORTER_OTLP_[SIGNAL_]PROTOCOL).
_OTLP_NAMES: dict[str, Protocol | None] = {
    "otlp": None,
    "otlp_proto_grpc": "grpc",
    "otlp_proto_http": "http/protobuf",
}


def _names(variable: str, default: str) -> list[str]:
    value = os.environ.get(variable, "").strip() or default
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def _protocol(signal_variable: str) -> Protocol | None:
    value = (
        os.environ.get(signal_variable, "").strip()
        or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL, "").strip()
        or _DEFAULT_PROTOCOL
    ).lower()
    if value in ("grpc", "http/protobuf"):
        return "grpc" if value == "grpc" else "http/protobuf"
    _logger.warning("OTLP protocol %r is not supported (use grpc or http/protobuf); skipped", value)
    return None


def _otlp_span_exporter(protocol: Protocol) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def _otlp_metric_exporter(protocol: Protocol) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter()


def _otlp_log_exporter(protocol: Protocol) -> LogRecordExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (  # noqa: PLC0415
            OTLPLogExporter as GrpcLogExporter,
        )

        return GrpcLogExporter()
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # noqa: PLC0415
        OTLPLogExporter as HttpLogExporter,
    )

    return HttpLogExporter()


def span_exporters_from_env() -> list[SpanExporter]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` asks for.

    Unset means ``otlp`` when an OTLP endpoint is configured
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
    and no exporter otherwise, so a broker started without a collector does not
    retry against ``localhost:4317`` forever. An exporter that cannot be built
    is logged and left out.
    """
    endpoint_set = any(
        os.environ.get(variable, "").strip()
        for variable in (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    )
    exporters: list[SpanExporter] = []
    for name in _names(OTEL_TRACES_EXPORTER, "otlp" if endpoint_set else "none"):
        try:
            if name in _OTLP_NAMES:
                protocol = _OTLP_NAMES[name] or _protocol(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
                if protocol is not None:
                    exporters.append(_otlp_span_exporter(protocol))
            elif name == "console":
                exporters.append(ConsoleSpanExporter())
            elif name != "none":
                _logger.warning("%s=%s is not supported; skipped", OTEL_TRACES_EXPORTER, name)
        except Exception:
            _logger.exception("cannot build the %r span exporter; traces go without it", name)
    return exporters


def metric_exporters_from_env() -> list[MetricExporter]:
    """The push metric exporters ``OTEL_METRICS_EXPORTER`` asks for (default: none).

    Prometheus is not among them: the pipeline always has its pull endpoint,
    governed by ``TelemetryConfig.metrics_port``, so ``prometheus`` and
    ``none`` add nothing here.
    """
    exporters: list[MetricExporter] = []
    for name in _names(OTEL_METRICS_EXPORTER, "prometheus"):
        try:
            if name in _OTLP_NAMES:
                protocol = _OTLP_NAMES[name] or _protocol(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL)
                if protocol is not None:
                    exporters.append(_otlp_metric_exporter(protocol))
            elif name not in ("prometheus", "none"):
                _logger.warning("%s=%s is not supported; skipped", OTEL_METRICS_EXPORTER, name)
        except Exception:
            _logger.exception("cannot build the %r metric exporter; metrics go without it", name)
    return exporters


def log_exporters_from_env() -> list[LogRecordExporter]:
    """The log record exporters ``OTEL_LOGS_EXPORTER`` asks for (``otlp`` only).

    Unset means ``otlp`` when ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` is set and none
    otherwise: the shared ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone does not turn logs
    on, so a collector set up for traces and metrics is not sent a signal it has no
    pipeline for. The logs carry the audit events (``streambus/security/audit.py``).
    """
    endpoint_set = bool(os.environ.get(OTEL_EXPORTER_OTLP_LOGS_ENDPOINT, "").strip())
    exporters: list[LogRecordExporter] = []
    for name in _names(OTEL_LOGS_EXPORTER, "otlp" if endpoint_set else "none"):
        try:
            if name in _OTLP_NAMES:
                protocol = _OTLP_NAMES[name] or _protocol(OTEL_EXPORTER_OTLP_LOGS_PROTOCOL)
                if protocol is not None:
                    exporters.append(_otlp_log_exporter(protocol))
            elif name != "none":
                _logger.warning("%s=%s is not supported; skipped", OTEL_LOGS_EXPORTER, name)
        except Exception:
            _logger.exception("cannot build the %r log exporter; logs go without it", name)
    return exporters
