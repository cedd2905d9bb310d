"""Transactions with real clients on a real broker: confluent-kafka's transactional
producer (commit, abort, send_offsets_to_transaction, zombie fencing), a transaction
left open and aborted by its timeout (counted through a real scrape), Kafka's error
codes for bad input, and the admin APIs (ListTransactions, DescribeTransactions) through
raw requests and kafka-python's admin client.

Assertions about what a ``read_committed`` consumer sees need Fetch's isolation level
(the partition service's last stable offset and aborted transactions): they are skipped
until ``PartitionService.last_stable_offset`` exists.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka.admin import AbortTransactionSpec, KafkaAdminClient
from kafka.protocol.admin import (
    DescribeProducersRequest,
    DescribeTransactionsRequest,
    ListTransactionsRequest,
)
from kafka.protocol.consumer import OffsetFetchRequest
from kafka.protocol.metadata import FindCoordinatorRequest
from kafka.protocol.producer import (
    AddPartitionsToTxnRequest,
    EndTxnRequest,
    InitProducerIdRequest,
    TxnOffsetCommitRequest,
)
from kafka.structs import TopicPartition as KafkaTP

from streambus.partitions import PartitionService
from streambus.structs import TopicPartition as SbTP
from tests.harness import BrokerThread, RawClient, total, wait_until

UNSTABLE_OFFSET_COMMIT = 88
READ_COMMITTED = hasattr(PartitionService, "last_stable_offset")
needs_read_committed = pytest.mark.skipif(
    not READ_COMMITTED, reason="waits for Fetch isolation_level=read_committed (the LSO)"
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path / "data",
        transaction_state_log_num_partitions=4,
        transaction_abort_timed_out_transaction_cleanup_interval_ms=200,
        group_initial_rebalance_delay_ms=0,
    ) as b:
        yield b


def _create(bootstrap: str, *topics: tuple[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1) for name, partitions in topics])
    for future in futures.values():
        future.result(15)


def _producer(bootstrap: str, txn_id: str, **extra: Any) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": txn_id,
            "linger.ms": 5,
            **extra,
        }
    )


def _read_all(bootstrap: str, topics: list[str], isolation: str, expect: int) -> list[bytes]:
    """Every value in ``topics`` from the start; waits until ``expect`` values are seen
    (then a little longer for anything more) or the deadline."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    consumer.subscribe(topics)
    values: list[bytes] = []
    deadline = time.monotonic() + 20
    idle_after_expected = 0
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(values) >= expect:
                    idle_after_expected += 1
                    if idle_after_expected >= 5:
                        break
                continue
            if msg.error():
                continue
            values.append(msg.value())
    finally:
        consumer.close()
    return values


def test_commit_and_abort_across_topics_and_partitions(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("txn-a", 3), ("txn-b", 2))
    producer = _producer(broker.bootstrap, "txn-commit-abort")
    producer.init_transactions(15)
    producer.begin_transaction()
    committed = []
    for i in range(30):
        topic, partitions = ("txn-a", 3) if i % 2 else ("txn-b", 2)
        value = f"commit-{i}".encode()
        producer.produce(topic, value, partition=(i // 2) % partitions)
        committed.append(value)
    producer.commit_transaction(15)
    producer.begin_transaction()
    aborted = []
    for i in range(10):
        value = f"abort-{i}".encode()
        producer.produce("txn-a", value, partition=i % 3)
        aborted.append(value)
    producer.flush(10)
    producer.abort_transaction(15)
    # The producer goes on after an abort: a third transaction commits.
    producer.begin_transaction()
    producer.produce("txn-b", b"after-abort", partition=0)
    producer.commit_transaction(15)

    coordinator = broker.broker.transactions
    meta = broker.run(coordinator.describe, "txn-commit-abort")
    assert meta.state.kafka_name == "CompleteCommit"
    assert {(tp.topic, tp.partition) for tp in meta.partitions} == {("txn-b", 0)}

    # Every record is in the logs (read_uncommitted sees aborted ones too), and markers
    # went to each partition each transaction touched: 5 + 3 + 1 = 9 control batches.
    uncommitted = _read_all(broker.bootstrap, ["txn-a", "txn-b"], "read_uncommitted", 41)
    assert sorted(uncommitted) == sorted([*committed, *aborted, b"after-abort"])
    ends = sum(
        broker.run(lambda tp=tp: broker.broker.partitions.offsets(tp).high_watermark)
        for tp in _tps(("txn-a", 3), ("txn-b", 2))
    )
    assert ends == 41 + 9

    samples = broker.scrape()
    assert total(samples, "streambus_transactions_committed_total") == 2
    assert total(samples, "streambus_transactions_aborted_total", reason="client") == 1
    assert total(samples, "streambus_transaction_duration_seconds_count") == 3
    # Kafka-scale buckets (to 60 s), not the latency view's (to 5 s).
    assert total(samples, "streambus_transaction_duration_seconds_bucket", le="60.0") == 3
    assert total(samples, "streambus_transactions_active") == 0
    producer.flush(5)


def _tps(*topics: tuple[str, int]) -> list[SbTP]:
    return [SbTP(name, p) for name, count in topics for p in range(count)]


@needs_read_committed
def test_read_committed_sees_only_committed(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("rc", 2))
    producer = _producer(broker.bootstrap, "txn-rc")
    producer.init_transactions(15)
    producer.begin_transaction()
    for i in range(10):
        producer.produce("rc", f"c{i}".encode(), partition=i % 2)
    producer.commit_transaction(15)
    producer.begin_transaction()
    for i in range(10):
        producer.produce("rc", f"a{i}".encode(), partition=i % 2)
    producer.flush(10)
    producer.abort_transaction(15)
    seen = _read_all(broker.bootstrap, ["rc"], "read_committed", 10)
    assert sorted(seen) == sorted(f"c{i}".encode() for i in range(10))


def test_send_offsets_to_transaction(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("eos-in", 1), ("eos-out", 1))
    plain = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(20):
        plain.produce("eos-in", f"in-{i}".encode(), partition=0)
    plain.flush(10)
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "eos-group",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if READ_COMMITTED else "read_uncommitted",
        }
    )
    consumer.subscribe(["eos-in"])
    producer = _producer(broker.bootstrap, "txn-eos")
    producer.init_transactions(15)
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 20
        while len(got) < 10 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                got.append(msg)
        producer.begin_transaction()
        for msg in got:
            producer.produce("eos-out", msg.value().upper(), partition=0)
        offsets = [TopicPartition("eos-in", 0, got[-1].offset() + 1)]
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 15)
        producer.commit_transaction(15)
        committed = consumer.committed([TopicPartition("eos-in", 0)], 10)
        assert committed[0].offset == got[-1].offset() + 1

        # Offsets sent in an aborted transaction are dropped: the commit above stands.
        producer.begin_transaction()
        producer.produce("eos-out", b"never", partition=0)
        producer.send_offsets_to_transaction(
            [TopicPartition("eos-in", 0, 19)], consumer.consumer_group_metadata(), 15
        )
        producer.abort_transaction(15)
        committed = consumer.committed([TopicPartition("eos-in", 0)], 10)
        assert committed[0].offset == got[-1].offset() + 1
    finally:
        consumer.close()

    # Reloaded from __consumer_offsets (the transactional records and their markers), the
    # committed offset is the one the committed transaction wrote.
    def reload() -> Any:
        broker.broker.groups.offsets.load()
        return broker.broker.groups.committed("eos-group")

    table = broker.run(reload)
    assert [v.offset for v in table.values()] == [got[-1].offset() + 1]


def test_second_producer_fences_the_first(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("zombie", 1))
    first = _producer(broker.bootstrap, "txn-zombie")
    first.init_transactions(15)
    first.begin_transaction()
    first.produce("zombie", b"from-the-zombie", partition=0)
    first.flush(10)
    # The second producer's init aborts the first one's open transaction and bumps the epoch.
    second = _producer(broker.bootstrap, "txn-zombie")
    second.init_transactions(15)
    with pytest.raises(KafkaException) as excinfo:
        first.commit_transaction(10)
    error = excinfo.value.args[0]
    assert error.fatal() or error.txn_requires_abort()
    assert error.code() in (
        # librdkafka's names for PRODUCER_FENCED / INVALID_PRODUCER_EPOCH / its own fencing
        -144,  # _FENCED
        90,
        47,
    ), error
    second.begin_transaction()
    second.produce("zombie", b"from-the-new-one", partition=0)
    second.commit_transaction(15)
    samples = broker.scrape()
    assert total(samples, "streambus_transactions_aborted_total", reason="fenced") == 1
    assert total(samples, "streambus_transactions_committed_total") == 1


def test_transaction_left_open_is_aborted_after_its_timeout(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("abandoned", 1))
    producer = _producer(broker.bootstrap, "txn-abandoned", **{"transaction.timeout.ms": 1500})
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce("abandoned", b"left-open", partition=0)
    producer.flush(10)
    coordinator = broker.broker.transactions
    assert broker.run(coordinator.describe, "txn-abandoned").state.kafka_name == "Ongoing"
    samples = broker.scrape()
    assert total(samples, "streambus_transactions_active") == 1
    assert total(samples, "streambus_transaction_oldest_open_seconds") > 0

    def aborted() -> float:
        return total(broker.scrape(), "streambus_transactions_aborted_total", reason="timeout")

    assert wait_until(aborted, timeout=20) == 1
    meta = broker.run(coordinator.describe, "txn-abandoned")
    assert meta.state.kafka_name == "CompleteAbort"
    samples = broker.scrape()
    assert total(samples, "streambus_transactions_active") == 0
    assert total(samples, "streambus_transaction_oldest_open_seconds") == 0
    # The abort marker is in the partition, after the record.
    end = broker.run(lambda: broker.broker.partitions.offsets(SbTP("abandoned", 0)).high_watermark)
    assert end == 2
    # The producer it abandoned is fenced: its epoch was bumped by the abort.
    with pytest.raises(KafkaException):
        producer.commit_transaction(10)


def _coordinator_request(client: RawClient, txn_id: str) -> None:
    response = client.request(FindCoordinatorRequest(key=txn_id, key_type=1), 3)
    assert response.error_code == 0, response


def _init(client: RawClient, txn_id: str, timeout_ms: int = 60_000) -> tuple[int, int]:
    response = client.request(
        InitProducerIdRequest(transactional_id=txn_id, transaction_timeout_ms=timeout_ms), 4
    )
    assert response.error_code == 0, response
    return response.producer_id, response.producer_epoch


def test_bad_input_gets_kafka_error_codes(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("bad-input", 1))
    with RawClient(broker.bootstrap) as client:
        _coordinator_request(client, "txn-raw")
        # transaction.max.timeout.ms is enforced at init: INVALID_TRANSACTION_TIMEOUT
        response = client.request(
            InitProducerIdRequest(transactional_id="txn-raw", transaction_timeout_ms=900_001), 4
        )
        assert response.error_code == 50
        # EndTxn for an id that has no producer: INVALID_PRODUCER_ID_MAPPING
        response = client.request(
            EndTxnRequest(
                transactional_id="never-seen", producer_id=42, producer_epoch=0, committed=True
            ),
            3,
        )
        assert response.error_code == 49
        pid, epoch = _init(client, "txn-raw")
        # EndTxn with nothing in the transaction: INVALID_TXN_STATE
        response = client.request(
            EndTxnRequest(
                transactional_id="txn-raw", producer_id=pid, producer_epoch=epoch, committed=True
            ),
            3,
        )
        assert response.error_code == 48
        # A second init bumps the epoch; the old epoch is fenced.
        pid2, epoch2 = _init(client, "txn-raw")
        assert (pid2, epoch2) == (pid, epoch + 1)

        def add(version: int, producer_epoch: int, topic: str = "bad-input") -> int:
            response = client.request(
                AddPartitionsToTxnRequest(
                    v3_and_below_transactional_id="txn-raw",
                    v3_and_below_producer_id=pid,
                    v3_and_below_producer_epoch=producer_epoch,
                    v3_and_below_topics=[
                        AddPartitionsToTxnRequest.AddPartitionsToTxnTopic(
                            name=topic, partitions=[0]
                        )
                    ],
                ),
                version,
            )
            code: int = response.results_by_topic_v3_and_below[0].results_by_partition[0]
            return code.partition_error_code  # type: ignore[attr-defined, no-any-return]

        assert add(3, epoch) == 90  # PRODUCER_FENCED
        assert add(1, epoch) == 47  # INVALID_PRODUCER_EPOCH before KIP-588
        assert add(3, epoch2, topic="no-such-topic") == 3  # UNKNOWN_TOPIC_OR_PARTITION
        assert add(3, epoch2) == 0
        # TxnOffsetCommit for a group the transaction did not add: INVALID_TXN_STATE
        response = client.request(
            TxnOffsetCommitRequest(
                transactional_id="txn-raw",
                group_id="not-added",
                producer_id=pid,
                producer_epoch=epoch2,
                topics=[
                    TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic(
                        name="bad-input",
                        partitions=[
                            TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic.TxnOffsetCommitRequestPartition(
                                partition_index=0, committed_offset=1, committed_metadata=None
                            )
                        ],
                    )
                ],
            ),
            2,
        )
        assert response.topics[0].partitions[0].error_code == 48
        # EndTxn with a stale epoch: PRODUCER_FENCED; then a real abort succeeds.
        response = client.request(
            EndTxnRequest(
                transactional_id="txn-raw", producer_id=pid, producer_epoch=epoch, committed=False
            ),
            3,
        )
        assert response.error_code == 90
        response = client.request(
            EndTxnRequest(
                transactional_id="txn-raw", producer_id=pid, producer_epoch=epoch2, committed=False
            ),
            3,
        )
        assert response.error_code == 0
        # Committing what was aborted: INVALID_TXN_STATE; aborting again is a retry: NONE.
        response = client.request(
            EndTxnRequest(
                transactional_id="txn-raw", producer_id=pid, producer_epoch=epoch2, committed=True
            ),
            3,
        )
        assert response.error_code == 48
    meta = broker.run(broker.broker.transactions.describe, "txn-raw")
    assert meta.state.kafka_name == "CompleteAbort"
    assert no_traceback(broker)


def no_traceback(broker: BrokerThread) -> bool:
    return broker.broker.status.name == "RUNNING"


def test_list_and_describe_transactions(broker: BrokerThread) -> None:
    _create(broker.bootstrap, ("listed", 2))
    producer = _producer(broker.bootstrap, "txn-listed")
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce("listed", b"x", partition=1)
    producer.flush(10)
    done = _producer(broker.bootstrap, "txn-done")
    done.init_transactions(15)
    with RawClient(broker.bootstrap) as client:
        response = client.request(
            ListTransactionsRequest(state_filters=[], producer_id_filters=[]), 0
        )
        states = {t.transactional_id: t.transaction_state for t in response.transaction_states}
        assert states == {"txn-listed": "Ongoing", "txn-done": "Empty"}
        response = client.request(
            ListTransactionsRequest(state_filters=["Ongoing", "Bogus"], producer_id_filters=[]), 0
        )
        assert [t.transactional_id for t in response.transaction_states] == ["txn-listed"]
        assert response.unknown_state_filters == ["Bogus"]
        response = client.request(
            DescribeTransactionsRequest(transactional_ids=["txn-listed", "nobody"]), 0
        )
        listed, nobody = response.transaction_states
        assert listed.error_code == 0
        assert listed.transaction_state == "Ongoing"
        assert [(t.topic, list(t.partitions)) for t in listed.topics] == [("listed", [1])]
        assert listed.transaction_start_time_ms > 0
        assert nobody.error_code == 105  # TRANSACTIONAL_ID_NOT_FOUND
        # What `kafka-transactions find-hanging` asks each partition's leader.
        D = DescribeProducersRequest
        response = client.request(
            D(topics=[D.TopicRequest(name="listed", partition_indexes=[0, 1, 7])]), 0
        )
        by_partition = {p.partition_index: p for p in response.topics[0].partitions}
        assert by_partition[0].error_code == 0
        assert by_partition[0].active_producers == []
        (active,) = by_partition[1].active_producers
        assert (active.producer_id, active.producer_epoch) == (
            listed.producer_id,
            listed.producer_epoch,
        )
        assert active.current_txn_start_offset == 0
        assert active.last_sequence == 0
        assert by_partition[7].error_code == 3  # UNKNOWN_TOPIC_OR_PARTITION
    producer.abort_transaction(15)


def test_kafka_python_admin_lists_describes_and_aborts(broker: BrokerThread) -> None:
    """What ``kafka-transactions.sh`` list/describe/abort do, through kafka-python's admin
    (Kafka 4.4's tools jar is not in .tools: only its client libraries are)."""
    _create(broker.bootstrap, ("hanging", 1))
    producer = _producer(broker.bootstrap, "txn-hanging")
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce("hanging", b"hangs", partition=0)
    producer.flush(10)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        listings = [t for ts in admin.list_transactions().values() for t in ts]
        assert [(t.transactional_id, t.state.value) for t in listings] == [
            ("txn-hanging", "Ongoing")
        ]
        described = admin.describe_transactions(["txn-hanging"])["txn-hanging"]
        assert described.state.value == "Ongoing"
        assert described.topic_partitions == {KafkaTP("hanging", 0)}
        # The operator's abort writes an abort marker straight to the partition's leader.
        admin.abort_transaction(
            AbortTransactionSpec(
                KafkaTP("hanging", 0), described.producer_id, described.producer_epoch, -1
            )
        )
    finally:
        admin.close()
    end = broker.run(lambda: broker.broker.partitions.offsets(SbTP("hanging", 0)).high_watermark)
    assert end == 2  # the record and the abort marker
    producer.abort_transaction(15)


def test_markers_reach_partitions_led_by_other_brokers(tmp_path: Path) -> None:
    """In a cluster the coordinator (the leader of the id's __transaction_state partition)
    writes markers to partitions other brokers lead through WriteTxnMarkers."""
    from tests.harness import ClusterProcesses
    from tests.test_cluster import CLUSTER_ENV, wait_cluster_size

    env = {**CLUSTER_ENV, "STREAMBUS_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "3"}
    with ClusterProcesses(tmp_path, 3, env=env) as cluster:
        wait_cluster_size(cluster, 3)
        _create(cluster.bootstrap, ("spread", 6))
        producer = _producer(cluster.bootstrap, "txn-spread")
        producer.init_transactions(30)
        producer.begin_transaction()
        for p in range(6):
            for i in range(3):
                producer.produce("spread", f"{p}-{i}".encode(), partition=p)
        producer.commit_transaction(30)
        producer.begin_transaction()
        for p in range(6):
            producer.produce("spread", b"aborted", partition=p)
        producer.flush(30)  # abort_transaction purges what is not sent yet
        producer.abort_transaction(30)
        consumer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "watermarks"})

        def highs() -> list[int]:
            return [
                consumer.get_watermark_offsets(TopicPartition("spread", p), 10)[1] for p in range(6)
            ]

        # 3 committed records + commit marker + 1 aborted record + abort marker, everywhere.
        # EndTxn may be answered while a marker to another broker is still being retried
        # (after 5 s), so the last ones are waited for.
        try:
            wait_until(lambda: highs() == [6] * 6, 30, 0.5)
        except TimeoutError:
            raise AssertionError(f"high watermarks {highs()}, not 6 everywhere") from None
        finally:
            consumer.close()


def _fetch_stable(client: RawClient, group: str, topic: str) -> Any:
    """OffsetFetch v7 with require_stable, as a read_committed consumer sends it (KIP-447)."""
    F = OffsetFetchRequest
    request = F(
        group_id=group,
        topics=[F.OffsetFetchRequestTopic(name=topic, partition_indexes=[0])],
        require_stable=True,
    )
    return client.request(request, 7).topics[0].partitions[0]


def test_read_committed_groups_lag_against_the_last_stable_offset(broker: BrokerThread) -> None:
    """Offsets pending in a transaction answer UNSTABLE_OFFSET_COMMIT to require_stable, and a
    read_committed group's lag is measured to the LSO, which an open transaction holds back."""
    _create(broker.bootstrap, ("lagged", 1))
    plain = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(5):
        plain.produce("lagged", f"p{i}".encode(), partition=0)
    plain.flush(10)
    producer = _producer(broker.bootstrap, "txn-lag")
    producer.init_transactions(15)
    producer.begin_transaction()
    for i in range(3):
        producer.produce("lagged", f"t{i}".encode(), partition=0)
    producer.flush(10)  # high watermark 8, last stable offset 5
    committer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "rc-group"})
    other = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "ru-group"})
    try:
        committer.commit(offsets=[TopicPartition("lagged", 0, 5)], asynchronous=False)
        other.commit(offsets=[TopicPartition("lagged", 0, 5)], asynchronous=False)
        with RawClient(broker.bootstrap) as client:
            stable = _fetch_stable(client, "rc-group", "lagged")
        assert (stable.error_code, stable.committed_offset) == (0, 5)

        def lag(group: str) -> float:
            return total(broker.scrape(), "streambus_consumer_group_lag", group=group)

        assert lag("rc-group") == 0  # up to date with what read_committed can read
        assert lag("ru-group") == 3
        # Offsets sent in the open transaction are pending: require_stable is told to retry.
        producer.send_offsets_to_transaction(
            [TopicPartition("lagged", 0, 8)], committer.consumer_group_metadata(), 15
        )
        with RawClient(broker.bootstrap) as client:
            pending = _fetch_stable(client, "rc-group", "lagged")
        assert pending.error_code == UNSTABLE_OFFSET_COMMIT
        producer.commit_transaction(15)  # the marker: LSO 9 (8 records and the marker)
        with RawClient(broker.bootstrap) as client:
            settled = _fetch_stable(client, "rc-group", "lagged")
        assert (settled.error_code, settled.committed_offset) == (0, 8)
        assert lag("rc-group") == 1  # the marker's offset, which no consumer reads past
    finally:
        committer.close()
        other.close()
