"""Metrics equal the work done, read through a real HTTP scrape of /metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BrokerThread, scrape_text, total, wait_until

N = 90
SEED_TOTAL_GAUGES = {
    "streambus_topics_total",
    "streambus_partitions_total",
    "streambus_replicas_total",
    "streambus_consumer_groups_total",
    "streambus_consumer_group_members_total",
    "streambus_segments_total",
}


def messages() -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(f"key-{i}".encode(), b"v" * (10 + i), [("h", b"x" * (i % 5))]) for i in range(N)]


def payload(rows: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> int:
    return sum(len(k) + len(v) + sum(len(hk) + len(hv) for hk, hv in h) for k, v, h in rows)


def test_metrics_equal_the_work_done(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "m", 3, {})
        rows = messages()
        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 20})
        delivered: list[Any] = []
        for key, value, headers in rows:
            producer.produce(
                "m", value, key, headers=headers, on_delivery=lambda e, m: delivered.append((e, m))
            )
        assert producer.flush(10) == 0
        assert all(err is None for err, _ in delivered)
        consumer = Consumer(
            {"bootstrap.servers": b.bootstrap, "group.id": "x", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition("m", p, 0) for p in range(3)])
        got = 0
        for _ in range(100):
            got += len([m for m in consumer.consume(100, 0.3) if m.error() is None])
            if got >= N:
                break
        assert got == N
        s = b.scrape()

        per_partition = {p: sum(1 for e, m in delivered if m.partition() == p) for p in range(3)}
        for p, count in per_partition.items():
            assert (
                total(s, "streambus_messages_produced_total", topic="m", partition=str(p)) == count
            )
            assert total(s, "streambus_messages_stored_total", topic="m", partition=str(p)) == count
        assert total(s, "streambus_messages_produced_total") == N
        assert total(s, "streambus_messages_stored_total") == N
        assert total(s, "streambus_bytes_produced_total") == payload(rows)
        assert total(s, "streambus_bytes_stored_total") == payload(rows)
        assert total(s, "streambus_messages_consumed_total", topic="m") == N
        assert total(s, "streambus_bytes_consumed_total", topic="m") == payload(rows)

        produce_requests = total(s, "streambus_network_requests_total", api="Produce")
        assert produce_requests >= 1
        assert total(s, "streambus_produce_latency_seconds_count", topic="m") == produce_requests
        assert total(s, "streambus_consume_latency_seconds_count", topic="m") == total(
            s, "streambus_network_requests_total", api="Fetch"
        )
        assert total(s, "streambus_network_bytes_in_total") > payload(rows)
        assert total(s, "streambus_network_bytes_out_total") > payload(rows)

        assert total(s, "streambus_topics_total") == 1
        assert total(s, "streambus_partitions_total") == 3
        assert total(s, "streambus_replicas_total") == 3
        assert total(s, "streambus_segments_total") == 3
        assert total(s, "streambus_broker_status") == 2
        assert total(s, "streambus_broker_uptime_seconds") > 0
        assert total(s, "streambus_broker_connections") >= 2  # producer and consumer are connected
        on_disk = sum(f.stat().st_size for f in (tmp_path / "data").rglob("*.log"))
        assert total(s, "streambus_storage_used_bytes") == on_disk
        free = shutil.disk_usage(tmp_path).free
        assert abs(total(s, "streambus_storage_available_bytes") - free) < 512 * 1024 * 1024

        for (name, labels), _ in s.items():
            keys = dict(labels)
            assert keys.get("broker_id") == "1", name
            assert not any(k.startswith("otel_scope") for k in keys), name
        assert not any(name.startswith(("python_", "process_", "target_info")) for name, _ in s)

        consumer.close()
        del producer
        wait_until(lambda: total(b.scrape(), "streambus_broker_connections") == 0)


def test_active_requests_counts_a_waiting_long_poll(tmp_path: Path) -> None:
    import threading

    from tests.harness import RawClient, fetch_request

    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "quiet", 1, {})
        assert total(b.scrape(), "streambus_broker_active_requests") == 0
        request = fetch_request("quiet", max_wait_ms=3000, min_bytes=1, max_bytes=1_000_000)
        with RawClient(b.bootstrap) as client:
            waiting = threading.Thread(target=client.request, args=(request, 12))
            waiting.start()
            wait_until(lambda: total(b.scrape(), "streambus_broker_active_requests") == 1)
            waiting.join(10)
        assert total(b.scrape(), "streambus_broker_active_requests") == 0
        s = b.scrape()
        assert total(s, "streambus_consume_latency_seconds_sum", topic="quiet") >= 2.9


def test_errors_are_counted_by_api_and_error(tmp_path: Path) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    with BrokerThread(tmp_path / "data") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic("dup", 1, 1)])["dup"].result(10)
        with pytest.raises(KafkaException):
            admin.create_topics([NewTopic("dup", 1, 1)])["dup"].result(10)
        with pytest.raises(KafkaException):
            admin.create_topics([NewTopic("bad name!", 1, 1)])["bad name!"].result(10)
        s = b.scrape()
        assert (
            total(
                s,
                "streambus_network_errors_total",
                api="CreateTopics",
                error="TOPIC_ALREADY_EXISTS",
            )
            == 1
        )
        assert (
            total(
                s,
                "streambus_network_errors_total",
                api="CreateTopics",
                error="INVALID_TOPIC_EXCEPTION",
            )
            == 1
        )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with `make install`")
def test_promtool_lint(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    with BrokerThread(tmp_path / "data") as b:
        producer = Producer({"bootstrap.servers": b.bootstrap})
        producer.produce("lint", b"v", b"k")
        assert producer.flush(10) == 0
        text = scrape_text(b.metrics_url)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    flagged = {line.split()[0] for line in problems}
    assert flagged <= SEED_TOTAL_GAUGES, problems
    for line in problems:
        assert 'non-counter metrics should not have "_total" suffix' in line, line
