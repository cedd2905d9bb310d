"""Corrupt log files are detected, logged, counted and stepped over, never served.

Every case is a real file damaged on disk between a graceful stop and a restart
of a ``streambus serve`` process, then read by a real consumer from offset 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streambus.storage import parse_batches
from tests.harness import BrokerProcess, scrape, total, wait_until

MESSAGES = 60
SEGMENT_BYTES = 2048  # about a dozen one-record batches per segment
METRIC = "streambus_storage_corruptions_total"


def value(i: int) -> bytes:
    return f"message-{i:04d}-".encode() + b"x" * 100


def segments(data_dir: Path, topic: str) -> list[Path]:
    return sorted((data_dir / "topics" / topic / "0").glob("*.log"))


def batches(path: Path) -> list[tuple[int, int, int]]:
    """(position, size, base offset) of each batch of a .log."""
    return [(pos, h.size, h.base_offset) for pos, h in parse_batches(path.read_bytes())]


def offsets_in(path: Path) -> set[int]:
    return {base for _, _, base in batches(path)}  # one record per batch here


# Each damage takes the data dir and its topic, damages a file, and returns the offsets it
# destroyed, the file it damaged and the byte position the broker must name.
def flip_byte(data_dir: Path, topic: str) -> tuple[set[int], Path, int]:
    seg = segments(data_dir, topic)[1]
    pos, size, base = batches(seg)[3]
    with seg.open("r+b") as f:
        f.seek(pos + size - 20)  # inside the record's value: only the CRC can tell
        byte = f.read(1)
        f.seek(pos + size - 20)
        f.write(bytes([byte[0] ^ 0x40]))
    return {base}, seg, pos


def cut_mid_batch(data_dir: Path, topic: str) -> tuple[set[int], Path, int]:
    seg = segments(data_dir, topic)[1]
    pos, size, base = batches(seg)[-1]
    os.truncate(seg, pos + size // 2)
    return {base}, seg, pos


def empty_segment(data_dir: Path, topic: str) -> tuple[set[int], Path, int]:
    seg = segments(data_dir, topic)[2]
    lost = offsets_in(seg)
    os.truncate(seg, 0)
    return lost, seg, 0


def change_base_offset(data_dir: Path, topic: str) -> tuple[set[int], Path, int]:
    """The base offset is outside the CRC: make a batch claim its predecessor's offset."""
    seg = segments(data_dir, topic)[1]
    listed = batches(seg)
    pos, _, base = listed[5]
    with seg.open("r+b") as f:
        f.seek(pos)
        f.write(listed[4][2].to_bytes(8, "big"))
    return {base}, seg, pos


@dataclass
class Case:
    topic: str
    lost: set[int]
    path: Path
    position: int


DAMAGES = {
    "flip": flip_byte,
    "cut": cut_mid_batch,
    "empty": empty_segment,
    "base": change_base_offset,
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, dict]]:
    data_dir = tmp_path_factory.mktemp("corrupt") / "data"
    data_dir.mkdir()
    with BrokerProcess(data_dir) as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        topics = [*DAMAGES, "zeroed"]
        config = {"segment.bytes": str(SEGMENT_BYTES)}
        for future in admin.create_topics(
            [NewTopic(t, 1, 1, config=config) for t in topics]
        ).values():
            future.result(30)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        for topic in topics:
            for i in range(MESSAGES):
                producer.produce(topic, value(i), key=b"k", partition=0)
                producer.flush(10)  # one record per batch
        del producer, admin  # their threads would keep calling the stopped broker
        assert broker.stop() == 0  # graceful: flushed, checkpoint written
    cases: dict[str, Case] = {}
    for name, damage in DAMAGES.items():
        lost, path, position = damage(data_dir, name)
        assert len(segments(data_dir, name)) >= 4
        cases[name] = Case(name, lost, path, position)
    zeroed = segments(data_dir, "zeroed")[-1]
    zeroed.write_bytes(b"\0" * zeroed.stat().st_size)
    cases["zeroed"] = Case("zeroed", offsets_in_zeroed(data_dir), zeroed, 0)
    with BrokerProcess(data_dir) as restarted:
        yield restarted, cases


def offsets_in_zeroed(data_dir: Path) -> set[int]:
    base = int(segments(data_dir, "zeroed")[-1].stem)
    return set(range(base, MESSAGES))


def consume(bootstrap: str, topic: str, until: int) -> list[tuple[int, bytes]]:
    """(offset, value) of every record from offset 0 until one at ``until`` or later."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}-{os.urandom(4).hex()}",
            "enable.auto.commit": False,
            "check.crcs": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[tuple[int, bytes]] = []
    errors: list[Any] = []

    def done() -> bool:
        msg = consumer.poll(0.2)
        if msg is not None:
            if msg.error():
                errors.append(msg.error())
            else:
                got.append((msg.offset(), msg.value()))
        return bool(got) and got[-1][0] >= until

    try:
        wait_until(done, timeout=30, interval=0)
    finally:
        consumer.close()
    assert not errors
    return got


def error_lines(broker: BrokerProcess, path: Path) -> list[str]:
    return [
        line
        for line in broker.log_text().splitlines()
        if " ERROR " in line and path.name in line and f"/{path.parent.parent.name}/" in line
    ]


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_closed_segment_is_skipped_reported_and_counted(
    damaged: tuple[BrokerProcess, dict], name: str
) -> None:
    broker, cases = damaged
    case: Case = cases[name]
    for _ in range(2):  # a second reader finds the region already known: counted once
        got = consume(broker.bootstrap, case.topic, MESSAGES - 1)
        expected = [(i, value(i)) for i in range(MESSAGES) if i not in case.lost]
        assert got == expected, "every intact record under its own offset, nothing else"
    (line,) = error_lines(broker, case.path)
    assert f"byte {case.position} " in line
    assert re.search(rf"offset {min(case.lost)}\b", line)
    samples = scrape(f"http://127.0.0.1:{broker.metrics_port}/metrics")
    assert total(samples, METRIC, topic=case.topic, partition="0") == 1


def test_a_zeroed_last_segment_never_reuses_offsets(damaged: tuple[BrokerProcess, dict]) -> None:
    broker, cases = damaged
    case: Case = cases["zeroed"]
    (line,) = [ln for ln in broker.log_text().splitlines() if " ERROR " in ln and "/zeroed/" in ln]
    assert f"offsets {min(case.lost)}..{MESSAGES - 1} are lost, continuing at {MESSAGES}" in line
    samples = scrape(f"http://127.0.0.1:{broker.metrics_port}/metrics")
    assert total(samples, METRIC, topic="zeroed", partition="0") == 1
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
    delivered: list[int] = []
    producer.produce(
        "zeroed", b"after", partition=0, on_delivery=lambda _e, m: delivered.append(m.offset())
    )
    producer.flush(10)
    del producer
    assert delivered == [MESSAGES], "the next offset continues after the lost ones"
    got = consume(broker.bootstrap, "zeroed", MESSAGES)
    expected = [(i, value(i)) for i in range(MESSAGES) if i not in case.lost]
    assert got == [*expected, (MESSAGES, b"after")]


def test_after_an_unclean_stop_closed_segments_are_verified_without_a_reader(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with BrokerProcess(data_dir) as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        config = {"segment.bytes": str(SEGMENT_BYTES)}
        admin.create_topics([NewTopic("crashed", 1, 1, config=config)])["crashed"].result(30)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        for i in range(MESSAGES):
            producer.produce("crashed", value(i), key=b"k", partition=0)
            producer.flush(10)
        del producer, admin
        broker.kill()  # no clean-shutdown marker
    lost, path, position = flip_byte(data_dir, "crashed")
    with BrokerProcess(data_dir) as restarted:
        (line,) = wait_until(lambda: error_lines(restarted, path))
        assert f"byte {position} " in line
        assert re.search(rf"offset {min(lost)}\b", line)
        url = f"http://127.0.0.1:{restarted.metrics_port}/metrics"
        assert total(scrape(url), METRIC, topic="crashed", partition="0") == 1
        assert "verifying" in restarted.log_text()
        assert restarted.stop() == 0
    assert (data_dir / ".clean_shutdown").exists(), "a graceful stop leaves the marker"
