"""Transactions in the partition log, on real files: markers, the last stable offset and
the aborted-transaction index through reopen, replication, truncation, retention and
compaction. A read_committed reader here is Kafka's client algorithm, fed what a Fetch
would carry (the batches and ``aborted_transactions``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streambus.errors import InvalidProducerEpochError, InvalidRecordError
from streambus.records import build_batch, iter_records, parse_batches
from streambus.records.batch import (
    CONTROL_KEY,
    CONTROL_VALUE,
    TRANSACTIONAL_MASK,
    BatchHeader,
    build_control_batch,
    parse_control_record,
)
from streambus.storage import PartitionLog
from streambus.storage.txnindex import ENTRY
from streambus.topic_config import CleanupPolicy, TopicConfig

SMALL = TopicConfig(segment_bytes=1024, index_interval_bytes=256)
NOW_MS = 1_700_000_000_000


class Clock:
    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


OpenLog = Callable[..., PartitionLog]


@pytest.fixture
def open_log() -> Iterator[OpenLog]:
    opened: list[PartitionLog] = []

    def _open(
        directory: Path, config: TopicConfig = SMALL, *, clock: Callable[[], float] = time.time
    ) -> PartitionLog:
        plog = PartitionLog.open(directory, config, clock=clock)
        opened.append(plog)
        return plog

    yield _open
    for plog in opened:
        plog.close()


class Producer:
    """A transactional producer's batches: sequence numbers continue across transactions
    of one epoch."""

    def __init__(self, pid: int, epoch: int = 0) -> None:
        self.pid, self.epoch, self.seq = pid, epoch, 0

    def batch(self, *values: bytes, key: bytes | None = None) -> bytes:
        data = build_batch(
            [(key, v, (), NOW_MS) for v in values],
            producer_id=self.pid,
            producer_epoch=self.epoch,
            base_sequence=self.seq,
            attributes=TRANSACTIONAL_MASK,
        )
        self.seq += len(values)
        return data

    def send(self, plog: PartitionLog, *values: bytes, key: bytes | None = None) -> int:
        return plog.append(self.batch(*values, key=key)).base_offset

    def end(self, plog: PartitionLog, *, commit: bool, coordinator_epoch: int = 7) -> int:
        return plog.append_marker(self.pid, self.epoch, commit, coordinator_epoch).base_offset


def plain(*values: bytes, key: bytes | None = None) -> bytes:
    return build_batch([(key, v, (), NOW_MS) for v in values])


def batches(plog: PartitionLog, start: int = 0, upto: int | None = None) -> list[tuple[int, bytes]]:
    """(position, bytes) ... as (header, data) of every batch from ``start`` below ``upto``."""
    data = bytes(plog.read(start, 1 << 30)) if start < plog.log_end_offset else b""
    out = []
    for pos, header in parse_batches(data):
        if upto is not None and header.base_offset >= upto:
            break
        out.append((pos, data[pos : pos + header.size]))
    return out


def read_all(plog: PartitionLog, start: int = 0) -> list[bytes | None]:
    """Every record value from ``start``, control records left out (read_uncommitted)."""
    values: list[bytes | None] = []
    for _, data in batches(plog, start):
        header = parse_batches(data)[0][1]
        if not header.is_control:
            values += [r.value for r in iter_records(data, 0, header) if r.offset >= start]
    return values


def read_committed(plog: PartitionLog, start: int = 0) -> list[bytes | None]:
    """What a read_committed consumer fetching [start, LSO) keeps (Kafka's Fetcher):
    transactional batches of a producer are dropped from its aborted transaction's first
    offset until its abort marker."""
    upto = plog.last_stable_offset(plog.log_end_offset)
    pending = sorted(plog.aborted_transactions(start, upto), key=lambda e: e[1])
    aborting: set[int] = set()
    values: list[bytes | None] = []
    for _, data in batches(plog, start, upto):
        header = parse_batches(data)[0][1]
        while pending and pending[0][1] <= header.last_offset:
            aborting.add(pending.pop(0)[0])
        if header.is_control:
            marker = parse_control_record(data, 0, header)
            if marker is not None and not marker.commit:
                aborting.discard(header.producer_id)
            continue
        if header.is_transactional and header.producer_id in aborting:
            continue
        values += [r.value for r in iter_records(data, 0, header) if start <= r.offset < upto]
    return values


def starts(values: list[bytes | None], prefix: bytes) -> bool:
    return any(v is not None and v.startswith(prefix) for v in values)


def header_at(plog: PartitionLog, offset: int) -> tuple[BatchHeader, bytes]:
    data = bytes(plog.read(offset, 1))
    header = parse_batches(data)[0][1]
    return header, data[: header.size]


def txn_state(plog: PartitionLog) -> tuple[object, ...]:
    hw = plog.log_end_offset
    return (
        plog.last_stable_offset(hw),
        plog.aborted_index(),
        plog.ongoing_transactions(),
        plog.aborted_transactions(0, hw),
    )


def txnindex_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.txnindex"))}


# -- markers ----------------------------------------------------------------------------


def test_commit_and_abort_markers_in_kafkas_layout(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path, clock=Clock())
    p = Producer(1000, epoch=3)
    assert p.send(plog, b"a", b"b") == 0
    result = plog.append_marker(1000, 3, True, 5, leader_epoch=2)
    assert (result.base_offset, result.last_offset, result.record_count) == (2, 2, 1)
    header, data = header_at(plog, 2)
    assert header.is_control
    assert header.is_transactional
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (1000, 3, -1)
    assert header.partition_leader_epoch == 2
    assert header.records_count == 1
    (record,) = iter_records(data, 0, header)
    assert record.key == CONTROL_KEY.pack(0, 1)
    assert record.value == CONTROL_VALUE.pack(0, 5)
    assert record.timestamp == NOW_MS
    p.send(plog, b"c")
    assert p.end(plog, commit=False) == 4
    header, data = header_at(plog, 4)
    marker = parse_control_record(data, 0, header)
    assert marker is not None
    assert not marker.commit
    assert marker.coordinator_epoch == 7
    assert read_all(plog) == [b"a", b"b", b"c"]
    assert read_committed(plog) == [b"a", b"b"]
    assert plog.aborted_transactions(0, 5) == [(1000, 3)]
    (info,) = plog.producers()
    assert (info.producer_id, info.producer_epoch, info.last_sequence) == (1000, 3, 2)
    assert (info.coordinator_epoch, info.current_txn_start_offset) == (7, -1)


def test_clients_cannot_write_control_batches(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path)
    marker = build_control_batch(1, 0, commit=True, coordinator_epoch=0, timestamp_ms=NOW_MS)
    with pytest.raises(InvalidRecordError):
        plog.append(marker)
    with pytest.raises(InvalidRecordError):
        plog.append_marker(-1, 0, True, 0)


def test_marker_without_transaction_is_written_but_not_indexed(
    tmp_path: Path, open_log: OpenLog
) -> None:
    plog = open_log(tmp_path)
    plog.append(plain(b"x"))
    assert plog.append_marker(42, 0, False, 1).base_offset == 1
    assert plog.log_end_offset == 2
    assert plog.aborted_index() == []
    assert plog.last_stable_offset(2) == 2
    assert read_committed(plog) == [b"x"]


# -- last stable offset and the aborted list ---------------------------------------------


def test_lso_follows_the_oldest_open_transaction(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path)
    plog.append(plain(b"n0"))
    a, b = Producer(1), Producer(2)
    assert plog.last_stable_offset(1) == 1
    a.send(plog, b"a1")  # offset 1
    assert plog.last_stable_offset(plog.log_end_offset) == 1
    b.send(plog, b"b1")  # offset 2
    assert plog.ongoing_transactions() == [(1, 0, 1, NOW_MS), (2, 0, 2, NOW_MS)]
    plog.append(plain(b"n1"))  # 3
    assert plog.last_stable_offset(4) == 1
    assert plog.last_stable_offset(0) == 0  # never above the high watermark
    a.end(plog, commit=True)  # 4
    assert plog.last_stable_offset(plog.log_end_offset) == 2
    assert read_committed(plog) == [b"n0", b"a1"]
    b.end(plog, commit=True)  # 5
    assert plog.last_stable_offset(6) == 6
    assert plog.last_stable_offset(5) == 5
    assert plog.ongoing_transactions() == []
    assert read_committed(plog) == [b"n0", b"a1", b"b1", b"n1"]


def test_two_producers_interleaved_read_committed_drops_exactly_the_aborted(
    tmp_path: Path, open_log: OpenLog
) -> None:
    plog = open_log(tmp_path)
    a, b = Producer(1), Producer(2)
    a.send(plog, b"a1", b"a2")  # 0-1
    b.send(plog, b"b1")  # 2
    plog.append(plain(b"n1"))  # 3
    a.send(plog, b"a3")  # 4
    b.send(plog, b"b2", b"b3")  # 5-6
    a.end(plog, commit=False)  # 7: aborts a1 a2 a3
    b.send(plog, b"b4")  # 8
    b.end(plog, commit=True)  # 9
    a.send(plog, b"a4")  # 10
    b.send(plog, b"b5")  # 11
    b.end(plog, commit=False)  # 12: aborts b5
    a.end(plog, commit=True)  # 13
    # b5's abort: a's transaction from offset 10 is still open, so the LSO is 10.
    assert plog.aborted_index() == [(1, 0, 7, 2), (2, 11, 12, 10)]
    assert read_committed(plog) == [b"b1", b"n1", b"b2", b"b3", b"b4", b"a4"]
    assert read_all(plog) == [
        b"a1", b"a2", b"b1", b"n1", b"a3", b"b2", b"b3", b"b4", b"a4", b"b5",
    ]  # fmt: skip
    # Ranges: an entry is returned when its [first, marker] overlaps [start, upto).
    assert plog.aborted_transactions(0, 14) == [(1, 0), (2, 11)]
    assert plog.aborted_transactions(3, 7) == [(1, 0)]
    assert plog.aborted_transactions(8, 11) == []
    assert plog.aborted_transactions(8, 12) == [(2, 11)]
    assert plog.aborted_transactions(13, 14) == []
    assert read_committed(plog, start=4) == [b"b2", b"b3", b"b4", b"a4"]
    assert read_committed(plog, start=8) == [b"b4", b"a4"]


# -- fencing ------------------------------------------------------------------------------


def test_older_epoch_fenced_after_a_marker(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path)
    old = Producer(5, epoch=0)
    old.send(plog, b"zombie")
    # The coordinator aborts with a bumped epoch (a new producer instance took over).
    plog.append_marker(5, 1, False, 3)
    assert plog.last_stable_offset(plog.log_end_offset) == plog.log_end_offset
    with pytest.raises(InvalidProducerEpochError):
        old.send(plog, b"late")
    with pytest.raises(InvalidProducerEpochError):
        plog.append_marker(5, 0, True, 3)
    assert plog.log_end_offset == 2
    new = Producer(5, epoch=1)
    new.send(plog, b"fresh")
    new.end(plog, commit=True)
    assert read_committed(plog) == [b"fresh"]


# -- reopen -----------------------------------------------------------------------------


def _mixed_history(plog: PartitionLog) -> None:
    """Several segments of committed, aborted and one open transaction."""
    a, b = Producer(1), Producer(2)
    for i in range(12):
        a.send(plog, b"a%d" % i + b"." * 60)
        b.send(plog, b"b%d" % i + b"." * 60)
        plog.append(plain(b"n%d" % i + b"." * 60))
        a.end(plog, commit=i % 3 != 0)
        if i % 2:
            b.end(plog, commit=i % 4 == 1)
    b.send(plog, b"open")


def test_reopen_rebuilds_state_and_index(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path)
    _mixed_history(plog)
    assert plog.segment_count > 3
    before, seen, files = txn_state(plog), read_committed(plog), txnindex_files(tmp_path)
    assert len(plog.aborted_index()) >= 6
    assert plog.ongoing_transactions()
    assert len(files) >= 3
    for name, raw in files.items():
        assert raw, name
        assert len(raw) % ENTRY.size == 0, name
    plog.close()

    plog = open_log(tmp_path)
    assert txn_state(plog) == before
    assert read_committed(plog) == seen
    assert txnindex_files(tmp_path) == files
    plog.close()

    # Every index file deleted, one cut mid-entry, one with a plausible but wrong entry.
    names = list(files)
    (tmp_path / names[0]).unlink()
    (tmp_path / names[1]).write_bytes(files[names[1]][:-3])
    raw = bytearray(files[names[2]])
    raw[2:10] = (999).to_bytes(8, "big")  # another producer id
    (tmp_path / names[2]).write_bytes(bytes(raw))
    (tmp_path / names[-1]).write_bytes(b"\x00\x07" + files[names[-1]][2:])  # bad version
    plog = open_log(tmp_path)
    assert txn_state(plog) == before
    assert read_committed(plog) == seen
    assert txnindex_files(tmp_path) == files  # rewritten as they were

    # The open transaction still ends, and its abort is indexed.
    plog.append_marker(2, 0, False, 1)
    assert plog.ongoing_transactions() == []
    assert read_committed(plog) == seen
    assert plog.last_stable_offset(plog.log_end_offset) == plog.log_end_offset


def test_reopen_after_crash_between_marker_and_index(tmp_path: Path, open_log: OpenLog) -> None:
    plog = open_log(tmp_path)
    p = Producer(9)
    p.send(plog, b"x")
    p.end(plog, commit=False)
    entries = plog.aborted_index()
    plog.close()
    (tmp_path / f"{0:020d}.txnindex").unlink()  # the entry never reached the disk
    plog = open_log(tmp_path)
    assert plog.aborted_index() == entries
    assert read_committed(plog) == []


# -- replication ------------------------------------------------------------------------


def copy_to(leader: PartitionLog, follower: PartitionLog, chunk: int = 300) -> None:
    """What a follower's fetcher does: fetch whole batches from its log end, store them."""
    while follower.log_end_offset < leader.log_end_offset:
        data = bytes(leader.read(follower.log_end_offset, chunk))
        follower.append_replicated(data)


def test_follower_copy_is_identical_with_the_same_state(tmp_path: Path, open_log: OpenLog) -> None:
    leader = open_log(tmp_path / "leader")
    follower = open_log(tmp_path / "follower")
    _mixed_history(leader)
    copy_to(leader, follower)
    assert txn_state(follower) == txn_state(leader)
    assert read_committed(follower) == read_committed(leader)
    leader.flush()
    follower.flush()
    for path in sorted((tmp_path / "leader").glob("*.log")):
        assert (tmp_path / "follower" / path.name).read_bytes() == path.read_bytes()
    assert txnindex_files(tmp_path / "follower") == txnindex_files(tmp_path / "leader")
    follower.close()
    follower = open_log(tmp_path / "follower")
    assert txn_state(follower) == txn_state(leader)


def test_truncation_across_a_marker_reopens_the_transaction(
    tmp_path: Path, open_log: OpenLog
) -> None:
    leader = open_log(tmp_path / "leader")
    follower = open_log(tmp_path / "follower")
    a = Producer(1)
    plog_values = [b"v%d" % i + b"." * 80 for i in range(20)]
    for value in plog_values[:10]:
        leader.append(plain(value))
    first = a.send(leader, b"t1")
    for value in plog_values[10:]:
        leader.append(plain(value))
    marker = a.end(leader, commit=False)
    leader.append(plain(b"after"))
    copy_to(leader, follower)
    assert follower.aborted_index() == [(1, first, marker, marker + 1)]
    # A new leader never got the marker: the follower cuts back to it.
    follower.truncate_to(marker)
    assert follower.log_end_offset == marker
    assert follower.aborted_index() == []
    assert follower.ongoing_transactions() == [(1, 0, first, NOW_MS)]
    assert follower.last_stable_offset(follower.log_end_offset) == first
    assert b"".join(txnindex_files(tmp_path / "follower").values()) == b""
    # The new leader commits it instead.
    follower.append_marker(1, 0, True, 8)
    assert b"t1" in read_committed(follower)
    follower.close()
    follower = open_log(tmp_path / "follower")
    assert follower.aborted_index() == []
    assert b"t1" in read_committed(follower)
    # Emptied and restarted: nothing of it remains.
    follower.truncate_fully_and_start_at(100)
    assert txn_state(follower) == (100, [], [], [])
    assert not list((tmp_path / "follower").glob("*.txnindex"))


# -- retention and compaction -----------------------------------------------------------


def test_retention_deletes_the_segments_index(tmp_path: Path, open_log: OpenLog) -> None:
    clock = Clock()
    config = TopicConfig(segment_bytes=1024, index_interval_bytes=256, retention_ms=1000)
    plog = open_log(tmp_path, config, clock=clock)
    a = Producer(1)
    for i in range(6):
        a.send(plog, b"old%d" % i + b"." * 200)
        a.end(plog, commit=False)
    assert len(txnindex_files(tmp_path)) >= 2
    clock.now_ms += 10_000
    plog.roll()
    kept = a.send(plog, b"new")
    a.end(plog, commit=False)
    assert plog.enforce_retention(clock.now_ms + 1) >= 2
    assert plog.log_start_offset == kept
    assert list(txnindex_files(tmp_path)) == [f"{kept:020d}.txnindex"]
    assert plog.aborted_index() == [(1, kept, kept + 1, kept + 2)]
    assert plog.aborted_transactions(0, plog.log_end_offset) == [(1, kept)]
    plog.close()
    plog = open_log(tmp_path, config, clock=clock)
    assert plog.aborted_index() == [(1, kept, kept + 1, kept + 2)]


def test_compaction_keeps_committed_drops_aborted_keeps_markers(
    tmp_path: Path, open_log: OpenLog
) -> None:
    clock = Clock()
    config = TopicConfig(
        segment_bytes=600, index_interval_bytes=128, cleanup_policy=CleanupPolicy.COMPACT
    )
    plog = open_log(tmp_path, config, clock=clock)
    a, b = Producer(1), Producer(2)
    plog.append(plain(b"k1-v0", key=b"k1"))
    a.send(plog, b"k1-committed", key=b"k1")
    a.send(plog, b"k2-committed", key=b"k2")
    a.end(plog, commit=True)
    b.send(plog, b"k1-aborted", key=b"k1")  # later than the committed value, but aborted
    b.send(plog, b"k3-aborted", key=b"k3")
    b.end(plog, commit=False)
    for i in range(8):
        plog.append(plain(b"f%d" % i + b"." * 100, key=b"filler"))
    b.send(plog, b"k2-open", key=b"k2")  # open: everything from here stays as it is
    for i in range(8):
        plog.append(plain(b"g%d" % i + b"." * 100, key=b"filler"))
    plog.roll()
    assert plog.segment_count > 3
    markers_before = [
        parse_batches(d)[0][1].base_offset
        for _, d in batches(plog)
        if parse_batches(d)[0][1].is_control
    ]
    committed_before = read_committed(plog)
    index_before = plog.aborted_index()
    assert plog.compact(clock.now_ms)
    after = read_all(plog)
    assert b"k1-aborted" not in after
    assert b"k3-aborted" not in after
    assert b"k1-committed" in after
    assert b"k2-committed" in after
    assert b"k1-v0" not in after
    assert b"k2-open" in after
    assert starts(after, b"g0")
    assert [
        parse_batches(d)[0][1].base_offset
        for _, d in batches(plog)
        if parse_batches(d)[0][1].is_control
    ] == markers_before
    assert plog.aborted_index() == index_before
    committed = read_committed(plog)
    assert committed == [v for v in committed_before if v in committed]
    assert b"k1-committed" in committed
    assert b"k2-committed" in committed
    # The open transaction aborts: its record goes at the next compaction, and k2 keeps
    # its committed value.
    b.end(plog, commit=False)
    plog.roll()
    plog.compact(clock.now_ms)
    after = read_all(plog)
    assert b"k2-open" not in after
    assert b"k2-committed" in after
    assert starts(after, b"g7")
    assert not starts(after, b"g0")
    state = txn_state(plog)
    plog.close()
    plog = open_log(tmp_path, config, clock=clock)
    assert txn_state(plog) == state
    assert b"k2-committed" in read_committed(plog)


def test_background_flush_syncs_the_index_and_reopen_agrees(
    tmp_path: Path, open_log: OpenLog
) -> None:
    """With a worker thread for fsyncs (as the LogManager runs logs), the index file is
    synced with its segment, and a follower that starts mid-transaction (its log start
    above the transaction's first offset) indexes nothing for it."""
    config = TopicConfig(segment_bytes=1024, index_interval_bytes=256, flush_messages=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plog = open_log(tmp_path / "leader", config)
        plog.set_background(pool.submit)
        a = Producer(3)
        first = a.send(plog, b"x" * 100)
        plain_at = plog.append(plain(b"y" * 100)).base_offset
        result = plog.append_marker(3, 0, False, 2)
        assert result.needs_sync
        asyncio.run(plog.wait_synced(result.last_offset + 1))
        assert plog.aborted_index() == [(3, first, result.base_offset, result.base_offset + 1)]
        assert txnindex_files(tmp_path / "leader")
        follower = open_log(tmp_path / "follower", config)
        follower.truncate_fully_and_start_at(plain_at)
        copy_to(plog, follower)
        assert follower.aborted_index() == []
        assert follower.last_stable_offset(follower.log_end_offset) == plog.log_end_offset
        plog.close()
        follower.close()
    plog = open_log(tmp_path / "leader", config)
    assert plog.aborted_transactions(0, plog.log_end_offset) == [(3, first)]
