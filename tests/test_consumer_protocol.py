"""The consumer group protocol (KIP-848) with librdkafka consumers (``group.protocol=consumer``).

The coordinator assigns; members reconcile incrementally. Three members read a topic,
one leaves and another joins: every message is read exactly once and the lag a real
/metrics scrape shows is exact. A static member that restarts within its session
timeout gets its partitions back while the other members see no revocation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streambus.protocol.consumer_group_messages import ConsumerGroupDescribeRequest
from tests import consumer_groups
from tests.consumer_groups import GroupConsumer, group_broker, heartbeat
from tests.harness import BrokerThread, RawClient, total, wait_until

TOPIC = "kip848"
PARTITIONS = 6
GROUP = "g848"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with group_broker(tmp_path, {TOPIC: PARTITIONS}) as b:
        yield b


def produce(bootstrap: str, start: int, count: int) -> None:
    consumer_groups.produce(bootstrap, TOPIC, PARTITIONS, start, count)


class Member(GroupConsumer):
    """A consumer-protocol member: records a message once its commit succeeded, and every
    partition it is given or has taken away."""

    def __init__(
        self, bootstrap: str, name: str, instance: str | None = None, protocol: str = "consumer"
    ) -> None:
        config: dict[str, Any] = {}
        if instance is not None:
            config["group.instance.id"] = instance
        if protocol == "classic":
            config.update({"session.timeout.ms": 10_000, "heartbeat.interval.ms": 300})
        super().__init__(
            bootstrap,
            name,
            group=GROUP,
            topics=[TOPIC],
            commit="before_read",
            protocol=protocol,
            config=config,
            keep=lambda m: (m.partition(), m.offset(), m.value()),
        )


def _values(members: list[Member]) -> list[int]:
    return sorted(int(v) for m in members for _, _, v in m.read)


def _lag(broker: BrokerThread) -> float:
    return total(broker.scrape(), "streambus_consumer_group_lag", group=GROUP)


def test_members_leave_and_join_every_message_read_once_lag_exact(broker: BrokerThread) -> None:
    produce(broker.bootstrap, 0, 300)
    members = [Member(broker.bootstrap, f"m{i}") for i in range(3)]
    for m in members:
        m.start()
    wait_until(lambda: len(_values(members)) >= 300, timeout=60)
    wait_until(lambda: all(len(m.assigned) == 2 for m in members), timeout=30)
    assert sorted(p for m in members for p in m.assigned) == list(range(PARTITIONS))
    scraped = broker.scrape()
    assert total(scraped, "streambus_consumer_group_members_total", group=GROUP) == 3
    assert total(scraped, "streambus_consumer_group_rebalances_total", group=GROUP) >= 1

    leaving = members.pop(0)
    leaving.stop()
    assert leaving.closed.wait(30)
    produce(broker.bootstrap, 300, 300)
    wait_until(lambda: sorted(p for m in members for p in m.assigned) == list(range(6)), 30)

    joining = Member(broker.bootstrap, "m3")
    joining.start()
    members.append(joining)
    wait_until(lambda: len(joining.assigned) == 2, timeout=30)
    produce(broker.bootstrap, 600, 300)
    everyone = [leaving, *members]
    wait_until(lambda: len(_values(everyone)) >= 900, timeout=60)
    wait_until(lambda: _lag(broker) == 0, timeout=15)
    assert _values(everyone) == list(range(900)), "every message read exactly once"
    assert total(broker.scrape(), "streambus_consumer_group_members_total", group=GROUP) == 3

    # Lag exact: 60 more messages with everyone stopped are 60 behind.
    for m in members:
        m.stop()
    for m in members:
        assert m.closed.wait(30)
    assert all(m.error is None for m in everyone)
    produce(broker.bootstrap, 900, 60)
    wait_until(lambda: _lag(broker) == 60, timeout=15)
    scraped = broker.scrape()
    assert total(scraped, "streambus_consumer_group_members_total", group=GROUP) == 0


@pytest.mark.parametrize("protocol", ["consumer", "classic"])
def test_static_member_restart_revokes_nothing_from_the_others(
    broker: BrokerThread, protocol: str
) -> None:
    produce(broker.bootstrap, 0, 60)
    members = [
        Member(broker.bootstrap, f"s{i}", instance=f"instance-{i}", protocol=protocol)
        for i in range(3)
    ]
    for m in members:
        m.start()
    wait_until(lambda: all(len(m.assigned) == 2 for m in members), timeout=60)
    before = [set(m.assigned) for m in members]
    revoked_before = [list(m.revokes) for m in members]
    rebalances_before = total(broker.scrape(), "streambus_consumer_group_rebalances_total")

    restarting = members[0]
    restarting.stop()
    assert restarting.closed.wait(30)
    again = Member(broker.bootstrap, "s0-again", instance="instance-0", protocol=protocol)
    again.start()
    wait_until(lambda: len(again.assigned) == 2, timeout=30)
    assert again.assigned == before[0], "the static member gets its partitions back"
    for m, had, revoked in zip(members[1:], before[1:], revoked_before[1:], strict=True):
        assert m.assigned == had
        assert m.revokes == revoked, "the other members saw no revocation"
    assert total(broker.scrape(), "streambus_consumer_group_rebalances_total") == (
        rebalances_before
    ), "no rebalance"
    for m in [again, *members[1:]]:
        m.stop()
    for m in [again, *members[1:]]:
        assert m.closed.wait(30)


def _heartbeat(client: RawClient, version: int = 1, **fields: Any) -> Any:
    base: dict[str, Any] = {
        "group_id": "raw",
        "member_id": "member-a",
        "subscribed_topic_names": [TOPIC],
    }
    base.update(fields)
    return heartbeat(client, version, **base)


def test_heartbeat_errors_and_describe(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as c:
        joined = _heartbeat(c)
        assert joined.error_code == 0
        assert joined.member_epoch >= 1
        assert joined.heartbeat_interval_ms == 300
        got = {p for tp in joined.assignment.topic_partitions for p in tp.partitions}
        assert got == set(range(PARTITIONS))
        assert _heartbeat(c, member_epoch=joined.member_epoch + 5).error_code == 110  # FENCED
        assert _heartbeat(c, member_id="nobody", member_epoch=3).error_code == 25  # UNKNOWN
        assert _heartbeat(c, member_id="", member_epoch=0).error_code == 42  # v1 needs an id
        assert _heartbeat(c, version=0, member_id="").member_id  # v0: the broker names it
        assert _heartbeat(c, member_id="b", server_assignor="nope").error_code == 112
        described = c.request(
            ConsumerGroupDescribeRequest(
                group_ids=["raw", "missing"], include_authorized_operations=False
            ),
            1,
        )
        raw, missing = described.groups
        assert raw.error_code == 0
        assert raw.assignor_name == "uniform"
        assert {m.member_id for m in raw.members} >= {"member-a"}
        assert missing.error_code == 69  # GROUP_ID_NOT_FOUND
        left = _heartbeat(c, member_epoch=-1)
        assert left.error_code == 0
        assert left.member_epoch == -1
