"""The telemetry pipeline, end to end: real SDK providers, real scrapes of ``/metrics``.

Global OpenTelemetry providers can be set once per process, so every test here
runs with ``set_global=False``, and the cases about global providers run in a
subprocess of their own.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from telemetry import (
    ANY_FREE_PORT,
    LATENCY_BUCKETS,
    MetricsEndpointError,
    Pipeline,
    TelemetryConfig,
    start_pipeline,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Prometheus' default histogram boundaries in the SDK, for histograms no view touches.
SDK_DEFAULT_BUCKETS = (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment with no OTEL_* configuration."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pipeline() -> Iterator[Pipeline]:
    config = TelemetryConfig(metrics_host="127.0.0.1", metrics_port=ANY_FREE_PORT, tracing=False)
    with start_pipeline(config, set_global=False) as started:
        yield started


def scrape(pipeline: Pipeline, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics; returns (content type, body)."""
    assert pipeline.metrics_address is not None
    host, port = pipeline.metrics_address
    request = urllib.request.Request(f"http://{host}:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def samples(text: str) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_python(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["stderr"] = completed.stderr
    return result


# --- /metrics ---------------------------------------------------------------------


def test_api_measurements_reach_metrics_endpoint_with_exact_values(pipeline: Pipeline) -> None:
    meter = pipeline.meter_provider.get_meter("streambus.test", "1.0")
    produced = meter.create_counter("streambus.messages.produced", unit="{message}")
    produced.add(3, {"topic": "orders", "partition": 0})
    produced.add(4, {"topic": "orders", "partition": 0})
    produced.add(5, {"topic": "orders", "partition": 1})
    latency = meter.create_histogram("streambus.produce.latency", unit="s")
    for seconds in (0.0005, 0.003, 0.2, 7.0):
        latency.record(seconds, {"topic": "orders"})
    connections = meter.create_up_down_counter("streambus.connections", unit="{connection}")
    connections.add(3)
    connections.add(-1)

    def storage_used(_options: CallbackOptions) -> list[Observation]:
        return [Observation(4096, {"topic": "orders"})]

    meter.create_observable_gauge("streambus.storage.used", [storage_used], unit="By")

    content_type, text = scrape(pipeline)

    assert content_type.startswith("text/plain; version=0.0.4")
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples(text)}
    orders = (("topic", "orders"),)
    assert values[("streambus_messages_produced_total", (("partition", "0"), *orders))] == 7
    assert values[("streambus_messages_produced_total", (("partition", "1"), *orders))] == 5
    assert values[("streambus_storage_used_bytes", orders)] == 4096
    assert values[("streambus_connections", ())] == 2
    assert values[("streambus_produce_latency_seconds_count", orders)] == 4
    assert values[("streambus_produce_latency_seconds_sum", orders)] == pytest.approx(7.2035)
    buckets = {
        float(labels["le"]): s.value
        for s in samples(text)
        if s.name == "streambus_produce_latency_seconds_bucket"
        for labels in [s.labels]
    }
    assert list(buckets) == [*LATENCY_BUCKETS, math.inf]
    assert buckets[0.001] == 1  # 0.0005
    assert buckets[0.005] == 2  # 0.003
    assert buckets[0.1] == 2
    assert buckets[0.25] == 3  # 0.2
    assert buckets[5.0] == 3
    assert buckets[math.inf] == 4  # 7.0

    families = {(f.name, f.type) for f in text_string_to_metric_families(text)}
    assert families == {
        ("streambus_messages_produced", "counter"),
        ("streambus_produce_latency_seconds", "histogram"),
        ("streambus_connections", "gauge"),
        ("streambus_storage_used_bytes", "gauge"),
    }
    assert "otel_scope_" not in text
    assert "target_info" not in text
    assert not [line for line in text.splitlines() if line.startswith(("python_", "process_"))]


def test_exposition_parses_in_both_formats(pipeline: Pipeline) -> None:
    meter = pipeline.meter_provider.get_meter("streambus.test")
    meter.create_counter("streambus.messages.produced", unit="{message}").add(1, {"topic": "t"})
    meter.create_histogram("streambus.consume.latency", unit="s").record(0.5, {"topic": "t"})

    _, text = scrape(pipeline)
    assert {f.name for f in text_string_to_metric_families(text)} == {
        "streambus_messages_produced",
        "streambus_consume_latency_seconds",
    }
    # Prometheus 2.x asks for OpenMetrics first; that exposition must parse as well.
    content_type, om_text = scrape(pipeline, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    om = {f.name: f for f in openmetrics_families(om_text)}
    assert om["streambus_messages_produced"].type == "counter"
    assert om["streambus_consume_latency_seconds"].type == "histogram"


def test_collect_prometheus_text_needs_no_endpoint() -> None:
    config = TelemetryConfig(metrics_port=0, tracing=False)
    with start_pipeline(config, set_global=False) as pipeline:
        assert pipeline.metrics_address is None
        assert pipeline.owns_providers
        meter = pipeline.meter_provider.get_meter("streambus.test")
        meter.create_counter("streambus.messages.produced", unit="{message}").add(9)
        text = pipeline.collect_prometheus_text()
    assert [(s.name, s.value) for s in samples(text)] == [("streambus_messages_produced_total", 9)]
    assert pipeline.collect_prometheus_text() == ""  # shut down: nothing left to collect


@pytest.mark.parametrize(
    ("name", "unit", "prometheus_name", "boundaries"),
    [
        ("streambus.produce.latency", "s", "streambus_produce_latency_seconds", LATENCY_BUCKETS),
        ("streambus.request.duration", "s", "streambus_request_duration_seconds", LATENCY_BUCKETS),
        ("streambus.fetch.wait.latency", "", "streambus_fetch_wait_latency", LATENCY_BUCKETS),
        ("streambus.flush.latency", "1", "streambus_flush_latency", LATENCY_BUCKETS),
        ("streambus.batch.size", "By", "streambus_batch_size_bytes", SDK_DEFAULT_BUCKETS),
    ],
)
def test_latency_histograms_get_latency_buckets_once(
    pipeline: Pipeline,
    name: str,
    unit: str,
    prometheus_name: str,
    boundaries: tuple[float, ...],
) -> None:
    pipeline.meter_provider.get_meter("streambus.test").create_histogram(name, unit=unit).record(1)

    _, text = scrape(pipeline)

    families = list(text_string_to_metric_families(text))
    assert [f.name for f in families] == [prometheus_name]  # one stream, however many views match
    les = [float(s.labels["le"]) for s in families[0].samples if s.name.endswith("_bucket")]
    assert les == [*boundaries, math.inf]


def test_thousands_of_series_do_not_overflow(pipeline: Pipeline) -> None:
    meter = pipeline.meter_provider.get_meter("streambus.test")
    produced = meter.create_counter("streambus.messages.produced", unit="{message}")
    for partition in range(1000):
        for api in ("produce", "fetch", "list_offsets", "offset_commit"):
            produced.add(1, {"topic": "big", "partition": partition, "api": api})

    text = pipeline.collect_prometheus_text()

    series = [s for s in samples(text) if s.name == "streambus_messages_produced_total"]
    assert len(series) == 4000
    assert "otel_metric_overflow" not in text


def test_busy_port_raises_an_error_naming_host_and_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = TelemetryConfig(metrics_host="127.0.0.1", metrics_port=port, tracing=False)
        with pytest.raises(MetricsEndpointError, match=f"127.0.0.1:{port}") as raised:
            start_pipeline(config, set_global=False)
    assert isinstance(raised.value, OSError)


def test_shutdown_closes_endpoint_and_is_idempotent() -> None:
    config = TelemetryConfig(metrics_host="127.0.0.1", metrics_port=ANY_FREE_PORT, tracing=False)
    pipeline = start_pipeline(config, set_global=False)
    scrape(pipeline)
    pipeline.shutdown()
    pipeline.shutdown()
    with pytest.raises(urllib.error.URLError):
        scrape(pipeline)


def test_config_rejects_impossible_ports() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        TelemetryConfig(metrics_port=65536)
    with pytest.raises(ValueError, match="metrics_port"):
        TelemetryConfig(metrics_port=-2)


# --- resource and traces -------------------------------------------------------------


def test_resource_defaults_and_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    config = TelemetryConfig(metrics_port=0, service_name="sb", broker_id="7")
    with start_pipeline(config, set_global=False) as pipeline:
        assert isinstance(pipeline.tracer_provider, SdkTracerProvider)
        attributes = pipeline.tracer_provider.resource.attributes
    assert attributes[SERVICE_NAME] == "sb"
    assert attributes[SERVICE_INSTANCE_ID] == "7"

    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-3,deployment.id=x")
    with start_pipeline(config, set_global=False) as pipeline:
        assert isinstance(pipeline.tracer_provider, SdkTracerProvider)
        attributes = pipeline.tracer_provider.resource.attributes
    assert attributes[SERVICE_NAME] == "from-env"
    assert attributes[SERVICE_INSTANCE_ID] == "pod-3"
    assert attributes["deployment.id"] == "x"


@pytest.mark.parametrize(("sampler", "recorded"), [("always_off", 0), ("always_on", 1)])
def test_sampler_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, sampler: str, recorded: int
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    spans = InMemorySpanExporter()
    with start_pipeline(TelemetryConfig(metrics_port=0), set_global=False) as pipeline:
        assert isinstance(pipeline.tracer_provider, SdkTracerProvider)
        pipeline.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        with pipeline.tracer_provider.get_tracer("t").start_as_current_span("produce") as span:
            assert span.is_recording() is bool(recorded)
    assert len(spans.get_finished_spans()) == recorded


def test_tracing_disabled_builds_no_tracer_provider() -> None:
    config = TelemetryConfig(metrics_port=0, tracing=False)
    with start_pipeline(config, set_global=False) as pipeline:
        assert not isinstance(pipeline.tracer_provider, SdkTracerProvider)
        assert not pipeline.owns_tracer_provider
        assert pipeline.owns_meter_provider
        with pipeline.tracer_provider.get_tracer("t").start_as_current_span("x") as span:
            assert not span.is_recording()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_unreachable_collector_does_not_hold_shutdown(
    monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    port = closed_port()
    path = "" if protocol == "grpc" else "/v1/traces"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}{path}")
    threads_before = set(threading.enumerate())
    pipeline = start_pipeline(TelemetryConfig(metrics_port=0), set_global=False)
    with pipeline.tracer_provider.get_tracer("t").start_as_current_span("produce") as span:
        assert span.is_recording()
    pipeline.meter_provider.get_meter("t").create_counter("streambus.messages.produced").add(1)

    started = time.monotonic()
    pipeline.shutdown(timeout_s=1.5)
    elapsed = time.monotonic() - started

    assert elapsed < 2.5
    # The abandoned exports were cut short too: none of the pipeline's threads keeps retrying.
    give_up = time.monotonic() + 2.0
    while time.monotonic() < give_up and set(threading.enumerate()) - threads_before:
        time.sleep(0.05)
    assert [t.name for t in set(threading.enumerate()) - threads_before] == []


# --- global providers (each case in a fresh interpreter) ----------------------------------


def test_set_global_installs_ours_and_a_second_start_reuses_them() -> None:
    result = run_python(
        """
        import json, logging
        from opentelemetry import metrics, trace
        from telemetry import ANY_FREE_PORT, TelemetryConfig, start_pipeline

        logging.basicConfig(level=logging.INFO)
        config = TelemetryConfig(metrics_host="127.0.0.1", metrics_port=ANY_FREE_PORT)
        first = start_pipeline(config)
        second = start_pipeline(config)
        out = {
            "first_owns": first.owns_providers,
            "first_has_endpoint": first.metrics_address is not None,
            "first_is_global": metrics.get_meter_provider() is first.meter_provider
            and trace.get_tracer_provider() is first.tracer_provider,
            "second_owns": second.owns_providers,
            "second_address": second.metrics_address,
            "second_text": second.collect_prometheus_text(),
            "same_providers": second.meter_provider is first.meter_provider
            and second.tracer_provider is first.tracer_provider,
        }
        second.shutdown()
        first.shutdown()
        print(json.dumps(out))
        """
    )
    assert result["first_owns"] is True
    assert result["first_has_endpoint"] is True
    assert result["first_is_global"] is True
    assert result["second_owns"] is False
    assert result["second_address"] is None
    assert result["second_text"] == ""
    assert result["same_providers"] is True


def test_existing_sdk_providers_are_used_as_they_are() -> None:
    """What ``opentelemetry-instrument streambus serve`` looks like to the pipeline."""
    result = run_python(
        """
        import json, logging
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from telemetry import ANY_FREE_PORT, TelemetryConfig, start_pipeline

        logging.basicConfig(level=logging.INFO)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        trace.set_tracer_provider(TracerProvider())
        pipeline = start_pipeline(
            TelemetryConfig(metrics_host="127.0.0.1", metrics_port=ANY_FREE_PORT)
        )
        meter = pipeline.meter_provider.get_meter("t")
        meter.create_counter("streambus.messages.produced").add(2)
        data = reader.get_metrics_data()
        names = [
            m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        ]
        out = {
            "owns": pipeline.owns_providers,
            "address": pipeline.metrics_address,
            "meter_is_users": pipeline.meter_provider is metrics.get_meter_provider(),
            "tracer_is_users": pipeline.tracer_provider is trace.get_tracer_provider(),
            "user_reader_sees": names,
        }
        pipeline.shutdown()
        print(json.dumps(out))
        """
    )
    assert result["owns"] is False
    assert result["address"] is None
    assert result["meter_is_users"] is True
    assert result["tracer_is_users"] is True
    assert result["user_reader_sees"] == ["streambus.messages.produced"]
    stderr = str(result["stderr"])
    assert "existing OpenTelemetry SDK MeterProvider" in stderr
    assert "existing OpenTelemetry SDK TracerProvider" in stderr
