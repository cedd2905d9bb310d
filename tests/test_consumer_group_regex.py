"""Regex subscriptions of the consumer group protocol (KIP-848), resolved by the coordinator.

A librdkafka consumer (``group.protocol=consumer``) subscribing to ``^orders-.*`` gets the
partitions of the topics that match and none of the others; a matching topic created
afterwards is assigned to it without the consumer resubscribing, and one deleted leaves
its assignment. ConsumerGroupDescribe reports the member's regex; a regex Python cannot
compile is INVALID_REGULAR_EXPRESSION.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.consumer_groups import (
    GroupConsumer,
    create_topics,
    describe_group,
    group_broker,
    heartbeat,
)
from tests.harness import BrokerThread, RawClient, wait_until

GROUP = "regex-group"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with group_broker(tmp_path) as b:
        yield b


class RegexConsumer(GroupConsumer):
    """Subscribes once by regex; records its assignment and every message it reads."""

    def __init__(self, bootstrap: str, pattern: str) -> None:
        super().__init__(
            bootstrap,
            "regex-consumer",
            group=GROUP,
            topics=[pattern],
            config={"topic.metadata.refresh.interval.ms": 500},
            key=lambda p: (p.topic, p.partition),
            keep=lambda m: (m.topic(), m.value()),
        )


def _describe(bootstrap: str) -> Any:
    return describe_group(bootstrap, GROUP)


def test_regex_subscription_follows_matching_topics(broker: BrokerThread) -> None:
    create_topics(broker.bootstrap, {"orders-eu": 2, "orders-us": 1, "payments": 2})
    consumer = RegexConsumer(broker.bootstrap, "^orders-.*")
    consumer.start()
    try:
        expected = {("orders-eu", 0), ("orders-eu", 1), ("orders-us", 0)}
        wait_until(lambda: consumer.snapshot() == expected, timeout=60)

        described = _describe(broker.bootstrap)
        assert described.error_code == 0
        (member,) = described.members
        # librdkafka sends its subscribed patterns joined as one regex: "(^orders-.*)".
        assert member.subscribed_topic_regex in ("^orders-.*", "(^orders-.*)")
        assigned = {
            (tp.topic_name, p) for tp in member.assignment.topic_partitions for p in tp.partitions
        }
        assert assigned == expected

        # A matching topic created later is assigned without resubscribing; another is not.
        create_topics(broker.bootstrap, {"orders-apac": 3, "refunds": 1})
        expected |= {("orders-apac", p) for p in range(3)}
        wait_until(lambda: consumer.snapshot() == expected, timeout=60)

        producer = Producer({"bootstrap.servers": broker.bootstrap})
        for topic in ("orders-apac", "payments", "refunds"):
            producer.produce(topic, topic.encode(), partition=0)
        assert producer.flush(15) == 0
        wait_until(lambda: ("orders-apac", b"orders-apac") in consumer.read, timeout=30)
        assert {t for t, _ in consumer.read} == {"orders-apac"}

        # A matching topic deleted leaves the member's assignment.
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.delete_topics(["orders-us"])["orders-us"].result(15)
        expected -= {("orders-us", 0)}
        wait_until(lambda: consumer.snapshot() == expected, timeout=60)
        assert consumer.error is None
    finally:
        consumer.stop()
        consumer.join(30)
    assert consumer.error is None


def _heartbeat(client: RawClient, **fields: Any) -> Any:
    base: dict[str, Any] = {
        "group_id": "raw-regex",
        "member_id": "member-r",
        "subscribed_topic_names": [],
    }
    base.update(fields)
    return heartbeat(client, **base)


def test_regex_errors_and_internal_topics(broker: BrokerThread) -> None:
    create_topics(broker.bootstrap, {"logs-a": 1})
    # Commit an offset so that __consumer_offsets exists: a catch-all regex must skip it.
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "committer"})
    consumer.commit(offsets=[TopicPartition("logs-a", 0, 0)], asynchronous=False)
    consumer.close()
    with RawClient(broker.bootstrap) as c:
        bad = _heartbeat(c, subscribed_topic_regex="orders-[")
        assert bad.error_code == 130  # INVALID_REGULAR_EXPRESSION
        assert "orders-[" in bad.error_message
        # RE2 is Kafka's dialect: no lookarounds or backreferences (what keeps it linear).
        for pattern in ("(?=orders).*", r"(a)\1"):
            refused = _heartbeat(c, subscribed_topic_regex=pattern)
            assert refused.error_code == 130, pattern
        joined = _heartbeat(c, subscribed_topic_regex=".*")
        assert joined.error_code == 0
        got = [tp.partitions for tp in joined.assignment.topic_partitions]
        assert got == [[0]], "only logs-a: internal topics never match"
        # The member keeps its epoch; an invalid new regex is refused and changes nothing.
        again = _heartbeat(c, member_epoch=joined.member_epoch, subscribed_topic_regex="(")
        assert again.error_code == 130
        kept = _heartbeat(c, member_epoch=joined.member_epoch)
        assert kept.error_code == 0
        assert kept.member_epoch == joined.member_epoch
