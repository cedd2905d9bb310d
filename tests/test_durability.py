"""Durability on the real on-disk log: SIGKILL mid-stream, torn tails, retention, compaction."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from streambus.structs import TopicPartition
from tests.harness import BrokerProcess, BrokerThread, scrape, total, wait_until


def consume_all(
    bootstrap: str, topic: str, partitions: int, expect: int, timeout: float = 30
) -> list[Any]:
    """Every record of ``topic`` up to each partition's high watermark (at least ``expect``).

    Reading to the ends, not to a count: a killed broker may hold more records than its
    producer saw acknowledged, and stopping at the acknowledged count would leave a
    partition half read."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "check",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
        for p in range(partitions)
    }
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[Any] = []
    reached = dict.fromkeys(range(partitions), 0)
    deadline = time.monotonic() + timeout
    while (
        len(got) < expect or any(reached[p] < ends[p] for p in reached)
    ) and time.monotonic() < deadline:
        for m in consumer.consume(500, 0.5):
            assert m.error() is None, m.error()
            got.append((m.partition(), m.offset(), m.key(), m.value()))
            reached[m.partition()] = max(reached[m.partition()], m.offset() + 1)
    # one more short poll: anything beyond the ends would show up here
    got.extend(
        (m.partition(), m.offset(), m.key(), m.value())
        for m in consumer.consume(500, 0.5)
        if m.error() is None
    )
    consumer.close()
    return got


def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    data = tmp_path / "data"
    broker = BrokerProcess(data).start()
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})  # kept alive until the result
        admin.create_topics([NewTopic("durable", 3, 1)])["durable"].result(10)
        acked: list[tuple[int, int, bytes, bytes]] = []
        lock = threading.Lock()

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                with lock:
                    acked.append((msg.partition(), msg.offset(), msg.key(), msg.value()))

        producer = Producer(
            {
                "bootstrap.servers": broker.bootstrap,
                "acks": "all",
                "linger.ms": 2,
                "message.timeout.ms": 3000,
                "enable.idempotence": True,
            }
        )
        i = 0
        killed_at = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            producer.produce(
                "durable", f"value-{i}-".encode() * 3, f"k{i}".encode(), on_delivery=on_delivery
            )
            i += 1
            producer.poll(0)
            if i % 200 == 0:
                producer.poll(0.01)
            if killed_at is None and len(acked) >= 2000:
                broker.kill()  # SIGKILL while the stream is in full flow
                killed_at = len(acked)
                break
        assert killed_at is not None, "the broker acknowledged 2000 messages before the kill"
        producer.flush(5)  # the rest fail: the broker is gone
        with lock:
            acknowledged = list(acked)
        assert len(acknowledged) >= 2000

        broker.start()
        got = consume_all(broker.bootstrap, "durable", 3, len(acknowledged))
        stored = {(p, o): (k, v) for p, o, k, v in got}
        missing = [(p, o) for p, o, k, v in acknowledged if stored.get((p, o)) != (k, v)]
        assert not missing, f"{len(missing)} acknowledged messages lost or changed"
        for p in range(3):
            offsets = sorted(o for q, o in stored if q == p)
            assert offsets == list(range(len(offsets))), "offsets stay contiguous after recovery"
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            assert broker.stop(signal.SIGTERM) == 0


def test_torn_tail_is_truncated_not_fatal(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    data = tmp_path / "data"
    broker = BrokerProcess(data).start()
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(50):
        producer.produce("torn", f"v{i}".encode(), b"k")
    assert producer.flush(10) == 0
    assert broker.stop() == 0, "SIGTERM stops the broker with exit code 0"

    (segment,) = sorted((data / "topics" / "torn").rglob("*.log"))
    good_size = segment.stat().st_size
    with open(segment, "ab") as f:  # half a batch, as a crash mid-write would leave it
        f.write(b"\x00\x00\x00\x00\x00\x00\x00\x32\x00\x00\x01\x00" + b"\x07" * 30)

    broker.start()
    try:
        wait_until(lambda: "truncat" in broker.log_text().lower())
        assert segment.stat().st_size == good_size
        producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
        delivered: list[Any] = []
        producer.produce(
            "torn", b"after", b"k", on_delivery=lambda e, m: delivered.append(m.offset())
        )
        assert producer.flush(10) == 0
        assert delivered == [50]
        got = consume_all(broker.bootstrap, "torn", 1, 51)
        assert [v for _, _, _, v in got] == [f"v{i}".encode() for i in range(50)] + [b"after"]
    finally:
        assert broker.stop() == 0


def test_retention_deletes_old_segments(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    topic_config = {"segment.bytes": "2000", "retention.ms": "60000"}
    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "old", 1, topic_config)
        producer = Producer(
            {"bootstrap.servers": b.bootstrap, "linger.ms": 0, "batch.num.messages": 1}
        )
        old = int(time.time() * 1000) - 3_600_000  # an hour old: past retention.ms
        for i in range(40):
            producer.produce("old", b"x" * 100, f"k{i}".encode(), timestamp=old)
            producer.flush(5)
        producer.produce("old", b"fresh", b"new")
        assert producer.flush(5) == 0

        def start_offset() -> int:
            return int(b.run(lambda: b.broker.logs.log(TopicPartition("old", 0)).log_start_offset))

        def segments() -> int:
            return int(b.run(lambda: b.broker.logs.log(TopicPartition("old", 0)).segment_count))

        # A retention pass may run while the old records are still being written, so the
        # expired segments can go in more than one pass: wait for the last of them.
        wait_until(lambda: start_offset() > 0 and segments() == 1)
        got = consume_all(b.bootstrap, "old", 1, 1, timeout=10)
        assert got[-1][3] == b"fresh"
        assert total(scrape(b.metrics_url), "streambus_segments_total") == 1


def test_compaction_keeps_last_value_per_key(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    config = {"cleanup.policy": "compact", "segment.bytes": "1500", "delete.retention.ms": "0"}
    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "state", 1, config)
        producer = Producer(
            {"bootstrap.servers": b.bootstrap, "linger.ms": 0, "batch.num.messages": 1}
        )
        for round_ in range(5):
            for key in range(6):
                producer.produce("state", f"{key}:{round_}".encode() * 5, f"key-{key}".encode())
                producer.flush(5)
        producer.produce("state", None, b"key-0")  # tombstone: key-0 is deleted
        for i in range(20):  # filler so the records above sit in closed segments
            producer.produce("state", b"f" * 100, f"filler-{i}".encode())
            producer.flush(5)
        assert producer.flush(5) == 0
        wait_until(lambda: total(scrape(b.metrics_url), "streambus_compactions_total") >= 1)

        got = consume_all(b.bootstrap, "state", 1, 10, timeout=10)
        latest: dict[bytes, bytes | None] = {}
        for _, _, key, value in got:
            latest[key] = value
        for key in range(1, 6):
            assert latest[f"key-{key}".encode()] == f"{key}:4".encode() * 5
        values = [v for _, _, k, v in got if k == b"key-3"]
        assert values == [b"3:4" * 5], "older values of a key are compacted away"
        assert b"key-0" not in {k for _, _, k, _ in got}, (
            "the tombstone and what it deleted are gone"
        )
        consumed = total(scrape(b.metrics_url), "streambus_bytes_consumed_total", topic="state")
        assert consumed == sum(len(k) + len(v or b"") for _, _, k, v in got), (
            "payload of rewritten batches is measured, not taken from the produce-time sizes"
        )
        offsets = [o for _, o, _, _ in got]
        assert offsets == sorted(offsets)
        assert len(set(offsets)) == len(offsets)
