"""The quorum wired into the broker: a single node is a one-node cluster of itself, and
three processes on loopback form one cluster that Kafka clients use through one address."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.admin import DescribeClusterRequest
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.producer import InitProducerIdRequest, ProduceRequest

from streambus.records.batch import build_batch
from tests.harness import (
    BrokerProcess,
    BrokerThread,
    RawClient,
    free_port,
    scrape,
    total,
    wait_until,
)

SECRET = "wiring-test-secret"  # noqa: S105 - a test cluster


def metadata(client: RawClient, topics: list[str] | None = None, version: int = 12) -> Any:
    wanted = (
        None if topics is None else [MetadataRequest.MetadataRequestTopic(name=t) for t in topics]
    )
    return client.request(
        MetadataRequest(
            topics=wanted,
            allow_auto_topic_creation=False,
            include_cluster_authorized_operations=False,
            include_topic_authorized_operations=False,
        ),
        version,
    )


def test_single_node_is_a_cluster_of_itself(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", broker_id=7) as b:
        b.run(b.broker.create_topic, "t", 3, {})
        with RawClient(b.bootstrap) as client:
            md = metadata(client, ["t"])
            assert md.controller_id == 7
            assert [(n.node_id, n.port) for n in md.brokers] == [(7, b.broker.port)]
            parts = md.topics[0].partitions
            assert [(p.leader_id, list(p.replica_nodes)) for p in parts] == [(7, [7])] * 3
            dc = client.request(
                DescribeClusterRequest(include_cluster_authorized_operations=False), 0
            )
            assert (dc.error_code, dc.controller_id) == (0, 7)
            assert [br.broker_id for br in dc.brokers] == [7]
        s = b.scrape()
        assert total(s, "streambus_cluster_size") == 1
        assert total(s, "streambus_cluster_leader") == 1
        assert total(s, "streambus_controller_id") == 7
        assert total(s, "streambus_partitions_leader") == 3
        assert total(s, "streambus_raft_term") == 1
        assert total(s, "streambus_offline_partitions") == 0


def init_producer_id(client: RawClient) -> tuple[int, int]:
    r = client.request(
        InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 2
    )
    assert r.error_code == 0
    return int(r.producer_id), int(r.producer_epoch)


def test_single_node_ids_survive_sigkill_and_keep_its_cluster_id(tmp_path: Path) -> None:
    """One broker's quorum is in memory: its producer_ids file must still carry every id it
    gave out across a SIGKILL, and its cluster id stays the one in meta.properties."""
    data = tmp_path / "data"
    given: list[tuple[int, int]] = []
    for _ in range(3):
        with BrokerProcess(data, "--no-tracing") as p:
            with RawClient(p.bootstrap) as client:
                given += [init_producer_id(client) for _ in range(3)]
                cluster_id = metadata(client).cluster_id
            p.kill()
        assert f"cluster.id={cluster_id}\n" in (data / "meta.properties").read_text()
    assert len(set(given)) == len(given) == 9, given
    assert [e for _, e in given] == [0] * 9


def test_replication_factor_above_the_live_brokers_is_refused(tmp_path: Path) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    with BrokerThread(tmp_path / "data") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        futures = admin.create_topics([NewTopic("r3", 1, 3)])
        with pytest.raises(Exception, match="larger than the 1 live brokers") as caught:
            futures["r3"].result(10)
        assert caught.value.args[0].code() == 38  # INVALID_REPLICATION_FACTOR


@contextlib.contextmanager
def three_brokers(tmp_path: Path) -> Iterator[list[BrokerProcess]]:
    raft = [free_port() for _ in range(3)]
    quorum = ",".join(f"{i + 1}@127.0.0.1:{port}" for i, port in enumerate(raft))
    procs = [
        BrokerProcess(
            tmp_path / f"b{i + 1}",
            "--node-id",
            str(i + 1),
            "--controller-quorum",
            quorum,
            "--no-tracing",
            env={"STREAMBUS_CLUSTER_SECRET": SECRET},
        )
        for i in range(3)
    ]
    with contextlib.ExitStack() as stack:
        for p in procs:
            stack.enter_context(p)
        yield procs


def _metrics(p: BrokerProcess) -> Any:
    return scrape(f"http://127.0.0.1:{p.metrics_port}/metrics")


def test_three_processes_form_one_cluster(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    with three_brokers(tmp_path) as procs:

        def formed() -> bool:
            samples = [_metrics(p) for p in procs]
            sizes = [total(s, "streambus_cluster_size") for s in samples]
            leaders = sum(total(s, "streambus_cluster_leader") for s in samples)
            return sizes == [3, 3, 3] and leaders == 1

        wait_until(formed, 60, 0.5)
        controllers = {total(_metrics(p), "streambus_controller_id") for p in procs}
        assert len(controllers) == 1
        assert controllers <= {1, 2, 3}

        admin = AdminClient({"bootstrap.servers": procs[1].bootstrap})
        admin.create_topics([NewTopic("spread", 6, 1)])["spread"].result(30)
        with RawClient(procs[0].bootstrap) as client:

            def placed() -> Any:
                md = metadata(client, ["spread"])
                parts = md.topics[0].partitions
                return md if len(parts) == 6 and all(p.leader_id > 0 for p in parts) else None

            md = wait_until(placed, 30, 0.2)
            assert {n.node_id for n in md.brokers} == {1, 2, 3}
            leaders = {p.partition_index: p.leader_id for p in md.topics[0].partitions}
            assert set(leaders.values()) == {1, 2, 3}

        # A Produce sent to a broker that does not lead the partition: refused, not written.
        partition, leader = next(iter(leaders.items()))
        other = procs[leader % 3]  # a broker other than the leader (ids are 1-3)
        batch = build_batch([(b"k", b"v", [], 1_700_000_000_000)])
        TD = ProduceRequest.TopicProduceData
        PD = TD.PartitionProduceData
        with RawClient(other.bootstrap) as client:
            # that broker has applied the topic's record too (it follows the leader's log)
            wait_until(lambda: metadata(client, ["spread"]).topics[0].error_code == 0, 30, 0.2)
            response = client.request(
                ProduceRequest(
                    transactional_id=None,
                    acks=-1,
                    timeout_ms=5000,
                    topic_data=[
                        TD(name="spread", partition_data=[PD(index=partition, records=batch)])
                    ],
                ),
                9,
            )
        assert response.responses[0].partition_responses[0].error_code == 6

        producer = Producer({"bootstrap.servers": procs[0].bootstrap})
        sent = [f"m{i}".encode() for i in range(60)]
        for i, value in enumerate(sent):
            producer.produce("spread", value, key=str(i).encode())
        assert producer.flush(30) == 0
        consumer = Consumer(
            {
                "bootstrap.servers": procs[2].bootstrap,
                "group.id": f"g-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe(["spread"])
        got: list[bytes] = []
        try:
            for _ in range(200):
                got += [m.value() for m in consumer.consume(100, 0.5) if m.error() is None]
                if len(got) >= len(sent):
                    break
        finally:
            consumer.close()
        assert sorted(got) == sorted(sent)
        for p in procs:
            assert "Traceback" not in p.log_text()
