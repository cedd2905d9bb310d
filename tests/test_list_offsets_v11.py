"""ListOffsets v11 (earliest offset pending upload, KIP-1023) and DescribeCluster v2
(fenced brokers, KIP-1073; endpoint types, KIP-919), in raw frames against a real broker
and through Kafka 4.4's own `kafka-get-offsets` and `kafka-cluster` tools."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from kafka.protocol.admin import DescribeClusterRequest
from kafka.protocol.consumer import ListOffsetsRequest
from kafka.protocol.metadata import ApiVersionsRequest

from streambus.cluster.records import RegisterBroker
from tests.harness import BrokerThread, RawClient, wait_until
from tests.test_kafka_tools import Tools, kafka_tools  # noqa: F401 - the jars' fixture

UNSUPPORTED_VERSION = 35
INVALID_REQUEST = 42
MISMATCHED_ENDPOINT_TYPE = 114
UNSUPPORTED_ENDPOINT_TYPE = 115
CLUSTER = "org.apache.kafka.tools.ClusterTool"  # kafka-cluster.sh
GHOST = 9  # a broker registered in the quorum that never heartbeats: it stays fenced


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path_factory.mktemp("v11") / "data",
        metrics=False,
        # short broker sessions: the ghost below is fenced soon after it registers
        broker_session_timeout_ms=1500,
        broker_heartbeat_interval_ms=200,
    ) as b:
        b.run(b.broker.create_topic, "pending", 1, {})
        quorum = b.broker.cluster.quorum
        assert b.call(quorum.submit(RegisterBroker(GHOST, "ghost", 1, "g"))).ok
        # registered fenced, unfenced by the controller as just seen, fenced once silent
        wait_until(lambda: not quorum.state.brokers[GHOST].fenced, timeout=30)
        wait_until(lambda: quorum.state.brokers[GHOST].fenced, timeout=30)
        producer = Producer({"bootstrap.servers": b.bootstrap})
        for i in range(3):
            producer.produce("pending", f"v{i}".encode(), partition=0)
        assert producer.flush(30) == 0
        yield b


def _list_offset(raw: RawClient, timestamp: int, version: int) -> Any:
    L = ListOffsetsRequest
    part = L.ListOffsetsTopic.ListOffsetsPartition(
        partition_index=0, current_leader_epoch=-1, timestamp=timestamp
    )
    request = L(
        replica_id=-1,
        isolation_level=0,
        topics=[L.ListOffsetsTopic(name="pending", partitions=[part])],
        timeout_ms=1000,
    )
    return raw.request(request, version).topics[0].partitions[0]


def _advertised(raw: RawClient, key: int) -> tuple[int, int]:
    answer = raw.request(ApiVersionsRequest(), 3)
    [api] = [a for a in answer.api_keys if a.api_key == key]
    return int(api.min_version), int(api.max_version)


def test_list_offsets_v11_earliest_pending_upload(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as raw:
        assert _advertised(raw, 2) == (1, 11)
        # No tiered storage: nothing is pending upload, so no offset, as Kafka answers.
        pending = _list_offset(raw, -6, 11)
        assert (pending.error_code, pending.offset, pending.timestamp) == (0, -1, -1)
        assert pending.leader_epoch == -1
        # The other timestamps answer in v11 as before.
        assert (_list_offset(raw, -1, 11).offset, _list_offset(raw, -2, 11).offset) == (3, 0)
        assert _list_offset(raw, -4, 11).offset == 0
        assert _list_offset(raw, -5, 11).offset == -1
        assert _list_offset(raw, int(time.time() * 1000) - 3_600_000, 11).offset == 0


@pytest.mark.parametrize(
    ("timestamp", "since"), [(-3, 7), (-4, 8), (-5, 9), (-6, 11), (-7, None), (-100, None)]
)
def test_list_offsets_special_timestamp_needs_its_version(
    broker: BrokerThread, timestamp: int, since: int | None
) -> None:
    """A special timestamp in an older version than its own, or one no version defines,
    is UNSUPPORTED_VERSION for its partition (Kafka's ReplicaManager)."""
    with RawClient(broker.bootstrap) as raw:
        for version in range(1, 12):
            got = _list_offset(raw, timestamp, version)
            refused = since is None or version < since
            assert got.error_code == (UNSUPPORTED_VERSION if refused else 0), (version, got)
            if refused:
                assert got.offset == -1


def _describe_cluster(raw: RawClient, version: int, **fields: Any) -> Any:
    return raw.request(
        DescribeClusterRequest(include_cluster_authorized_operations=False, **fields), version
    )


def test_describe_cluster_v2_endpoint_types_and_fenced_brokers(broker: BrokerThread) -> None:
    own = broker.broker.broker_id
    with RawClient(broker.bootstrap) as raw:
        assert _advertised(raw, 60) == (0, 2)
        plain = _describe_cluster(raw, 2, endpoint_type=1, include_fenced_brokers=False)
        assert (plain.error_code, plain.endpoint_type, plain.controller_id) == (0, 1, own)
        assert [(b.broker_id, b.is_fenced) for b in plain.brokers] == [(own, False)]
        # controllers asked of a broker: told so, as a Kafka broker tells it
        ctl = _describe_cluster(raw, 2, endpoint_type=2, include_fenced_brokers=False)
        assert (ctl.error_code, ctl.brokers) == (MISMATCHED_ENDPOINT_TYPE, [])
        assert "endpoint of type CONTROLLER" in ctl.error_message
        odd = _describe_cluster(raw, 1, endpoint_type=7)
        assert odd.error_code == UNSUPPORTED_ENDPOINT_TYPE
        assert odd.error_message == "Unsupported endpoint type 7"

        hidden = _describe_cluster(raw, 2, endpoint_type=1, include_fenced_brokers=False)
        assert [b.broker_id for b in hidden.brokers] == [own]
        shown = _describe_cluster(raw, 2, endpoint_type=1, include_fenced_brokers=True)
        rows = sorted((b.broker_id, b.host, b.port, b.is_fenced) for b in shown.brokers)
        assert (GHOST, "ghost", 1, True) in rows
        assert (own, False) in {(r[0], r[3]) for r in rows}
        v1 = _describe_cluster(raw, 1, endpoint_type=1)
        assert [b.broker_id for b in v1.brokers] == [own]  # v1 never lists fenced ones


@pytest.fixture
def tools(kafka_tools: Path, broker: BrokerThread) -> Tools:  # noqa: F811 - the import's use
    return Tools(kafka_tools, broker)


@pytest.mark.slow
def test_kafka_tools_pending_upload_and_cluster_endpoints(
    tools: Tools, broker: BrokerThread
) -> None:
    # kafka-get-offsets --time -6 negotiates ListOffsets v11; with nothing pending upload the
    # tool leaves the partition out, as for -5 (it printed "does not support" before v11).
    found = tools.offsets_at("pending", ["-6", "earliest-pending-upload", "-1"])
    assert found == {"-6": {}, "earliest-pending-upload": {}, "-1": {0: 3}}, found

    own = str(tools.broker.broker.broker_id)
    listed = tools.ok(CLUSTER, "list-endpoints", "--bootstrap-server", tools.bootstrap)
    rows = [line.split() for line in listed.lines[1:]]
    assert [(r[0], r[4], r[5]) for r in rows] == [(own, "unfenced", "broker")], listed
    with_fenced = tools.ok(
        CLUSTER, "list-endpoints", "--bootstrap-server", tools.bootstrap, "--include-fenced-brokers"
    )
    states = {r[0]: r[4] for r in (line.split() for line in with_fenced.lines[1:])}
    assert states == {own: "unfenced", str(GHOST): "fenced"}, with_fenced
    # A broker is no controller endpoint: the tool reports Kafka's error and fails.
    ctl = tools.run(CLUSTER, "list-endpoints", "--bootstrap-controller", tools.bootstrap)
    assert ctl.returncode != 0, ctl
    assert "MismatchedEndpointTypeException" in ctl.stderr + ctl.stdout, ctl
