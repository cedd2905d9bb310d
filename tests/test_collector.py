"""The repo's OpenTelemetry Collector config, run for real: a `streambus serve` process exports
OTLP to a collector running otel-collector.yaml; a real Prometheus scrapes the collector's
Prometheus exporter, and a second collector (a `file` exporter) stands in for the trace backend.

The collector binary is built by deploy/otelcol/build.sh (`make otelcol`) into .tools/otelcol
when missing or when its manifest changed; that needs Go and the Go module proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, BrokerProcess, free_port, wait_until
from tests.test_prometheus_server import PROMETHEUS, PrometheusServer

# The session fixture's build is not charged to a test's timeout; the tests' own waits are.
pytestmark = pytest.mark.timeout(120, func_only=True)

OTELCOL = ROOT / ".tools" / "otelcol"
BUILD_SCRIPT = ROOT / "deploy" / "otelcol" / "build.sh"
CONFIG = ROOT / "otel-collector.yaml"

# OTLP span kinds as OTLP JSON encodes them (integers).
SERVER, PRODUCER, CONSUMER = 2, 4, 5


@pytest.fixture(scope="session")
def otelcol() -> Path:
    """.tools/otelcol, built (or rebuilt after a manifest change) by deploy/otelcol/build.sh."""
    if not OTELCOL.exists() and shutil.which("go") is None:
        pytest.fail(
            "`go` is not on PATH: these tests build the OpenTelemetry Collector "
            f"({OTELCOL.relative_to(ROOT)}) with deploy/otelcol/build.sh, which needs Go >= 1.26 "
            "and the Go module proxy"
        )
    result = subprocess.run(
        [str(BUILD_SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"deploy/otelcol/build.sh failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    assert OTELCOL.exists(), result.stdout
    return OTELCOL


def collector_env(**overrides: str) -> dict[str, str]:
    """Every address of otel-collector.yaml on a free 127.0.0.1 port (no defaults used)."""
    env = {
        "OTLP_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
        "OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
        "PROMETHEUS_ENDPOINT": f"127.0.0.1:{free_port()}",
        "HEALTH_CHECK_ENDPOINT": f"127.0.0.1:{free_port()}",
        "OTELCOL_METRICS_HOST": "127.0.0.1",
        "OTELCOL_METRICS_PORT": str(free_port()),
        "TRACE_BACKEND_ENDPOINT": f"127.0.0.1:{free_port()}",
        "DEPLOYMENT_ENVIRONMENT": "collector-test",
    }
    env.update(overrides)
    return env


class Collector:
    """An otelcol process on a config file; started, polled healthy, terminated by the test."""

    def __init__(
        self, binary: Path, config: Path, log_path: Path, health_endpoint: str, env: dict[str, str]
    ) -> None:
        self.binary = binary
        self.config = config
        self.log_path = log_path
        self.health_url = f"http://{health_endpoint}/"
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Collector:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(self.binary), "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"collector exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            # 503 (HTTPError) until the pipelines run; refused before the extension listens.
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.health_url, timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"collector not healthy after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def test_repo_config_validates(otelcol: Path) -> None:
    """`otelcol validate` accepts otel-collector.yaml: with the tests' variables, and with none
    (every `${env:NAME:-default}` default)."""
    unset = {k: v for k, v in os.environ.items() if k not in collector_env()}
    for env in ({**os.environ, **collector_env()}, unset):
        result = subprocess.run(
            [str(otelcol), "validate", "--config", str(CONFIG)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# What builder-config.yaml compiles in: the components of otel-collector.yaml, plus the `file`
# exporter that the trace-backend stand-in below uses.
COMPONENTS = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch", "resource"},
    "exporters": {"otlp_grpc", "prometheus", "debug", "file"},
    "extensions": {"health_check"},
}
TEST_ONLY = {"file"}


def test_binary_holds_exactly_the_components_the_config_uses(otelcol: Path) -> None:
    result = subprocess.run(
        [str(otelcol), "components"], capture_output=True, text=True, timeout=60, check=True
    )
    built: dict[str, set[str]] = {}
    section = ""
    for line in result.stdout.splitlines():
        if re.match(r"^[a-z]+:", line):
            section = line.split(":")[0]
        elif match := re.match(r"^ +- name: (\S+)$", line):
            built.setdefault(section, set()).add(match.group(1))
    assert {k: v for k, v in built.items() if k in COMPONENTS} == COMPONENTS, result.stdout
    config = CONFIG.read_text()
    for names in COMPONENTS.values():
        for name in names - TEST_ONLY:
            assert re.search(rf"^  {name}:$", config, re.MULTILINE), f"{name} unused"


def attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP JSON attributes ([{key, value: {stringValue|intValue|...}}]) as a plain dict."""
    out: dict[str, Any] = {}
    for item in items:
        for kind, value in item.get("value", {}).items():  # one entry, or none for an empty value
            out[item["key"]] = int(value) if kind == "intValue" else value
    return out


def read_otlp_file(path: Path, signal: str = "spans") -> list[dict[str, Any]]:
    """Every span (or, with ``signal="logs"``, log record) in a file exporter's OTLP JSON
    lines, each with its resource's attributes."""
    outer, scope, items = {
        "spans": ("resourceSpans", "scopeSpans", "spans"),
        "logs": ("resourceLogs", "scopeLogs", "logRecords"),
    }[signal]
    found: list[dict[str, Any]] = []
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        try:
            request = json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            continue
        for resource_items in request.get(outer, []):
            resource = attributes(resource_items.get("resource", {}).get("attributes", []))
            for scope_items in resource_items.get(scope, []):
                found.extend({**item, "resource": resource} for item in scope_items.get(items, []))
    return found


def read_spans(path: Path) -> list[dict[str, Any]]:
    return read_otlp_file(path, "spans")


def find(spans: list[dict[str, Any]], name: str, kind: int) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name and s.get("kind") == kind]


def linked(span: dict[str, Any]) -> set[tuple[str, str]]:
    return {(link["traceId"], link["spanId"]) for link in span.get("links", [])}


def traced_round_trip(
    stack: contextlib.ExitStack,
    bootstrap: str,
    otlp_url: str,
    topic: str,
    *,
    value: bytes,
    name: str,
) -> Any:
    """One message produced and consumed by OpenTelemetry-instrumented confluent-kafka clients
    whose spans go by OTLP to ``otlp_url`` (services ``<name>-producer``, ``<name>-consumer``);
    the consumed message, once both clients' spans are exported."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    def provider(service_name: str) -> TracerProvider:
        tp = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=otlp_url, insecure=True)
        tp.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        stack.callback(tp.shutdown)
        return tp

    producer_tp, consumer_tp = provider(f"{name}-producer"), provider(f"{name}-consumer")
    # One message in its own flush: one Produce request, so the broker's span is a child.
    producer = ConfluentKafkaInstrumentor.instrument_producer(
        Producer({"bootstrap.servers": bootstrap, "linger.ms": 0}), tracer_provider=producer_tp
    )
    producer.produce(topic=topic, value=value, key=b"k")
    assert producer.flush(15) == 0
    consumer = ConfluentKafkaInstrumentor.instrument_consumer(
        Consumer({"bootstrap.servers": bootstrap, "group.id": name, "enable.auto.commit": False}),
        tracer_provider=consumer_tp,
    )
    # The proxy forwards poll/consume/subscribe, not assign: assign on the wrapped consumer.
    consumer.original_consumer().assign([TopicPartition(topic, 0, 0)])
    message: Any = wait_until(lambda: consumer.poll(0.5), timeout=20)
    assert message.error() is None, message.error()
    consumer.poll(0.2)  # the instrumentation ends the consumer span on the next poll
    consumer.close()
    assert producer_tp.force_flush(10_000)
    assert consumer_tp.force_flush(10_000)
    return message


BACKEND_CONFIG = """\
# The trace backend stand-in: OTLP in, every request appended to a JSON-lines file.
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {otlp}
exporters:
  file:
    path: {path}
    format: json
    flush_interval: 100ms
extensions:
  health_check:
    endpoint: {health}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
  telemetry:
    metrics:
      level: none
"""


@pytest.mark.slow
def test_broker_telemetry_through_collector_to_prometheus_and_trace_backend(
    otelcol: Path, tmp_path: Path
) -> None:

    if PROMETHEUS is None:
        pytest.fail("`prometheus` is not on PATH; `make install` installs it (Debian package)")

    topic = "collector-e2e"
    environment = "collector-e2e"
    env = collector_env(DEPLOYMENT_ENVIRONMENT=environment)
    otlp_url = f"http://{env['OTLP_GRPC_ENDPOINT']}"
    backend_otlp = env["TRACE_BACKEND_ENDPOINT"]
    backend_health = f"127.0.0.1:{free_port()}"
    spans_file = tmp_path / "backend-spans.json"
    backend_config = tmp_path / "backend.yaml"
    backend_config.write_text(
        BACKEND_CONFIG.format(otlp=backend_otlp, path=spans_file, health=backend_health)
    )

    with contextlib.ExitStack() as stack:
        backend = Collector(otelcol, backend_config, tmp_path / "backend.log", backend_health, {})
        stack.callback(backend.stop)
        backend.start()
        collector = Collector(
            otelcol, CONFIG, tmp_path / "collector.log", env["HEALTH_CHECK_ENDPOINT"], env
        )
        stack.callback(collector.stop)
        collector.start()
        # Prometheus's first scrape of a new target lands ~6 s after it starts: start it now.
        prometheus = PrometheusServer(tmp_path / "prometheus", env["PROMETHEUS_ENDPOINT"])
        stack.callback(prometheus.stop)
        backend.wait_healthy()
        collector.wait_healthy()

        broker = BrokerProcess(
            tmp_path / "data",
            env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        stack.callback(broker.__exit__)
        broker.start()

        message = traced_round_trip(
            stack,
            broker.bootstrap,
            otlp_url,
            topic,
            value=b"through the collector",
            name="collector-e2e",
        )
        assert message.value() == b"through the collector"

        # Traces: producer -> collector -> backend, broker -> collector -> backend.
        def message_trace() -> tuple[dict[str, Any], ...] | None:
            spans = read_spans(spans_file)
            sends = find(spans, f"{topic} send", PRODUCER)
            produces = find(spans, f"produce {topic}", SERVER)
            processes = find(spans, f"{topic} process", CONSUMER)
            if not (sends and produces and processes):
                return None
            (send,) = sends
            context = (send["traceId"], send["spanId"])
            if not any(context in linked(f) for f in find(spans, f"fetch {topic}", SERVER)):
                return None
            return send, produces[0], processes[0]

        try:
            send, produce, process = wait_until(message_trace, timeout=20, interval=0.2)
        except TimeoutError:
            names = sorted({(s["name"], s.get("kind")) for s in read_spans(spans_file)})
            raise AssertionError(
                f"the trace backend did not get the message's spans; it has {names}\n"
                f"collector log:\n{collector.log_text()[-3000:]}"
            ) from None

        assert send["resource"]["service.name"] == "collector-e2e-producer"
        # The broker's Produce span: a child of the producer's span, in its trace (or linked).
        assert produce["resource"]["service.name"] == "streambus"
        assert produce["traceId"] == send["traceId"]
        assert produce.get("parentSpanId") == send["spanId"] or (
            (send["traceId"], send["spanId"]) in linked(produce)
        )
        produce_attributes = attributes(produce.get("attributes", []))
        assert produce_attributes["messaging.destination.name"] == topic
        assert produce_attributes["messaging.kafka.offset"] == message.offset()
        # The consumer's span links to the producer's span.
        assert process["resource"]["service.name"] == "collector-e2e-consumer"
        assert (send["traceId"], send["spanId"]) in linked(process)
        # The collector's resource processor stamped every span it passed on.
        for span in (send, produce, process):
            assert span["resource"]["deployment.environment"] == environment

        # A user with no trace backend reads the same file with `streambus traces`.
        rendered = subprocess.run(
            [
                sys.executable,
                "-m",
                "streambus",
                "traces",
                str(spans_file),
                "--trace",
                send["traceId"],
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert rendered.returncode == 0, rendered.stderr
        tree = rendered.stdout.splitlines()
        send_line = next(i for i, line in enumerate(tree) if f"{topic} send [PRODUCER]" in line)
        produce_line = next(i for i, line in enumerate(tree) if f"produce {topic} [SERVER]" in line)
        assert produce_line > send_line, rendered.stdout
        indent = len(tree[produce_line]) - len(tree[produce_line].lstrip(" │├└─"))
        assert indent > len(tree[send_line]) - len(tree[send_line].lstrip(" │├└─"))
        assert f"offset={message.offset()}" in tree[produce_line]
        assert "(streambus)" in tree[produce_line]

        # Metrics: broker -> collector -> Prometheus exporter <- real Prometheus scrape, with
        # the resource attributes as labels.
        query = (
            f'streambus_messages_produced_total{{topic="{topic}",service_name="streambus",'
            f'deployment_environment="{environment}"}}'
        )
        try:
            series = wait_until(lambda: prometheus.query(query), timeout=30, interval=0.5)
        except TimeoutError:
            with urllib.request.urlopen(f"http://{env['PROMETHEUS_ENDPOINT']}/metrics") as r:
                served = r.read().decode()
            raise AssertionError(
                f"Prometheus has no {query}; the collector serves:\n{served[-3000:]}"
            ) from None
        assert [float(s["value"][1]) for s in series] == [1.0]
        assert series[0]["metric"]["broker_id"] == "1"
        assert series[0]["metric"]["service_instance_id"] == "1"
        (up,) = prometheus.query('up{job="streambus"}')
        assert up["value"][1] == "1"
        assert prometheus.query(
            f'streambus_produce_latency_seconds_count{{deployment_environment="{environment}"}}'
        )

        # A broker exporting to a live collector still shuts down cleanly.
        assert broker.stop() == 0, broker.log_text()
        # The config uses no deprecated component name or setting (the collector warns at start).
        deprecated = [line for line in collector.log_text().splitlines() if "deprecated" in line]
        assert not deprecated, deprecated
