"""Three `streambus serve` processes on loopback forming one cluster: clients across the brokers,
the group coordinator Kafka's hash names, controller failover, the cluster metrics, and bad input
(a wrong secret, a duplicate node id, a write to a non-leader).

Timings are printed (`pytest -s`), not asserted; bench/cluster_failover.py measures failover over
several rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.metadata import FindCoordinatorRequest
from kafka.protocol.producer import InitProducerIdRequest, ProduceRequest

from streambus.records.batch import build_batch
from tests.harness import (
    BrokerProcess,
    ClusterProcesses,
    RawClient,
    fetch_request,
    free_port,
    total,
    wait_until,
)

pytestmark = pytest.mark.slow

NOT_LEADER_OR_FOLLOWER = 6
OFFSETS_PARTITIONS = 50  # offsets.topic.num.partitions, Kafka's default
SESSION_TIMEOUT_MS = 3000
# Short sessions so a killed broker leaves the cluster within seconds, not Kafka's nine.
CLUSTER_ENV = {
    "STREAMBUS_BROKER_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
    "STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "500",
    "PYTHONUNBUFFERED": "1",
}


def produce_request(topic: str, records: bytes, partition: int = 0) -> Any:
    td = ProduceRequest.TopicProduceData
    pd = td.PartitionProduceData
    return ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[td(name=topic, partition_data=[pd(index=partition, records=records)])],
    )


def java_string_hashcode(s: str) -> int:
    """Java's String.hashCode: over UTF-16 code units, 32-bit signed overflow."""
    h = 0
    data = s.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i : i + 2], "big")) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_abs(n: int) -> int:
    """Kafka's Utils.abs: Math.abs, with Integer.MIN_VALUE mapped to 0."""
    return 0 if n == -(1 << 31) else abs(n)


def offsets_partition(group: str) -> int:
    return kafka_abs(java_string_hashcode(group)) % OFFSETS_PARTITIONS


def test_java_hashcode_matches_java() -> None:
    # Values computed by the JVM ("".hashCode() etc.)
    assert java_string_hashcode("") == 0
    assert java_string_hashcode("hello") == 99162322
    assert java_string_hashcode("polygenelubricants") == -(1 << 31)
    assert kafka_abs(java_string_hashcode("polygenelubricants")) == 0
    assert java_string_hashcode("consumer-group-éß") == java_hash_reference("consumer-group-éß")


def java_hash_reference(s: str) -> int:
    """The textbook formula s[0]*31^(n-1) + ... + s[n-1], reduced to a signed int."""
    n = len(s)
    h = int(sum(ord(c) * pow(31, n - 1 - i) for i, c in enumerate(s))) % (1 << 32)
    return h - (1 << 32) if h >= 1 << 31 else h


def metric(broker: BrokerProcess, name: str) -> float | None:
    """``name`` summed over the broker's series, None while its /metrics does not answer."""
    try:
        samples = broker.scrape()
    except OSError:
        return None
    if not any(n == name for n, _ in samples):
        return None
    return total(samples, name)


def metrics_of(cluster: ClusterProcesses, name: str) -> dict[int, float | None]:
    return {node: metric(b, name) for node, b in cluster.live().items()}


def wait_cluster_size(cluster: ClusterProcesses, size: int, timeout: float = 60) -> None:
    def ready() -> bool:
        return all(v == size for v in metrics_of(cluster, "streambus_cluster_size").values())

    try:
        wait_until(ready, timeout, 0.2)
    except TimeoutError:
        raise AssertionError(
            f"cluster_size not {size} everywhere: {metrics_of(cluster, 'streambus_cluster_size')}"
        ) from None


def controller(cluster: ClusterProcesses) -> int | None:
    """The node whose streambus_cluster_leader is 1, when exactly one says so."""
    leaders = [n for n, v in metrics_of(cluster, "streambus_cluster_leader").items() if v == 1]
    return leaders[0] if len(leaders) == 1 else None


def cluster_metadata(bootstrap: str, topic: str | None = None) -> Any:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    return admin.list_topics(topic, timeout=10)


def leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """partition -> leader node, as the broker at ``bootstrap`` reports it."""
    md = cluster_metadata(bootstrap, topic)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return {}
    return {p.id: p.leader for p in t.partitions.values()}


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def wait_topic_everywhere(cluster: ClusterProcesses, topic: str, partitions: int) -> dict[int, int]:
    """Until every live broker's Metadata names a leader for each partition; their view."""

    def agreed() -> dict[int, int] | None:
        views = [leaders(b.bootstrap, topic) for b in cluster.live().values()]
        first = views[0]
        ok = len(first) == partitions and all(v >= 0 for v in first.values())
        return first if ok and all(v == first for v in views) else None

    return dict(wait_until(agreed, 30, 0.2))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    started = time.monotonic()
    with ClusterProcesses(tmp_path_factory.mktemp("cluster"), 3, env=CLUSTER_ENV) as c:
        wait_cluster_size(c, 3)
        print(f"\ncluster of 3 ready in {time.monotonic() - started:.2f}s")
        yield c


# -- clients across three brokers --------------------------------------------------------------

TOPIC = "spread"
PARTITIONS = 6
N = 60  # per client


def produce_confluent(bootstrap: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    errors: list[Any] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(error)

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i, v in enumerate(values):
        producer.produce(TOPIC, v, str(i).encode(), on_delivery=delivered)
    assert producer.flush(30) == 0
    assert not errors, errors


def produce_kafka_python(bootstrap: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), linger_ms=5)
    futures = [producer.send(TOPIC, value=v, key=str(i).encode()) for i, v in enumerate(values)]
    producer.flush(30)
    assert all(f.get(10).offset >= 0 for f in futures)
    producer.close()


def produce_aiokafka(bootstrap: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            for i, v in enumerate(values):
                await producer.send(TOPIC, v, key=str(i).encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


def consume_confluent_group(bootstrap: str, group: str, want: int) -> list[bytes]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([TOPIC])
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < want and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                assert m.error() is None, m.error()
                got.append(bytes(m.value() or b""))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return got


def consume_kafka_python(bootstrap: str, want: int) -> list[bytes]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
    consumer.seek_to_beginning()
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(500).values():
            got.extend(r.value for r in records)
    consumer.close()
    return got


def consume_aiokafka_group(bootstrap: str, group: str, want: int) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer

    async def run() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            TOPIC,
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + 30
            while len(got) < want and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    got.extend(bytes(r.value or b"") for r in records)
            await consumer.commit()
        finally:
            await consumer.stop()
        return got

    return asyncio.run(run())


def find_coordinator(bootstrap: str, group: str) -> tuple[int, int]:
    """(error code, node id) of FindCoordinator v2 for ``group``, asked of one broker."""
    with RawClient(bootstrap) as client:
        r = client.request(FindCoordinatorRequest(key=group, key_type=0), 2)
        return int(r.error_code), int(r.node_id)


def test_three_clients_across_three_brokers(cluster: ClusterProcesses) -> None:
    started = time.monotonic()
    create_topic(cluster.brokers[1].bootstrap, TOPIC, PARTITIONS)
    placement = wait_topic_everywhere(cluster, TOPIC, PARTITIONS)
    assert set(placement.values()) == {1, 2, 3}, f"leaders not spread: {placement}"
    md = cluster_metadata(cluster.brokers[2].bootstrap)
    assert sorted(md.brokers) == [1, 2, 3]
    assert {b.port for b in md.brokers.values()} == {b.port for b in cluster.brokers.values()}

    sent = {
        client: [f"{client}-{i}".encode() for i in range(N)]
        for client in ("confluent", "kafka-python", "aiokafka")
    }
    # each producer bootstraps from one broker only: it must find the others from Metadata
    produce_confluent(cluster.brokers[1].bootstrap, sent["confluent"])
    produce_kafka_python(cluster.brokers[2].bootstrap, sent["kafka-python"])
    produce_aiokafka(cluster.brokers[3].bootstrap, sent["aiokafka"])
    every = Counter(v for values in sent.values() for v in values)
    print(f"produced {sum(every.values())} messages in {time.monotonic() - started:.2f}s")

    consumers: dict[str, Callable[[], list[bytes]]] = {
        "confluent (group)": lambda: consume_confluent_group(
            cluster.brokers[3].bootstrap, "spread-confluent", len(every)
        ),
        "kafka-python": lambda: consume_kafka_python(cluster.brokers[1].bootstrap, len(every)),
        "aiokafka (group)": lambda: consume_aiokafka_group(
            cluster.brokers[2].bootstrap, "spread-aiokafka", len(every)
        ),
    }
    read: dict[str, list[bytes]] = {}
    for client, consume in consumers.items():
        began = time.monotonic()
        read[client] = consume()
        print(f"{client} read {len(read[client])} in {time.monotonic() - began:.2f}s")
    for client, got in read.items():
        assert Counter(got) == every, f"{client} read {len(got)} of {len(every)}, not each once"

    for group in ("spread-confluent", "spread-aiokafka"):
        partition = offsets_partition(group)
        offsets_leaders = wait_topic_everywhere(cluster, "__consumer_offsets", OFFSETS_PARTITIONS)
        expected = offsets_leaders[partition]
        for node, b in cluster.brokers.items():
            error, coordinator = find_coordinator(b.bootstrap, group)
            assert (error, coordinator) == (0, expected), (
                f"FindCoordinator({group}) at broker {node}: error {error}, node {coordinator}; "
                f"__consumer_offsets partition {partition} is led by {expected}"
            )
    print(f"clients test took {time.monotonic() - started:.2f}s")
    # last, so the client checks above run whatever this finds
    cluster_ids = {n: cluster_metadata(b.bootstrap).cluster_id for n, b in cluster.brokers.items()}
    assert len(set(cluster_ids.values())) == 1, f"one cluster, one cluster id: {cluster_ids}"


def test_producer_ids_are_unique_across_the_brokers(cluster: ClusterProcesses) -> None:
    """Idempotent producers that bootstrap from different brokers must get different producer
    ids: a partition leader takes a repeated (id, epoch, sequence) for a retry and drops it."""
    ids: dict[tuple[int, int], int] = {}
    for node, b in cluster.brokers.items():
        for _ in range(2):
            with RawClient(b.bootstrap) as client:
                init = client.request(
                    InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 2
                )
            assert init.error_code == 0
            key = (int(init.producer_id), int(init.producer_epoch))
            assert key not in ids, f"broker {node} gave producer id {key}, as broker {ids[key]} did"
            ids[key] = node


# -- metrics ---------------------------------------------------------------------------------


def test_every_broker_reports_the_cluster(cluster: ClusterProcesses) -> None:
    wait_cluster_size(cluster, 3)
    wait_until(lambda: controller(cluster) is not None, 30)
    assert sum(v or 0 for v in metrics_of(cluster, "streambus_cluster_leader").values()) == 1
    leader = controller(cluster)
    assert set(metrics_of(cluster, "streambus_controller_id").values()) == {leader}
    terms = metrics_of(cluster, "streambus_raft_term")
    assert len(set(terms.values())) == 1, f"raft_term differs: {terms}"
    assert (next(iter(terms.values())) or 0) >= 1

    before = metrics_of(cluster, "streambus_raft_commit_index")
    assert all(v is not None for v in before.values()), before
    create_topic(cluster.brokers[2].bootstrap, "metrics-write", 3)

    def risen() -> bool:
        now = metrics_of(cluster, "streambus_raft_commit_index")
        return all((now[n] or 0) > (before[n] or 0) for n in before)

    wait_until(risen, 30, 0.1)
    after = metrics_of(cluster, "streambus_raft_commit_index")
    print(f"\nraft_commit_index before {before} after a CreateTopics {after}")
    led = metrics_of(cluster, "streambus_partitions_leader")
    assert all(v is not None for v in led.values()), led
    assert set(metrics_of(cluster, "streambus_offline_partitions").values()) == {0}


# -- bad input -------------------------------------------------------------------------------


def test_write_to_a_non_leader_is_refused_and_not_stored(cluster: ClusterProcesses) -> None:
    topic = "leader-only"
    create_topic(cluster.brokers[3].bootstrap, topic, 1)
    leader = wait_topic_everywhere(cluster, topic, 1)[0]
    other = next(n for n in cluster.brokers if n != leader)
    batch = build_batch([(b"k", b"to-the-wrong-broker", [], 1_700_000_000_000)])
    with RawClient(cluster.brokers[other].bootstrap) as client:
        response = client.request(produce_request(topic, batch), 9)
        assert response.responses[0].partition_responses[0].error_code == NOT_LEADER_OR_FOLLOWER
        fetched = client.request(fetch_request(topic), 12)
        assert fetched.responses[0].partitions[0].error_code == NOT_LEADER_OR_FOLLOWER
    good = build_batch([(b"k", b"to-the-leader", [], 1_700_000_000_000)])
    with RawClient(cluster.brokers[leader].bootstrap) as client:
        response = client.request(produce_request(topic, good), 9)
        assert response.responses[0].partition_responses[0].error_code == 0
        fetched = client.request(fetch_request(topic), 12)
        records = bytes(fetched.responses[0].partitions[0].records or b"")
        assert b"to-the-leader" in records
        assert b"to-the-wrong-broker" not in records
        assert fetched.responses[0].partitions[0].high_watermark == 1


def wait_out(proc: BrokerProcess, pattern: str, timeout: float = 45) -> re.Match[str] | None:
    """Until the process exits or its log matches ``pattern``; the match, if any."""

    def settled() -> bool:
        assert proc.proc is not None
        return proc.proc.poll() is not None or re.search(pattern, proc.log_text(), re.I) is not None

    with contextlib.suppress(TimeoutError):
        wait_until(settled, timeout, 0.2)
    return re.search(pattern, proc.log_text(), re.I)


def assert_cluster_unaffected(cluster: ClusterProcesses, terms: dict[int, float | None]) -> None:
    assert len(cluster.live()) == 3, "the three brokers run on"
    wait_cluster_size(cluster, 3, 10)
    assert sum(v or 0 for v in metrics_of(cluster, "streambus_cluster_leader").values()) == 1
    md = cluster_metadata(cluster.brokers[1].bootstrap)
    assert sorted(md.brokers) == [1, 2, 3]
    assert {b.port for b in md.brokers.values()} == {b.port for b in cluster.brokers.values()}
    after = metrics_of(cluster, "streambus_raft_term")
    print(f"raft_term before {terms} after {after}")


def test_a_broker_with_the_wrong_secret_cannot_join(cluster: ClusterProcesses) -> None:
    terms = metrics_of(cluster, "streambus_raft_term")
    own = free_port()
    intruder = cluster.process(
        4, quorum=cluster.quorum(n4=own), secret=secrets.token_hex(16), name="intruder"
    )
    intruder.start(wait=False)
    try:
        started = time.monotonic()
        said = wait_out(intruder, r"could not (register|join)|cannot join|secret|password")
        print(f"\nwrong-secret broker settled in {time.monotonic() - started:.2f}s")
        log = intruder.log_text()
        assert said is not None, f"no line says it could not join:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]
        md = cluster_metadata(cluster.brokers[1].bootstrap)
        assert 4 not in md.brokers
        assert_cluster_unaffected(cluster, terms)
    finally:
        intruder.__exit__()


@pytest.mark.parametrize("raft_address", ["its own", "node 2's"])
def test_a_second_broker_with_a_live_node_id_is_refused(
    cluster: ClusterProcesses, raft_address: str
) -> None:
    """Node 2 started again elsewhere, with the same secret: from a Raft address of its own
    (the voters know node 2 at another), or from node 2's (taken). It is refused - exits
    non-zero with a line naming node 2 - or stays out, never registered; the cluster runs on."""
    terms = metrics_of(cluster, "streambus_raft_term")
    quorum = cluster.quorum(n2=free_port()) if raft_address == "its own" else cluster.quorum()
    twin = cluster.process(2, quorum=quorum, name=f"twin-{raft_address[:3]}")
    twin.start(wait=False)
    assert twin.proc is not None
    try:
        # longer than a registration attempt (a session and three heartbeats) and a retry
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: twin.proc is not None and twin.proc.poll() is not None, 20, 0.2)
        log = twin.log_text()
        assert "Traceback" not in log, log[-3000:]
        if twin.proc.poll() is not None:
            print(f"\ntwin ({raft_address} Raft address) exited with {twin.proc.returncode}")
            assert twin.proc.returncode != 0, log[-3000:]
            assert re.search(r"\b(node|broker|voter)( id)? 2\b", log), log[-3000:]
        else:
            print(f"\ntwin ({raft_address} Raft address) runs on, outside the cluster")
            assert "broker 2 registered" not in log, log[-3000:]
            assert re.search(r"not registered|could not register|refused", log), log[-3000:]
        assert_cluster_unaffected(cluster, terms)
    finally:
        twin.__exit__()


# -- failover --------------------------------------------------------------------------------


def kill_controller(cluster: ClusterProcesses) -> tuple[int, float, int, float]:
    """SIGKILL the controller; (old controller, old term, new controller, seconds to it).

    Polls the survivors' /metrics every 50 ms for one reporting cluster_leader 1 in a
    higher term."""
    old = wait_until(lambda: controller(cluster), 30)
    term = max(v or 0 for v in metrics_of(cluster, "streambus_raft_term").values())
    cluster.brokers[old].kill()
    killed_at = time.monotonic()
    survivors = {n: b for n, b in cluster.brokers.items() if n != old}

    def elected() -> int | None:
        for n, b in survivors.items():
            if (
                metric(b, "streambus_cluster_leader") == 1
                and (metric(b, "streambus_raft_term") or 0) > term
            ):
                return n
        return None

    new = wait_until(elected, 60, 0.05)
    return old, term, new, time.monotonic() - killed_at


def restart(cluster: ClusterProcesses, node: int, timeout: float = 60) -> None:
    """Start ``node`` again; return once it registered anew and every broker agrees on the
    size (3), the controller and the term. (Its journal alone reports the old size at once.)"""
    broker = cluster.brokers[node]
    before = len(broker.log_text())
    broker.start()

    def registered() -> bool:
        assert broker.proc is not None
        log = broker.log_text()[before:]
        assert broker.proc.poll() is None, f"broker {node} exited on restart:\n{log[-3000:]}"
        return f"broker {node} registered" in log

    wait_until(registered, timeout, 0.1)

    def agreed() -> bool:
        seen = [
            metrics_of(cluster, name)
            for name in ("streambus_cluster_size", "streambus_controller_id", "streambus_raft_term")
        ]
        return set(seen[0].values()) == {3} and all(len(set(s.values())) == 1 for s in seen[1:])

    wait_until(agreed, timeout, 0.1)


@pytest.fixture
def failover_cluster(tmp_path: Path) -> Iterator[ClusterProcesses]:
    with ClusterProcesses(tmp_path, 3, env=CLUSTER_ENV) as c:
        wait_cluster_size(c, 3)
        yield c


def test_controller_failover(failover_cluster: ClusterProcesses) -> None:
    cluster = failover_cluster
    old, term, new, elapsed = kill_controller(cluster)
    print(f"\ncontroller {old} SIGKILLed in term {term:g}: broker {new} elected in {elapsed:.3f}s")
    assert new != old
    terms = metrics_of(cluster, "streambus_raft_term")
    assert all((t or 0) > term for t in terms.values()), terms

    started = time.monotonic()
    wait_cluster_size(cluster, 2, 30)
    print(f"cluster_size 2 on the survivors {time.monotonic() - started:.2f}s after the election")
    md = cluster_metadata(cluster.brokers[new].bootstrap)
    assert old not in md.brokers
    assert md.controller_id == new

    survivor = next(n for n in cluster.live() if n != new)  # not the controller: forwarded
    create_topic(cluster.brokers[survivor].bootstrap, "after-failover", 4)
    placement = wait_topic_everywhere(cluster, "after-failover", 4)
    assert set(placement.values()) <= set(cluster.live()), placement

    started = time.monotonic()
    restart(cluster, old)
    print(f"broker {old} rejoined (cluster_size 3) {time.monotonic() - started:.2f}s after restart")
    assert sum(v or 0 for v in metrics_of(cluster, "streambus_cluster_leader").values()) == 1
    terms = metrics_of(cluster, "streambus_raft_term")
    print(f"after the rejoin: raft_term {terms}")
    assert "after-failover" in cluster_metadata(cluster.brokers[old].bootstrap).topics


def test_a_controller_restarted_at_once_rejoins(failover_cluster: ClusterProcesses) -> None:
    """The crash-and-restart a supervisor does: SIGKILL the controller and start it again at
    once, before its old incarnation's session ends. It must wait for that session to end
    (through the controller change its own death causes) and rejoin, not give up."""
    cluster = failover_cluster
    old = wait_until(lambda: controller(cluster), 30)
    cluster.brokers[old].kill()
    started = time.monotonic()
    restart(cluster, old)
    print(f"\ncontroller {old} restarted at once: back in {time.monotonic() - started:.2f}s")
    assert sum(v or 0 for v in metrics_of(cluster, "streambus_cluster_leader").values()) == 1
