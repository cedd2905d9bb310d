"""PartitionLog's replication side on real files: leader epochs, replicated appends,
truncation, the high watermark checkpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import pytest

from streambus.errors import CorruptRecordError, InvalidRecordError, NotLeaderOrFollowerError
from streambus.records import build_batch, parse_batches
from streambus.records.batch import (
    ATTRIBUTES_OFFSET,
    CONTROL_MASK,
    CRC_OFFSET,
    partition_leader_epoch,
    read_header,
    set_base_offset,
    set_partition_leader_epoch,
)
from streambus.storage import PartitionLog
from streambus.storage.epochs import EPOCH_FILE
from streambus.topic_config import CleanupPolicy, TopicConfig

SMALL = TopicConfig(segment_bytes=1024, index_interval_bytes=256)

OpenLog = Callable[[Path, TopicConfig], PartitionLog]


@pytest.fixture
def open_log() -> Iterator[OpenLog]:
    """PartitionLog.open, closing whatever the test left open."""
    opened: list[PartitionLog] = []

    def _open(directory: Path, config: TopicConfig) -> PartitionLog:
        plog = PartitionLog.open(directory, config, clock=time.time)
        opened.append(plog)
        return plog

    yield _open
    for plog in opened:
        plog.close()


def batch(*values: bytes, ts: int = 1_000, pid: int = -1, seq: int = -1) -> bytes:
    return build_batch(
        [(b"k", v, [], ts) for v in values],
        producer_id=pid,
        producer_epoch=0 if pid >= 0 else -1,
        base_sequence=seq,
    )


def control_batch(offset: int, pid: int) -> bytes:
    """A transaction marker as a leader stores it (attributes bit 5 set)."""
    data = bytearray(build_batch([(b"\0\0\0\0", b"\0\0\0\0\0\0", [], 5)], producer_id=pid))
    data[ATTRIBUTES_OFFSET + 1] |= CONTROL_MASK  # the low byte of the int16 attributes
    data[CRC_OFFSET : CRC_OFFSET + 4] = crc32c.crc32c(data[ATTRIBUTES_OFFSET:]).to_bytes(4, "big")
    set_base_offset(data, 0, offset)
    return bytes(data)


def leader_log(open_log: OpenLog, directory: Path) -> PartitionLog:
    """30 offsets in 15 batches over several segments: epochs 0 (0..9), 2 (10..19), 5 (20..29)."""
    plog = open_log(directory, SMALL)
    for i in range(15):
        epoch = 0 if i < 5 else 2 if i < 10 else 5
        plog.append(batch(b"%d" % i * 40, b"x", ts=1_000 + i), leader_epoch=epoch)
    return plog


def test_append_stamps_leader_epoch_and_cache_survives_reopen(
    tmp_path: Path, open_log: OpenLog
) -> None:
    plog = leader_log(open_log, tmp_path / "p0")
    assert plog.segment_count > 2
    assert plog.epoch_entries() == [(0, 0), (2, 10), (5, 20)]
    assert plog.latest_epoch == 5
    data = plog.read(0, 1 << 20)
    assert [partition_leader_epoch(data, pos) for pos, _ in parse_batches(data)] == (
        [0] * 5 + [2] * 5 + [5] * 5
    )
    # An epoch below the latest is stamped but changes nothing in the cache.
    plog.append(batch(b"late"), leader_epoch=3)
    assert plog.epoch_entries() == [(0, 0), (2, 10), (5, 20)]
    plog.close()
    text = (tmp_path / "p0" / EPOCH_FILE).read_text()
    assert text == "0\n3\n0 0\n2 10\n5 20\n"  # Kafka's leader-epoch-checkpoint format
    reopened = open_log(tmp_path / "p0", SMALL)
    assert reopened.epoch_entries() == [(0, 0), (2, 10), (5, 20)]
    assert reopened.log_end_offset == 31


def test_epoch_cache_rebuilt_when_missing_or_corrupt(
    tmp_path: Path, open_log: OpenLog, caplog: pytest.LogCaptureFixture
) -> None:
    leader_log(open_log, tmp_path / "p0").close()
    path = tmp_path / "p0" / EPOCH_FILE
    path.write_text("0\n7\n0 0\nnonsense\n")
    with caplog.at_level(logging.ERROR, logger="streambus.storage"):
        plog = open_log(tmp_path / "p0", SMALL)
    assert any(EPOCH_FILE in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert plog.epoch_entries() == [(0, 0), (2, 10), (5, 20)]
    assert path.read_text() == "0\n3\n0 0\n2 10\n5 20\n"
    plog.close()
    path.unlink()
    assert open_log(tmp_path / "p0", SMALL).epoch_entries() == [(0, 0), (2, 10), (5, 20)]


def test_epoch_lost_with_an_unsynced_write_is_recovered_from_the_batches(
    tmp_path: Path, open_log: OpenLog
) -> None:
    plog = leader_log(open_log, tmp_path / "p0")
    plog.close()
    # The file as it stood before epoch 5's first batch (a crash lost the newer write).
    (tmp_path / "p0" / EPOCH_FILE).write_text("0\n2\n0 0\n2 10\n")
    assert open_log(tmp_path / "p0", SMALL).epoch_entries() == [(0, 0), (2, 10), (5, 20)]


def test_end_offset_for_epoch(tmp_path: Path, open_log: OpenLog) -> None:
    empty = open_log(tmp_path / "empty", SMALL)
    assert empty.latest_epoch == -1
    assert empty.end_offset_for_epoch(0) == (-1, -1)
    plog = open_log(tmp_path / "p0", SMALL)
    plog.append(batch(b"a", b"b"), leader_epoch=1)  # 0..1
    plog.append(batch(b"c"), leader_epoch=3)  # 2
    plog.append(batch(b"d", b"e"), leader_epoch=4)  # 3..4
    assert plog.epoch_entries() == [(1, 0), (3, 2), (4, 3)]
    assert plog.end_offset_for_epoch(-1) == (-1, -1)  # undefined epoch
    assert plog.end_offset_for_epoch(0) == (-1, -1)  # older than every cached epoch
    assert plog.end_offset_for_epoch(1) == (1, 2)  # ends where epoch 3 starts
    assert plog.end_offset_for_epoch(2) == (1, 2)  # not cached: the epoch below it
    assert plog.end_offset_for_epoch(3) == (3, 3)
    assert plog.end_offset_for_epoch(4) == (4, 5)  # the latest ends at the log end
    assert plog.end_offset_for_epoch(9) == (4, 5)


def copy_all(leader: PartitionLog, follower: PartitionLog, *, chunk: int) -> None:
    """What a fetcher does: read from the follower's end, append what comes back."""
    while follower.log_end_offset < leader.log_end_offset:
        data = leader.read(follower.log_end_offset, chunk)
        follower.append_replicated(memoryview(bytes(data)))


def test_append_replicated_keeps_the_leaders_bytes(tmp_path: Path, open_log: OpenLog) -> None:
    leader = leader_log(open_log, tmp_path / "leader")
    follower = open_log(tmp_path / "follower", SMALL)
    copy_all(leader, follower, chunk=300)  # small reads: some end in a partial batch
    assert follower.log_end_offset == leader.log_end_offset == 30
    assert follower.segment_count > 1
    assert bytes(follower.read(0, 1 << 20)) == bytes(leader.read(0, 1 << 20))
    assert follower.epoch_entries() == leader.epoch_entries()
    follower.close()
    reopened = open_log(tmp_path / "follower", SMALL)
    assert reopened.corruptions == 0
    assert bytes(reopened.read(0, 1 << 20)) == bytes(leader.read(0, 1 << 20))
    assert reopened.epoch_entries() == [(0, 0), (2, 10), (5, 20)]


def test_append_replicated_reports_what_it_stored(tmp_path: Path, open_log: OpenLog) -> None:
    leader = leader_log(open_log, tmp_path / "leader")
    follower = open_log(tmp_path / "follower", SMALL)
    data = bytes(leader.read(0, 1 << 20))
    sizes = [h.size for _, h in parse_batches(data)]
    got = follower.append_replicated(data[: sum(sizes[:3]) + 20])  # 3 whole batches + a piece
    assert (got.first_offset, got.last_offset, got.batches, got.records) == (0, 5, 3, 6)
    assert got.bytes == sum(sizes[:3])
    assert got.max_timestamp == 1_002
    assert follower.log_end_offset == 6
    nothing = follower.append_replicated(b"")
    assert (nothing.batches, nothing.first_offset, nothing.last_offset) == (0, 6, 5)


def test_append_replicated_rejects_offsets_below_the_end_and_bad_crcs(
    tmp_path: Path, open_log: OpenLog
) -> None:
    leader = leader_log(open_log, tmp_path / "leader")
    follower = open_log(tmp_path / "follower", SMALL)
    first = bytes(leader.read(0, 1))  # one whole batch: offsets 0..1
    follower.append_replicated(first)
    with pytest.raises(InvalidRecordError):
        follower.append_replicated(first)  # base 0 is below the end, 2
    bad = bytearray(leader.read(2, 1))
    bad[-1] ^= 0xFF
    with pytest.raises(CorruptRecordError):
        follower.append_replicated(bytes(bad))
    assert follower.log_end_offset == 2
    # A good batch followed by a corrupt one: nothing is written.
    with pytest.raises(CorruptRecordError):
        follower.append_replicated(bytes(leader.read(2, 1)) + bytes(bad))
    assert follower.log_end_offset == 2


def test_append_replicated_accepts_gaps_and_control_batches(
    tmp_path: Path, open_log: OpenLog
) -> None:
    compacted = TopicConfig(
        segment_bytes=1024, index_interval_bytes=256, cleanup_policy=CleanupPolicy.COMPACT
    )
    follower = open_log(tmp_path / "follower", compacted)
    first = bytearray(batch(b"a"))
    set_base_offset(first, 0, 0)
    set_partition_leader_epoch(first, 0, 1)
    gap = bytearray(batch(b"b", b"c"))
    set_base_offset(gap, 0, 7)  # offsets 1..6 were compacted away on the leader
    set_partition_leader_epoch(gap, 0, 2)
    marker = control_batch(9, pid=42)
    got = follower.append_replicated(bytes(first) + bytes(gap) + marker)
    assert (got.first_offset, got.last_offset, got.batches) == (0, 9, 3)
    assert follower.log_end_offset == 10
    assert follower.epoch_entries() == [(1, 0), (2, 7)]
    stored = bytes(follower.read(0, 1 << 20))
    assert stored == bytes(first) + bytes(gap) + marker
    assert read_header(stored, len(first) + len(gap)).is_control
    follower.close()
    reopened = open_log(tmp_path / "follower", compacted)
    assert reopened.corruptions == 0
    assert reopened.log_end_offset == 10
    assert bytes(reopened.read(7, 1 << 20)) == bytes(gap) + marker


def test_replicated_idempotent_batches_are_duplicates_after_a_leader_change(
    tmp_path: Path, open_log: OpenLog
) -> None:
    leader = open_log(tmp_path / "leader", SMALL)
    leader.append(batch(b"a", pid=7, seq=0), leader_epoch=1)
    leader.append(batch(b"b", pid=7, seq=1), leader_epoch=1)
    follower = open_log(tmp_path / "follower", SMALL)
    copy_all(leader, follower, chunk=1 << 20)
    retry = follower.append(batch(b"b", pid=7, seq=1), leader_epoch=2)
    assert retry.duplicate
    assert retry.base_offset == 1
    assert follower.log_end_offset == 2


def test_truncate_inside_a_segment_and_reopen(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig())
    for i in range(10):
        plog.append(batch(b"v%d" % i, pid=7, seq=i), leader_epoch=1 if i < 6 else 2)
    plog.set_high_watermark(9)
    plog.flush()
    plog.truncate_to(7)  # inside no batch: offsets 7.. go
    assert plog.log_end_offset == 7
    assert plog.high_watermark == 7
    assert plog.epoch_entries() == [(1, 0), (2, 6)]
    plog.truncate_to(5)
    assert plog.epoch_entries() == [(1, 0)]
    # The retry of a truncated batch is appended again, not answered as a duplicate.
    again = plog.append(batch(b"v5", pid=7, seq=5), leader_epoch=3)
    assert not again.duplicate
    assert again.base_offset == 5
    assert plog.epoch_entries() == [(1, 0), (3, 5)]
    plog.close()
    reopened = open_log(tmp_path / "p0", TopicConfig())
    assert reopened.corruptions == 0
    assert reopened.log_end_offset == 6
    assert reopened.high_watermark == 5
    assert reopened.epoch_entries() == [(1, 0), (3, 5)]
    assert reopened.append(batch(b"v6", pid=7, seq=6)).base_offset == 6


def test_truncate_inside_a_batch_drops_the_whole_batch(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    plog.append(batch(b"a", b"b"))  # 0..1
    plog.append(batch(b"c", b"d", b"e"))  # 2..4
    plog.truncate_to(3)
    assert plog.log_end_offset == 2
    assert [h.base_offset for h in plog.iter_headers()] == [0]


def test_truncate_across_segments_and_reopen(
    tmp_path: Path, open_log: OpenLog, caplog: pytest.LogCaptureFixture
) -> None:
    plog = leader_log(open_log, tmp_path / "p0")
    before = plog.segment_count
    bases = sorted(int(p.stem) for p in (tmp_path / "p0").glob("*.log"))
    assert len(bases) == before > 2
    plog.flush()  # leo.checkpoint says 30
    target = bases[1] + 2  # inside the second segment
    with caplog.at_level(logging.INFO, logger="streambus.storage"):
        plog.truncate_to(target)
    assert any(f"30 -> {target}" in r.getMessage() for r in caplog.records)
    assert plog.log_end_offset == target
    assert plog.segment_count == 2
    assert sorted(int(p.stem) for p in (tmp_path / "p0").glob("*.log")) == bases[:2]
    assert plog.epoch_entries() == ([(0, 0)] if target <= 10 else [(0, 0), (2, 10)])
    assert (tmp_path / "p0" / "leo.checkpoint").read_text() == f"0\n{target}\n"
    plog.append(batch(b"new"), leader_epoch=6)
    plog.close()
    with caplog.at_level(logging.WARNING, logger="streambus.storage"):
        caplog.clear()
        reopened = open_log(tmp_path / "p0", SMALL)
    assert reopened.corruptions == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert reopened.log_end_offset == target + 1
    assert [h.base_offset for h in reopened.iter_headers()][-1] == target
    assert reopened.latest_epoch == 6
    # The cut segment's index serves reads from every offset that is left.
    for offset in range(target + 1):
        got = parse_batches(reopened.read(offset, 1))
        assert got[0][1].base_offset <= offset <= got[0][1].last_offset


def test_truncate_to_at_or_past_the_end_does_nothing(tmp_path: Path, open_log: OpenLog) -> None:
    plog = leader_log(open_log, tmp_path / "p0")
    plog.truncate_to(30)
    plog.truncate_to(99)
    assert plog.log_end_offset == 30
    assert plog.epoch_entries() == [(0, 0), (2, 10), (5, 20)]


def test_truncate_fully_and_start_at(tmp_path: Path, open_log: OpenLog) -> None:
    plog = leader_log(open_log, tmp_path / "p0")
    plog.set_high_watermark(25)
    plog.truncate_fully_and_start_at(100)
    assert (plog.log_start_offset, plog.log_end_offset, plog.high_watermark) == (100, 100, 100)
    assert plog.epoch_entries() == []
    assert plog.segment_count == 1
    assert [p.name for p in (tmp_path / "p0").glob("*.log")] == [f"{100:020d}.log"]
    leader = open_log(tmp_path / "leader", SMALL)
    leader.truncate_fully_and_start_at(100)
    leader.append(batch(b"a"), leader_epoch=9)
    plog.append_replicated(bytes(leader.read(100, 1 << 20)))
    plog.close()
    reopened = open_log(tmp_path / "p0", SMALL)
    assert reopened.corruptions == 0
    assert (reopened.log_start_offset, reopened.log_end_offset) == (100, 101)
    assert reopened.epoch_entries() == [(9, 100)]
    # Below the log start, truncate_to empties the log the same way.
    reopened.truncate_to(50)
    assert (reopened.log_start_offset, reopened.log_end_offset) == (50, 50)
    reopened.close()
    assert open_log(tmp_path / "p0", SMALL).corruptions == 0


def test_high_watermark_checkpoint(tmp_path: Path, open_log: OpenLog) -> None:
    plog = leader_log(open_log, tmp_path / "p0")
    assert plog.high_watermark == 0  # a new log starts at its start
    plog.set_high_watermark(99)
    assert plog.high_watermark == 30  # clamped to the log end
    plog.set_high_watermark(12)
    plog.flush()
    assert (tmp_path / "p0" / "hw.checkpoint").read_text() == "0\n12\n"
    plog.set_high_watermark(14)
    plog.close()  # written on close too
    assert open_log(tmp_path / "p0", SMALL).high_watermark == 14


def test_high_watermark_defaults_to_the_log_end_without_a_checkpoint(
    tmp_path: Path, open_log: OpenLog
) -> None:
    leader_log(open_log, tmp_path / "p0").close()
    (tmp_path / "p0" / "hw.checkpoint").unlink()  # a data dir from before replication
    assert open_log(tmp_path / "p0", SMALL).high_watermark == 30


def test_new_log_checkpoints_its_high_watermark_at_once(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", SMALL)
    assert (tmp_path / "p0" / "hw.checkpoint").read_text() == "0\n0\n"
    plog.append(batch(b"a"), leader_epoch=0)
    plog.close()
    (tmp_path / "p0" / "leo.checkpoint").unlink()  # nothing but the HW file says what was seen
    assert open_log(tmp_path / "p0", SMALL).high_watermark == 0
    (tmp_path / "p0" / "hw.checkpoint").write_text("garbage")
    assert open_log(tmp_path / "p0", SMALL).high_watermark == 0  # unreadable: the log start


def test_retention_trims_the_epoch_cache(tmp_path: Path, open_log: OpenLog) -> None:
    config = TopicConfig(segment_bytes=1024, index_interval_bytes=256, retention_bytes=1)
    plog = open_log(tmp_path / "p0", config)
    for i in range(15):
        epoch = 0 if i < 5 else 2 if i < 10 else 5
        plog.append(batch(b"%d" % i * 40, b"x", ts=1_000 + i), leader_epoch=epoch)
    assert plog.epoch_entries() == [(0, 0), (2, 10), (5, 20)]
    assert plog.enforce_retention(int(time.time() * 1000)) > 0
    start = plog.log_start_offset
    assert start > 10
    covering = 2 if start < 20 else 5
    expected = [(covering, start)] + ([(5, 20)] if start < 20 else [])
    assert plog.epoch_entries() == expected
    assert plog.end_offset_for_epoch(0) == (-1, -1)
    plog.close()
    assert open_log(tmp_path / "p0", config).epoch_entries() == expected


def test_truncation_discards_a_running_compaction(tmp_path: Path, open_log: OpenLog) -> None:
    config = TopicConfig(
        segment_bytes=1024,
        index_interval_bytes=256,
        cleanup_policy=CleanupPolicy.COMPACT,
        min_compaction_lag_ms=0,
    )
    plog = open_log(tmp_path / "p0", config)
    for i in range(40):
        plog.append(build_batch([(b"k%d" % (i % 3), b"v" * 60, [], 1_000 + i)]), leader_epoch=1)
    job = plog.start_compaction(int(time.time() * 1000))
    assert job is not None
    with ThreadPoolExecutor(1) as pool:
        job.future = pool.submit(job.run)
        plog.truncate_to(5)  # aborts the cleaner and waits for it
        result = job.future.result()
    assert not plog.finish_compaction(job, result)
    job.settle()
    assert not list((tmp_path / "p0").glob("*.cleaned"))
    assert plog.log_end_offset == 5
    assert [h.base_offset for h in plog.iter_headers()] == [0, 1, 2, 3, 4]
    plog.close()
    reopened = open_log(tmp_path / "p0", config)
    assert reopened.corruptions == 0
    assert reopened.log_end_offset == 5


def test_fsync_waiter_of_truncated_offsets_is_told(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path / "p0", TopicConfig(flush_messages=1))
    with ThreadPoolExecutor(1) as pool:
        plog.set_background(pool.submit)
        plog.append(batch(b"a"), leader_epoch=1)
        got = plog.append(batch(b"b"), leader_epoch=1)
        assert got.needs_sync
        plog.truncate_to(1)
        with pytest.raises(NotLeaderOrFollowerError):
            asyncio.run(plog.wait_synced(got.last_offset + 1))
        asyncio.run(plog.wait_synced(1))  # what is left is synced
        plog.close()
