"""DeleteRecords, DescribeLogDirs, OffsetDelete, ListOffsets' special timestamps and
authorized operations, driven through confluent-kafka's and kafka-python's admin clients
and raw frames against a real broker."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec
from kafka import KafkaAdminClient, KafkaConsumer
from kafka import errors as kerrors
from kafka.protocol.admin import DeleteRecordsRequest, DescribeClusterRequest
from kafka.protocol.consumer import ListOffsetsRequest
from kafka.protocol.metadata import MetadataRequest
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from streambus.records import build_batch
from streambus.storage import PartitionLog
from streambus.topic_config import TopicConfig
from tests.harness import (
    BrokerProcess,
    BrokerThread,
    ClusterProcesses,
    RawClient,
    fetch_request,
    wait_until,
)

OFFSET_OUT_OF_RANGE = 1
UNKNOWN_TOPIC_OR_PARTITION = 3
GROUP_ID_NOT_FOUND = 69
GROUP_SUBSCRIBED_TO_TOPIC = 86
# Kafka 4.4's AclEntry.supportedOperations(TOPIC / CLUSTER), as bit fields 3576 and 8096;
# kafka-python decodes them into the set of bits, and "not requested" into None.
TOPIC_OPERATIONS = {3, 4, 5, 6, 7, 8, 10, 11}
CLUSTER_OPERATIONS = {5, 7, 8, 9, 10, 11, 12}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path / "data") as b:
        yield b


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def _create(bootstrap: str, topic: str, partitions: int = 1, **configs: str) -> None:
    admin = _admin(bootstrap)  # kept alive until the answer: its futures die with it
    futures = admin.create_topics(
        [NewTopic(topic, partitions, 1, config=configs)], operation_timeout=10
    )
    futures[topic].result(15)


def _produce(bootstrap: str, topic: str, count: int, *, start: int = 0, ts: Any = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for i in range(start, start + count):
        stamp = ts(i) if ts is not None else 0
        producer.produce(topic, value=f"m{i}".encode(), partition=0, timestamp=stamp)
        producer.flush(10)  # a batch each: small segments then hold a few each
    producer.flush(10)


def _segments(data_dir: Path, topic: str) -> list[int]:
    return sorted(int(p.stem) for p in (data_dir / "topics" / topic / "0").glob("*.log"))


def _earliest(bootstrap: str, topic: str, spec: OffsetSpec) -> Any:
    admin = _admin(bootstrap)
    got = admin.list_offsets({TopicPartition(topic, 0): spec})
    return got[TopicPartition(topic, 0)].result(10)


def _delete_records(bootstrap: str, topic: str, offset: int) -> Any:
    admin = _admin(bootstrap)
    got = admin.delete_records([TopicPartition(topic, 0, offset)])
    return got[TopicPartition(topic, 0)].result(10)


# -- storage ----------------------------------------------------------------------------------


def test_log_start_moves_inside_a_segment_and_survives_reopen(tmp_path: Path) -> None:
    config = TopicConfig(segment_bytes=300, index_interval_bytes=64)
    plog = PartitionLog.open(tmp_path / "p", config)
    for i in range(20):
        plog.append(build_batch([(None, b"x" * 40, (), 1000 + i)]))
    segments = plog.segment_count
    assert segments > 3
    start_of_third = sorted(int(p.stem) for p in (tmp_path / "p").glob("*.log"))[2]
    doomed = plog.advance_log_start(start_of_third + 1)
    plog.persist_log_start()
    for segment in doomed:
        segment.delete()
    assert len(doomed) == 2
    assert plog.segment_count == segments - 2
    assert plog.log_start_offset == start_of_third + 1
    assert plog.offset_for_timestamp(0) == (start_of_third + 1, 1000 + start_of_third + 1)
    plog.close()
    again = PartitionLog.open(tmp_path / "p", config)
    assert again.log_start_offset == start_of_third + 1
    assert again.advance_log_start(5) == []  # never backwards
    # to the log end: every segment goes, the log continues at the same end
    doomed = again.advance_log_start(again.log_end_offset)
    assert again.segment_count == 1
    assert again.log_start_offset == 20 == again.log_end_offset
    assert len(doomed) == segments - 2
    again.close()


# -- DeleteRecords ------------------------------------------------------------------------------


def test_delete_records_moves_the_log_start(broker: BrokerThread) -> None:
    boot = broker.bootstrap
    _create(boot, "dr", **{"segment.bytes": "400"})
    _produce(boot, "dr", 30)
    before = _segments(broker.data_dir, "dr")
    assert len(before) > 3
    cut = before[2] + 1  # inside the third segment
    assert _delete_records(boot, "dr", cut).low_watermark == cut
    # whole segments below it are deleted, the one holding it stays
    assert _segments(broker.data_dir, "dr") == before[2:]
    assert _earliest(boot, "dr", OffsetSpec.earliest()).offset == cut

    consumer = Consumer(
        {"bootstrap.servers": boot, "group.id": "dr-reader", "auto.offset.reset": "earliest"}
    )
    consumer.assign([TopicPartition("dr", 0, 0)])  # below the log start: reset to earliest
    first = None
    deadline = time.monotonic() + 15
    while first is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            first = msg
    consumer.close()
    assert first is not None
    assert first.offset() == cut
    assert first.value() == f"m{cut}".encode()

    with RawClient(boot) as raw:
        fetched = raw.request(fetch_request("dr"), 12)  # from offset 0
        part = fetched.responses[0].partitions[0]
        assert part.error_code == OFFSET_OUT_OF_RANGE
        assert part.log_start_offset == cut

        def delete(topic: str, offset: int) -> Any:
            D = DeleteRecordsRequest
            request = D(
                topics=[
                    D.DeleteRecordsTopic(
                        name=topic,
                        partitions=[
                            D.DeleteRecordsTopic.DeleteRecordsPartition(
                                partition_index=0, offset=offset
                            )
                        ],
                    )
                ],
                timeout_ms=5000,
            )
            return raw.request(request, 2).topics[0].partitions[0]

        past = delete("dr", 31)
        assert (past.error_code, past.low_watermark) == (OFFSET_OUT_OF_RANGE, -1)
        assert delete("nope", 0).error_code == UNKNOWN_TOPIC_OR_PARTITION
        lower = delete("dr", 1)  # below the log start: nothing moves
        assert (lower.error_code, lower.low_watermark) == (0, cut)
        to_hw = delete("dr", -1)  # -1: up to the high watermark
        assert (to_hw.error_code, to_hw.low_watermark) == (0, 30)
    assert len(_segments(broker.data_dir, "dr")) == 1
    _produce(boot, "dr", 1, start=30)
    assert _earliest(boot, "dr", OffsetSpec.latest()).offset == 31


def test_delete_records_with_kafka_python(broker: BrokerThread) -> None:
    _create(broker.bootstrap, "dr-kp")
    _produce(broker.bootstrap, "dr-kp", 5)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        result = admin.delete_records({KafkaTP("dr-kp", 0): 3})
    finally:
        admin.close()
    assert result[KafkaTP("dr-kp", 0)]["low_watermark"] == 3


def test_deleted_records_stay_deleted_after_a_kill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with BrokerProcess(data) as proc:
        _create(proc.bootstrap, "kept")
        _produce(proc.bootstrap, "kept", 10)
        assert _delete_records(proc.bootstrap, "kept", 7).low_watermark == 7
        proc.stop(signal.SIGKILL)
    with BrokerProcess(data) as proc:
        earliest = wait_until(lambda: _earliest(proc.bootstrap, "kept", OffsetSpec.earliest()))
        assert earliest.offset == 7
        assert _earliest(proc.bootstrap, "kept", OffsetSpec.latest()).offset == 10


# -- DescribeLogDirs ----------------------------------------------------------------------------


def test_describe_log_dirs_reports_sizes_on_disk(broker: BrokerThread) -> None:
    _create(broker.bootstrap, "dirs", 2)
    _produce(broker.bootstrap, "dirs", 6)
    on_disk = sum(p.stat().st_size for p in (broker.data_dir / "topics/dirs/0").glob("*.log"))
    assert on_disk > 0
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        described = admin.describe_log_dirs()
    finally:
        admin.close()
    text = repr(described)
    assert str(broker.data_dir.resolve()) in text
    with RawClient(broker.bootstrap) as raw:
        from kafka.protocol.admin import DescribeLogDirsRequest as L

        response = raw.request(
            L(topics=[L.DescribableLogDirTopic(topic="dirs", partitions=[0, 1])]), 4
        )
    assert response.error_code == 0
    (result,) = response.results
    assert result.log_dir == str(broker.data_dir.resolve())
    assert result.total_bytes > 0
    assert 0 <= result.usable_bytes <= result.total_bytes
    (topic,) = result.topics
    sizes = {p.partition_index: p for p in topic.partitions}
    assert sizes[0].partition_size == on_disk
    assert sizes[1].partition_size == 0
    assert all(p.offset_lag == 0 and not p.is_future_key for p in topic.partitions)


# -- OffsetDelete -------------------------------------------------------------------------------


def test_offset_delete_by_kafka_rules(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with BrokerThread(data) as b:
        _create(b.bootstrap, "used")
        _create(b.bootstrap, "other")
        _produce(b.bootstrap, "used", 3)
        consumer = KafkaConsumer(  # closed below: the group must lose its member
            "used",
            bootstrap_servers=b.bootstrap,
            group_id="g1",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        wait_until(lambda: consumer.poll(200) or consumer.assignment(), timeout=30)
        consumer.commit(
            {
                KafkaTP("used", 0): OffsetAndMetadata(2, "", -1),
                KafkaTP("other", 0): OffsetAndMetadata(1, "", -1),
            }
        )
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
        try:
            # a live member subscribes to "used": its offset stays, "other"'s goes
            errors = admin.delete_group_offsets("g1", [KafkaTP("used", 0), KafkaTP("other", 0)])
            assert errors[KafkaTP("used", 0)] is kerrors.GroupSubscribedToTopicError
            assert errors[KafkaTP("other", 0)] is kerrors.NoError
            committed = admin.list_group_offsets("g1")["g1"]
            assert KafkaTP("used", 0) in committed
            assert KafkaTP("other", 0) not in committed
            consumer.close()
            described = admin.describe_groups(["g1"])["g1"]
            # the members gone, still a consumer group, now Empty
            assert (described["protocol_type"], described["group_state"]) == ("consumer", "Empty")
            errors = admin.delete_group_offsets("g1", [KafkaTP("used", 0)])
            assert errors == {KafkaTP("used", 0): kerrors.NoError}
            assert admin.list_group_offsets("g1")["g1"] == {}
            with pytest.raises(kerrors.GroupIdNotFoundError):
                admin.delete_group_offsets("never-seen", [KafkaTP("used", 0)])
        finally:
            admin.close()
            consumer.close()  # again after a failure: no socket left open
    with BrokerThread(data) as b:  # tombstones: nothing comes back after a restart
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
        try:
            assert admin.list_group_offsets("g1")["g1"] == {}
        finally:
            admin.close()


# -- ListOffsets --------------------------------------------------------------------------------


def _list_offsets(raw: RawClient, topic: str, timestamp: int, version: int = 9) -> Any:
    L = ListOffsetsRequest
    request = L(
        replica_id=-1,
        isolation_level=0,
        topics=[
            L.ListOffsetsTopic(
                name=topic,
                partitions=[
                    L.ListOffsetsTopic.ListOffsetsPartition(
                        partition_index=0, current_leader_epoch=-1, timestamp=timestamp
                    )
                ],
            )
        ],
        timeout_ms=1000,
    )
    return raw.request(request, version).topics[0].partitions[0]


def test_list_offsets_special_timestamps(broker: BrokerThread) -> None:
    boot = broker.bootstrap
    _create(boot, "times")
    with RawClient(boot) as raw:
        empty = _list_offsets(raw, "times", -3)
        assert (empty.error_code, empty.offset, empty.timestamp) == (0, -1, -1)
    base = int(time.time() * 1000) - 60_000
    stamps = [base + 10, base + 50, base + 20, base + 50, base + 30]  # max first at offset 1
    _produce(boot, "times", 5, ts=lambda i: stamps[i])
    _delete_records(boot, "times", 1)
    with RawClient(boot) as raw:
        latest_max = _list_offsets(raw, "times", -3)
        assert (latest_max.offset, latest_max.timestamp) == (1, base + 50)
        assert latest_max.leader_epoch >= 0
        assert _list_offsets(raw, "times", -4).offset == 1  # earliest local: the log start
        tiered = _list_offsets(raw, "times", -5)  # no tiered storage
        assert (tiered.error_code, tiered.offset, tiered.leader_epoch) == (0, -1, -1)
        assert _list_offsets(raw, "times", -2, version=10).offset == 1
        assert _list_offsets(raw, "times", -1).offset == 5
        # a timestamp below the log start's records: the first record at or past it
        assert _list_offsets(raw, "times", base).offset == 1
        assert _list_offsets(raw, "times", base + 25).offset == 1
        assert _list_offsets(raw, "times", base + 60).offset == -1
        assert _list_offsets(raw, "absent", -3).error_code == UNKNOWN_TOPIC_OR_PARTITION
    got = _earliest(boot, "times", OffsetSpec.max_timestamp())
    assert (got.offset, got.timestamp) == (1, base + 50)


# -- authorized operations ----------------------------------------------------------------------


def test_authorized_operations_when_asked(broker: BrokerThread) -> None:
    boot = broker.bootstrap
    _create(boot, "ops")
    M = MetadataRequest
    with RawClient(boot) as raw:
        asked = raw.request(
            M(
                topics=[M.MetadataRequestTopic(name="ops")],
                allow_auto_topic_creation=False,
                include_cluster_authorized_operations=True,
                include_topic_authorized_operations=True,
            ),
            10,
        )
        assert asked.authorized_operations == CLUSTER_OPERATIONS
        assert asked.topics[0].authorized_operations == TOPIC_OPERATIONS
        plain = raw.request(
            M(
                topics=[M.MetadataRequestTopic(name="ops")],
                allow_auto_topic_creation=False,
                include_cluster_authorized_operations=False,
                include_topic_authorized_operations=False,
            ),
            10,
        )
        assert plain.authorized_operations is None
        assert plain.topics[0].authorized_operations is None
        cluster = raw.request(
            DescribeClusterRequest(include_cluster_authorized_operations=True, endpoint_type=1), 1
        )
        assert cluster.authorized_operations == CLUSTER_OPERATIONS
    admin = _admin(boot)
    described = admin.describe_cluster(include_authorized_operations=True).result(10)
    assert described.authorized_operations is not None
    assert len(described.authorized_operations) == 7
    topics = admin.describe_topics(TopicCollection(["ops"]), include_authorized_operations=True)
    ops = topics["ops"].result(10).authorized_operations
    assert ops is not None
    assert len(ops) == 8


# -- followers ----------------------------------------------------------------------------------


def test_followers_follow_the_leaders_log_start(tmp_path: Path) -> None:
    from tests.test_replication import REPL_ENV, create_replicated, wait_cluster_size, wait_in_sync

    with ClusterProcesses(tmp_path, 3, env=REPL_ENV) as cluster:
        wait_cluster_size(cluster, 3)
        create_replicated(cluster.bootstrap, "trimmed", 1)
        view = wait_in_sync(cluster, "trimmed", 1)[0]
        producer = Producer({"bootstrap.servers": cluster.bootstrap, "acks": "all"})
        for i in range(10):
            producer.produce("trimmed", value=f"r{i}".encode(), partition=0)
        assert producer.flush(30) == 0
        leader = cluster.brokers[view.leader]
        assert _delete_records(leader.bootstrap, "trimmed", 6).low_watermark == 6
        for node in view.replicas:
            path = cluster.brokers[node].data_dir / "topics/trimmed/0/log-start.checkpoint"
            wait_until(lambda p=path: p.exists() and p.read_text().split() == ["0", "6"], 60)
