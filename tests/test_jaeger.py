"""One message's trace in a real trace backend: producer -> broker -> consumer spans travel
through the repo's Collector config (otel-collector.yaml) to Jaeger v2, and the test finds them
through Jaeger's query API, as a user would in its UI.

Jaeger is built by deploy/jaeger/build.sh (`make jaeger`) into .tools/jaeger; that needs Go and
the Go module proxy (a few minutes cold, seconds after).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, BrokerProcess, free_port, wait_until
from tests.test_collector import CONFIG, Collector, collector_env, otelcol, traced_round_trip

__all__ = ["otelcol"]  # the Collector fixture, used here too

pytestmark = pytest.mark.timeout(120, func_only=True)

JAEGER = ROOT / ".tools" / "jaeger"
BUILD_SCRIPT = ROOT / "deploy" / "jaeger" / "build.sh"

CONFIG_FILE = ROOT / "deploy" / "jaeger" / "config.yaml"  # the file the README runs


@pytest.fixture(scope="session")
def jaeger() -> Path:
    """.tools/jaeger, built (or rebuilt after a go.mod change) by deploy/jaeger/build.sh."""
    if not JAEGER.exists() and shutil.which("go") is None:
        pytest.fail(
            "`go` is not on PATH: this test builds Jaeger (.tools/jaeger) with "
            "deploy/jaeger/build.sh, which needs Go and the Go module proxy"
        )
    result = subprocess.run(
        [str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"deploy/jaeger/build.sh failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return JAEGER


def query(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def service_of(trace: dict[str, Any], span: dict[str, Any]) -> str:
    return str(trace["processes"][span["processID"]]["serviceName"])


def test_one_message_trace_through_the_collector_to_jaeger(
    otelcol: Path, jaeger: Path, tmp_path: Path
) -> None:

    topic = "jaeger-e2e"
    env = collector_env(DEPLOYMENT_ENVIRONMENT="jaeger-e2e")
    otlp_url = f"http://{env['OTLP_GRPC_ENDPOINT']}"
    jaeger_health = f"127.0.0.1:{free_port()}"
    jaeger_query = f"127.0.0.1:{free_port()}"
    api = f"http://{jaeger_query}/api"
    jaeger_env = {
        "JAEGER_HEALTH_ENDPOINT": jaeger_health,
        "JAEGER_QUERY_ENDPOINT": jaeger_query,
        "JAEGER_QUERY_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
        "JAEGER_OTLP_GRPC_ENDPOINT": env["TRACE_BACKEND_ENDPOINT"],
    }

    with contextlib.ExitStack() as stack:
        backend = Collector(jaeger, CONFIG_FILE, tmp_path / "jaeger.log", jaeger_health, jaeger_env)
        stack.callback(backend.stop)
        backend.start()
        collector = Collector(
            otelcol, CONFIG, tmp_path / "collector.log", env["HEALTH_CHECK_ENDPOINT"], env
        )
        stack.callback(collector.stop)
        collector.start()

        def jaeger_ready() -> bool:
            assert backend.proc is not None
            if backend.proc.poll() is not None:
                raise AssertionError(f"jaeger exited:\n{backend.log_text()[-3000:]}")
            with contextlib.suppress(OSError):
                return "data" in query(api, "/services")
            return False

        wait_until(jaeger_ready, 60, 0.2)
        collector.wait_healthy()

        broker = BrokerProcess(
            tmp_path / "data",
            env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        stack.callback(broker.__exit__)
        broker.start()

        message = traced_round_trip(
            stack, broker.bootstrap, otlp_url, topic, value=b"into jaeger", name="jaeger-e2e"
        )

        # The producer's trace, looked up as a user would: by service, then by trace id.
        def producer_trace() -> dict[str, Any] | None:
            with contextlib.suppress(urllib.error.URLError):
                found = query(api, "/traces", service="jaeger-e2e-producer", limit="20")
                for trace in found.get("data") or []:
                    names = {s["operationName"] for s in trace["spans"]}
                    if {f"{topic} send", f"produce {topic}"} <= names:
                        return dict(trace)
            return None

        try:
            trace = wait_until(producer_trace, timeout=30, interval=0.5)
        except TimeoutError:
            raise AssertionError(
                f"Jaeger has no trace with the send and produce spans\n"
                f"collector log:\n{collector.log_text()[-2000:]}\n"
                f"jaeger log:\n{backend.log_text()[-2000:]}"
            ) from None
        trace_id = trace["traceID"]
        whole = query(api, f"/traces/{trace_id}")["data"][0]
        spans = {s["operationName"]: s for s in whole["spans"]}
        send, produce = spans[f"{topic} send"], spans[f"produce {topic}"]
        assert service_of(whole, send) == "jaeger-e2e-producer"
        assert service_of(whole, produce) == "streambus"
        # The broker's Produce span is the producer span's child in the same trace.
        assert {"refType": "CHILD_OF", "traceID": trace_id, "spanID": send["spanID"]} in produce[
            "references"
        ]
        tags = {t["key"]: t["value"] for t in produce["tags"]}
        assert tags["messaging.destination.name"] == topic
        assert tags["messaging.kafka.offset"] == message.offset()

        # The consumer's span and the broker's Fetch span point back at the producer's span.
        def points_back(service: str, operation: str) -> bool:
            found = query(api, "/traces", service=service, limit="20")
            for other in found.get("data") or []:
                for span in other["spans"]:
                    if span["operationName"] == operation and any(
                        r["traceID"] == trace_id and r["spanID"] == send["spanID"]
                        for r in span.get("references", [])
                    ):
                        return True
            return False

        wait_until(lambda: points_back("jaeger-e2e-consumer", f"{topic} process"), 30, 0.5)
        wait_until(lambda: points_back("streambus", f"fetch {topic}"), 30, 0.5)
