"""`opentelemetry-instrument streambus serve`: StreamBus records through the user's SDK pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness import ROOT, free_port, wait_for_port, wait_until


def test_existing_sdk_providers_are_used_and_no_second_pipeline_is_built(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    assert instrument.exists(), "opentelemetry-distro is in the test extras"
    port, metrics_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_SERVICE_NAME": "streambus-auto",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(instrument),
                sys.executable,
                "-m",
                "streambus",
                "serve",
                "--data-dir",
                str(tmp_path / "data"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, proc)
            producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}"})
            producer.produce("auto", b"value", b"key")
            assert producer.flush(10) == 0

            def logged(words: str) -> bool:
                return words in log_path.read_text(errors="replace")

            wait_until(lambda: logged('"name": "produce auto"'), 15)
            wait_until(lambda: logged('"name": "streambus.messages.produced"'), 15)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
                served = True
            except urllib.error.URLError:
                served = False
            assert not served, (
                "the user's pipeline exports; StreamBus serves no /metrics of its own"
            )
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    output = log_path.read_text(errors="replace")
    assert "using the process's existing OpenTelemetry SDK MeterProvider" in output
    assert "using the process's existing OpenTelemetry SDK TracerProvider" in output
    assert '"service.name": "streambus-auto"' in output
