"""Audit events as OpenTelemetry log records: a `streambus serve` process with
OTEL_LOGS_EXPORTER=otlp sends them to a real Collector, whose `file` exporter writes
them; a failed SASL login arrives with its attributes and without the password."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

from tests.harness import BrokerProcess, RawClient, free_port, wait_until
from tests.test_collector import Collector, attributes, otelcol, read_otlp_file  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(120, func_only=True)

PASSWORD = "s3cret-never-logged-QWERTY"  # noqa: S105 - a test credential

LOGS_CONFIG = """\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {otlp}
processors:
  batch:
    timeout: 100ms
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
    logs:
      receivers: [otlp]
      processors: [batch]
      exporters: [file]
  telemetry:
    metrics:
      level: none
"""


def read_logs(path: Path) -> list[dict[str, Any]]:
    """Every log record in a file exporter's OTLP JSON lines, attributes flattened."""
    return [
        {**record, "attrs": attributes(record.get("attributes", []))}
        for record in read_otlp_file(path, "logs")
    ]


def test_failed_login_audit_record_reaches_the_collector(
    otelcol: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    otlp = f"127.0.0.1:{free_port()}"
    health = f"127.0.0.1:{free_port()}"
    logs_file = tmp_path / "logs.json"
    config = tmp_path / "logs.yaml"
    config.write_text(LOGS_CONFIG.format(otlp=otlp, path=logs_file, health=health))
    with contextlib.ExitStack() as stack:
        collector = Collector(otelcol, config, tmp_path / "collector.log", health, {})
        stack.callback(collector.stop)
        collector.start()
        collector.wait_healthy()
        port = free_port()
        broker = BrokerProcess(
            tmp_path / "data",
            "--listeners",
            f"SASL_PLAINTEXT://127.0.0.1:{port}",
            "--audit-log",
            str(tmp_path / "audit.log"),
            env={
                "OTEL_LOGS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": f"http://{otlp}",
                "OTEL_BLRP_SCHEDULE_DELAY": "200",
                "STREAMBUS_CONNECTION_FAILED_AUTHENTICATION_DELAY_MS": "1",
            },
        )
        broker.port = port
        stack.callback(broker.__exit__)
        broker.start()

        with RawClient(f"127.0.0.1:{port}") as raw:
            assert raw.request(SaslHandshakeRequest(mechanism="PLAIN"), 1).error_code == 0
            token = b"\0mallory\0" + PASSWORD.encode()
            reply = raw.request(SaslAuthenticateRequest(auth_bytes=token), 2)
            assert reply.error_code == 58  # SASL_AUTHENTICATION_FAILED

        def audited() -> list[dict[str, Any]]:
            return [
                r for r in read_logs(logs_file) if r["attrs"].get("audit.type") == "authentication"
            ]

        wait_until(audited, timeout=30)
        (record,) = audited()
        assert record["attrs"]["principal"] == "User:mallory"
        assert record["attrs"]["mechanism"] == "PLAIN"
        assert record["attrs"]["listener"] == "SASL_PLAINTEXT"
        assert record["attrs"]["success"] is False
        assert record["attrs"]["reason"] == "invalid_credentials"
        assert record["attrs"]["client"].startswith("127.0.0.1:")
        assert record["resource"]["service.name"] == "streambus"
        assert PASSWORD not in logs_file.read_text()
        broker.__exit__()
        assert PASSWORD not in broker.log_text()
        assert PASSWORD not in (tmp_path / "audit.log").read_text()
        assert '"principal":"User:mallory"' in (tmp_path / "audit.log").read_text()
