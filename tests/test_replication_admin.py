"""Replicated topics' metadata through real admin clients on three `streambus serve` processes:
CreateTopics with a replication factor and with an explicit assignment, CreatePartitions,
ElectLeaders, and a SIGKILLed broker leaving the ISR with leadership moving.

Only metadata is checked here: what Metadata answers (replicas, ISR, leader) and the local
logs each replica's broker opens. Copying the data itself is the replica fetcher's, tested
elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException

from tests.harness import BrokerThread, ClusterProcesses, wait_until

pytestmark = pytest.mark.slow

CLUSTER_ENV = {
    # Short sessions so a killed broker is fenced within seconds, not Kafka's nine.
    "STREAMBUS_BROKER_SESSION_TIMEOUT_MS": "3000",
    "STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "500",
    "PYTHONUNBUFFERED": "1",
}
ELECTION_NOT_NEEDED = 84
PREFERRED_LEADER_NOT_AVAILABLE = 80
INVALID_PARTITIONS = 37
INVALID_REPLICATION_FACTOR = 38
INVALID_REPLICA_ASSIGNMENT = 39

# partition -> (leader, replicas, isr)
Layout = dict[int, tuple[int, list[int], list[int]]]


def layout(bootstrap: str, topic: str) -> Layout:
    """What the broker at ``bootstrap`` answers in Metadata for ``topic`` ({} if nothing)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        md = admin.list_topics(topic, timeout=5)
    except Exception:
        return {}
    t = md.topics.get(topic)
    if t is None or not t.partitions:
        return {}
    return {p.id: (p.leader, list(p.replicas), list(p.isrs)) for p in t.partitions.values()}


def brokers_listed(bootstrap: str) -> set[int]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    return set(admin.list_topics(timeout=5).brokers)


def settle(cluster: ClusterProcesses, topic: str, check: Any, timeout: float = 30) -> Layout:
    """Wait until every live broker answers a layout of ``topic`` that passes ``check``."""
    seen: dict[int, Layout] = {}

    def agreed() -> bool:
        for node, broker in cluster.live().items():
            seen[node] = layout(broker.bootstrap, topic)
        first = next(iter(seen.values()))
        return all(v == first for v in seen.values()) and bool(first) and bool(check(first))

    try:
        wait_until(agreed, timeout, 0.2)
    except TimeoutError:
        raise AssertionError(f"{topic} never settled: {seen}") from None
    return next(iter(seen.values()))


def kafka_admin(bootstrap: str) -> Any:
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)


def election_codes(response: Any) -> dict[tuple[str, int], int]:
    return {
        (r.topic, p.partition_id): p.error_code
        for r in response.replica_election_results
        for p in r.partition_result
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    root = tmp_path_factory.mktemp("replication-admin")
    with ClusterProcesses(root, env=CLUSTER_ENV) as c:
        any_broker = c.brokers[1].bootstrap
        wait_until(lambda: brokers_listed(any_broker) == {1, 2, 3}, 60, 0.3)
        yield c


def test_replicated_topics_are_created_placed_grown_and_elected(
    cluster: ClusterProcesses,
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
    from kafka.admin import NewPartitions as KNewPartitions
    from kafka.admin import NewTopic as KNewTopic

    b1 = cluster.brokers[1].bootstrap
    admin = AdminClient({"bootstrap.servers": b1})

    # Replication factor 3, placed by the cluster: every partition on every broker,
    # leaders spread, ISR = replicas, leader = preferred replica.
    done = admin.create_topics([NewTopic("r3", 3, 3, config={"min.insync.replicas": "2"})])
    done["r3"].result(20)
    r3 = settle(cluster, "r3", lambda lay: len(lay) == 3)
    for leader, replicas, isr in r3.values():
        assert sorted(replicas) == [1, 2, 3]
        assert sorted(isr) == [1, 2, 3]
        assert leader == replicas[0]
    assert {leader for leader, _, _ in r3.values()} == {1, 2, 3}

    # Refusals a client can act on.
    bad = admin.create_topics([NewTopic("r4", 1, 4)])
    with pytest.raises(KafkaException, match="larger than the 3 live brokers") as caught:
        bad["r4"].result(20)
    assert caught.value.args[0].code() == INVALID_REPLICATION_FACTOR

    # An explicit assignment is placed as given (kafka-python's replica_assignments).
    kadmin = kafka_admin(b1)
    try:
        assignment = {0: [3, 1, 2], 1: [2, 3, 1]}
        kadmin.create_topics([KNewTopic("placed", replica_assignments=assignment)])
        placed = settle(cluster, "placed", lambda lay: len(lay) == 2)
        assert placed[0][:2] == (3, [3, 1, 2])
        assert placed[1][:2] == (2, [2, 3, 1])
        response = kadmin.create_topics(
            [KNewTopic("nowhere", replica_assignments={0: [1, 9]})], raise_errors=False
        )
        assert [t["error_code"] for t in response["topics"]] == [INVALID_REPLICA_ASSIGNMENT]

        # CreatePartitions: placed by the cluster (confluent), or as given (kafka-python).
        grown = admin.create_partitions([NewPartitions("r3", 5)])
        grown["r3"].result(20)
        r3 = settle(cluster, "r3", lambda lay: len(lay) == 5)
        assert all(sorted(r3[p][1]) == [1, 2, 3] for p in (3, 4))
        kadmin.create_partitions({"placed": KNewPartitions(3, [[1, 2, 3]])})
        placed = settle(cluster, "placed", lambda lay: len(lay) == 3)
        assert placed[2] == (1, [1, 2, 3], [1, 2, 3])
        response = kadmin.create_partitions(
            {"placed": KNewPartitions(2), "missing": KNewPartitions(4)}, raise_errors=False
        )
        codes = {r.name: r.error_code for r in response.results}
        assert codes == {"placed": INVALID_PARTITIONS, "missing": 3}

        # Every replica's broker opened the new partitions' logs and recorded the count.
        for broker in cluster.brokers.values():
            topic_dir = broker.data_dir / "topics" / "r3"
            wait_until(lambda d=topic_dir: (d / "4").is_dir(), 20, 0.2)
            meta = json.loads((topic_dir / "topic.json").read_text())
            assert meta["partitions"] == 5

        # A new partition takes records on its leader.
        producer = Producer({"bootstrap.servers": b1, "acks": 1})
        delivered: list[Any] = []
        producer.produce(
            "r3", b"new", partition=4, on_delivery=lambda err, _: delivered.append(err)
        )
        assert producer.flush(30) == 0
        assert delivered == [None]

        # ElectLeaders: every leader is already its preferred replica.
        response = kadmin.elect_leaders(0, {"r3": [0, 1]}, raise_errors=False)
        assert election_codes(response) == {
            ("r3", 0): ELECTION_NOT_NEEDED,
            ("r3", 1): ELECTION_NOT_NEEDED,
        }
        everything = election_codes(kadmin.elect_leaders(0, ["r3", "placed"], raise_errors=False))
        assert sorted(everything) == [("placed", p) for p in range(3)] + [
            ("r3", p) for p in range(5)
        ]
        assert set(everything.values()) == {ELECTION_NOT_NEEDED}
    finally:
        kadmin.close()

    from confluent_kafka import ElectionType, TopicPartition

    outcome = admin.elect_leaders(ElectionType.PREFERRED, [TopicPartition("r3", 2)]).result(20)
    (error,) = outcome.values()
    assert error is not None
    assert error.code() == ELECTION_NOT_NEEDED


@pytest.fixture
def cluster5(tmp_path: Path) -> Iterator[ClusterProcesses]:
    """Five voters: two brokers can be down and the quorum still has a majority."""
    with ClusterProcesses(tmp_path, 5, env=CLUSTER_ENV) as c:
        any_broker = c.brokers[3].bootstrap
        wait_until(lambda: brokers_listed(any_broker) == {1, 2, 3, 4, 5}, 60, 0.3)
        yield c


def test_a_killed_broker_leaves_the_isr_and_unclean_election_brings_a_partition_back(
    cluster5: ClusterProcesses,
) -> None:
    cluster = cluster5
    from confluent_kafka.admin import AdminClient, NewTopic
    from kafka.admin import NewTopic as KNewTopic

    b3 = cluster.brokers[3].bootstrap
    admin = AdminClient({"bootstrap.servers": b3})
    admin.create_topics([NewTopic("kill", 3, 3)])["kill"].result(20)
    client = kafka_admin(b3)
    try:
        client.create_topics([KNewTopic("pair", replica_assignments={0: [1, 2]})])
    finally:
        client.close()
    before = settle(cluster, "kill", lambda lay: len(lay) == 3)
    settle(cluster, "pair", lambda lay: lay[0] == (1, [1, 2], [1, 2]))

    cluster.brokers[2].kill()  # SIGKILL: fenced once its session runs out
    after = settle(cluster, "kill", lambda lay: all(2 not in isr for _, _, isr in lay.values()))
    for p, (leader, replicas, isr) in after.items():
        assert replicas == before[p][1]
        expected = [b for b in replicas if b != 2]
        assert sorted(isr) == sorted(expected)
        assert leader == (before[p][0] if before[p][0] != 2 else expected[0])
    settle(cluster, "pair", lambda lay: lay[0] == (1, [1, 2], [1]))

    # Broker 1, the only in-sync replica of pair-0, goes: the partition is offline. Broker 2
    # returns out of sync (with no leader it cannot catch up), and a clean election will not
    # pick it; an unclean election, asked for, does.
    cluster.brokers[1].kill()
    settle(cluster, "pair", lambda lay: lay[0] == (-1, [1, 2], [1]))
    cluster.brokers[2].start()
    wait_until(lambda: brokers_listed(b3) == {2, 3, 4, 5}, 60, 0.3)
    settle(cluster, "pair", lambda lay: lay[0] == (-1, [1, 2], [1]))
    response = None

    def elected() -> bool:
        nonlocal response
        client = kafka_admin(b3)
        try:
            response = client.elect_leaders(1, {"pair": [0]}, raise_errors=False)
        except Exception:
            return False  # the controller may be moving (broker 1 may have led the quorum)
        finally:
            client.close()
        return True

    wait_until(elected, 60, 0.5)
    assert election_codes(response) == {("pair", 0): 0}
    settle(cluster, "pair", lambda lay: lay[0] == (2, [1, 2], [2]))

    client = kafka_admin(b3)
    try:
        preferred = client.elect_leaders(0, {"pair": [0]}, raise_errors=False)
    finally:
        client.close()
    assert election_codes(preferred) == {("pair", 0): PREFERRED_LEADER_NOT_AVAILABLE}


def test_a_single_brokers_topic_grows(tmp_path: Path) -> None:
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

    with BrokerThread(tmp_path / "data") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic("solo", 1, -1)])["solo"].result(10)
        admin.create_partitions([NewPartitions("solo", 3)])["solo"].result(10)
        md = admin.list_topics("solo", timeout=10).topics["solo"]
        assert sorted(md.partitions) == [0, 1, 2]
        assert all(p.leader == p.replicas[0] for p in md.partitions.values())
        meta = json.loads((tmp_path / "data" / "topics" / "solo" / "topic.json").read_text())
        assert meta["partitions"] == 3
        assert (tmp_path / "data" / "topics" / "solo" / "2").is_dir()
        only = admin.create_partitions([NewPartitions("solo", 3)])
        with pytest.raises(KafkaException, match="already has 3 partitions") as caught:
            only["solo"].result(10)
        assert caught.value.args[0].code() == INVALID_PARTITIONS


def test_elect_leaders_and_validate_only_on_a_single_broker(tmp_path: Path) -> None:
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
    from kafka.protocol.admin import CreateTopicsRequest, ElectLeadersRequest

    from tests.harness import RawClient

    with BrokerThread(tmp_path / "data") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic("one", 2, 1)])["one"].result(10)
        with RawClient(b.bootstrap) as client:
            # Every partition (null): none needs an election, so none is listed (Kafka's way).
            for version in (0, 1, 2):
                request = ElectLeadersRequest(
                    election_type=0, topic_partitions=None, timeout_ms=5000
                )
                response = client.request(request, version)
                assert election_codes(response) == {}
            named = ElectLeadersRequest(
                election_type=1,
                topic_partitions=[
                    ElectLeadersRequest.TopicPartitions(topic="one", partitions=[1, 7])
                ],
                timeout_ms=5000,
            )
            # UNCLEAN on a partition with a leader: not needed; an unknown one: UNKNOWN_TOPIC
            assert election_codes(client.request(named, 2)) == {
                ("one", 1): ELECTION_NOT_NEEDED,
                ("one", 7): 3,
            }
            bad_type = ElectLeadersRequest(
                election_type=5, topic_partitions=named.topic_partitions, timeout_ms=5000
            )
            assert set(election_codes(client.request(bad_type, 2)).values()) == {42}

            # validate_only with an assignment checks it and creates nothing.
            T = CreateTopicsRequest.CreatableTopic
            check = CreateTopicsRequest(
                topics=[
                    T(
                        name="assigned",
                        num_partitions=-1,
                        replication_factor=-1,
                        assignments=[
                            T.CreatableReplicaAssignment(partition_index=0, broker_ids=[1])
                        ],
                        configs=[],
                    ),
                    T(
                        name="both",
                        num_partitions=2,
                        replication_factor=-1,
                        assignments=[
                            T.CreatableReplicaAssignment(partition_index=0, broker_ids=[1])
                        ],
                        configs=[],
                    ),
                    T(
                        name="elsewhere",
                        num_partitions=-1,
                        replication_factor=-1,
                        assignments=[
                            T.CreatableReplicaAssignment(partition_index=0, broker_ids=[5])
                        ],
                        configs=[],
                    ),
                ],
                timeout_ms=5000,
                validate_only=True,
            )
            codes = {t.name: t.error_code for t in client.request(check, 5).topics}
            assert codes == {"assigned": 0, "both": 42, "elsewhere": INVALID_REPLICA_ASSIGNMENT}
        assert "assigned" not in admin.list_topics(timeout=10).topics

        checked = admin.create_partitions([NewPartitions("one", 4)], validate_only=True)
        checked["one"].result(10)
        assert len(admin.list_topics("one", timeout=10).topics["one"].partitions) == 2
