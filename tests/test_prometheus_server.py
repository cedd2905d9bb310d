"""A real Prometheus server scrapes a running broker; the seed's queries return data."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BrokerThread, free_port, wait_for_port, wait_until

PROMETHEUS = shutil.which("prometheus")

# The seed README's dashboard queries, the consumer-lag one included.
SEED_QUERIES = [
    "streambus_consumer_group_lag",
    "rate(streambus_messages_produced_total[1m])",
    "rate(streambus_messages_consumed_total[1m])",
    "histogram_quantile(0.95, rate(streambus_produce_latency_seconds_bucket[5m]))",
    "histogram_quantile(0.99, rate(streambus_consume_latency_seconds_bucket[5m]))",
    "streambus_broker_uptime_seconds",
    "streambus_broker_status",
    "streambus_broker_connections",
    "(streambus_storage_used_bytes / (streambus_storage_used_bytes"
    " + streambus_storage_available_bytes)) * 100",
]


class PrometheusServer:
    """A real Prometheus scraping ``target`` (one ``host:port``, or several) as job ``streambus``.

    Optional: ``rule_files`` (rules files to load, evaluated every ``scrape_interval``),
    ``alertmanagers`` (``host:port`` of Alertmanagers to send alerts to) and ``extra_args``
    (more command-line flags, e.g. ``--rules.alert.resend-delay=1s``) and ``scrape_options``
    (YAML lines added to the job, indented four spaces: ``scheme``, ``tls_config``, ...).
    """

    def __init__(
        self,
        workdir: Path,
        target: str | Sequence[str],
        scrape_interval: str = "1s",
        *,
        rule_files: Sequence[Path] = (),
        alertmanagers: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        scrape_options: str = "",
    ) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        targets = [target] if isinstance(target, str) else list(target)
        text = (
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: streambus\n"
            f"{scrape_options}"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
            "        labels: {env: 'test', service: 'streambus'}\n"
        )
        if rule_files:
            text += "rule_files:\n" + "".join(f"  - '{path}'\n" for path in rule_files)
        if alertmanagers:
            text += (
                "alerting:\n"
                "  alertmanagers:\n"
                "    - static_configs:\n"
                f"        - targets: [{', '.join(repr(a) for a in alertmanagers)}]\n"
            )
        config.write_text(text)
        assert PROMETHEUS is not None
        self._log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                *extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc, timeout=30)
        # The port opens before the TSDB is loaded; until then the API answers 503.
        wait_until(self._ready, timeout=60, interval=0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._log.close()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_prometheus_scrapes_broker_and_seed_queries_have_data(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "prom", 3, {})
        target = b.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = PrometheusServer(tmp_path / "prom", target)
        stop = threading.Event()

        def traffic() -> None:
            producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 5})
            consumer = Consumer(
                {"bootstrap.servers": b.bootstrap, "group.id": "p", "enable.auto.commit": False}
            )
            consumer.assign([TopicPartition("prom", p, 0) for p in range(3)])
            while not stop.is_set():
                for i in range(50):
                    producer.produce("prom", b"v" * 100, str(i).encode())
                producer.flush(5)
                if consumer.consume(500, 0.2):
                    consumer.commit(asynchronous=False)  # group "p" gets lag series
            consumer.close()

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            pending = list(SEED_QUERIES)
            deadline = time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                pending = [q for q in pending if not prom.query(q)]
                time.sleep(1)
            assert not pending, f"queries without data: {pending}"
            (up,) = prom.query('up{job="streambus"}')
            assert up["value"][1] == "1"
            series = prom.query('streambus_messages_produced_total{env="test",service="streambus"}')
            assert {s["metric"]["partition"] for s in series} == {"0", "1", "2"}
            assert all(s["metric"]["broker_id"] == "1" for s in series)
        finally:
            stop.set()
            worker.join(30)
            prom.stop()
