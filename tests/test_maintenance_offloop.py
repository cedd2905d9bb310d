"""Storage maintenance off the event loop: compaction, retention unlinks, fsyncs and start-up
recovery run in worker threads, and the broker keeps answering while they do."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.consumer import HeartbeatRequest, JoinGroupRequest, SyncGroupRequest
from kafka.protocol.metadata import ApiVersionsRequest

from streambus.errors import KafkaStorageError
from streambus.storage import LogManager, build_batch, cleaner, iter_records, parse_batches
from streambus.storage.batch import Record
from streambus.storage.log import PartitionLog
from streambus.structs import TopicPartition
from streambus.topic_config import TopicConfig
from tests.harness import BrokerThread, RawClient, wait_until

COMPACTED = {"cleanup.policy": "compact", "segment.bytes": str(8 * 1024 * 1024)}
NOW_MS = 1_700_000_000_000


@pytest.fixture
def cleaner_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads ``cleaner.clean`` ran in (a spy: the real cleaner runs)."""
    names: list[str] = []
    real = cleaner.clean

    def spy(*args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(cleaner, "clean", spy)
    return names


def fill(manager: LogManager, topic: str) -> None:
    plog = manager.log(TopicPartition(topic, 0))
    for i in range(400):
        key = b"key-%d" % (i % 23)
        value = None if i == 390 else b"%04d" % i + b"v" * (i % 50)
        plog.append(build_batch([(key, value, [], NOW_MS - 10_000_000 + i)]))
    plog.append(build_batch([(b"a", b"1", [], NOW_MS), (b"a", b"2", [], NOW_MS)]))
    for i in range(30):  # the records above end up in closed segments
        plog.append(build_batch([(b"tail-%d" % i, b"x" * 60, [], NOW_MS)]))


def all_records(data: bytes | memoryview) -> list[Record]:
    return [r for pos, header in parse_batches(data) for r in iter_records(data, pos, header)]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_compaction_runs_in_a_worker_thread_with_the_inline_result(
    tmp_path: Path, cleaner_threads: list[str]
) -> None:
    overrides = {"cleanup.policy": "compact", "segment.bytes": "2000", "delete.retention.ms": "1"}
    inline = LogManager(tmp_path / "inline", TopicConfig(), clock=lambda: NOW_MS / 1000)
    offloop = LogManager(tmp_path / "offloop", TopicConfig(), clock=lambda: NOW_MS / 1000)
    tp = TopicPartition("state", 0)
    for manager in (inline, offloop):
        manager.load()
        manager.create_topic("state", 1, overrides)
        fill(manager, "state")
    size_before = inline.log(tp).size_bytes
    try:
        assert inline.maintenance(NOW_MS).compactions == 1
        assert cleaner_threads == [threading.current_thread().name]
        cleaner_threads.clear()

        async def maintain() -> tuple[int, str]:
            report = await offloop.maintain(NOW_MS)
            return report.compactions, threading.current_thread().name

        compactions, loop_thread = asyncio.run(maintain())
        assert compactions == 1
        assert len(cleaner_threads) == 1
        assert cleaner_threads[0].startswith("streambus-cleaner")
        assert cleaner_threads[0] != loop_thread

        compacted = inline.log(tp).read(0, 1 << 20)
        assert offloop.log(tp).read(0, 1 << 20) == compacted
        assert len(compacted) < size_before
        latest = {
            r.key: r.value
            for p, h in parse_batches(compacted)
            for r in iter_records(compacted, p, h)
        }
        assert latest[b"key-0"] == b"0391" + b"v" * 41  # the last write of key-0
        assert latest[b"a"] == b"2"
        # the same files, indexes included, and no staged copy left
        assert files(tmp_path / "offloop/topics/state/0") == files(
            tmp_path / "inline/topics/state/0"
        )
        assert not list((tmp_path / "offloop").rglob("*.cleaned"))
    finally:
        inline.close()
        offloop.close()
    reopened = LogManager(tmp_path / "offloop", TopicConfig(), clock=lambda: NOW_MS / 1000)
    reopened.load()
    try:
        assert reopened.log(tp).read(0, 1 << 20) == compacted
    finally:
        reopened.close()


def test_retention_unlinks_and_fsyncs_run_in_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = LogManager(tmp_path, TopicConfig(), clock=lambda: NOW_MS / 1000)
    manager.load()
    manager.create_topic("events", 1, {"segment.bytes": "1024", "retention.ms": "1000"})
    manager.create_topic("synced", 1, {"flush.messages": "1"})
    events = manager.log(TopicPartition("events", 0))
    synced = manager.log(TopicPartition("synced", 0))
    fsyncs: list[str] = []
    unlinks: list[str] = []
    real_fsync, real_unlink = os.fsync, Path.unlink

    def fsync_spy(fd: int) -> None:
        fsyncs.append(threading.current_thread().name)
        real_fsync(fd)

    def unlink_spy(path: Path, missing_ok: bool = False) -> None:
        if path.suffix == ".log":
            unlinks.append(threading.current_thread().name)
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(os, "fsync", fsync_spy)
    monkeypatch.setattr(Path, "unlink", unlink_spy)

    async def scenario() -> tuple[str, int]:
        loop_thread = threading.current_thread().name
        for _ in range(30):
            events.append(build_batch([(None, b"x" * 100, [], NOW_MS - 60_000)]))
        synced.append(build_batch([(None, b"acked", [], NOW_MS)]))  # flush.messages=1
        report = await manager.maintain(NOW_MS)
        return loop_thread, report.segments_deleted

    try:
        loop_thread, deleted = asyncio.run(scenario())
        wait_until(lambda: fsyncs, 10)
        assert deleted > 0
        assert events.log_start_offset > 0
        assert len(unlinks) == deleted
        assert all(name.startswith("streambus-io") for name in unlinks + fsyncs), (
            unlinks,
            fsyncs,
        )
        assert loop_thread not in unlinks + fsyncs
    finally:
        manager.close()


def produce_compacted(bootstrap: str, topic: str, megabytes: int) -> None:
    """Tens of MB through a real producer, each of 2,000 keys written many times."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 262144})
    value = b"v" * 1000
    for i in range(megabytes * 1024 * 1024 // len(value)):
        while True:
            try:
                producer.produce(topic, value, key=b"key-%d" % (i % 2000))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0


def start_maintenance(b: BrokerThread) -> Future[Any]:
    """One maintenance pass on the broker's loop, as its maintenance task runs it."""
    return asyncio.run_coroutine_threadsafe(b.broker.logs.maintain(int(time.time() * 1000)), b.loop)


def staged_copies(data_dir: Path, topic: str) -> list[Path]:
    return list((data_dir / "topics" / topic).rglob("*.cleaned"))


@pytest.fixture
def big_compacted(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path / "data",
        maintenance_interval_ms=3_600_000,  # passes are started by the test
        group_initial_rebalance_delay_ms=0,
        group_min_session_timeout_ms=500,
    ) as b:
        b.run(b.broker.create_topic, "state", 1, COMPACTED)
        produce_compacted(b.bootstrap, "state", 40)
        yield b


def test_broker_answers_pings_and_heartbeats_during_a_large_compaction(
    big_compacted: BrokerThread,
) -> None:
    b = big_compacted
    size_before = b.run(b.broker.storage_used_bytes)
    with RawClient(b.bootstrap) as member, RawClient(b.bootstrap) as pinger:
        join = JoinGroupRequest(
            group_id="g",
            session_timeout_ms=2000,
            rebalance_timeout_ms=2000,
            member_id="",
            group_instance_id=None,
            protocol_type="consumer",
            protocols=[JoinGroupRequest.JoinGroupRequestProtocol(name="range", metadata=b"")],
        )
        join.member_id = member.request(join, 5).member_id  # MEMBER_ID_REQUIRED first
        joined = member.request(join, 5)
        assert joined.error_code == 0
        assignment = SyncGroupRequest.SyncGroupRequestAssignment
        synced = SyncGroupRequest(
            group_id="g",
            generation_id=joined.generation_id,
            member_id=joined.member_id,
            group_instance_id=None,
            assignments=[assignment(member_id=joined.member_id, assignment=b"")],
        )
        assert member.request(synced, 3).error_code == 0
        heartbeat = HeartbeatRequest(
            group_id="g",
            generation_id=joined.generation_id,
            member_id=joined.member_id,
            group_instance_id=None,
        )

        running = start_maintenance(b)
        pings_during = heartbeats_during = 0
        while not running.done():
            pinger.request(ApiVersionsRequest(), 0)
            if not running.done():
                pings_during += 1
            assert member.request(heartbeat, 3).error_code == 0  # still a member
            if not running.done():
                heartbeats_during += 1
            time.sleep(0.01)
        assert running.result().compactions == 1
        # Answered while the cleaner worked, not queued behind it.
        assert pings_during >= 3
        assert heartbeats_during >= 3
        assert member.request(heartbeat, 3).error_code == 0
    assert b.run(b.broker.storage_used_bytes) < size_before / 2


def test_topic_deleted_during_compaction_leaves_nothing_behind(
    big_compacted: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    b = big_compacted
    caplog.set_level(logging.INFO, logger="streambus.storage")
    running = start_maintenance(b)
    wait_until(lambda: staged_copies(b.data_dir, "state") or running.done(), 30, 0.005)
    b.run(b.broker.delete_topic, "state")  # as DeleteTopics does, at once
    assert running.result(30).compactions == 0  # the cleaning was called off
    assert not [r for r in caplog.records if "compacted" in r.getMessage()]
    assert [p.name for p in (b.data_dir / "topics").iterdir() if "state" in p.name] == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    b.run(b.broker.create_topic, "state", 1, COMPACTED)  # a fresh, empty topic
    assert b.run(b.broker.logs.log, TopicPartition("state", 0)).log_end_offset == 0
    assert not staged_copies(b.data_dir, "state")


def test_stop_during_compaction_exits_cleanly(
    big_compacted: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    b = big_compacted
    end = b.run(b.broker.logs.log, TopicPartition("state", 0)).log_end_offset
    running = start_maintenance(b)
    wait_until(lambda: staged_copies(b.data_dir, "state") or running.done(), 30, 0.005)
    b.call(b.broker.stop())
    running.result(30)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not staged_copies(b.data_dir, "state")
    with BrokerThread(b.data_dir, maintenance_interval_ms=3_600_000) as again:
        plog = again.run(again.broker.logs.log, TopicPartition("state", 0))
        assert again.run(lambda: plog.log_end_offset) == end
        first = again.run(plog.read, 0, 1 << 16)
        assert all_records(first)[0].offset == 0


def test_start_up_recovery_runs_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "t", 2, {})
    opened: list[str] = []
    real: Callable[..., PartitionLog] = PartitionLog.open.__func__

    def spy(cls: type[PartitionLog], *args: Any, **kwargs: Any) -> PartitionLog:
        opened.append(threading.current_thread().name)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PartitionLog, "open", classmethod(spy))
    with BrokerThread(tmp_path / "data") as b:
        loop_thread = b.run(lambda: threading.current_thread().name)
        assert b.run(b.broker.partition_count) == 2
    assert len(opened) >= 2
    assert loop_thread not in opened


def test_failed_background_fsync_is_reported_and_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append does not wait for its fsync (the Produce handler does); the append that
    finds it failed says so, and the unsynced data is synced again once the disk answers."""
    manager = LogManager(tmp_path, TopicConfig(), clock=lambda: NOW_MS / 1000)
    manager.load()
    manager.create_topic("synced", 1, {"flush.messages": "1"})
    plog = manager.log(TopicPartition("synced", 0))
    real_fsync = os.fsync
    synced: list[int] = []

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    try:
        monkeypatch.setattr(os, "fsync", failing_fsync)
        plog.append(build_batch([(None, b"first", [], NOW_MS)]))  # acknowledged; fsync pending
        wait_until(lambda: plog._flushing is not None and plog._flushing.done(), 10)
        with pytest.raises(KafkaStorageError, match="injected"):
            plog.append(build_batch([(None, b"second", [], NOW_MS)]))
        assert manager.health.errors() == {"EIO": 1}
        monkeypatch.setattr(os, "fsync", counting_fsync)
        plog.append(build_batch([(None, b"third", [], NOW_MS)]))
        wait_until(lambda: synced, 10)
        assert plog.log_end_offset == 3  # nothing acknowledged was dropped
    finally:
        manager.close()


def test_flush_messages_acknowledges_after_its_fsync_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush.messages=1: the produce is answered only once its fsync (in a worker thread)
    is done, as Kafka answers after its flush; other requests are served meanwhile."""
    from tests.test_storage_hardening import create_topic, produce

    real_fsync = os.fsync
    entered = threading.Event()
    release = threading.Event()
    fsync_threads: list[str] = []

    def held_fsync(fd: int) -> None:
        fsync_threads.append(threading.current_thread().name)
        entered.set()
        release.wait(30)
        real_fsync(fd)

    with BrokerThread(tmp_path / "data", topic={"flush.messages": "1"}) as broker:
        loop_thread = broker.run(lambda: threading.current_thread().name)
        with RawClient(broker.bootstrap) as c:
            assert create_topic(c, "durable", 1).error_code == 0
            produce(c, "durable", build_batch([(None, b"warm-up", [], NOW_MS)]))
        monkeypatch.setattr(os, "fsync", held_fsync)
        answered: Future[Any] = Future()

        def send() -> None:
            with RawClient(broker.bootstrap) as c:
                record = build_batch([(None, b"durable", [], NOW_MS)])
                answered.set_result(produce(c, "durable", record))

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert entered.wait(10)
            assert not answered.done()  # the fsync is held, so the acknowledgement is too
            with RawClient(broker.bootstrap) as other:  # the loop is not held
                other.request(ApiVersionsRequest(), 3)
            assert not answered.done()
        finally:
            release.set()
            sender.join(10)
        assert answered.result(10).error_code == 0
        assert answered.result().base_offset == 1
        assert fsync_threads
        assert loop_thread not in fsync_threads
