"""Round trips with unmodified Kafka clients: confluent-kafka, kafka-python, aiokafka and kcat.

Each creates a 3-partition topic, produces records with keys, headers and
timestamps, and reads them back: byte-identical, with contiguous offsets.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BrokerThread

N = 60
PARTITIONS = 3
BASE_TS = 1_700_000_000_000


def dataset() -> list[tuple[bytes, bytes, list[tuple[str, bytes]], int]]:
    """Keys, values with every byte value in them, two headers, and distinct timestamps."""
    out = []
    for i in range(N):
        value = bytes(range(256))[i % 200 :] + f"-payload-{i}".encode()
        headers = [("trace-id", f"t{i}".encode()), ("blob", bytes([i, 0, 255]))]
        out.append((f"key-{i % 7}".encode(), value, headers, BASE_TS + i * 1000))
    return out


def check_round_trip(
    got: list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes]], int]],
    sent: list[tuple[bytes, bytes, list[tuple[str, bytes]], int]],
) -> None:
    """``got`` rows are (partition, offset, key, value, headers, timestamp)."""
    assert len(got) == len(sent)
    by_partition: dict[int, list[int]] = defaultdict(list)
    for partition, offset, *_ in got:
        by_partition[partition].append(offset)
    for offsets in by_partition.values():
        assert sorted(offsets) == list(range(len(offsets))), "offsets are contiguous from 0"
    assert len(by_partition) > 1, "keys spread over partitions"
    want = sorted((k, v, [(hk, hv) for hk, hv in h], ts) for k, v, h, ts in sent)
    have = sorted((k, v, [(hk, bytes(hv)) for hk, hv in h], ts) for _, _, k, v, h, ts in got)
    assert have == want


def test_confluent_kafka_round_trip(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    with BrokerThread(tmp_path / "data") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        futures = admin.create_topics(
            [NewTopic("ck", num_partitions=PARTITIONS, replication_factor=1)]
        )
        futures["ck"].result(10)
        sent = dataset()
        producer = Producer(
            {"bootstrap.servers": b.bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )
        errors: list[Any] = []
        for key, value, headers, ts in sent:
            producer.produce(
                "ck",
                value,
                key,
                headers=headers,
                timestamp=ts,
                on_delivery=lambda err, _m: err and errors.append(err),
            )
        assert producer.flush(15) == 0
        assert not errors
        consumer = Consumer(
            {"bootstrap.servers": b.bootstrap, "group.id": "unused", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition("ck", p, 0) for p in range(PARTITIONS)])
        got: list[Any] = []
        for _ in range(200):
            if len(got) >= N:
                break
            for m in consumer.consume(100, 0.5):
                assert m.error() is None, m.error()
                got.append(
                    (
                        m.partition(),
                        m.offset(),
                        m.key(),
                        m.value(),
                        m.headers() or [],
                        m.timestamp()[1],
                    )
                )
        consumer.close()
        check_round_trip(got, sent)


def test_kafka_python_round_trip(tmp_path: Path) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic

    with BrokerThread(tmp_path / "data") as b:
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
        admin.create_topics([NewTopic("kp", PARTITIONS, 1)])
        admin.close()
        sent = dataset()
        # kafka-python's producer is idempotent by default: this exercises InitProducerId.
        producer = KafkaProducer(bootstrap_servers=b.bootstrap, linger_ms=5)
        futures = [
            producer.send("kp", value=v, key=k, headers=h, timestamp_ms=ts) for k, v, h, ts in sent
        ]
        producer.flush(15)
        assert all(f.get(10).offset >= 0 for f in futures)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False)
        consumer.assign([TopicPartition("kp", p) for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        got: list[Any] = []
        for _ in range(60):
            if len(got) >= N:
                break
            for records in consumer.poll(500).values():
                got.extend(
                    (r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp)
                    for r in records
                )
        consumer.close()
        check_round_trip(got, sent)


def test_aiokafka_round_trip(tmp_path: Path) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    sent = dataset()

    async def run(bootstrap: str) -> list[Any]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic("ak", PARTITIONS, 1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            for k, v, h, ts in sent:
                await producer.send("ak", v, key=k, headers=h, timestamp_ms=ts)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        got: list[Any] = []
        try:
            consumer.assign([TopicPartition("ak", p) for p in range(PARTITIONS)])
            await consumer.seek_to_beginning()
            while len(got) < N:
                batch = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 15)
                for records in batch.values():
                    got.extend(
                        (r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp)
                        for r in records
                    )
        finally:
            await consumer.stop()
        return got

    with BrokerThread(tmp_path / "data") as b:
        got = asyncio.run(run(b.bootstrap))
        check_round_trip(got, sent)


KCAT = shutil.which("kcat")


@pytest.mark.skipif(KCAT is None, reason="kcat is installed by `make install`")
def test_kcat_round_trip(tmp_path: Path) -> None:
    assert KCAT is not None
    with BrokerThread(tmp_path / "data", num_partitions=PARTITIONS) as b:
        # kcat has no CreateTopics: the topic is auto-created with num.partitions=3.
        lines = [f"key-{i}\tvalue-{i}" for i in range(N)]
        produce = subprocess.run(
            [KCAT, "-b", b.bootstrap, "-P", "-t", "kc", "-K", "\t", "-H", "origin=kcat"],
            input="\n".join(lines) + "\n",
            text=True,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert produce.returncode == 0, produce.stderr
        consume = subprocess.run(
            [
                KCAT,
                "-b",
                b.bootstrap,
                "-C",
                "-t",
                "kc",
                "-o",
                "beginning",
                "-e",
                "-q",
                "-f",
                "%p|%o|%k|%s|%h\n",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert consume.returncode == 0, consume.stderr
        rows = [line.split("|") for line in consume.stdout.splitlines() if line]
        assert len(rows) == N
        by_partition: dict[str, list[int]] = defaultdict(list)
        for partition, offset, key, value, headers in rows:
            by_partition[partition].append(int(offset))
            assert value == "value-" + key.removeprefix("key-")
            assert headers == "origin=kcat"
        assert len(by_partition) == PARTITIONS
        for offsets in by_partition.values():
            assert sorted(offsets) == list(range(len(offsets)))
        assert sorted(r[2] for r in rows) == sorted(f"key-{i}" for i in range(N))
