"""Compressed record batches (gzip, snappy, lz4, zstd): real clients round-trip them byte for
byte, the metrics count their uncompressed records, compaction keeps the latest value per key,
and a small batch that inflates far past max.message.bytes is refused without being inflated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cramjam
import crc32c
import pytest
from kafka.protocol.producer import ProduceRequest

from streambus.records.batch import (
    HEADER,
    MIN_BATCH_LENGTH,
    TRACE_SCAN_INFLATED_BYTES,
    build_batch,
    walk_batches,
)
from streambus.structs import TopicPartition
from tests.harness import BrokerProcess, BrokerThread, RawClient, scrape, total, wait_until

CODECS = ["gzip", "snappy", "lz4", "zstd"]
CODEC_IDS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
TS = 1_700_000_000_000
Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path / "data", auto_create_topics_enable=False) as b:
        yield b


def messages(n: int) -> list[Message]:
    """Compressible and incompressible values, null and present keys, headers."""
    out: list[Message] = []
    for i in range(n):
        value = f"value-{i}-".encode() * 30 if i % 3 else os.urandom(700)
        key = None if i % 7 == 0 else f"key-{i}".encode()
        out.append((key, value, [("h", f"header-{i}".encode()), ("bin", os.urandom(8))]))
    return out


def read_back(bootstrap: str, topic: str, n: int) -> list[Message]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen: list[Message] = []
    try:

        def done() -> bool:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                seen.append((msg.key(), msg.value(), list(msg.headers() or [])))
            return len(seen) >= n

        wait_until(done, timeout=30, interval=0)
    finally:
        consumer.close()
    return seen


def stored_codecs(broker: BrokerThread, topic: str) -> set[int]:
    def read() -> bytes:
        log = broker.broker.logs.log(TopicPartition(topic, 0))
        return bytes(log.read(0, 64 << 20))

    data = broker.run(read)
    return {header.compression for _, header in walk_batches(data)}


def check_round_trip(broker: BrokerThread, topic: str, codec: str, sent: list[Message]) -> None:
    assert read_back(broker.bootstrap, topic, len(sent)) == sent
    assert CODEC_IDS[codec] in stored_codecs(broker, topic), f"no {codec} batch was stored"
    samples = scrape(broker.metrics_url)
    assert total(samples, "streambus_messages_produced_total", topic=topic) == len(sent)
    payload = sum(
        len(k or b"") + len(v or b"") + sum(len(hk) + len(hv) for hk, hv in h) for k, v, h in sent
    )
    assert total(samples, "streambus_bytes_produced_total", topic=topic) == payload


@pytest.mark.parametrize("codec", CODECS)
def test_confluent_kafka_round_trips(broker: BrokerThread, codec: str) -> None:
    from confluent_kafka import Producer

    broker.run(broker.broker.create_topic, "t", 1, {})
    sent = messages(300)
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "compression.type": codec, "linger.ms": 50}
    )
    for key, value, headers in sent:
        producer.produce("t", value, key, headers=headers)
    assert producer.flush(15) == 0
    check_round_trip(broker, "t", codec, sent)


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_round_trips(broker: BrokerThread, codec: str) -> None:
    from kafka import KafkaProducer
    from kafka import codec as client_codecs

    if not getattr(client_codecs, f"has_{codec}")():
        pytest.skip(f"kafka-python has no {codec} library installed (client side)")
    broker.run(broker.broker.create_topic, "t", 1, {})
    sent = messages(300)
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, compression_type=codec, linger_ms=50
    )
    for key, value, headers in sent:
        producer.send("t", value, key, headers=headers)
    producer.flush()
    producer.close()
    check_round_trip(broker, "t", codec, sent)


@pytest.mark.parametrize("codec", CODECS)
def test_aiokafka_round_trips(broker: BrokerThread, codec: str) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka import codec as client_codecs

    if not getattr(client_codecs, f"has_{codec}")():
        pytest.skip(f"aiokafka has no {codec} library installed (client side)")
    broker.run(broker.broker.create_topic, "t", 1, {})
    sent = messages(300)

    async def produce() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, compression_type=codec, linger_ms=50
        )
        await producer.start()
        try:
            futures = [
                await producer.send("t", value, key=key, headers=headers)
                for key, value, headers in sent
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(produce())
    check_round_trip(broker, "t", codec, sent)


@pytest.mark.parametrize("codec", CODECS)
def test_compaction_keeps_the_latest_value_per_key(tmp_path: Path, codec: str) -> None:
    from confluent_kafka import Consumer, Producer

    config = {"cleanup.policy": "compact", "segment.bytes": "1500", "delete.retention.ms": "0"}
    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "state", 1, config)
        producer = Producer(
            {
                "bootstrap.servers": b.bootstrap,
                "compression.type": codec,
                "linger.ms": 0,
                "batch.num.messages": 3,
            }
        )
        for round_ in range(5):
            for key in range(6):
                value = f"{key}:{round_}".encode() * 20
                producer.produce("state", value, f"key-{key}".encode())
            producer.flush(5)
        for i in range(20):  # filler so the records above sit in closed segments
            producer.produce("state", b"f" * 200, f"filler-{i}".encode())
            producer.flush(5)
        assert producer.flush(5) == 0
        assert CODEC_IDS[codec] in stored_codecs(b, "state")
        wait_until(lambda: total(scrape(b.metrics_url), "streambus_compactions_total") >= 1)

        consumer = Consumer(
            {
                "bootstrap.servers": b.bootstrap,
                "group.id": "state-reader",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe(["state"])
        got: list[tuple[bytes, bytes]] = []
        try:

            def done() -> bool:
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    got.append((msg.key(), msg.value()))
                return sum(1 for k, _ in got if k.startswith(b"filler-")) >= 20

            wait_until(done, timeout=30, interval=0)
        finally:
            consumer.close()
        for key in range(6):
            values = [v for k, v in got if k == f"key-{key}".encode()]
            assert values == [f"{key}:4".encode() * 20], f"key-{key} kept {len(values)} values"


# -- decompression bombs ------------------------------------------------------------------------

LIMIT = 1 << 20  # the topic's max.message.bytes
INFLATED = 128 << 20


def compressed_batch(records_section: bytes, attributes: int) -> bytes:
    """A v2 batch of one record whose records section is ``records_section`` as given."""
    buf = bytearray(HEADER.size) + records_section
    HEADER.pack_into(
        buf, 0, 0, MIN_BATCH_LENGTH + len(records_section), -1, 2, 0, attributes, 0, TS, TS,
        -1, -1, -1, 1,
    )  # fmt: skip
    struct.pack_into(">I", buf, 17, crc32c.crc32c(bytes(buf[21:])))
    return bytes(buf)


def _zstd_streamed(data: bytes) -> bytes:
    """zstd without a content size in its frame header, as Java's ZstdOutputStream writes."""
    compressor = cramjam.zstd.Compressor()
    compressor.compress(data)
    return bytes(compressor.finish())


def _xerial(data: bytes, block: int = 1 << 20) -> bytes:
    out = bytearray(b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1))
    for i in range(0, len(data), block):
        chunk = bytes(cramjam.snappy.compress_raw(data[i : i + block]))
        out += struct.pack(">i", len(chunk)) + chunk
    return bytes(out)


def bombs() -> Iterator[tuple[str, bytes, int]]:
    """(name, batch, inflated size). Snappy compresses zeros only about 21 times, so its
    honest bomb is as large as max.message.bytes allows; its lying one is a few bytes."""
    zeros = b"\0" * INFLATED
    record = build_batch([(b"k", zeros, [], TS)])[HEADER.size :]
    yield "zstd", compressed_batch(_zstd_streamed(record), 4), len(record)
    yield (
        "zstd, size announced",
        compressed_batch(bytes(cramjam.zstd.compress(record)), 4),
        len(record),
    )
    small = build_batch([(b"k", zeros[: 96 << 20], [], TS)])[HEADER.size :]
    yield "lz4", compressed_batch(bytes(cramjam.lz4.compress(small)), 3), len(small)
    snappy = build_batch([(b"k", zeros[: 20 << 20], [], TS)])[HEADER.size :]
    yield "snappy (xerial)", compressed_batch(_xerial(snappy), 2), len(snappy)
    yield (
        "snappy (raw)",
        compressed_batch(bytes(cramjam.snappy.compress_raw(snappy)), 2),
        len(snappy),
    )
    # A raw snappy preamble announcing 4 GiB - 1 in front of a few bytes.
    yield (
        "snappy (lying preamble)",
        compressed_batch(b"\xff\xff\xff\xff\x0f\x00abc", 2),
        (1 << 32) - 1,
    )


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def produce(client: RawClient, topic: str, records: bytes) -> Any:
    TD = ProduceRequest.TopicProduceData
    request = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[TD(name=topic, partition_data=[TD.PartitionProduceData(0, records)])],
    )
    return client.request(request, 9).responses[0].partition_responses[0]


@pytest.mark.slow
def test_bombs_are_refused_without_being_inflated(tmp_path: Path) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    data = tmp_path / "data"
    data.mkdir()
    built = list(bombs())
    with BrokerProcess(data) as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        admin = AdminClient({"bootstrap.servers": proc.bootstrap})
        topic = NewTopic("bombs", 1, 1, config={"max.message.bytes": str(LIMIT)})
        admin.create_topics([topic])["bombs"].result(15)
        with RawClient(proc.bootstrap) as client:
            ok = produce(client, "bombs", build_batch([(b"k", b"canary", [], TS)]))
            assert ok.error_code == 0
            for name, batch, inflated in built:
                assert len(batch) < LIMIT, name
                assert inflated > 16 * LIMIT, name
                with contextlib.suppress(OSError):  # reset VmHWM to the current RSS
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                before = _status(pid, "VmHWM")
                part = produce(client, "bombs", batch)
                grown = _status(pid, "VmHWM") - before
                assert part.error_code == 10, (name, part.error_code, part.error_message)
                assert f"more than {LIMIT} bytes (max.message.bytes)" in part.error_message, name
                # The produce span's trace-header scan may inflate up to its own cap and the
                # append up to max.message.bytes; the inflated records (20-128 MiB) never are.
                print(f"{name}: {len(batch)} B inflating to {inflated} B, VmHWM +{grown} B")
                assert grown < 2 * TRACE_SCAN_INFLATED_BYTES + 4 * LIMIT, (name, grown)
            assert produce(client, "bombs", build_batch([(b"k", b"after", [], TS)])).error_code == 0
    assert "Traceback" not in proc.log_text()
