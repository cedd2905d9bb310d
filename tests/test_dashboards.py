"""deploy/grafana: the provisioning files agree with the dashboard, and every query of every
panel returns data from a real Prometheus scraping a broker that carries traffic."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, BrokerThread
from tests.test_prometheus_server import PROMETHEUS, PrometheusServer

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streambus.json"
DATASOURCE_UID = "streambus-prometheus"
PANEL_QUERIES = 55  # every target of every panel; a new panel must raise this
TOPIC = "orders"
GROUP = "order-readers"

# What Grafana puts in place of its variables before a query reaches Prometheus; the
# Prometheus in the test scrapes every second, so a 1m window holds enough samples.
VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "topic": TOPIC}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for p in d["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [(p["title"], t["expr"]) for p in panels(d) for t in p["targets"]]


def substitute(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in VARIABLES, f"unknown dashboard variable ${name} in {expr}"
        return VARIABLES[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)
    assert "$" not in out, out
    return out


def label_values_query(definition: str) -> tuple[str, str]:
    """``label_values(metric, label)`` as a PromQL query, and the label."""
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition)
    assert m is not None, definition
    return f"count by ({m.group(2)}) ({m.group(1)})", m.group(2)


def test_provisioning_matches_the_dashboard() -> None:
    import yaml

    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "streambus.yml").read_text()
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    d = dashboard()
    assert d["schemaVersion"] >= 39
    assert d["uid"] == "streambus"
    every = d["panels"] + [p for row in d["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    occupied: set[tuple[int, int]] = set()
    for p in every:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
    for p in panels(d):
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
        assert p["targets"], f"panel {p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
            assert t["expr"].strip(), p["title"]
    (variable,) = d["templating"]["list"]
    assert variable["name"] == "topic"
    assert variable["datasource"]["uid"] == DATASOURCE_UID
    assert variable["definition"] == "label_values(streambus_messages_produced_total, topic)"
    assert len(queries(d)) == PANEL_QUERIES


def test_dashboard_covers_the_examples_panels() -> None:
    exprs = " ".join(e for _, e in queries(dashboard()))
    for metric in (
        "streambus_messages_produced_total",
        "streambus_messages_consumed_total",
        "streambus_produce_latency_seconds_bucket",
        "streambus_consume_latency_seconds_bucket",
        "streambus_consumer_group_lag",
        "streambus_broker_uptime_seconds",
        "streambus_broker_status",
        "streambus_broker_connections",
        "streambus_broker_active_requests",
        "streambus_network_bytes_in_total",
        "streambus_network_bytes_out_total",
        "streambus_network_requests_total",
        "streambus_network_errors_total",
        "streambus_cluster_size",
        "streambus_cluster_leader",
        "streambus_controller_id",
        "streambus_raft_term",
        "streambus_raft_commit_index",
        "streambus_partitions_leader",
        "streambus_offline_partitions",
    ):
        assert metric in exprs, metric
    assert (
        "(streambus_storage_used_bytes / (streambus_storage_used_bytes"
        " + streambus_storage_available_bytes)) * 100" in exprs
    )
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(streambus_produce_latency" in exprs
        assert f"histogram_quantile({q}, sum by (le) (rate(streambus_consume_latency" in exprs
    assert 'topic=~"$topic"' in exprs


def traffic(bootstrap: str, stop: threading.Event, ready: threading.Event) -> None:
    """Produce to and consume from TOPIC, with a plain and a group consumer that commits."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    # one error, so the error panels have a series: the topic exists already
    admin = AdminClient({"bootstrap.servers": bootstrap})
    with pytest.raises(KafkaException):
        admin.create_topics([NewTopic(TOPIC, 3, 1)])[TOPIC].result(10)
    # keyed rewrites on a compacted topic with small segments: compaction passes run
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
    for i in range(60):
        producer.produce("state", b"s" * 100, f"key-{i % 6}".encode())
    producer.flush(10)
    ready.set()

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    reader = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "plain", "enable.auto.commit": False}
    )
    reader.assign([TopicPartition(TOPIC, p, 0) for p in range(3)])
    group = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": GROUP,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    group.subscribe([TOPIC])
    try:
        while not stop.is_set():
            for i in range(50):
                producer.produce(TOPIC, b"v" * 100, str(i).encode())
            producer.flush(5)
            reader.consume(500, 0.1)
            if [m for m in group.consume(200, 0.2) if m.error() is None]:
                group.commit(asynchronous=False)
    finally:
        reader.close()
        group.close()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_every_panel_query_returns_data(tmp_path: Path) -> None:
    d = dashboard()
    panel_queries = [(title, substitute(expr)) for title, expr in queries(d)]
    assert len(panel_queries) == PANEL_QUERIES
    (variable,) = d["templating"]["list"]
    variable_query, label = label_values_query(variable["definition"])

    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, TOPIC, 3, {})
        b.run(
            b.broker.create_topic,
            "state",
            1,
            {"cleanup.policy": "compact", "segment.bytes": "1500"},
        )
        target = b.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = PrometheusServer(tmp_path / "prom", target)
        stop, ready = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                traffic(b.bootstrap, stop, ready)
            except BaseException as exc:
                errors.append(exc)
                ready.set()

        worker = threading.Thread(target=run)
        worker.start()
        try:
            assert ready.wait(30)
            pending = list(panel_queries)
            deadline = time.monotonic() + 45
            while pending and time.monotonic() < deadline and not errors:
                pending = [(title, q) for title, q in pending if not prom.query(q)]
                time.sleep(1)
            assert not errors, errors
            assert not pending, "panel queries without data:\n" + "\n".join(
                f"  {title}: {q}" for title, q in pending
            )
            values = {s["metric"][label] for s in prom.query(variable_query)}
            assert {TOPIC, "state"} <= values
        finally:
            stop.set()
            worker.join(30)
            prom.stop()
