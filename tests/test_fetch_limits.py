"""What a Fetch may cost the broker: memory bounded whatever the client asks or fails to read,
responses capped by fetch_max_bytes, very many partitions answered in slices."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from kafka.protocol.consumer import FetchRequest

from streambus.instrumentation import MAX_LINKS
from streambus.protocol.fetch import EAGER_BYTES, _Read, _traceparents
from streambus.storage import build_batch, iter_records, parse_batches
from tests.harness import BrokerProcess, RawClient, fetch_request, running, wait_until

VALUE = 100_000  # bytes per message
MIB = 1024 * 1024


def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(count):
        producer.produce(topic, i.to_bytes(4, "big") * (VALUE // 4), partition=0)
        producer.poll(0)
    assert producer.flush(60) == 0
    del producer


def consume_all(bootstrap: str, topic: str, count: int, **config: Any) -> list[tuple[int, bytes]]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "check", "enable.auto.commit": False, **config}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[tuple[int, bytes]] = []

    def done() -> bool:
        for msg in consumer.consume(1000, 0.5):
            assert not msg.error(), msg.error()
            got.append((msg.offset(), msg.value()))
        return len(got) >= count

    try:
        wait_until(done, timeout=60, interval=0)
    finally:
        consumer.close()
    return got


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def loaded_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with BrokerProcess(data_dir) as broker:
        produce(broker.bootstrap, "big", 400)  # 40 MB
        yield broker


def test_clients_that_never_read_their_fetches_cost_bounded_memory(
    loaded_broker: BrokerProcess,
) -> None:
    broker = loaded_broker
    assert broker.proc is not None
    before = rss_bytes(broker.proc.pid)
    sinks: list[socket.socket] = []
    try:
        for i in range(10):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            sock.connect(("127.0.0.1", broker.port))
            request = fetch_request("big", max_bytes=50_000_000)
            request.with_header(correlation_id=i, client_id="sink")
            sock.sendall(bytes(request.encode(version=12, header=True, framed=True)))
            sinks.append(sock)
        for sock in sinks:  # every response is being written: its memory is taken
            sock.settimeout(30)
            assert sock.recv(4, socket.MSG_PEEK)
        # The loop still serves others while the ten responses wait on their readers.
        got = consume_all(broker.bootstrap, "big", 20)
        assert [offset for offset, _ in got[:20]] == list(range(20))
        growth = rss_bytes(broker.proc.pid) - before
    finally:
        for sock in sinks:
            sock.close()
    # Before responses were streamed: ~2 x 40 MB per connection (about 800 MB here).
    assert growth < 200 * MIB, f"broker RSS grew {growth / MIB:.0f} MiB"


def test_a_huge_fetch_is_capped_and_returns_the_right_records(tmp_path: Path) -> None:
    cap = 3 * MIB
    with running(tmp_path / "data", fetch_max_bytes=cap) as broker:
        produce(broker.bootstrap, "big", 80)  # 8 MB
        with RawClient(broker.bootstrap) as client:
            response = client.request(fetch_request("big", max_bytes=2**31 - 1), 12)
        (part,) = response.responses[0].partitions
        records = bytes(part.records)
        assert EAGER_BYTES < len(records) <= cap, "streamed past the eager part, within the cap"
        offsets = []
        for pos, header in parse_batches(records):
            for record in iter_records(records, pos, header):
                assert record.value == record.offset.to_bytes(4, "big") * (VALUE // 4)
                offsets.append(record.offset)
        assert offsets == list(range(len(offsets)))
        got = consume_all(broker.bootstrap, "big", 80, **{"fetch.max.bytes": 2_000_000_000})
        assert got == [(i, i.to_bytes(4, "big") * (VALUE // 4)) for i in range(80)]


def test_a_fetch_of_twenty_thousand_partitions_is_answered_in_full(tmp_path: Path) -> None:
    with running(tmp_path / "data") as broker:
        produce(broker.bootstrap, "one", 3)
        request = fetch_request("one", max_bytes=10 * MIB)
        wanted = request.topics[0].partitions
        template = wanted[0]
        for p in range(1, 20_000):
            wanted.append(
                FetchRequest.FetchTopic.FetchPartition(
                    partition=p,
                    current_leader_epoch=-1,
                    fetch_offset=0,
                    log_start_offset=-1,
                    partition_max_bytes=template.partition_max_bytes,
                )
            )
        with RawClient(broker.bootstrap, timeout=60) as client:
            response = client.request(request, 12)
    parts = response.responses[0].partitions
    assert [p.partition_index for p in parts] == list(range(20_000))
    assert parts[0].error_code == 0
    assert parts[0].high_watermark == 3
    assert len(parse_batches(bytes(parts[0].records))) >= 1
    assert {p.error_code for p in parts[1:]} == {3}  # UNKNOWN_TOPIC_OR_PARTITION


def test_the_trace_scan_keeps_at_most_max_links_traceparents_from_the_first_batches() -> None:
    def traceparent(i: int) -> bytes:
        return f"00-{i:032x}-{i:016x}-01".encode()

    batches = [
        build_batch([(b"k", b"v", [("traceparent", traceparent(i))], 1)], base_offset=i)
        for i in range(1, 200)
    ]
    got = _traceparents([_Read("t", 0, 0, records=b"".join(batches))])
    assert got == [traceparent(i) for i in range(1, MAX_LINKS + 1)]
