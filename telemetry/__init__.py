"""The OpenTelemetry SDK pipeline of StreamBus: providers, ``/metrics``, OTLP.

The broker (package ``streambus``) records through the OpenTelemetry API only;
this package is the one place that builds SDK providers and exporters.
"""

from telemetry.pipeline import ANY_FREE_PORT, Pipeline, TelemetryConfig, start_pipeline
from telemetry.prometheus import MetricsEndpointError
from telemetry.views import LATENCY_BUCKETS
from telemetry.web_config import WebConfig, WebConfigError, load_web_config

# Constants, then types, then the entry point.
__all__ = [
    "ANY_FREE_PORT",
    "LATENCY_BUCKETS",
    "MetricsEndpointError",
    "Pipeline",
    "TelemetryConfig",
    "WebConfig",
    "WebConfigError",
    "load_web_config",
    "start_pipeline",
]
