"""A consumer group (KIP-848) survives the loss of its coordinator in a cluster.

Three ``streambus serve`` brokers; a topic with replication factor 3; two librdkafka
consumers in a ``group.protocol=consumer`` group, committing what they read. The broker
that coordinates the group (the leader of the group's ``__consumer_offsets`` partition) is
SIGKILLed. The new leader of that partition loads the group from its replica of the log:
its members, epochs and assignments are described by the surviving brokers as before the
kill, the consumers read new messages with no partition revoked or given anew, and the
offsets committed before the kill are kept. This holds because a heartbeat is answered only
once the partition's ISR has the group's records, as an offset commit is.

And when the ISR cannot take them (both followers SIGSTOPped, so the quorum cannot shrink
the ISR either), a heartbeat that changes the group is answered COORDINATOR_NOT_AVAILABLE
once the offset commit timeout passes, as Kafka's coordinator answers a write that timed
out; the member retries when the followers are back and is let in.

The failover time (SIGKILL -> the group described again by a survivor) is printed with
``pytest -s``, not asserted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from kafka.protocol.metadata.find_coordinator import FindCoordinatorRequest

from tests import consumer_groups
from tests.consumer_groups import (
    PROCESS_ENV,
    AdminView,
    GroupConsumer,
    RawState,
    describe_group,
    evenly_assigned,
    group_state,
    heartbeat,
    settled,
)
from tests.harness import ClusterProcesses, RawClient, wait_until
from tests.test_cluster import wait_cluster_size
from tests.test_group_protocol import commit
from tests.test_replication import REPL_ENV, create_replicated, stopped, wait_in_sync

pytestmark = pytest.mark.slow

TOPIC = "failover"
PARTITIONS = 4
GROUP = "failover-group"
COORDINATOR_NOT_AVAILABLE = 15
OFFSETS_PARTITIONS = 3
ENV = {
    **REPL_ENV,
    "STREAMBUS_OFFSETS_TOPIC_NUM_PARTITIONS": str(OFFSETS_PARTITIONS),
    **PROCESS_ENV,
}


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[ClusterProcesses]:
    with ClusterProcesses(tmp_path, 3, env=ENV) as c:
        wait_cluster_size(c, 3)
        yield c


class Member(GroupConsumer):
    """A consumer that commits synchronously what each poll read; records its assignment
    callbacks."""

    def __init__(self, bootstrap: str, name: str) -> None:
        super().__init__(
            bootstrap,
            name,
            group=GROUP,
            topics=[TOPIC],
            commit="after_read",
            config={"client.id": name, "reconnect.backoff.max.ms": 500},
        )


def produce(bootstrap: str, start: int, count: int) -> None:
    consumer_groups.produce(
        bootstrap, TOPIC, PARTITIONS, start, count, acks="all", flush_timeout=30
    )


def coordinator_of(bootstraps: list[str], group: str = GROUP) -> int | None:
    """The node a broker names as the group's coordinator (FindCoordinator), if any does."""
    for bootstrap in bootstraps:
        with contextlib.suppress(OSError), RawClient(bootstrap) as client:
            found = client.request(FindCoordinatorRequest(key=group, key_type=0), 2)
            if found.error_code == 0:
                return int(found.node_id)
    return None


def raw_state(bootstrap: str) -> RawState | None:
    return raw_state_of(bootstrap, GROUP)


def raw_state_of(bootstrap: str, group_id: str) -> RawState | None:
    """The group as ``bootstrap`` describes it; None if it does not coordinate it (yet)."""
    try:
        group = describe_group(bootstrap, group_id)
    except OSError:
        return None
    return group_state(group) if group.error_code == 0 else None


def admin_view(bootstrap: str) -> AdminView:
    """What ``describe_consumer_groups`` shows through ``bootstrap``."""
    return consumer_groups.admin_view(bootstrap, GROUP, request_timeout=10)


def committed(bootstrap: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = ConsumerGroupTopicPartitions(
        GROUP, [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    )
    result = admin.list_consumer_group_offsets([request], request_timeout=10)[GROUP].result(15)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def stable(cluster: ClusterProcesses, members: list[Member]) -> bool:
    node = coordinator_of([b.bootstrap for b in cluster.live().values()])
    state = None if node is None else raw_state(cluster.brokers[node].bootstrap)
    if state is None:
        return False
    return settled(state) and evenly_assigned(members, PARTITIONS, len(state[2]))


@pytest.mark.timeout(300)
def test_group_fails_over_to_the_new_coordinator(cluster3: ClusterProcesses) -> None:
    cluster = cluster3
    create_replicated(cluster.bootstrap, TOPIC, PARTITIONS)
    wait_in_sync(cluster, TOPIC, PARTITIONS)
    produce(cluster.bootstrap, 0, 40)
    members = [Member(cluster.bootstrap, f"failover-{i}") for i in range(2)]
    for m in members:
        m.start()
    try:
        wait_until(lambda: stable(cluster, members), timeout=90)
        wait_until(lambda: sum(m.count() for m in members) >= 40, timeout=60)
        # Every message read is committed: 10 per partition.
        wait_until(lambda: committed(cluster.bootstrap) == dict.fromkeys(range(PARTITIONS), 10), 60)
        # The group's records are in all three replicas of its offsets partition.
        wait_in_sync(cluster, "__consumer_offsets", OFFSETS_PARTITIONS)

        old = wait_until(
            lambda: coordinator_of([b.bootstrap for b in cluster.brokers.values()]), 30
        )
        before = raw_state(cluster.brokers[old].bootstrap)
        assert before is not None
        admin_before = admin_view(cluster.brokers[old].bootstrap)
        assert set(admin_before[1]) == set(before[2])
        history_before = [m.history() for m in members]

        survivors = {n: b for n, b in cluster.brokers.items() if n != old}
        logs_before = {n: len(b.log_text()) for n, b in survivors.items()}
        cluster.brokers[old].kill()
        killed_at = time.monotonic()
        survivor_bootstrap = ",".join(b.bootstrap for b in survivors.values())

        def described() -> tuple[int, RawState] | None:
            # Every survivor names the new coordinator: an admin client asking one that
            # still names the killed broker waits on it until its request times out.
            named = {coordinator_of([b.bootstrap]) for b in survivors.values()}
            if len(named) != 1:
                return None
            node = named.pop()
            if node is None or node == old:
                return None
            state = raw_state(survivors[node].bootstrap)
            return None if state is None else (node, state)

        new, after = wait_until(described, 90, 0.05)
        failover = time.monotonic() - killed_at
        print(
            f"\ncoordinator {old} SIGKILLed; broker {new} describes consumer group {GROUP!r} "
            f"again after {failover * 1000:.0f} ms",
            flush=True,
        )

        assert after == before, "members, epochs and assignments as before the kill"
        assert admin_view(survivor_bootstrap) == admin_before
        assert committed(survivor_bootstrap) == dict.fromkeys(range(PARTITIONS), 10), (
            "offsets committed before the kill are kept"
        )
        log = survivors[new].log_text()[logs_before[new] :]
        assert f"loaded consumer group '{GROUP}'" in log

        # The consumers carry on with the new coordinator: new messages are read, and
        # nobody's partitions were revoked or reassigned.
        produce(survivor_bootstrap, 40, 40)
        wait_until(lambda: sum(m.count() for m in members) >= 80, timeout=90)
        wait_until(
            lambda: committed(survivor_bootstrap) == dict.fromkeys(range(PARTITIONS), 20), 60
        )
        assert raw_state(survivors[new].bootstrap) == before
        for m, history in zip(members, history_before, strict=True):
            assert m.history() == history, "no partition revoked or given anew"
            assert m.error is None
        assert sorted(int(v) for m in members for v in m.read) == list(range(80)), (
            "every message read once"
        )
        log = survivors[new].log_text()[logs_before[new] :]
        assert "joins consumer group" not in log, "nobody had to rejoin"
    finally:
        for m in members:
            m.stop()
        for m in members:
            m.join(30)


def join(bootstrap: str, group: str, member: str) -> Any:
    """One ConsumerGroupHeartbeat of a member joining ``group``; its response."""
    with RawClient(bootstrap, timeout=30) as client:
        return heartbeat(client, group_id=group, member_id=member, subscribed_topic_names=[TOPIC])


@pytest.mark.timeout(240)
def test_heartbeat_waits_for_the_isr_and_times_out_retriably(cluster3: ClusterProcesses) -> None:
    cluster = cluster3
    group = "stalled-group"
    create_replicated(cluster.bootstrap, TOPIC, PARTITIONS)
    node = wait_until(
        lambda: coordinator_of([b.bootstrap for b in cluster.brokers.values()], group), 60
    )
    coordinator = cluster.brokers[node]

    def joined() -> Any:
        # refused (COORDINATOR_NOT_AVAILABLE) until __consumer_offsets is created and led
        response = join(coordinator.bootstrap, group, "member-a")
        return response if response.error_code == 0 else None

    wait_until(joined, 30, 0.2)
    wait_in_sync(cluster, "__consumer_offsets", OFFSETS_PARTITIONS)
    followers = [b for n, b in cluster.brokers.items() if n != node]
    # A group of plain offset commits (no members) that the same broker coordinates.
    bootstraps = [b.bootstrap for b in cluster.brokers.values()]
    committer = next(
        g for g in (f"committer-{i}" for i in range(1000)) if coordinator_of(bootstraps, g) == node
    )

    with stopped(followers[0]), stopped(followers[1]):
        began = time.monotonic()
        refused = join(coordinator.bootstrap, group, "member-b")
        waited = time.monotonic() - began
        # An offset commit the ISR cannot take is refused retriably too, as Kafka's
        # coordinator answers it (not REQUEST_TIMED_OUT, which older clients do not retry).
        with RawClient(coordinator.bootstrap, timeout=30) as client:
            commit_error = commit(client, -1, "", 5, TOPIC, group=committer)
    assert commit_error == COORDINATOR_NOT_AVAILABLE, commit_error
    print(
        f"\nheartbeat answered {refused.error_code} after {waited * 1000:.0f} ms "
        "with both followers stopped",
        flush=True,
    )
    assert refused.error_code == COORDINATOR_NOT_AVAILABLE, refused.error_message
    assert "not replicated" in (refused.error_message or "")

    # Back in the ISR, the member's retry is let in and told its assignment.
    def admitted() -> Any:
        response = join(coordinator.bootstrap, group, "member-b")
        return response if response.error_code == 0 else None

    again = wait_until(admitted, 60, 0.5)
    assert again.member_epoch > 0
    assert again.assignment is not None
    state = raw_state_of(coordinator.bootstrap, group)
    assert state is not None
    assert set(state[2]) == {"member-a", "member-b"}
