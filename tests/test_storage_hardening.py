"""The data directory under an unlucky operator: a second broker, corrupt metadata, topics too
big to open, topics that cannot be opened, and a disk that fills up — all with real brokers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.admin import (
    CreateTopicsRequest,
    DeleteTopicsRequest,
)
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.producer import InitProducerIdRequest, ProduceRequest

from streambus.errors import KafkaStorageError
from streambus.records import build_batch
from streambus.storage import LogManager
from streambus.storage.datadir import DataDirError
from streambus.structs import TopicPartition
from streambus.topic_config import TopicConfig
from tests.harness import ROOT, BrokerProcess, BrokerThread, RawClient, scrape, total
from tests.test_durability import consume_all

TD = ProduceRequest.TopicProduceData
PD = TD.PartitionProduceData
STORAGE_ERROR = 56
TOPIC_ALREADY_EXISTS = 36
INVALID_PARTITIONS = 37


# -- raw requests ------------------------------------------------------------------------------
def produce(client: RawClient, topic: str, records: bytes, partition: int = 0) -> Any:
    request = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[TD(name=topic, partition_data=[PD(index=partition, records=records)])],
    )
    return client.request(request, 9).responses[0].partition_responses[0]


def create_topic(client: RawClient, name: str, partitions: int) -> Any:
    T = CreateTopicsRequest.CreatableTopic
    request = CreateTopicsRequest(
        topics=[
            T(
                name=name,
                num_partitions=partitions,
                replication_factor=1,
                assignments=[],
                configs=[],
            )
        ],
        timeout_ms=10_000,
        validate_only=False,
    )
    return client.request(request, 7).topics[0]


def delete_topic(client: RawClient, name: str) -> Any:
    request = DeleteTopicsRequest(
        topics=[DeleteTopicsRequest.DeleteTopicState(name=name, topic_id=uuid.UUID(int=0))],
        timeout_ms=10_000,
    )
    return client.request(request, 6).responses[0]


def metadata(client: RawClient, *names: str) -> dict[str, Any]:
    topics = [MetadataRequest.MetadataRequestTopic(name=n, topic_id=None) for n in names]
    request = MetadataRequest(
        topics=topics,
        allow_auto_topic_creation=False,
        include_cluster_authorized_operations=False,
        include_topic_authorized_operations=False,
    )
    return {t.name: t for t in client.request(request, 9).topics}


def init_producer_id(client: RawClient) -> int:
    request = InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60_000)
    return int(client.request(request, 2).error_code)


def commit_offset(client: RawClient, group: str, topic: str, offset: int) -> int:
    """A commit outside any generation (a simple consumer's): the group protocol tests'."""
    from tests.test_group_protocol import commit

    return commit(client, -1, "", offset, topic, group=group)


def serve_once(data_dir: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``streambus serve`` that is expected to refuse to start."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "streambus",
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


# -- one broker per data directory -------------------------------------------------------------
def test_second_broker_on_the_same_dir_exits_naming_the_holder(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    data = tmp_path / "data"
    with BrokerProcess(data) as first:
        assert first.proc is not None
        with RawClient(first.bootstrap) as client:
            assert create_topic(client, "kept", 2).error_code == 0
        producer = Producer({"bootstrap.servers": first.bootstrap, "acks": "all"})
        acked: list[tuple[int, int, bytes]] = []

        def on_delivery(err: Any, msg: Any) -> None:
            assert err is None, err
            acked.append((msg.partition(), msg.offset(), msg.value()))

        for i in range(500):
            producer.produce(
                "kept", f"before-{i}".encode(), partition=i % 2, on_delivery=on_delivery
            )
        assert producer.flush(30) == 0

        second = BrokerProcess(data)
        second.log_path = tmp_path / "second.log"
        with pytest.raises(RuntimeError, match="exited with"):
            second.start()
        second.__exit__()  # closes its log file
        assert second.proc is not None
        assert second.proc.returncode != 0
        out = second.log_text()
        assert "Traceback" not in out
        errors = error_lines(out)
        assert len(errors) == 1, out
        assert str(data / ".lock") in errors[0]
        assert f"pid {first.proc.pid}" in errors[0]

        # The first broker never noticed: it keeps serving and holds every record.
        assert first.proc.poll() is None
        for i in range(500):
            producer.produce(
                "kept", f"after-{i}".encode(), partition=i % 2, on_delivery=on_delivery
            )
        assert producer.flush(30) == 0
        got = consume_all(first.bootstrap, "kept", 2, len(acked))
        assert sorted((p, o, v) for p, o, _, v in got) == sorted(acked)
        assert first.stop() == 0
    assert (data / ".lock").read_text().strip() == str(first.proc.pid)

    # The lock dies with its holder: the directory starts again after a clean stop.
    with BrokerProcess(data) as again:
        got = consume_all(again.bootstrap, "kept", 2, len(acked))
        assert len(got) == 1000


def test_two_in_process_brokers_on_one_dir(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data") as first:
        second = BrokerThread(tmp_path / "data")
        try:
            with pytest.raises(DataDirError, match=r"\.lock is locked by pid"):
                second.__enter__()
        finally:
            second.__exit__()
        assert first.broker.status.name == "RUNNING"


# -- a data directory that cannot be used ------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"\xff\xfe\x00garbage\x00", "not UTF-8"),
        (b"version=1\nthis line is not a property\n", "line 2 is not key=value"),
        (b"version=1\nnode.id=1\n", "no cluster.id"),
        (b"version=1\ncluster.id=a b/c\nnode.id=1\n", "is not a cluster id"),
    ],
)
def test_corrupt_meta_properties_is_one_clear_line(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.properties").write_bytes(content)
    result = serve_once(data)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert str(data / "meta.properties") in errors[0]
    assert complaint in errors[0]
    assert (data / "meta.properties").read_bytes() == content  # nothing guessed or rewritten


def test_data_dir_that_is_a_file_is_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    result = serve_once(data)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert f"data directory {data} is not a directory" in errors[0]


def test_data_dir_under_a_file_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    for data in (blocker / "broker", blocker / "a" / "b"):
        result = serve_once(data)
        assert result.returncode != 0
        out = result.stdout + result.stderr
        assert "Traceback" not in out
        assert "Errno" not in out
        errors = error_lines(out)
        assert len(errors) == 1, out
        assert f"data directory {data} cannot be created: {blocker} is a file" in errors[0]


# -- topic size against what the broker can open -----------------------------------------------
def _nofile(limit: int) -> Any:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return lower


def test_topic_too_big_for_the_open_files_limit_is_refused_and_restart_works(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with BrokerProcess(data, preexec_fn=_nofile(1024)) as broker, RawClient(broker.bootstrap) as c:
        # 1024 descriptors: 256 reserved, half the rest for connections: room for 128 partitions.
        refused = create_topic(c, "huge", 7000)
        assert refused.error_code == INVALID_PARTITIONS
        assert "RLIMIT_NOFILE" in refused.error_message
        assert not (data / "topics" / "huge").exists()
        assert create_topic(c, "fits", 100).error_code == 0
        refused = create_topic(c, "one-too-many", 29)
        assert refused.error_code == INVALID_PARTITIONS
        assert not (data / "topics" / "one-too-many").exists()
        assert produce(c, "fits", build_batch([(b"k", b"v", [], 1)]), 99).error_code == 0
        assert broker.stop() == 0

    with BrokerProcess(data, preexec_fn=_nofile(1024)) as broker, RawClient(broker.bootstrap) as c:
        topics = metadata(c, "fits", "huge")
        assert len(topics["fits"].partitions) == 100
        assert topics["huge"].error_code == 3  # UNKNOWN_TOPIC_OR_PARTITION: never made
        assert "Traceback" not in broker.log_text()
        assert broker.stop() == 0

    # What the unchecked creation used to leave: metadata for more partitions than can open.
    legacy = data / "topics" / "legacy"
    legacy.mkdir()
    meta = {"name": "legacy", "topic_id": str(uuid.uuid4()), "partitions": 7000, "overrides": {}}
    (legacy / "topic.json").write_text(json.dumps(meta))
    with BrokerProcess(data, preexec_fn=_nofile(1024)) as broker, RawClient(broker.bootstrap) as c:
        topics = metadata(c, "fits", "legacy")
        assert [p.error_code for p in topics["fits"].partitions] == [0] * 100
        assert {p.error_code for p in topics["legacy"].partitions} == {STORAGE_ERROR}
        assert produce(c, "fits", build_batch([(b"k", b"v", [], 1)]), 99).base_offset == 1
        assert "Too many open files" in broker.log_text()
        assert delete_topic(c, "legacy").error_code == 0


def test_max_partitions_limit(tmp_path: Path) -> None:
    env = {"STREAMBUS_MAX_PARTITIONS": "12"}
    with BrokerProcess(tmp_path / "data", env=env) as broker, RawClient(broker.bootstrap) as c:
        assert create_topic(c, "a", 10).error_code == 0
        refused = create_topic(c, "b", 3)
        assert refused.error_code == INVALID_PARTITIONS
        assert "max.partitions limit of 12" in refused.error_message
        assert create_topic(c, "b", 2).error_code == 0


@pytest.fixture
def scarce_descriptors() -> Iterator[list[int]]:
    """This process's open-files limit lowered, and all but a few descriptors taken."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    held: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(40):  # a few free: enough for some partitions, not for 100
            os.close(held.pop())
        yield held
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_creation_that_runs_out_of_descriptors_leaves_nothing(
    tmp_path: Path, scarce_descriptors: list[int]
) -> None:
    manager = LogManager(tmp_path, TopicConfig())
    manager.load()
    try:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(KafkaStorageError, match="nothing was kept") as caught:
            manager.create_topic("wide", 100, {})  # the budget allows 512; 40 fds are free
        assert "Too many open files" in str(caught.value)
        assert len(os.listdir("/proc/self/fd")) == before  # every descriptor given back
        assert not (tmp_path / "topics" / "wide").exists()
        assert "wide" not in manager.topics()
        assert manager.health.errors() == {"EMFILE": 1}
        for fd in scarce_descriptors[:400]:
            os.close(fd)
        del scarce_descriptors[:400]
        manager.create_topic("wide", 100, {})  # the same name is free: nothing half-made
        assert not manager.health.failing
    finally:
        manager.close()
    reopened = LogManager(tmp_path, TopicConfig())
    reopened.load()
    try:
        assert reopened.topics()["wide"].partitions == 100
    finally:
        reopened.close()


# -- a topic that cannot be opened is offline, not fatal ----------------------------------------
def test_unopenable_topics_are_offline_and_the_rest_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    with BrokerThread(data) as b, RawClient(b.bootstrap) as c:
        for name, partitions in (("good", 1), ("bad-meta", 3), ("bad-log", 2)):
            assert create_topic(c, name, partitions).error_code == 0
            for p in range(partitions):
                assert produce(c, name, build_batch([(b"k", b"v", [], 1)]), p).error_code == 0
    (data / "topics" / "bad-meta" / "topic.json").write_text('{"name": "bad-meta", "partit')
    segment = data / "topics" / "bad-log" / "1" / "00000000000000000000.log"
    segment.unlink()
    segment.mkdir()  # the partition's log cannot be opened

    caplog.set_level(logging.ERROR, logger="streambus.storage")
    with BrokerThread(data) as b, RawClient(b.bootstrap) as c:
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(str(data / "topics" / "bad-meta" / "topic.json") in m for m in logged)
        assert any(str(segment.parent) in m and "offline" in m for m in logged)
        assert total(b.scrape(), "streambus_offline_partitions") == 5

        topics = metadata(c, "good", "bad-meta", "bad-log")
        assert [p.error_code for p in topics["good"].partitions] == [0]
        for name, partitions in (("bad-meta", 3), ("bad-log", 2)):
            assert [p.error_code for p in topics[name].partitions] == [STORAGE_ERROR] * partitions
            assert {p.leader_id for p in topics[name].partitions} == {-1}
        assert produce(c, "good", build_batch([(b"k", b"v2", [], 2)])).base_offset == 1

        refused = produce(c, "bad-meta", build_batch([(b"k", b"v", [], 1)]))
        assert refused.error_code == STORAGE_ERROR

        exists = create_topic(c, "bad-meta", 1)
        assert exists.error_code == TOPIC_ALREADY_EXISTS
        assert "offline" in exists.error_message

        assert delete_topic(c, "bad-meta").error_code == 0
        assert delete_topic(c, "bad-log").error_code == 0
        assert not (data / "topics" / "bad-meta").exists()
        assert total(b.scrape(), "streambus_offline_partitions") == 0
        assert create_topic(c, "bad-meta", 2).error_code == 0
        assert produce(c, "bad-meta", build_batch([(b"k", b"v", [], 1)]), 1).base_offset == 0


def test_offsets_topic_that_lost_its_metadata_is_restored(tmp_path: Path) -> None:
    """What an earlier full disk left behind: __consumer_offsets without topic.json."""
    data = tmp_path / "data"
    with BrokerThread(data) as b, RawClient(b.bootstrap) as c:
        assert create_topic(c, "t", 1).error_code == 0
        assert commit_offset(c, "g", "t", 42) == 0
    (data / "topics" / "__consumer_offsets" / "topic.json").unlink()
    with BrokerThread(data) as b, RawClient(b.bootstrap) as c:
        assert b.broker.groups.offsets.fetch("g")[TopicPartition("t", 0)].offset == 42
        assert commit_offset(c, "g", "t", 43) == 0
        assert total(b.scrape(), "streambus_offline_partitions") == 0


# -- a full disk --------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` at ``mnt``, to fill up; skips where mounting is refused."""
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        yield mnt


def fill(path: Path, leave: int) -> None:
    """Write a ballast file until only about ``leave`` bytes remain free."""
    free = shutil.disk_usage(path.parent).free
    with path.open("wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, free - leave))
        f.flush()


def test_full_disk_answers_storage_error_and_resumes(tmp_path: Path, small_disk: Path) -> None:
    data = small_disk / "data"
    ballast = small_disk / "ballast"
    broker = BrokerProcess(data, "--topic-config", "segment.bytes=65536")
    broker.log_path = tmp_path / "broker.log"  # not on the disk being filled
    with broker, RawClient(broker.bootstrap) as c:
        assert create_topic(c, "fill", 1).error_code == 0
        acked: dict[int, bytes] = {}
        value = os.urandom(3000)

        def send(i: int) -> Any:
            answer = produce(c, "fill", build_batch([(b"k%d" % i, value + b"%d" % i, [], 1)]))
            if answer.error_code == 0:
                acked[answer.base_offset] = value + b"%d" % i
            return answer

        for i in range(20):
            assert send(i).error_code == 0
        fill(ballast, 100_000)
        failures = 0
        for i in range(20, 400):  # through segment rolls, index entries, and then a full disk
            answer = send(i)
            if answer.error_code:
                assert answer.error_code == STORAGE_ERROR
                failures += 1
        assert failures >= 10
        assert sorted(acked) == list(range(len(acked)))  # no offset burned by a failure
        # Every other write path answers too, and leaves nothing half-made.
        assert init_producer_id(c) == STORAGE_ERROR
        assert commit_offset(c, "g", "fill", 5) == STORAGE_ERROR
        made = create_topic(c, "new", 4)
        assert made.error_code == STORAGE_ERROR
        assert not (data / "topics" / "new").exists()
        assert not (data / "topics" / "__consumer_offsets").exists()

        metrics = f"http://127.0.0.1:{broker.metrics_port}/metrics"
        samples = scrape(metrics)
        assert total(samples, "streambus_storage_write_failing") == 1
        assert total(samples, "streambus_storage_write_errors_total", reason="ENOSPC") >= failures

        ballast.unlink()
        answer = send(1000)
        assert answer.error_code == 0
        assert answer.base_offset == max(acked)
        assert init_producer_id(c) == 0
        assert commit_offset(c, "g", "fill", 5) == 0
        assert create_topic(c, "new", 4).error_code == 0
        assert total(scrape(metrics), "streambus_storage_write_failing") == 0

        log_text = broker.log_text()
        assert log_text.count("storage writes failing") == 1, log_text
        assert log_text.count("storage writes succeed again") == 1, log_text
        assert "Traceback" not in log_text
        assert broker.stop() == 0

    restarted = BrokerProcess(data)
    restarted.log_path = tmp_path / "restarted.log"
    with restarted, RawClient(restarted.bootstrap) as c:
        got = consume_all(restarted.bootstrap, "fill", 1, len(acked))
        assert {offset: v for _, offset, _, v in got} == acked
        assert commit_offset(c, "g", "fill", 6) == 0
        assert "truncating" not in restarted.log_text()  # nothing half-written was left


def test_meta_files_written_atomically(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with BrokerThread(data) as b:
        b.run(b.broker.create_topic, "t", 2, {})
        assert b.call(b.broker.producer_ids.allocate()) == (0, 0)
    assert json.loads((data / "topics" / "t" / "topic.json").read_text())["partitions"] == 2
    assert (data / "producer_ids").read_text() == "1000\n"
    assert not list(data.rglob("*.tmp"))
    props = (data / "meta.properties").read_text()
    assert "cluster.id=" in props
    assert "node.id=1" in props


def test_appends_on_a_filling_disk_never_leave_a_torn_log(tmp_path: Path) -> None:
    """Every failed append, whichever write failed (the .log, an index entry, the seal of a
    segment or the files of the next one), leaves the log exactly as the acked appends made it."""
    config = TopicConfig(segment_bytes=8192, index_interval_bytes=64)
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        manager = LogManager(mnt, config)
        manager.load()
        manager.create_topic("t", 1, {})
        plog = manager.log(TopicPartition("t", 0))
        acked: list[bytes] = []
        failures = 0
        ballast = mnt / "ballast"
        try:
            for leave in range(0, 12_000, 379):  # the disk fills at a different point each time
                fill(ballast, leave)
                for i in range(8):
                    value = b"%d-%d-" % (leave, i) * 40
                    try:
                        result = plog.append(build_batch([(b"k", value, [], 1)]))
                    except KafkaStorageError:
                        failures += 1
                        assert plog.log_end_offset == len(acked)
                        continue
                    assert result.base_offset == len(acked)
                    acked.append(value)
                ballast.unlink()
            assert failures > 20
            assert manager.health.errors().keys() == {"ENOSPC"}
            assert not manager.health.failing  # the last appends, with space, succeeded
        finally:
            manager.close()
        reopened = LogManager(mnt, config)
        reopened.load()
        try:
            plog = reopened.log(TopicPartition("t", 0))
            assert plog.log_end_offset == len(acked)
            got = [r.value for h in plog.iter_headers() for r in _records(plog, h)]
            assert got == acked
        finally:
            reopened.close()


def _records(plog: Any, header: Any) -> list[Any]:
    from streambus.records import iter_records

    data = plog.read(header.base_offset, header.size)
    return list(iter_records(data, 0, header))
