"""PartitionLog on real files: appends, reads, recovery, idempotence, retention, compaction."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from streambus.errors import (
    InvalidProducerEpochError,
    InvalidRecordError,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceNumberError,
)
from streambus.records import build_batch, iter_records, parse_batches
from streambus.storage import PartitionLog
from streambus.topic_config import CleanupPolicy, TimestampType, TopicConfig

SMALL = TopicConfig(segment_bytes=1024, index_interval_bytes=256)


class OpenLog(Protocol):
    def __call__(
        self, directory: Path, config: TopicConfig, *, clock: Callable[[], float] = ...
    ) -> PartitionLog: ...


@pytest.fixture
def open_log() -> Iterator[OpenLog]:
    """PartitionLog.open, closing whatever the test left open."""
    opened: list[PartitionLog] = []

    def _open(
        directory: Path, config: TopicConfig, *, clock: Callable[[], float] = time.time
    ) -> PartitionLog:
        plog = PartitionLog.open(directory, config, clock=clock)
        opened.append(plog)
        return plog

    yield _open
    for plog in opened:
        plog.close()


class Clock:
    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


def batch(
    *values: bytes,
    key: bytes | None = b"k",
    ts: int = 1_000,
    pid: int = -1,
    epoch: int = -1,
    seq: int = -1,
) -> bytes:
    return build_batch(
        [(key, v, [], ts) for v in values],
        producer_id=pid,
        producer_epoch=epoch,
        base_sequence=seq,
    )


def records(data: bytes) -> list[tuple[int, bytes | None, bytes | None]]:
    return [
        (r.offset, r.key, r.value)
        for pos, header in parse_batches(data)
        for r in iter_records(data, pos, header)
    ]


def fill(plog: PartitionLog, count: int, size: int = 100) -> None:
    for i in range(count):
        plog.append(batch(b"%04d" % i + b"x" * size))


def test_append_assigns_contiguous_offsets_across_rolls(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    results = [plog.append(batch(b"a" * 100, b"b" * 100)) for _ in range(20)]
    assert [(r.base_offset, r.last_offset) for r in results] == [
        (2 * i, 2 * i + 1) for i in range(20)
    ]
    assert all(r.record_count == 2 and r.payload_bytes == 202 and not r.duplicate for r in results)
    assert plog.log_end_offset == 40
    assert plog.segment_count > 3
    assert all(len(p.stem) == 20 for p in (tmp_path / "p0").glob("*.log"))
    segment_files = {p.suffix for p in (tmp_path / "p0").iterdir()} - {"", ".checkpoint"}
    assert segment_files == {".log", ".index", ".timeindex"}
    data = plog.read(0, 1 << 20)  # spans every segment
    assert [o for o, _, _ in records(data)] == list(range(40))
    assert len(data) == plog.size_bytes
    # an offset in the middle of a batch returns that whole batch first
    assert [h.base_offset for _, h in parse_batches(plog.read(13, 1 << 20))][:2] == [12, 14]
    for offset in range(40):
        first = parse_batches(plog.read(offset, 1))[0][1]
        assert first.base_offset <= offset <= first.last_offset
    plog.close()


def test_read_max_bytes_and_first_batch_whole(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig())
    for i in range(5):
        plog.append(batch(b"%d" % i + b"v" * 200))
    one = parse_batches(plog.read(0, 1 << 20))[0][1].size
    assert len(parse_batches(plog.read(0, 1))) == 1  # bigger than max_bytes, returned whole
    assert len(parse_batches(plog.read(0, 2 * one + one // 2))) == 2
    assert len(parse_batches(plog.read(2, 2 * one))) == 2
    assert records(plog.read(4, 10))[0][0] == 4


def test_offset_out_of_range(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig())
    assert plog.read(0, 100) == b""  # empty log: offset 0 is the end
    plog.append(batch(b"v"))
    assert plog.read(1, 100) == b""
    with pytest.raises(OffsetOutOfRangeError):
        plog.read(2, 100)
    with pytest.raises(OffsetOutOfRangeError):
        plog.read(-1, 100)


def test_append_rejects_bad_batches(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig(max_message_bytes=500))
    with pytest.raises(MessageTooLargeError):
        plog.append(batch(b"x" * 600))
    with pytest.raises(InvalidRecordError, match="exactly one"):
        plog.append(batch(b"a") + batch(b"b"))
    assert plog.log_end_offset == 0


def test_reopen_keeps_everything(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    fill(plog, 30)
    before = plog.read(0, 1 << 20)
    segments = plog.segment_count
    plog.close()
    plog = open_log(tmp_path / "p0", SMALL)
    assert (plog.log_start_offset, plog.log_end_offset) == (0, 30)
    assert plog.segment_count == segments
    assert plog.read(0, 1 << 20) == before
    assert plog.append(batch(b"more")).base_offset == 30
    plog.close()


def test_lookups_survive_lost_index_files(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    fill(plog, 30)
    plog.close()
    for index in (tmp_path / "p0").glob("*.index"):
        index.unlink()
    for index in (tmp_path / "p0").glob("*.timeindex"):
        index.write_bytes(b"\x01\x02\x03")  # torn
    plog = open_log(tmp_path / "p0", SMALL)
    assert [o for o, _, _ in records(plog.read(0, 1 << 20))] == list(range(30))
    assert records(plog.read(17, 1))[0][0] == 17


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_torn_tail_truncated_on_reopen(
    tmp_path: Path, open_log: OpenLog, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    fill(plog, 12)
    good = plog.read(0, 1 << 20)
    plog.close()  # a SIGKILL leaves the same bytes: appends use unbuffered os.write
    # ... but writes no checkpoint (close does): the cut tail was never flushed.
    (tmp_path / "p0" / "leo.checkpoint").unlink()
    active = max((tmp_path / "p0").glob("*.log"))
    size = active.stat().st_size
    if damage == "garbage":
        with active.open("ab") as f:
            f.write(b"\xde\xad\xbe\xef" * 10)
        expected_drop = 40
    else:
        last = parse_batches(active.read_bytes())[-1]
        os.truncate(active, last[0] + 30)
        expected_drop = 30
        good = good[: len(good) - last[1].size]
    caplog.set_level(logging.WARNING, logger="streambus.storage")
    plog = open_log(tmp_path / "p0", SMALL)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert active.name in message
    assert f"{expected_drop} bytes" in message
    assert f"position {active.stat().st_size}" in message  # where the tail was cut
    if damage == "garbage":
        assert active.stat().st_size == size
    assert plog.read(0, 1 << 20) == good
    end = len(records(good))
    assert plog.log_end_offset == end
    assert plog.append(batch(b"after")).base_offset == end
    assert records(plog.read(end, 1 << 20)) == [(end, b"k", b"after")]
    plog.close()


def test_idempotent_retry_is_stored_once(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig())
    first = plog.append(batch(b"a", b"b", pid=7, epoch=0, seq=0))
    second = plog.append(batch(b"c", pid=7, epoch=0, seq=2))
    retry = plog.append(batch(b"a", b"b", pid=7, epoch=0, seq=0))
    assert retry.duplicate
    assert (
        (retry.base_offset, retry.last_offset) == (first.base_offset, first.last_offset) == (0, 1)
    )
    assert plog.log_end_offset == 3
    assert (second.base_offset, second.duplicate) == (2, False)
    with pytest.raises(OutOfOrderSequenceNumberError):
        plog.append(batch(b"gap", pid=7, epoch=0, seq=9))
    bumped = plog.append(batch(b"new epoch", pid=7, epoch=1, seq=0))
    assert bumped.base_offset == 3
    with pytest.raises(InvalidProducerEpochError):
        plog.append(batch(b"zombie", pid=7, epoch=0, seq=3))
    assert plog.append(batch(b"other producer", pid=8, epoch=0, seq=42)).base_offset == 4
    assert plog.append(batch(b"plain")).base_offset == 5
    assert plog.append(batch(b"plain")).base_offset == 6  # pid -1: never de-duplicated
    plog.close()

    plog = open_log(tmp_path / "p0", TopicConfig())
    again = plog.append(batch(b"c", pid=7, epoch=1, seq=0))
    assert again.duplicate
    assert again.base_offset == 3
    with pytest.raises(InvalidProducerEpochError):
        plog.append(batch(b"zombie", pid=7, epoch=0, seq=3))
    assert plog.append(batch(b"next", pid=7, epoch=1, seq=1)).base_offset == 7


def test_sequence_wraps_around(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig())
    plog.append(batch(b"a", b"b", pid=1, epoch=0, seq=2**31 - 2))
    assert not plog.append(batch(b"c", pid=1, epoch=0, seq=0)).duplicate


def test_log_append_time(tmp_path: Path, open_log: OpenLog) -> None:
    clock = Clock(5_000_000)
    config = TopicConfig(message_timestamp_type=TimestampType.LOG_APPEND_TIME)
    plog = open_log(tmp_path / "p0", config, clock=clock)
    result = plog.append(batch(b"v", ts=1))
    assert result.log_append_time_ms == 5_000_000
    header = parse_batches(plog.read(0, 1000))[0][1]
    assert header.timestamp_type == 1
    assert header.max_timestamp == 5_000_000
    plain = open_log(tmp_path / "p1", TopicConfig(), clock=clock)
    assert plain.append(batch(b"v", ts=1)).log_append_time_ms == -1


def test_segment_ms_rolls_by_age(tmp_path: Path, open_log: OpenLog) -> None:
    clock = Clock()
    plog = open_log(tmp_path / "p0", TopicConfig(segment_ms=60_000), clock=clock)
    plog.append(batch(b"a"))
    clock.now_ms += 30_000
    plog.append(batch(b"b"))
    assert plog.segment_count == 1
    clock.now_ms += 30_000
    plog.append(batch(b"c"))
    assert plog.segment_count == 2


def test_retention_by_time_deletes_only_closed_segments(
    tmp_path: Path, open_log: OpenLog, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1_000_000)
    config = TopicConfig(segment_bytes=1024, retention_ms=10_000)
    plog = open_log(tmp_path / "p0", config, clock=clock)
    for i in range(20):  # old records
        plog.append(batch(b"%03d" % i + b"x" * 100, ts=900_000))
    old_segments = plog.segment_count
    for i in range(20):  # fresh records
        plog.append(batch(b"%03d" % i + b"y" * 100, ts=1_000_000))
    caplog.set_level(logging.INFO, logger="streambus.storage")
    deleted = plog.enforce_retention(1_000_000)
    # every segment holding only old records goes: the last old one may have taken fresh ones
    assert old_segments - 1 <= deleted <= old_segments
    assert len([r for r in caplog.records if "deleted segment" in r.getMessage()]) == deleted
    assert 0 < plog.log_start_offset <= 20
    assert plog.segment_count >= 2
    with pytest.raises(OffsetOutOfRangeError):
        plog.read(0, 100)
    first = records(plog.read(plog.log_start_offset, 1))[0]
    assert first[0] == plog.log_start_offset
    # everything old: still the active segment survives
    clock.now_ms = 10_000_000
    deleted = plog.enforce_retention(clock.now_ms)
    assert plog.segment_count == 1
    assert deleted >= 1
    assert plog.log_end_offset == 40
    assert plog.append(batch(b"z")).base_offset == 40
    start = plog.log_start_offset
    plog.close()
    plog = open_log(tmp_path / "p0", config, clock=clock)
    assert (plog.log_start_offset, plog.log_end_offset) == (start, 41)


def test_retention_by_size(tmp_path: Path, open_log: OpenLog) -> None:
    config = TopicConfig(segment_bytes=1024, retention_bytes=2048, retention_ms=-1)
    plog = open_log(tmp_path / "p0", config)
    fill(plog, 60)
    assert plog.enforce_retention(0) > 0
    assert plog.size_bytes >= 2048
    assert plog.size_bytes - min(2048, plog.size_bytes) < 1024 + 1024  # within one segment
    start = plog.log_start_offset
    assert start > 0
    assert records(plog.read(start, 1))[0][0] == start
    plog.close()
    reopened = open_log(tmp_path / "p0", config)
    assert reopened.log_start_offset == start
    assert reopened.log_end_offset == 60


def test_retention_ignored_for_compact_policy(tmp_path: Path, open_log: OpenLog) -> None:
    config = TopicConfig(segment_bytes=1024, retention_ms=0, cleanup_policy=CleanupPolicy.COMPACT)
    plog = open_log(tmp_path / "p0", config)
    fill(plog, 30)
    assert plog.enforce_retention(10**13) == 0


def test_compaction_keeps_latest_value_per_key(tmp_path: Path, open_log: OpenLog) -> None:
    clock = Clock(10_000_000)
    config = TopicConfig(
        segment_bytes=600,
        cleanup_policy=CleanupPolicy.COMPACT,
        delete_retention_ms=1_000,
    )
    plog = open_log(tmp_path / "p0", config, clock=clock)
    with pytest.raises(InvalidRecordError, match="without key"):
        plog.append(batch(b"v", key=None))
    expected: dict[bytes, tuple[int, bytes | None]] = {}
    for i in range(60):
        key = b"key-%d" % (i % 7)
        value = None if i == 58 else b"value-%d" % i  # the last write of key-2
        offset = plog.append(build_batch([(key, value, [], 10_000_000)])).base_offset
        expected[key] = (offset, value)
    # a multi-record batch that keeps one record of three
    offset = plog.append(
        build_batch(
            [(b"m", b"1", [], 10_000_000), (b"m", b"2", [], 10_000_000), (b"n", b"3", [], 0)]
        )
    ).base_offset
    expected[b"m"] = (offset + 1, b"2")
    expected[b"n"] = (offset + 2, b"3")
    for i in range(10):  # push everything above into closed segments
        plog.append(build_batch([(b"tail-%d" % i, b"x" * 50, [], 10_000_000)]))
    active_base = max(int(p.stem) for p in (tmp_path / "p0").glob("*.log"))
    end = plog.log_end_offset
    size_before = plog.size_bytes

    assert plog.compact(clock.now_ms)
    assert not plog.compact(clock.now_ms)  # nothing new to clean
    assert plog.size_bytes < size_before
    assert plog.log_start_offset == 0
    assert plog.log_end_offset == end
    survivors = records(plog.read(0, 1 << 20))
    closed = [(o, k, v) for o, k, v in survivors if o < active_base]
    by_key = {k: (o, v) for o, k, v in closed if k is not None and not k.startswith(b"tail")}
    assert by_key == expected  # latest value, original offset; the young tombstone stays
    assert len([1 for _, k, _ in closed if k == b"key-0"]) == 1
    assert [o for o, _, _ in survivors] == sorted(o for o, _, _ in survivors)

    clock.now_ms += 5_000  # tombstones are now past delete.retention.ms
    assert plog.compact(clock.now_ms)
    keys = {k for _, k, _ in records(plog.read(0, 1 << 20))}
    tombstoned = next(k for k, (_, v) in expected.items() if v is None)
    assert tombstoned not in keys
    # reads from any offset still work, including offsets compacted away
    for offset in range(end):
        got = records(plog.read(offset, 1))
        assert got
        assert got[-1][0] >= offset
    compacted = plog.read(0, 1 << 20)
    plog.close()
    # a compaction killed before its rename leaves a .cleaned file; the .log is intact
    (tmp_path / "p0" / "00000000000000000000.log.cleaned").write_bytes(b"half-written")
    reopened = open_log(tmp_path / "p0", config, clock=clock)
    assert reopened.read(0, 1 << 20) == compacted
    assert reopened.log_end_offset == end
    assert not list((tmp_path / "p0").glob("*.cleaned"))


def test_offset_for_timestamp(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    assert plog.offset_for_timestamp(0) is None
    for i in range(30):
        plog.append(
            build_batch([(b"k", b"v" * 50, [], 1_000 + 10 * i), (b"k", b"w", [], 1_005 + 10 * i)])
        )
    assert plog.offset_for_timestamp(0) == (0, 1_000)
    assert plog.offset_for_timestamp(1_000) == (0, 1_000)
    assert plog.offset_for_timestamp(1_001) == (1, 1_005)
    assert plog.offset_for_timestamp(1_006) == (2, 1_010)
    assert plog.offset_for_timestamp(1_200) == (40, 1_200)
    assert plog.offset_for_timestamp(1_295) == (59, 1_295)
    assert plog.offset_for_timestamp(1_296) is None
    assert plog.max_timestamp_offset() == (59, 1_295)
    plog.close()
    plog = open_log(tmp_path / "p0", SMALL)
    assert plog.offset_for_timestamp(1_200) == (40, 1_200)


def test_flush_messages_fsyncs_every_append(
    tmp_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    plog = open_log(tmp_path / "p0", TopicConfig(flush_messages=1))
    lazy = open_log(tmp_path / "p1", TopicConfig())
    monkeypatch.setattr(os, "fsync", counting_fsync)
    lazy.append(batch(b"a"))
    assert calls == []
    plog.append(batch(b"a"))
    plog.append(batch(b"b"))
    assert len(calls) == 2


def test_flush_ms_via_maybe_flush(
    tmp_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    clock = Clock(1_000_000)
    plog = open_log(tmp_path / "p0", TopicConfig(flush_ms=1_000), clock=clock)

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    plog.append(batch(b"a"))
    assert not plog.maybe_flush(1_000_500)
    assert calls == []
    assert plog.maybe_flush(1_001_000)
    assert len(calls) == 1
    assert not plog.maybe_flush(1_002_000)  # nothing new


def test_delete_removes_directory(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    fill(plog, 20)
    plog.delete()
    assert not (tmp_path / "p0").exists()


CHILD = """
import sys
from pathlib import Path
from streambus.storage import PartitionLog
from streambus.records import build_batch
from streambus.topic_config import TopicConfig

config = TopicConfig(segment_bytes=4096, index_interval_bytes=256)
plog = PartitionLog.open(Path(sys.argv[1]), config)
for i in range(200):
    plog.append(build_batch([(b"k", b"%05d" % i + b"x" * 50, [], i)]))
print("appended", plog.log_end_offset, flush=True)
sys.stdin.read()  # wait to be killed, never closing the log
"""


def test_appends_survive_sigkill(tmp_path: Path, open_log: OpenLog) -> None:
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "p0")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],  # the repo root, so streambus imports
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["appended", "200"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    plog = open_log(tmp_path / "p0", TopicConfig(segment_bytes=4096, index_interval_bytes=256))
    assert plog.log_end_offset == 200
    assert plog.segment_count > 2
    values = [v for _, _, v in records(plog.read(0, 1 << 20))]
    assert values == [b"%05d" % i + b"x" * 50 for i in range(200)]
    assert plog.offset_for_timestamp(150) == (150, 150)
    assert plog.append(batch(b"after")).base_offset == 200
