"""deploy/grafana: the provisioning files agree with the dashboard, and every query of every
panel returns data from a real Prometheus scraping a broker that carries traffic; the
Replication row's from one scraping a three-broker cluster whose replicated topic carries
acks=all traffic while a follower is stopped past replica.lag.time.max.ms and resumed; the
Transactions row's from one scraping a broker whose transactional producers commit, abort, and
leave transactions open past their transaction.timeout.ms; the Schemas row's from one scraping a
broker that validates produced records against schemas and refuses some."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, BrokerThread, ClusterProcesses, RawClient, total, wait_until
from tests.test_alerts import fast_rules
from tests.test_cluster import controller, wait_cluster_size
from tests.test_cluster import metric as broker_metric
from tests.test_prometheus_server import PROMETHEUS, PrometheusServer
from tests.test_replication import REPL_ENV, create_replicated, wait_in_sync

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streambus.json"
DATASOURCE_UID = "streambus-prometheus"
PANEL_QUERIES = 80  # every target of every panel; a new panel must raise this
REPLICATION_ROW = "Replication"
REPLICATION_QUERIES = 9  # of them, in the Replication row
TRANSACTIONS_ROW = "Transactions"
TRANSACTIONS_QUERIES = 7  # of them, in the Transactions row
SCHEMAS_ROW = "Schemas"
SCHEMAS_QUERIES = 3  # of them, in the Schemas row
SECURITY_ROW = "Security"
SECURITY_QUERIES = 6  # of them, in the Security row
# Rows whose queries need more than one broker's plain traffic: each has its own live test.
OWN_TEST_ROWS = {REPLICATION_ROW, TRANSACTIONS_ROW, SCHEMAS_ROW, SECURITY_ROW}
TXN_TOPIC = "txn-orders"
REPLICATED_TOPIC = "replicated"
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


def row_of(d: dict[str, Any]) -> dict[str, str]:
    """panel title -> title of the row it sits under (rows are not collapsed: a row's panels
    follow it in the list, each below it and above the next row)."""
    out: dict[str, str] = {}
    row = ""
    for p in sorted(d["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            assert not p.get("panels"), "rows are expanded"
            row = p["title"]
        else:
            out[p["title"]] = row
    return out


def replication_queries(d: dict[str, Any], replication: bool) -> list[tuple[str, str]]:
    """The panel queries of the Replication row (``replication``), or of every other row."""
    rows = row_of(d)
    return [
        (title, e) for title, e in queries(d) if (rows[title] == REPLICATION_ROW) == replication
    ]


def row_queries(d: dict[str, Any], row: str) -> list[tuple[str, str]]:
    """The panel queries of the row titled ``row``."""
    rows = row_of(d)
    return [(title, e) for title, e in queries(d) if rows[title] == row]


def plain_queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    """The panel queries of every row without a live test of its own."""
    rows = row_of(d)
    return [(title, e) for title, e in queries(d) if rows[title] not in OWN_TEST_ROWS]


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


def test_dashboard_has_a_replication_row() -> None:
    d = dashboard()
    rows = [p["title"] for p in sorted(d["panels"], key=lambda p: p["gridPos"]["y"])]
    rows = [
        title for title in rows if title in {p["title"] for p in d["panels"] if p["type"] == "row"}
    ]
    assert rows.index(REPLICATION_ROW) == rows.index("Cluster") + 1
    replication = replication_queries(d, True)
    assert len(replication) == REPLICATION_QUERIES
    exprs = " ".join(e for _, e in replication)
    for metric_name in (
        "streambus_under_replicated_partitions",
        "streambus_under_min_isr_partitions",
        "streambus_replicas_total",
        "streambus_isr_changes_total",
        "streambus_replica_lag",
        "streambus_replication_messages_total",
        "streambus_replication_bytes_total",
    ):
        assert metric_name in exprs, metric_name
    for q in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (topic, le) "
            "(rate(streambus_replication_latency_seconds_bucket[$__rate_interval])))" in exprs
        )


def test_dashboard_has_a_transactions_row() -> None:
    d = dashboard()
    row_titles = {p["title"] for p in d["panels"] if p["type"] == "row"}
    rows = [
        p["title"]
        for p in sorted(d["panels"], key=lambda p: p["gridPos"]["y"])
        if p["title"] in row_titles
    ]
    assert rows.index(TRANSACTIONS_ROW) == rows.index(REPLICATION_ROW) + 1
    transactions = row_queries(d, TRANSACTIONS_ROW)
    assert len(transactions) == TRANSACTIONS_QUERIES
    by_title: dict[str, list[str]] = {}
    for title, e in transactions:
        by_title.setdefault(title, []).append(e)
    assert by_title["Open transactions"] == ["streambus_transactions_active"]
    assert by_title["Oldest open transaction"] == ["streambus_transaction_oldest_open_seconds"]
    rate = "[$__rate_interval]"
    assert by_title["Transactions committed and aborted per second"] == [
        f"sum by (broker_id) (rate(streambus_transactions_committed_total{rate}))",
        f"sum by (reason) (rate(streambus_transactions_aborted_total{rate}))",
    ]
    (ratio,) = by_title["Abort ratio"]
    aborted = f"sum(rate(streambus_transactions_aborted_total{rate}))"
    committed = f"sum(rate(streambus_transactions_committed_total{rate}))"
    # a broker that has only aborted has no committed series yet: 0 stands in for it
    assert ratio == f"{aborted} / ({aborted} + ({committed} or vector(0)))"
    assert by_title["Transaction duration"] == [
        f"histogram_quantile({q}, sum by (le) "
        f"(rate(streambus_transaction_duration_seconds_bucket{rate})))"
        for q in ("0.5", "0.99")
    ]


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
    panel_queries = [(title, substitute(expr)) for title, expr in plain_queries(d)]
    assert len(panel_queries) == (
        PANEL_QUERIES
        - REPLICATION_QUERIES
        - TRANSACTIONS_QUERIES
        - SCHEMAS_QUERIES
        - SECURITY_QUERIES
    )
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


def acks_all_traffic(bootstrap: str, stop: threading.Event, acked: list[int]) -> None:
    """acks=all batches to REPLICATED_TOPIC until ``stop``; counts acknowledged messages."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})

    def delivered(err: Any, _message: Any) -> None:
        if err is None:
            acked.append(1)

    while not stop.is_set():
        for i in range(20):
            producer.produce(REPLICATED_TOPIC, b"r" * 100, str(i).encode(), on_delivery=delivered)
        producer.flush(10)
        time.sleep(0.05)  # a steady trickle: the panels need rates, not load
    producer.flush(10)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_every_replication_panel_query_returns_data(tmp_path: Path) -> None:
    """Three `streambus serve` brokers, a topic with replication factor 3 and
    min.insync.replicas 2 under acks=all traffic, a follower SIGSTOPped until its leader shrinks
    the ISR (and Prometheus, evaluating alerts.yml with for: shortened, fires
    StreamBusUnderReplicatedPartitions), then SIGCONTed until it is back in the ISR: every
    Replication panel query returns data, and the figures behind them saw the follower go."""
    d = dashboard()
    panel_queries = [(title, substitute(expr)) for title, expr in replication_queries(d, True)]
    assert len(panel_queries) == REPLICATION_QUERIES

    with ClusterProcesses(tmp_path, 3, env=REPL_ENV) as cluster:
        wait_cluster_size(cluster, 3)
        create_replicated(cluster.bootstrap, REPLICATED_TOPIC, 1)
        view = wait_in_sync(cluster, REPLICATED_TOPIC, 1)[0]
        leader = cluster.brokers[view.leader]
        followers = [n for n in view.replicas if n != view.leader]
        # not the controller, when there is a choice: this is about the ISR, not Raft
        ctrl = controller(cluster)
        follower = cluster.brokers[next((n for n in followers if n != ctrl), followers[0])]
        targets = [
            b.metrics_url.removeprefix("http://").removesuffix("/metrics")
            for b in cluster.brokers.values()
        ]
        prom = PrometheusServer(tmp_path / "prom", targets, rule_files=[fast_rules(tmp_path)])
        stop = threading.Event()
        acked: list[int] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                acks_all_traffic(leader.bootstrap, stop, acked)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        try:
            wait_until(lambda: len(acked) >= 100 or errors, 30)
            assert follower.proc is not None
            follower.proc.send_signal(signal.SIGSTOP)
            try:
                wait_until(
                    lambda: (
                        (broker_metric(leader, "streambus_under_replicated_partitions") or 0) >= 1
                    ),
                    60,
                )
                # the rule fires on the real series (for: 1s here, 5m in alerts.yml)
                firing = (
                    'ALERTS{alertname="StreamBusUnderReplicatedPartitions", alertstate="firing"}'
                )
                alert = wait_until(lambda: prom.query(firing), 30, 0.5)
                assert str(view.leader) in [a["metric"]["broker_id"] for a in alert], alert
                acked_while_stopped = len(acked)
                wait_until(lambda: len(acked) >= acked_while_stopped + 100 or errors, 30)
            finally:
                follower.proc.send_signal(signal.SIGCONT)
            wait_in_sync(cluster, REPLICATED_TOPIC, 1)

            pending = list(panel_queries)
            deadline = time.monotonic() + 45
            while pending and time.monotonic() < deadline and not errors:
                pending = [(title, q) for title, q in pending if not prom.query(q)]
                time.sleep(1)
            assert not errors, errors
            assert not pending, "panel queries without data:\n" + "\n".join(
                f"  {title}: {q}" for title, q in pending
            )
            # what the panels show saw the follower leave and return
            changes = {
                s["metric"]["kind"]: float(s["value"][1])
                for s in prom.query(f'streambus_isr_changes_total{{broker_id="{view.leader}"}}')
            }
            assert changes.get("shrink", 0) >= 1, changes
            assert changes.get("expand", 0) >= 1, changes
            peak = prom.query("max_over_time(streambus_under_replicated_partitions[5m]) >= 1")
            assert str(view.leader) in [s["metric"]["broker_id"] for s in peak], peak
            topics = {s["metric"]["topic"] for s in prom.query("streambus_replica_lag")}
            assert REPLICATED_TOPIC in topics
        finally:
            stop.set()
            worker.join(30)
            prom.stop()


COMMITS, CLIENT_ABORTS, ABANDONED = 4, 3, 3


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_every_transactions_panel_query_returns_data(tmp_path: Path) -> None:
    """A broker whose coordinator checks for timed-out transactions every 200 ms, a real
    Prometheus scraping it every second (evaluating alerts.yml, ``for:`` shortened): three
    confluent-kafka transactional producers begin a transaction and vanish (transaction.timeout.ms
    3 s), another commits four and aborts three meanwhile. Every Transactions panel query
    returns data, the figures behind them are exactly the work done, the open transactions and
    their age were seen, and StreamBusTransactionTimeouts fires for the three timeouts."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    d = dashboard()
    panel_queries = [(title, substitute(expr)) for title, expr in row_queries(d, TRANSACTIONS_ROW)]
    assert len(panel_queries) == TRANSACTIONS_QUERIES

    with BrokerThread(
        tmp_path / "data",
        transaction_state_log_num_partitions=1,
        transaction_abort_timed_out_transaction_cleanup_interval_ms=200,
    ) as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic(TXN_TOPIC, 2, 1)])[TXN_TOPIC].result(15)
        target = b.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = PrometheusServer(tmp_path / "prom", target, rule_files=[fast_rules(tmp_path)])
        try:
            # Prometheus hands its targets to the scraper a few seconds after it is ready:
            # the transactions begin once it scrapes, so it sees them open.
            wait_until(lambda: prom.query("streambus_transactions_active"), 30, 0.5)
            abandoned = []
            for i in range(ABANDONED):
                producer = Producer(
                    {
                        "bootstrap.servers": b.bootstrap,
                        "transactional.id": f"vanishing-{i}",
                        "transaction.timeout.ms": 3000,
                        "linger.ms": 0,
                    }
                )
                producer.init_transactions(15)
                producer.begin_transaction()
                producer.produce(TXN_TOPIC, b"left open", partition=i % 2)
                assert producer.flush(10) == 0
                abandoned.append(producer)

            worker = Producer(
                {"bootstrap.servers": b.bootstrap, "transactional.id": "worker", "linger.ms": 5}
            )
            worker.init_transactions(15)
            for i in range(COMMITS + CLIENT_ABORTS):
                worker.begin_transaction()
                for partition in (0, 1):
                    worker.produce(TXN_TOPIC, f"record {i}".encode(), partition=partition)
                assert worker.flush(10) == 0
                if i < COMMITS:
                    worker.commit_transaction(15)
                else:
                    worker.abort_transaction(15)

            def timed_out() -> float:
                return total(b.scrape(), "streambus_transactions_aborted_total", reason="timeout")

            assert wait_until(lambda: timed_out() == ABANDONED, 30)

            firing = 'ALERTS{alertname="StreamBusTransactionTimeouts", alertstate="firing"}'
            pending = list(panel_queries)
            deadline = time.monotonic() + 30
            while (pending or not prom.query(firing)) and time.monotonic() < deadline:
                pending = [(title, q) for title, q in pending if not prom.query(q)]
                time.sleep(1)
            assert not pending, "panel queries without data:\n" + "\n".join(
                f"  {title}: {q}" for title, q in pending
            )
            (alert,) = prom.query(firing)
            assert alert["metric"]["reason"] == "timeout"

            def value(expr: str) -> float:
                (sample,) = prom.query(expr)
                return float(sample["value"][1])

            # what the panels show is the work done, through the scrape
            wait_until(
                lambda: (
                    value("sum(streambus_transaction_duration_seconds_count)")
                    == COMMITS + CLIENT_ABORTS + ABANDONED
                ),
                10,
            )
            assert value("sum(streambus_transactions_committed_total)") == COMMITS
            aborted = {
                s["metric"]["reason"]: float(s["value"][1])
                for s in prom.query("streambus_transactions_aborted_total")
            }
            assert aborted == {"client": CLIENT_ABORTS, "timeout": ABANDONED}
            # the vanished producers' transactions were seen open, then ended
            assert value("max_over_time(streambus_transactions_active[5m])") >= ABANDONED
            assert value("max_over_time(streambus_transaction_oldest_open_seconds[5m])") > 0
            wait_until(lambda: value("streambus_transactions_active") == 0, 10)
            # the clients go before the broker does
            del abandoned, producer, worker
        finally:
            prom.stop()


def test_dashboard_has_a_schemas_row() -> None:
    d = dashboard()
    rows = [
        p["title"]
        for p in sorted(d["panels"], key=lambda p: p["gridPos"]["y"])
        if p["type"] == "row"
    ]
    assert rows.index(SCHEMAS_ROW) == rows.index(TRANSACTIONS_ROW) + 1
    schemas = dict(row_queries(d, SCHEMAS_ROW))
    assert len(schemas) == SCHEMAS_QUERIES
    rate = "[$__rate_interval]"
    validated = f"sum by (topic) (rate(streambus_schema_validations_total{rate}))"
    refused = f"rate(streambus_schema_validation_errors_total{rate})"
    assert schemas["Records validated per second by topic"] == validated
    assert schemas["Records refused per second by reason"] == f"sum by (topic, reason) ({refused})"
    assert schemas["Validation error ratio by topic"] == f"sum by (topic) ({refused}) / {validated}"


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_every_schemas_panel_query_returns_data(tmp_path: Path) -> None:
    """A broker validating the values of one topic against an in-memory schema source (the
    registry's REST API is tested in test_schema_validation.py), a real Prometheus scraping
    it every second and evaluating alerts.yml (``for:`` shortened): batches of 4 records, one
    of which lacks the magic byte, are refused. Every Schemas panel query returns data, the
    figures are exactly the work done, and StreamBusSchemaValidationErrors fires."""
    from tests.test_schema_validation_checks import (
        MemorySource,
        Schema,
        batch,
        produce,
        wire,
    )

    d = dashboard()
    panel_queries = [(title, substitute(expr)) for title, expr in row_queries(d, SCHEMAS_ROW)]
    assert len(panel_queries) == SCHEMAS_QUERIES
    source = MemorySource()
    source.add("checked-value", Schema(1, "AVRO", '"string"'))
    with BrokerThread(tmp_path / "data") as b:
        b.broker.partitions.schema_validation.source = source
        b.run(b.broker.create_topic, "checked", 1, {"confluent.value.schema.validation": "true"})
        target = b.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = PrometheusServer(tmp_path / "prom", target, rule_files=[fast_rules(tmp_path)])
        firing = 'ALERTS{alertname="StreamBusSchemaValidationErrors", alertstate="firing"}'
        sent = refused = 0
        try:
            with RawClient(b.bootstrap) as client:
                pending = list(panel_queries)
                deadline = time.monotonic() + 45
                while (pending or not prom.query(firing)) and time.monotonic() < deadline:
                    good = produce(client, {("checked", 0): batch(wire(1, b"\x02a"))})
                    bad = produce(client, {("checked", 0): batch(*[wire(1)] * 3, b"plain")})
                    assert good[("checked", 0)].error_code == 0
                    assert bad[("checked", 0)].error_code == 87
                    sent, refused = sent + 5, refused + 1
                    pending = [(title, q) for title, q in pending if not prom.query(q)]
                    time.sleep(0.5)
            assert not pending, "panel queries without data:\n" + "\n".join(
                f"  {title}: {q}" for title, q in pending
            )
            (alert,) = prom.query(firing)
            assert alert["metric"]["topic"] == "checked"

            def value(expr: str) -> float:
                (sample,) = prom.query(expr)
                return float(sample["value"][1])

            assert wait_until(lambda: value("sum(streambus_schema_validations_total)") == sent, 10)
            assert (
                value('streambus_schema_validation_errors_total{reason="missing_magic_byte"}')
                == refused
            )
        finally:
            prom.stop()


def test_dashboard_has_a_security_row() -> None:
    d = dashboard()
    security = dict(row_queries(d, SECURITY_ROW))
    assert len(security) == SECURITY_QUERIES
    exprs = " ".join(security.values())
    for metric in (
        "streambus_authentication_attempts_total",
        "streambus_authentication_failures_total",
        "streambus_authorization_checks_total",
        "streambus_authorization_denials_total",
        "streambus_audit_events_logged_total",
    ):
        assert metric in exprs, metric
    assert "by (mechanism, listener, reason)" in exprs
    assert "by (operation, resource_type)" in exprs


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_every_security_panel_query_returns_data(tmp_path: Path) -> None:
    """A broker with a PLAINTEXT and a SASL_PLAINTEXT listener, the ACL authorizer on and an
    audit log, scraped every second by a real Prometheus: SASL logins (some with a wrong
    password) and anonymous produce requests denied WRITE on a topic without ACLs (each denial
    audited). Every Security panel query returns data, and the figures are exactly the work
    done."""
    from tests.test_schema_validation_checks import batch, produce
    from tests.test_security_auth import PASSWORD, WRONG, add_user, plain_login

    d = dashboard()
    panel_queries = [(title, substitute(expr)) for title, expr in row_queries(d, SECURITY_ROW)]
    assert len(panel_queries) == SECURITY_QUERIES
    with BrokerThread(
        tmp_path / "data",
        listeners="PLAINTEXT://127.0.0.1:0,SASL_PLAINTEXT://127.0.0.1:0",
        authorizer="acl",
        audit_log=tmp_path / "audit" / "audit.log",
        connection_failed_authentication_delay_ms=1,
    ) as b:
        add_user(b, "alice", PASSWORD)
        b.run(b.broker.create_topic, "secret", 1, {})
        plain = f"127.0.0.1:{b.broker.listener_port('PLAINTEXT')}"
        sasl = f"127.0.0.1:{b.broker.listener_port('SASL_PLAINTEXT')}"
        target = b.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = PrometheusServer(tmp_path / "prom", target)
        logins = failures = denials = 0
        try:
            pending = list(panel_queries)
            deadline = time.monotonic() + 45
            while pending and time.monotonic() < deadline:
                for password in (PASSWORD, WRONG):
                    with RawClient(sasl) as raw:
                        code = plain_login(raw, password).error_code
                        assert code == (0 if password == PASSWORD else 58)
                logins, failures = logins + 2, failures + 1
                with RawClient(plain) as client:
                    answer = produce(client, {("secret", 0): batch(b"x")})
                    assert answer[("secret", 0)].error_code == 29  # TOPIC_AUTHORIZATION_FAILED
                denials += 1
                pending = [(title, q) for title, q in pending if not prom.query(q)]
                time.sleep(0.5)
            assert not pending, "panel queries without data:\n" + "\n".join(
                f"  {title}: {q}" for title, q in pending
            )

            def value(expr: str) -> float:
                return sum(float(sample["value"][1]) for sample in prom.query(expr))

            assert wait_until(
                lambda: value("sum(streambus_authentication_attempts_total)") == logins, 10
            )
            assert value("sum(streambus_authentication_failures_total)") == failures
            denied = (
                'streambus_authorization_denials_total{operation="WRITE",resource_type="TOPIC"}'
            )
            assert wait_until(lambda: value(denied) == denials, 10)
            assert wait_until(
                lambda: (
                    value('streambus_audit_events_logged_total{type="authorization"}') == denials
                ),
                10,
            )
        finally:
            prom.stop()
