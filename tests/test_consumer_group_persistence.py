"""Consumer groups (KIP-848) survive their coordinator's restart.

A ``streambus serve`` process coordinates two librdkafka consumers (``group.protocol=consumer``);
it is stopped (SIGTERM, then SIGKILL) and started again on the same data directory. The
group's members, epochs and assignments are described as before (ConsumerGroupDescribe,
through the admin client and raw), and the consumers carry on: no partition is revoked or
given to another member, and the group epoch does not move.
"""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from tests import consumer_groups
from tests.consumer_groups import (
    PROCESS_ENV,
    AdminView,
    GroupConsumer,
    RawState,
    create_topics,
    describe_group,
    evenly_assigned,
    group_state,
    heartbeat,
    settled,
)
from tests.harness import BrokerProcess, RawClient, total, wait_until

TOPIC = "persisted"
PARTITIONS = 4
GROUP = "persisted-group"


class Member(GroupConsumer):
    def __init__(self, bootstrap: str, name: str) -> None:
        super().__init__(
            bootstrap,
            name,
            group=GROUP,
            topics=[TOPIC],
            config={"client.id": name, "reconnect.backoff.max.ms": 500},
        )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "data", env=PROCESS_ENV) as b:
        create_topics(b.bootstrap, {TOPIC: PARTITIONS})
        yield b


def produce(bootstrap: str, start: int, count: int) -> None:
    consumer_groups.produce(bootstrap, TOPIC, PARTITIONS, start, count)


def raw_state(bootstrap: str) -> RawState:
    """(group epoch, assignment epoch, member id -> (member epoch, partitions))."""
    group = describe_group(bootstrap, GROUP)
    assert group.error_code == 0, group.error_message
    return group_state(group)


def admin_view(bootstrap: str) -> AdminView:
    """What ``describe_consumer_groups`` shows: state, member id -> (client id, partitions)."""
    return consumer_groups.admin_view(bootstrap, GROUP)


def stable(bootstrap: str, members: list[Member]) -> bool:
    try:
        state = raw_state(bootstrap)
    except (AssertionError, OSError):
        return False
    return settled(state) and evenly_assigned(members, PARTITIONS, len(state[2]))


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
    response = heartbeat(
        client,
        group_id="raw-persisted",
        member_id=member,
        member_epoch=epoch,
        subscribed_topic_names=[TOPIC] if epoch == 0 else None,
        **fields,
    )
    assert response.error_code == 0, response.error_message
    return response


def test_left_member_and_deleted_group_stay_gone_after_restart(broker: BrokerProcess) -> None:
    with RawClient(broker.bootstrap) as c:
        a = _heartbeat(c, "member-a", 0, instance_id="static-a", rack_id="rack-1")
        b = _heartbeat(c, "member-b", 0, subscribed_topic_regex="^pers.*")
        _heartbeat(c, "member-b", b.member_epoch, topic_partitions=[])
        _heartbeat(c, "member-b", -1)  # leaves: its records are tombstoned
        _heartbeat(c, "member-a", a.member_epoch, topic_partitions=[])
    before = describe_group(broker.bootstrap, "raw-persisted")
    assert [m.member_id for m in before.members] == ["member-a"]
    assert broker.stop(signal.SIGTERM) == 0
    broker.start()
    after = describe_group(broker.bootstrap, "raw-persisted")
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
    assert describe_group(broker.bootstrap, "raw-persisted").error_code == 69  # GROUP_ID_NOT_FOUND


def _offsets_log(bootstrap: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) of ``__consumer_offsets`` in log order, read by a consumer."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "offsets-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics("__consumer_offsets", timeout=15).topics
        count = len(partitions["__consumer_offsets"].partitions)
        consumer.assign([TopicPartition("__consumer_offsets", p, 0) for p in range(count)])
        out: list[tuple[bytes, bytes | None]] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + 30
        while len(at_end) < count and time.monotonic() < deadline:
            msg = consumer.poll(1)
            if msg is None:
                continue
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                continue
            out.append((msg.key(), msg.value()))
        assert len(at_end) == count, "read every partition to its end"
        return out
    finally:
        consumer.close()


def _regex_records(bootstrap: str, group: str, regex: str) -> list[bytes | None]:
    """The values of ``group``'s ConsumerGroupRegularExpression record for ``regex``, checking
    the key is Kafka's: version 16, then GroupId and RegularExpression as int16-length strings."""
    key = struct.pack(">hh", 16, len(group)) + group.encode()
    key += struct.pack(">h", len(regex)) + regex.encode()
    return [v for k, v in _offsets_log(bootstrap) if k == key]


def _decode_regex_value(value: bytes) -> tuple[list[str], int, int]:
    """Kafka's ConsumerGroupRegularExpressionValue v0 (flexible): compact array of compact
    strings Topics, int64 Version, int64 Timestamp, empty tagged fields."""
    assert struct.unpack_from(">h", value)[0] == 0, "value version 0"
    pos = 2
    count = value[pos] - 1  # small enough for a one-byte varint here
    pos += 1
    topics = []
    for _ in range(count):
        length = value[pos] - 1
        topics.append(value[pos + 1 : pos + 1 + length].decode())
        pos += 1 + length
    version, timestamp = struct.unpack_from(">qq", value, pos)
    pos += 16
    assert value[pos:] == b"\x00", "no tagged fields, nothing after them"
    return topics, version, timestamp


def test_regex_resolution_is_persisted_as_kafka_record(broker: BrokerProcess) -> None:
    group, regex = "raw-regex-persisted", "^pers.*"
    started_ms = int(time.time() * 1000)

    def beat(c: RawClient, epoch: int, **fields: Any) -> Any:
        response = heartbeat(c, group_id=group, member_id="member-r", member_epoch=epoch, **fields)
        assert response.error_code == 0, response.error_message
        return response

    with RawClient(broker.bootstrap) as c:
        joined = beat(c, 0, subscribed_topic_names=[], subscribed_topic_regex=regex)
        owned = joined.assignment.topic_partitions
        assert sorted(p for tp in owned for p in tp.partitions) == list(range(PARTITIONS))
        beat(c, joined.member_epoch, topic_partitions=owned)
    before = describe_group(broker.bootstrap, group)
    (value,) = _regex_records(broker.bootstrap, group, regex)
    assert value is not None
    topics, version, timestamp = _decode_regex_value(value)
    assert topics == [TOPIC]
    assert version <= before.group_epoch
    assert started_ms <= timestamp <= int(time.time() * 1000)

    broker.kill()
    broker.start()
    after = describe_group(broker.bootstrap, group)
    assert after.group_epoch == before.group_epoch, "the loaded resolution moved no epoch"
    assert after == before
    with RawClient(broker.bootstrap) as c:
        kept = beat(c, before.members[0].member_epoch, topic_partitions=owned)
        assert kept.member_epoch == before.members[0].member_epoch
        assert describe_group(broker.bootstrap, group).group_epoch == before.group_epoch
        # Not written again by the load or the heartbeat: the same resolution, one record.
        assert _regex_records(broker.bootstrap, group, regex) == [value]

        # A new matching topic changes the resolution: a new record, a new group epoch.
        create_topics(broker.bootstrap, {"persisted-more": 1})
        wait_until(lambda: beat(c, kept.member_epoch).member_epoch > kept.member_epoch, timeout=30)
        assert describe_group(broker.bootstrap, group).group_epoch > before.group_epoch
        records = _regex_records(broker.bootstrap, group, regex)
        assert len(records) == 2
        assert records[-1] is not None
        assert _decode_regex_value(records[-1])[0] == [TOPIC, "persisted-more"]

        beat(c, -1)  # the last member with the regex leaves: its record is tombstoned
    assert _regex_records(broker.bootstrap, group, regex)[-1] is None
