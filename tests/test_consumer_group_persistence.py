"""Consumer groups (KIP-848) survive their coordinator's restart.

A ``streambus serve`` process coordinates two librdkafka consumers (``group.protocol=consumer``);
it is stopped (SIGTERM, then SIGKILL) and started again on the same data directory. The
group's members, epochs and assignments are described as before (ConsumerGroupDescribe,
through the admin client and raw), and the consumers carry on: no partition is revoked or
given to another member, and the group epoch does not move.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, ConsumerGroupType, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streambus.protocol.consumer_group_messages import (
    ConsumerGroupDescribeRequest,
    ConsumerGroupHeartbeatRequest,
)
from tests.harness import BrokerProcess, RawClient, total, wait_until

TOPIC = "persisted"
PARTITIONS = 4
GROUP = "persisted-group"


class Member(threading.Thread):
    def __init__(self, bootstrap: str, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": GROUP,
            "group.protocol": "consumer",
            "auto.offset.reset": "earliest",
            "client.id": name,
            "log.connection.close": False,
            "reconnect.backoff.max.ms": 500,
        }
        self.lock = threading.Lock()
        self.assigned: set[int] = set()
        self.assigns: list[set[int]] = []
        self.revokes: list[set[int]] = []
        self.read: list[bytes] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def snapshot(self) -> set[int]:
        with self.lock:
            return set(self.assigned)

    def run(self) -> None:
        try:
            consumer = Consumer(self.config)

            def on_assign(_c: Any, partitions: list[TopicPartition]) -> None:
                with self.lock:
                    got = {p.partition for p in partitions}
                    self.assigned |= got
                    if got:
                        self.assigns.append(got)

            def on_revoke(_c: Any, partitions: list[TopicPartition]) -> None:
                with self.lock:
                    gone = {p.partition for p in partitions}
                    self.assigned -= gone
                    if gone:
                        self.revokes.append(gone)

            consumer.subscribe([TOPIC], on_assign=on_assign, on_revoke=on_revoke)
            while not self._halt.is_set():
                for m in consumer.consume(100, 0.2):
                    if m.error() is None:
                        with self.lock:
                            self.read.append(m.value())
            consumer.close()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    env = {
        "STREAMBUS_GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
        "STREAMBUS_GROUP_CONSUMER_SESSION_TIMEOUT_MS": "45000",
    }
    with BrokerProcess(tmp_path / "data", env=env) as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])[TOPIC].result(15)
        yield b


def produce(bootstrap: str, start: int, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(start, start + count):
        producer.produce(TOPIC, str(i).encode(), partition=i % PARTITIONS)
    assert producer.flush(15) == 0


def raw_state(bootstrap: str) -> tuple[int, int, dict[str, tuple[int, tuple[int, ...]]]]:
    """(group epoch, assignment epoch, member id -> (member epoch, partitions))."""
    with RawClient(bootstrap) as c:
        response = c.request(
            ConsumerGroupDescribeRequest(group_ids=[GROUP], include_authorized_operations=False),
            1,
        )
    (group,) = response.groups
    assert group.error_code == 0, group.error_message
    members = {
        m.member_id: (
            m.member_epoch,
            tuple(sorted(p for tp in m.assignment.topic_partitions for p in tp.partitions)),
        )
        for m in group.members
    }
    return group.group_epoch, group.assignment_epoch, members


def admin_view(bootstrap: str) -> tuple[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """What ``describe_consumer_groups`` shows: state, member id -> (client id, partitions)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([GROUP])[GROUP].result(15)
    assert description.type == ConsumerGroupType.CONSUMER
    return str(description.state), {
        m.member_id: (
            m.client_id,
            tuple(sorted(tp.partition for tp in m.assignment.topic_partitions)),
        )
        for m in description.members
    }


def stable(bootstrap: str, members: list[Member]) -> bool:
    try:
        _, _, described = raw_state(bootstrap)
    except (AssertionError, OSError):
        return False
    held = sorted(p for m in members for p in m.snapshot())
    return (
        len(described) == len(members)
        and held == list(range(PARTITIONS))
        and all(len(m.snapshot()) == PARTITIONS // len(members) for m in members)
    )


def heartbeats(broker: BrokerProcess) -> float:
    return total(broker.scrape(), "streambus_network_requests_total", api="ConsumerGroupHeartbeat")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_group_survives_coordinator_restart(broker: BrokerProcess, sig: int) -> None:
    produce(broker.bootstrap, 0, 40)
    members = [Member(broker.bootstrap, f"persist-{i}") for i in range(2)]
    for m in members:
        m.start()
    try:
        wait_until(lambda: stable(broker.bootstrap, members), timeout=60)
        wait_until(lambda: sum(len(m.read) for m in members) >= 40, timeout=30)
        before = raw_state(broker.bootstrap)
        admin_before = admin_view(broker.bootstrap)
        assigns_before = [list(m.assigns) for m in members]
        revokes_before = [list(m.revokes) for m in members]

        if sig == signal.SIGKILL:
            broker.kill()
        else:
            assert broker.stop(sig) == 0
        log_before = len(broker.log_text())
        broker.start()

        assert raw_state(broker.bootstrap) == before, "members, epochs and assignment as before"
        assert admin_view(broker.bootstrap) == admin_before

        # The consumers carry on with the restarted coordinator: new messages are read, and
        # nobody's partitions were revoked or reassigned.
        produce(broker.bootstrap, 40, 40)
        wait_until(lambda: sum(len(m.read) for m in members) >= 80, timeout=60)
        # Several heartbeats of both members reach the restarted coordinator...
        wait_until(lambda: heartbeats(broker) >= 6, timeout=30)
        after = raw_state(broker.bootstrap)
        assert after == before
        for m, assigns, revokes in zip(members, assigns_before, revokes_before, strict=True):
            assert m.assigns == assigns, "no partition given anew"
            assert m.revokes == revokes, "no partition taken away"
            assert m.error is None
        restarted = broker.log_text()[log_before:]
        assert f"loaded consumer group '{GROUP}'" in restarted
        assert "joins consumer group" not in restarted, "nobody had to rejoin"
    finally:
        for m in members:
            m.stop()
        for m in members:
            m.join(30)


def _heartbeat(client: RawClient, member: str, epoch: int, **fields: Any) -> Any:
    request = ConsumerGroupHeartbeatRequest(
        group_id="raw-persisted",
        member_id=member,
        member_epoch=epoch,
        rebalance_timeout_ms=30_000,
        subscribed_topic_names=[TOPIC] if epoch == 0 else None,
        **fields,
    )
    response = client.request(request, 1)
    assert response.error_code == 0, response.error_message
    return response


def _raw_describe(bootstrap: str, group: str) -> Any:
    with RawClient(bootstrap) as c:
        response = c.request(
            ConsumerGroupDescribeRequest(group_ids=[group], include_authorized_operations=False),
            1,
        )
    return response.groups[0]


def test_left_member_and_deleted_group_stay_gone_after_restart(broker: BrokerProcess) -> None:
    with RawClient(broker.bootstrap) as c:
        a = _heartbeat(c, "member-a", 0, instance_id="static-a", rack_id="rack-1")
        b = _heartbeat(c, "member-b", 0, subscribed_topic_regex="^pers.*")
        _heartbeat(c, "member-b", b.member_epoch, topic_partitions=[])
        _heartbeat(c, "member-b", -1)  # leaves: its records are tombstoned
        _heartbeat(c, "member-a", a.member_epoch, topic_partitions=[])
    before = _raw_describe(broker.bootstrap, "raw-persisted")
    assert [m.member_id for m in before.members] == ["member-a"]
    assert broker.stop(signal.SIGTERM) == 0
    broker.start()
    after = _raw_describe(broker.bootstrap, "raw-persisted")
    assert after == before
    (member,) = after.members
    assert (member.instance_id, member.rack_id) == ("static-a", "rack-1")

    with RawClient(broker.bootstrap) as c:
        _heartbeat(c, "member-a", member.member_epoch, topic_partitions=[])
        _heartbeat(c, "member-a", -1)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.delete_consumer_groups(["raw-persisted"])["raw-persisted"].result(15)
    broker.kill()
    broker.start()
    assert _raw_describe(broker.bootstrap, "raw-persisted").error_code == 69  # GROUP_ID_NOT_FOUND
