"""Replication under faults, on `streambus serve` processes on loopback: topics with replication
factor 3 and min.insync.replicas 2, real Kafka clients, and brokers SIGKILLed, SIGSTOPped and
restarted.

* The kill loop: an idempotent acks=all producer and a consumer group run while the leader of a
  partition is SIGKILLed at a random moment and restarted, STREAMBUS_KILL_ROUNDS times (3 by
  default; `make soak` runs more). Then every acknowledged message is in every replica's log
  exactly once, in order, byte-identical (the three data directories are read after the brokers
  stop, with the storage code's batch reader), and the group resumes at its last commit.
* A SIGSTOPped follower leaves the ISR, the leader reports the partition under-replicated and
  acks=all goes on; after SIGCONT it rejoins.
* Two of a partition's three replicas down: acks=all gets NOT_ENOUGH_REPLICAS and nothing that
  was not replicated is acknowledged or kept.
* A leader that appended records its followers never copied is killed; on its return it
  truncates them away: no replica keeps records the others lack.
* streambus_replication_latency_seconds counts one observation per replicated batch.

Figures (failover per round, the kill-loop counts) are printed with `pytest -s`, not asserted.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from kafka.protocol.producer import ProduceRequest

from streambus.records.batch import build_batch, iter_records, walk_batches
from tests.harness import BrokerProcess, ClusterProcesses, RawClient, fetch_request, wait_until
from tests.test_cluster import (
    CLUSTER_ENV,
    controller,
    metric,
    restart,
    wait_cluster_size,
)

pytestmark = pytest.mark.slow

NOT_ENOUGH_REPLICAS = 19
NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20
REPLICA_LAG_TIME_MAX_MS = 1500
# Short sessions (from the cluster tests) so a killed broker is fenced within seconds, and a
# short replica.lag.time.max.ms so a stalled follower leaves the ISR within seconds.
REPL_ENV = {**CLUSTER_ENV, "STREAMBUS_REPLICA_LAG_TIME_MAX_MS": str(REPLICA_LAG_TIME_MAX_MS)}
KILL_ROUNDS = int(os.environ.get("STREAMBUS_KILL_ROUNDS", "3"))
SYNC_TIMEOUT_S = 90.0
FETCH_WAIT_MAX_MS = 200  # the divergent-leader test's replica.fetch.wait.max.ms

# Samples of a scrape: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers ---------------------------------------------------------------------------------


def create_replicated(bootstrap: str, topic: str, partitions: int, min_isr: int = 2) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(topic, partitions, 3, config={"min.insync.replicas": str(min_isr)})
    admin.create_topics([new], operation_timeout=30)[topic].result(60)


class PartitionView:
    def __init__(self, leader: int, replicas: list[int], isr: list[int]) -> None:
        self.leader = leader
        self.replicas = replicas
        self.isr = isr

    def __repr__(self) -> str:
        return f"leader {self.leader} replicas {self.replicas} isr {self.isr}"


def partitions_of(bootstrap: str, topic: str) -> dict[int, PartitionView]:
    """partition -> leader, replicas and ISR as the broker at ``bootstrap`` reports them."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        t = admin.list_topics(topic, timeout=5).topics.get(topic)
    except KafkaException:
        return {}
    if t is None or t.error is not None:
        return {}
    return {
        p.id: PartitionView(p.leader, sorted(p.replicas), sorted(p.isrs))
        for p in t.partitions.values()
    }


def wait_in_sync(
    cluster: ClusterProcesses, topic: str, partitions: int, timeout: float = SYNC_TIMEOUT_S
) -> dict[int, PartitionView]:
    """Until every live broker reports each partition with a live leader and all three
    replicas in the ISR; that view."""

    def synced() -> dict[int, PartitionView] | None:
        live = cluster.live()
        views = [partitions_of(b.bootstrap, topic) for b in live.values()]
        for view in views:
            if len(view) != partitions:
                return None
            for p in view.values():
                if p.leader not in live or len(p.replicas) != 3 or p.isr != p.replicas:
                    return None
        return views[0]

    try:
        return dict(wait_until(synced, timeout, 0.2))
    except TimeoutError:
        views = {n: partitions_of(b.bootstrap, topic) for n, b in cluster.live().items()}
        raise AssertionError(f"{topic} not in sync on every broker: {views}") from None


def produce_raw(topic: str, records: bytes, partition: int = 0, acks: int = -1) -> Any:
    td = ProduceRequest.TopicProduceData
    pd = td.PartitionProduceData
    return ProduceRequest(
        transactional_id=None,
        acks=acks,
        timeout_ms=10000,
        topic_data=[td(name=topic, partition_data=[pd(index=partition, records=records)])],
    )


def send_batch(broker: BrokerProcess, topic: str, values: list[bytes], acks: int = -1) -> Any:
    """One batch of ``values`` to partition 0 through ``broker``; its partition response."""
    batch = build_batch([(None, v, [], int(time.time() * 1000)) for v in values])
    with RawClient(broker.bootstrap, timeout=30) as client:
        response = client.request(produce_raw(topic, batch, acks=acks), 9)
    return response.responses[0].partition_responses[0]


def fetch_values(broker: BrokerProcess, topic: str) -> tuple[int, list[bytes]]:
    """(high watermark, every value below it) of partition 0, fetched as a consumer."""
    with RawClient(broker.bootstrap) as client:
        fetched = client.request(fetch_request(topic), 12).responses[0].partitions[0]
    assert fetched.error_code == 0, fetched
    data = bytes(fetched.records or b"")
    values = [
        r.value or b""
        for pos, header in walk_batches(data)
        if not header.is_control
        for r in iter_records(data, pos, header)
    ]
    return int(fetched.high_watermark), values


def stop_all(cluster: ClusterProcesses) -> None:
    """SIGTERM every live broker at once, then wait for each (the data dirs are read next)."""
    live = cluster.live()
    for broker in live.values():
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
    for broker in live.values():
        try:
            broker.stop()
        except subprocess.TimeoutExpired:  # what it wrote is in its files all the same
            broker.kill()


def replica_log(data_dir: Path, topic: str, partition: int) -> tuple[list[bytes], list[Any]]:
    """(each batch's bytes, each data record) of one partition's log in a stopped broker's
    data dir, read with the storage code's batch reader over the segments in offset order."""
    dirs = [
        d
        for d in data_dir.rglob(str(partition))
        if d.is_dir() and d.parent.name == topic and any(d.glob("*.log"))
    ]
    assert len(dirs) == 1, f"{data_dir}: partition dirs of {topic}-{partition}: {dirs}"
    batches: list[bytes] = []
    records: list[Any] = []
    for segment in sorted(dirs[0].glob("*.log")):
        data = segment.read_bytes()
        for pos, header in walk_batches(data):
            batches.append(data[pos : pos + header.size])
            if not header.is_control:
                records.extend(iter_records(data, pos, header))
    return batches, records


def assert_replicas_identical(
    cluster: ClusterProcesses, nodes: list[int], topic: str, partition: int
) -> list[Any]:
    """The partition's log is byte-identical in the data dirs of ``nodes``; its records."""
    logs = {n: replica_log(cluster.brokers[n].data_dir, topic, partition) for n in nodes}
    first = nodes[0]
    for n in nodes[1:]:
        ends = {m: (len(logs[m][0]), len(logs[m][1])) for m in nodes}
        assert logs[n][0] == logs[first][0], (
            f"{topic}-{partition}: broker {n}'s log differs from broker {first}'s "
            f"(batches, records): {ends}"
        )
    return logs[first][1]


def histogram_count(samples: Samples, name: str, topic: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == f"{name}_count" and ("topic", topic) in labels
    )


def stopped(broker: BrokerProcess) -> contextlib.AbstractContextManager[None]:
    """SIGSTOP ``broker`` for the block; SIGCONT on the way out whatever happens."""

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                broker.proc.send_signal(signal.SIGCONT)

    return block()


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[ClusterProcesses]:
    with ClusterProcesses(tmp_path, 3, env=REPL_ENV) as c:
        wait_cluster_size(c, 3)
        yield c


# -- the kill loop ---------------------------------------------------------------------------


class AckedProducer(threading.Thread):
    """An idempotent acks=all producer sending numbered values round-robin to the partitions
    until stopped; records what each acknowledgement said (partition -> [(offset, value)])."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        super().__init__(daemon=True)
        self.topic = topic
        self.partitions = partitions
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": 180000,
            }
        )
        self.acked: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(partitions)}
        self.errors: list[str] = []
        self.sent = 0
        self._stop_event = threading.Event()

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None
        assert offset is not None
        self.acked[partition].append((offset, bytes(msg.value() or b"")))

    def run(self) -> None:
        rng = random.Random(7)
        while not self._stop_event.is_set():
            partition = self.sent % self.partitions
            # a sequence number per partition, then random bytes: byte-identity is checked
            seq = self.sent // self.partitions
            value = f"p{partition}-{seq:08d}-".encode() + rng.randbytes(rng.randrange(10, 300))
            try:
                self.producer.produce(
                    self.topic, value, partition=partition, on_delivery=self._delivered
                )
                self.sent += 1
            except BufferError:
                self.producer.poll(0.1)
                continue
            self.producer.poll(0)
            time.sleep(0.002)

    def finish(self) -> int:
        """Stop sending; flush; how many are still undelivered."""
        self._stop_event.set()
        self.join(10)
        return int(self.producer.flush(180))

    @property
    def acknowledged(self) -> int:
        return sum(len(v) for v in self.acked.values())


class CommittingConsumer(threading.Thread):
    """A group member that reads and commits synchronously after each poll; records the
    offsets of each commit the coordinator accepted."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 10000,
            }
        )
        self.consumer.subscribe([topic])
        self.committed: dict[int, int] = {}
        self.read = 0
        # per partition, the offset after the last message read: the most a commit can hold
        self.position: dict[int, int] = {}
        self.commit_failures = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                messages = self.consumer.consume(200, 0.2)
                good = [m for m in messages if m.error() is None]
                self.read += len(good)
                if not good:
                    continue
                for m in good:
                    partition, offset = m.partition(), m.offset()
                    assert partition is not None
                    assert offset is not None
                    self.position[partition] = max(self.position.get(partition, 0), offset + 1)
                try:
                    done = self.consumer.commit(asynchronous=False) or []
                except KafkaException:
                    self.commit_failures += 1
                    continue
                for tp in done:
                    if tp.error is None and tp.offset >= 0:
                        self.committed[tp.partition] = tp.offset
        finally:
            self.consumer.close()

    def finish(self) -> None:
        self._stop_event.set()
        self.join(60)


def leader_of(cluster: ClusterProcesses, topic: str, partition: int) -> int:
    def agreed() -> int | None:
        views = [partitions_of(b.bootstrap, topic) for b in cluster.live().values()]
        found = {v[partition].leader for v in views if partition in v}
        leader = found.pop() if len(found) == 1 else -1
        return leader if leader in cluster.live() else None

    return int(wait_until(agreed, 30, 0.1))


def kill_leader(cluster: ClusterProcesses, topic: str, partition: int) -> tuple[int, int, float]:
    """SIGKILL ``partition``'s leader; (old leader, new leader, seconds until a survivor's
    Metadata names the new one), polling every 50 ms."""
    old = leader_of(cluster, topic, partition)
    cluster.brokers[old].kill()
    killed_at = time.monotonic()
    survivors = [b for n, b in cluster.brokers.items() if n != old]

    def moved() -> int | None:
        for b in survivors:
            view = partitions_of(b.bootstrap, topic).get(partition)
            if view is not None and view.leader not in (-1, old):
                return view.leader
        return None

    new = int(wait_until(moved, 60, 0.05))
    return old, new, time.monotonic() - killed_at


def resume_point(bootstrap: str, topic: str, group: str, partitions: int) -> dict[str, Any]:
    """A new member of ``group``: (committed offset, first offset it reads) per partition,
    and the offsets it read, until it has read to each partition's end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=30)}
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), 30)[1]
            for p in range(partitions)
        }
        consumer.subscribe([topic])
        read: dict[int, list[int]] = {p: [] for p in range(partitions)}
        deadline = time.monotonic() + 60

        def done() -> bool:
            return all(
                (read[p] and read[p][-1] >= ends[p] - 1) or committed[p] >= ends[p]
                for p in range(partitions)
            )

        while not done() and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    partition, offset = m.partition(), m.offset()
                    assert partition is not None
                    assert offset is not None
                    read[partition].append(offset)
        return {"committed": committed, "ends": ends, "read": read}
    finally:
        consumer.close()


@pytest.mark.timeout(90 + 30 * KILL_ROUNDS)  # a failover takes up to ~15 s on a loaded machine
def test_kill_the_leader_repeatedly_loses_nothing_acknowledged(cluster3: ClusterProcesses) -> None:
    cluster = cluster3
    topic, group, partitions = "kill-loop", "kill-loop-group", 3
    create_replicated(cluster.bootstrap, topic, partitions)
    wait_in_sync(cluster, topic, partitions)
    producer = AckedProducer(cluster.bootstrap, topic, partitions)
    consumer = CommittingConsumer(cluster.bootstrap, topic, group)
    producer.start()
    consumer.start()
    rng = random.Random()
    failovers: list[float] = []
    try:
        for round_ in range(1, KILL_ROUNDS + 1):
            time.sleep(rng.uniform(0.5, 3.0))  # random moment in the produce stream
            partition = round_ % partitions
            acked_before = producer.acknowledged
            old, new, seconds = kill_leader(cluster, topic, partition)
            failovers.append(seconds)
            print(
                f"\nround {round_}: leader {old} of {topic}-{partition} SIGKILLed "
                f"({acked_before} acknowledged so far); broker {new} leads after "
                f"{seconds * 1000:.0f} ms",
                flush=True,
            )
            began = time.monotonic()
            restart(cluster, old)
            wait_in_sync(cluster, topic, partitions)
            print(f"  broker {old} back and in sync after {time.monotonic() - began:.2f}s")
            assert not producer.errors, producer.errors[:5]
        # the group stops first, so its resume below has acknowledged messages to read
        consumer.finish()
        stopped_at = producer.acknowledged
        wait_until(lambda: producer.acknowledged >= stopped_at + 100, 60, 0.05)
    finally:
        consumer.finish()
        undelivered = producer.finish()
    assert undelivered == 0, f"{undelivered} messages never acknowledged"
    assert not producer.errors, f"delivery errors: {producer.errors[:5]}"
    wait_in_sync(cluster, topic, partitions)

    # the group resumes at its last accepted commit: no loss, no re-reading before it
    resumed = resume_point(cluster.bootstrap, topic, group, partitions)
    for p in range(partitions):
        # A commit the client saw fail may still have been stored (its answer was lost with
        # the coordinator): the group holds at least the last accepted commit, at most what
        # the member had read.
        last = consumer.committed.get(p, -1)
        committed = max(resumed["committed"][p], -1)  # -1001: the group has none
        most = consumer.position.get(p, -1)
        assert last <= committed <= most, (
            f"partition {p}: committed {committed}; last accepted commit {last}, read to {most}"
        )
        read = resumed["read"][p]
        if committed >= 0 and committed < resumed["ends"][p]:
            assert read, f"partition {p}: nothing read from {committed}"
            assert read[0] == committed, f"partition {p} resumed at {read[:1]}, not {committed}"
        assert read == sorted(set(read)), f"partition {p}: offsets repeat or go back"
        if read:
            assert read == list(range(read[0], read[-1] + 1)), f"partition {p}: a gap"

    # every replica's copy, read from the data dirs after a clean stop
    stop_all(cluster)
    read_back = lost = 0
    for p in range(partitions):
        records = assert_replicas_identical(cluster, [1, 2, 3], topic, p)
        in_log = {r.offset: r.value for r in records}
        values = [r.value for r in records]
        assert len(values) == len(set(values)), f"partition {p}: a value is stored twice"
        seqs = [int(v.split(b"-")[1]) for v in values]
        assert seqs == sorted(seqs), f"partition {p}: values out of order"
        for offset, value in producer.acked[p]:
            if in_log.get(offset) == value:
                read_back += 1
            else:
                lost += 1
    print(
        f"\nkill loop: {KILL_ROUNDS} rounds, {producer.sent} sent, {producer.acknowledged} "
        f"acknowledged, {read_back} read back from each of 3 replicas, {lost} lost; "
        f"group read {consumer.read} ({consumer.commit_failures} failed commits)"
    )
    print(
        "failover (SIGKILL -> new leader in Metadata): "
        + ", ".join(f"{t * 1000:.0f}" for t in failovers)
        + f" ms; median {statistics.median(failovers) * 1000:.0f} ms, "
        f"max {max(failovers) * 1000:.0f} ms"
    )
    assert lost == 0
    assert read_back == producer.acknowledged > 0


# -- a stalled follower ----------------------------------------------------------------------


def test_a_stopped_follower_leaves_the_isr_and_rejoins(cluster3: ClusterProcesses) -> None:
    cluster = cluster3
    topic = "stalled-follower"
    create_replicated(cluster.bootstrap, topic, 1)
    view = wait_in_sync(cluster, topic, 1)[0]
    leader = cluster.brokers[view.leader]
    ctrl = controller(cluster)
    followers = [n for n in view.replicas if n != view.leader]
    # not the controller, when there is a choice: this test is about the ISR, not Raft
    follower = next((n for n in followers if n != ctrl), followers[0])
    assert metric(leader, "streambus_under_replicated_partitions") == 0
    with stopped(cluster.brokers[follower]):
        began = time.monotonic()

        def shrunk() -> bool:
            isr = partitions_of(leader.bootstrap, topic)[0].isr
            return follower not in isr

        wait_until(shrunk, 60, 0.1)
        print(
            f"\nfollower {follower} SIGSTOPped: out of the ISR after "
            f"{time.monotonic() - began:.2f}s (replica.lag.time.max.ms {REPLICA_LAG_TIME_MAX_MS})"
        )
        wait_until(lambda: (metric(leader, "streambus_under_replicated_partitions") or 0) >= 1, 30)
        producer = Producer({"bootstrap.servers": leader.bootstrap, "acks": "all"})
        errors: list[Any] = []
        for i in range(50):
            producer.produce(
                topic,
                f"while-stopped-{i}".encode(),
                partition=0,
                on_delivery=lambda err, _m: errors.append(err) if err else None,
            )
        assert producer.flush(30) == 0
        assert not errors, errors[:3]
    began = time.monotonic()
    wait_in_sync(cluster, topic, 1)
    wait_until(lambda: metric(leader, "streambus_under_replicated_partitions") == 0, 30)
    print(f"SIGCONT: follower {follower} back in the ISR after {time.monotonic() - began:.2f}s")
    high_watermark, values = fetch_values(leader, topic)
    assert values == [f"while-stopped-{i}".encode() for i in range(50)]
    assert high_watermark == 50


# -- replication latency, through a scrape ---------------------------------------------------


def test_replication_latency_is_observed_once_per_batch(cluster3: ClusterProcesses) -> None:
    cluster = cluster3
    topic, batches = "latency-count", 25
    create_replicated(cluster.bootstrap, topic, 1)
    view = wait_in_sync(cluster, topic, 1)[0]
    leader = cluster.brokers[view.leader]
    name = "streambus_replication_latency_seconds"
    before = {n: histogram_count(b.scrape(), name, topic) for n, b in cluster.brokers.items()}
    for i in range(batches):
        response = send_batch(leader, topic, [f"b{i}-r{j}".encode() for j in range(3)])
        assert response.error_code == 0, response
    # the leader observes when the high watermark covers a batch, before it answers acks=all
    wait_until(
        lambda: histogram_count(leader.scrape(), name, topic) - before[view.leader] >= batches, 15
    )
    after = {n: histogram_count(b.scrape(), name, topic) for n, b in cluster.brokers.items()}
    grown = {n: after[n] - before[n] for n in after}
    print(f"\n{name}_count grew by {grown} for {batches} batches (leader {view.leader})")
    assert grown[view.leader] == batches
    assert sum(grown.values()) == batches, "followers observe nothing"
    samples = leader.scrape()
    total_s = sum(
        v for (n, labels), v in samples.items() if n == f"{name}_sum" and ("topic", topic) in labels
    )
    assert total_s > 0


# -- two of three replicas down --------------------------------------------------------------


@pytest.fixture
def cluster5(tmp_path: Path) -> Iterator[ClusterProcesses]:
    """Five brokers: two of a partition's three replicas can go down while three Raft voters
    remain, so the controller can still shrink the ISR."""
    with ClusterProcesses(tmp_path, 5, env=REPL_ENV) as c:
        wait_cluster_size(c, 5)
        yield c


def test_two_replicas_down_refuses_acks_all(cluster5: ClusterProcesses) -> None:
    cluster = cluster5
    topic = "two-down"
    create_replicated(cluster.bootstrap, topic, 1)
    view = wait_in_sync(cluster, topic, 1)[0]
    leader = cluster.brokers[view.leader]
    followers = [n for n in view.replicas if n != view.leader]
    acked = [f"replicated-{i}".encode() for i in range(6)]
    for i in range(0, len(acked), 2):
        assert send_batch(leader, topic, acked[i : i + 2]).error_code == 0
    for n in followers:
        cluster.brokers[n].kill()
    began = time.monotonic()
    wait_until(lambda: partitions_of(leader.bootstrap, topic)[0].isr == [view.leader], 60, 0.1)
    print(
        f"\nfollowers {followers} SIGKILLed: ISR [{view.leader}] after "
        f"{time.monotonic() - began:.2f}s"
    )
    # The leader's own partition state, which the gauge reads, may take the shrink a moment
    # after its Metadata shows it; an acks=all request in between is appended and answered
    # NOT_ENOUGH_REPLICAS_AFTER_APPEND instead.
    wait_until(lambda: metric(leader, "streambus_under_min_isr_partitions") == 1, 30, 0.05)
    refused = send_batch(leader, topic, [b"not-replicated"])
    print(f"acks=all with ISR 1 < min.insync.replicas 2: error {refused.error_code}")
    assert refused.error_code == NOT_ENOUGH_REPLICAS
    high_watermark, values = fetch_values(leader, topic)
    assert (high_watermark, values) == (len(acked), acked)

    for n in followers:
        restart_broker(cluster, n)
    wait_in_sync(cluster, topic, 1)
    high_watermark, values = fetch_values(leader, topic)
    assert (high_watermark, values) == (len(acked), acked)
    assert send_batch(leader, topic, [b"after"]).error_code == 0
    stop_all(cluster)
    records = assert_replicas_identical(cluster, view.replicas, topic, 0)
    assert [r.value for r in records] == [*acked, b"after"]


def restart_broker(cluster: ClusterProcesses, node: int) -> None:
    """Start ``node`` again and wait until it has registered (its log says so)."""
    broker = cluster.brokers[node]
    before = len(broker.log_text())
    broker.start()

    def registered() -> bool:
        assert broker.proc is not None
        if broker.proc.poll() is not None:
            raise RuntimeError(f"broker {node} exited with {broker.proc.returncode}")
        return f"broker {node} registered" in broker.log_text()[before:]

    try:
        wait_until(registered, 60, 0.1)
    except (TimeoutError, RuntimeError):
        cluster.print_log_tails()
        raise


# -- a divergent follower --------------------------------------------------------------------


@pytest.fixture
def slow_fence_cluster(tmp_path: Path) -> Iterator[ClusterProcesses]:
    """Sessions long enough that SIGSTOPped followers stay in the ISR for the test's steps."""
    env = {
        **REPL_ENV,
        "STREAMBUS_BROKER_SESSION_TIMEOUT_MS": "8000",
        "STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "1000",
        "STREAMBUS_REPLICA_LAG_TIME_MAX_MS": "30000",
        "STREAMBUS_REPLICA_FETCH_WAIT_MAX_MS": str(FETCH_WAIT_MAX_MS),
    }
    with ClusterProcesses(tmp_path, 3, env=env) as c:
        wait_cluster_size(c, 3)
        yield c


def test_a_leader_with_unreplicated_records_truncates_on_return(
    slow_fence_cluster: ClusterProcesses,
) -> None:
    """The leader appends (acks=1) while both followers are stopped, then dies; a follower
    becomes leader without those records and takes new ones. The old leader, restarted,
    must drop its divergent tail (OffsetForLeaderEpoch) and copy the new leader's records."""
    cluster = slow_fence_cluster
    topic = "divergent"
    create_replicated(cluster.bootstrap, topic, 1)
    view = wait_in_sync(cluster, topic, 1)[0]
    old = view.leader
    followers = [n for n in view.replicas if n != old]
    first = [f"acked-{i}".encode() for i in range(4)]
    assert send_batch(cluster.brokers[old], topic, first).error_code == 0
    divergent = [f"divergent-{i}".encode() for i in range(3)]
    with contextlib.ExitStack() as stack:
        for n in followers:
            stack.enter_context(stopped(cluster.brokers[n]))
        # Fetches the followers sent before they stopped wait at the leader for new data: a
        # record appended now would go out in their answers (and be read after SIGCONT). Once
        # replica.fetch.wait.max.ms has passed they are answered empty, and no new one comes.
        time.sleep(5 * FETCH_WAIT_MAX_MS / 1000)
        for value in divergent:
            response = send_batch(cluster.brokers[old], topic, [value], acks=1)
            assert response.error_code == 0, response
        cluster.brokers[old].kill()
    began = time.monotonic()
    survivor = cluster.brokers[followers[0]]

    def new_leader() -> int | None:
        # The new leader's own view too: the survivor may apply the election before the
        # broker it elected does, and that broker refuses a produce until it has.
        leader = partitions_of(survivor.bootstrap, topic).get(0)
        if leader is None or leader.leader not in followers:
            return None
        own = partitions_of(cluster.brokers[leader.leader].bootstrap, topic).get(0)
        return leader.leader if own is not None and own.leader == leader.leader else None

    leader = int(wait_until(new_leader, 60, 0.1))
    print(
        f"\nleader {old} killed with 3 unreplicated records; {leader} leads after "
        f"{time.monotonic() - began:.2f}s"
    )
    second = [f"new-leader-{i}".encode() for i in range(4)]
    assert send_batch(cluster.brokers[leader], topic, second).error_code == 0
    before = len(cluster.brokers[old].log_text())
    restart(cluster, old)
    wait_in_sync(cluster, topic, 1)
    print(
        "\n".join(
            line
            for line in cluster.brokers[old].log_text()[before:].splitlines()
            if "truncat" in line.lower()
        )
    )
    high_watermark, values = fetch_values(cluster.brokers[leader], topic)
    assert values == first + second
    stop_all(cluster)
    records = assert_replicas_identical(cluster, [1, 2, 3], topic, 0)
    assert [r.value for r in records] == first + second
    assert high_watermark == len(first) + len(second)
