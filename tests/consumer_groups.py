"""What the consumer group protocol (KIP-848) tests share.

A librdkafka consumer (``group.protocol=consumer``) on a thread of its own that records its
assignment callbacks and what it reads; a producer of numbered messages; a broker whose
group timings suit those tests; and raw ConsumerGroupHeartbeat / ConsumerGroupDescribe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import (
    Consumer,
    ConsumerGroupType,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from streambus.protocol.consumer_group_messages import (
    ConsumerGroupDescribeRequest,
    ConsumerGroupHeartbeatRequest,
)
from tests.harness import BrokerThread, RawClient

# For ``streambus serve`` processes: heartbeats twice a second, and a session long enough
# that no member is expired while the group is restarted or changes coordinator.
PROCESS_ENV = {
    "STREAMBUS_GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
    "STREAMBUS_GROUP_CONSUMER_SESSION_TIMEOUT_MS": "45000",
}

# (group epoch, assignment epoch, member id -> (member epoch, partitions))
RawState = tuple[int, int, dict[str, tuple[int, tuple[int, ...]]]]
# state, member id -> (client id, partitions)
AdminView = tuple[str, dict[str, tuple[str, tuple[int, ...]]]]

# When a consumer commits: "auto" leaves it to librdkafka; "before_read" commits each poll
# synchronously and records its messages only once that succeeded (a commit that fails
# because the partitions moved leaves them to their next owner); "after_read" records each
# poll, then commits it, a failed commit being retried with the next.
CommitMode = Literal["auto", "before_read", "after_read"]


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Creates each topic with its number of partitions, replication factor 1."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, n, 1) for t, n in topics.items()]).values():
        future.result(15)


@contextlib.contextmanager
def group_broker(tmp_path: Path, topics: dict[str, int] | None = None) -> Iterator[BrokerThread]:
    """An in-process broker whose members heartbeat every 300 ms, with ``topics`` created."""
    with BrokerThread(
        tmp_path,
        group_consumer_heartbeat_interval_ms=300,
        group_consumer_session_timeout_ms=10_000,
    ) as b:
        if topics:
            create_topics(b.bootstrap, topics)
        yield b


def produce(
    bootstrap: str,
    topic: str,
    partitions: int,
    start: int,
    count: int,
    *,
    acks: str | None = None,
    flush_timeout: float = 15,
) -> None:
    """Messages ``start`` .. ``start + count - 1`` (their number as value), round-robin."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap}
    if acks is not None:
        config["acks"] = acks
    producer = Producer(config)
    for i in range(start, start + count):
        producer.produce(topic, str(i).encode(), partition=i % partitions)
    assert producer.flush(flush_timeout) == 0


def _partition(p: TopicPartition) -> Any:
    return p.partition


def _value(m: Message) -> Any:
    return m.value()


class GroupConsumer(threading.Thread):
    """A consumer-protocol member subscribed to ``topics`` (names or one regex).

    Records its assignment (``assigned``, each partition by ``key``), every non-empty
    assignment and revocation (``assigns``, ``revokes``), and each message read (by
    ``keep``), all under ``lock``; ``closed`` is set once the thread has finished.
    """

    def __init__(
        self,
        bootstrap: str,
        name: str,
        *,
        group: str,
        topics: list[str],
        commit: CommitMode = "auto",
        protocol: str = "consumer",
        config: dict[str, Any] | None = None,
        key: Callable[[TopicPartition], Any] = _partition,
        keep: Callable[[Message], Any] = _value,
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "group.protocol": protocol,
            "auto.offset.reset": "earliest",
            "log.connection.close": False,
        }
        if commit != "auto":
            self.config["enable.auto.commit"] = False
        self.config.update(config or {})
        self.topics = topics
        self.commit = commit
        self.key = key
        self.keep = keep
        self.lock = threading.Lock()
        self.assigned: set[Any] = set()
        self.assigns: list[set[Any]] = []
        self.revokes: list[set[Any]] = []
        self.read: list[Any] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self.closed = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def snapshot(self) -> set[Any]:
        with self.lock:
            return set(self.assigned)

    def history(self) -> tuple[list[set[Any]], list[set[Any]]]:
        with self.lock:
            return list(self.assigns), list(self.revokes)

    def count(self) -> int:
        with self.lock:
            return len(self.read)

    def run(self) -> None:
        try:
            consumer = Consumer(self.config)

            def on_assign(_c: Any, partitions: list[TopicPartition]) -> None:
                with self.lock:
                    got = {self.key(p) for p in partitions}
                    self.assigned |= got
                    if got:
                        self.assigns.append(got)

            def on_revoke(_c: Any, partitions: list[TopicPartition]) -> None:
                with self.lock:
                    gone = {self.key(p) for p in partitions}
                    self.assigned -= gone
                    if gone:
                        self.revokes.append(gone)

            consumer.subscribe(self.topics, on_assign=on_assign, on_revoke=on_revoke)
            while not self._halt.is_set():
                good = [m for m in consumer.consume(100, 0.2) if m.error() is None]
                if not good:
                    continue
                if self.commit == "before_read":
                    try:
                        consumer.commit(asynchronous=False)
                    except KafkaException:
                        continue  # the partitions moved: their next owner reads these
                with self.lock:
                    self.read.extend(self.keep(m) for m in good)
                if self.commit == "after_read":
                    with contextlib.suppress(KafkaException):
                        consumer.commit(asynchronous=False)
            consumer.close()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.closed.set()


def evenly_assigned(members: Sequence[GroupConsumer], partitions: int, described: int) -> bool:
    """Each of the ``described`` members holds its even share of all ``partitions``."""
    held = sorted(p for m in members for p in m.snapshot())
    return (
        described == len(members)
        and held == list(range(partitions))
        and all(len(m.snapshot()) == partitions // len(members) for m in members)
    )


def settled(state: RawState) -> bool:
    """Reconciled: every member at the group's epoch, which the assignment has too, so no
    heartbeat still due moves an epoch (snapshots taken apart in time compare equal)."""
    group_epoch, assignment_epoch, described = state
    return group_epoch == assignment_epoch and all(
        epoch == group_epoch for epoch, _ in described.values()
    )


def heartbeat(client: RawClient, version: int = 1, **fields: Any) -> Any:
    """One raw ConsumerGroupHeartbeat; by default a member joining (epoch 0, 30 s rebalance
    timeout)."""
    request: dict[str, Any] = {"member_epoch": 0, "rebalance_timeout_ms": 30_000, **fields}
    return client.request(ConsumerGroupHeartbeatRequest(**request), version)


def describe_group(bootstrap: str, group: str) -> Any:
    """The group as a raw ConsumerGroupDescribe v1 through ``bootstrap`` describes it."""
    with RawClient(bootstrap) as c:
        response = c.request(
            ConsumerGroupDescribeRequest(group_ids=[group], include_authorized_operations=False),
            1,
        )
    return response.groups[0]


def group_state(described: Any) -> RawState:
    """A described group's epochs and each member's epoch and partitions."""
    members = {
        m.member_id: (
            m.member_epoch,
            tuple(sorted(p for tp in m.assignment.topic_partitions for p in tp.partitions)),
        )
        for m in described.members
    }
    return described.group_epoch, described.assignment_epoch, members


def admin_view(bootstrap: str, group: str, **options: Any) -> AdminView:
    """What ``describe_consumer_groups`` shows through ``bootstrap``."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([group], **options)[group].result(15)
    assert description.type == ConsumerGroupType.CONSUMER
    return str(description.state), {
        m.member_id: (
            m.client_id,
            tuple(sorted(tp.partition for tp in m.assignment.topic_partitions)),
        )
        for m in description.members
    }
