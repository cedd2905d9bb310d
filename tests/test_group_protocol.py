"""The classic group protocol on the wire: generations, member ids, static members, bad input.

A raw Kafka connection drives the broker so every error code is observed
exactly; the real-client tests are in test_groups.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.consumer import (
    HeartbeatRequest,
    JoinGroupRequest,
    LeaveGroupRequest,
    OffsetCommitRequest,
    OffsetFetchRequest,
    SyncGroupRequest,
)
from kafka.protocol.metadata import MetadataRequest

from tests.harness import BrokerThread, RawClient, total

GROUP = "g1"
P = JoinGroupRequest.JoinGroupRequestProtocol


def join(
    client: RawClient,
    member_id: str = "",
    protocols: Any = None,
    instance: str | None = None,
    protocol_type: str = "consumer",
) -> Any:
    request = JoinGroupRequest(
        group_id=GROUP,
        session_timeout_ms=10_000,
        rebalance_timeout_ms=10_000,
        member_id=member_id,
        group_instance_id=instance,
        protocol_type=protocol_type,
        protocols=[P(name="range", metadata=b"m1")] if protocols is None else protocols,
    )
    return client.request(request, 5)


def join_member(client: RawClient, **kw: Any) -> Any:
    """JoinGroup v5 with an empty member id gets MEMBER_ID_REQUIRED and an id, then joins."""
    first = join(client, **kw)
    if first.error_code == 79:
        return join(client, member_id=first.member_id, **kw)
    return first


def sync(
    client: RawClient,
    generation: int,
    member_id: str,
    assignments: Any = (),
    instance: str | None = None,
) -> Any:
    A = SyncGroupRequest.SyncGroupRequestAssignment
    request = SyncGroupRequest(
        group_id=GROUP,
        generation_id=generation,
        member_id=member_id,
        group_instance_id=instance,
        assignments=[A(member_id=m, assignment=a) for m, a in assignments],
    )
    return client.request(request, 3)


def heartbeat(
    client: RawClient, generation: int, member_id: str, instance: str | None = None
) -> int:
    request = HeartbeatRequest(
        group_id=GROUP, generation_id=generation, member_id=member_id, group_instance_id=instance
    )
    return int(client.request(request, 3).error_code)


def commit(
    client: RawClient,
    generation: int,
    member_id: str,
    offset: int,
    topic: str = "t",
    *,
    group: str = GROUP,
) -> int:
    T = OffsetCommitRequest.OffsetCommitRequestTopic
    request = OffsetCommitRequest(
        group_id=group,
        generation_id_or_member_epoch=generation,
        member_id=member_id,
        group_instance_id=None,
        topics=[
            T(
                name=topic,
                partitions=[
                    T.OffsetCommitRequestPartition(
                        partition_index=0,
                        committed_offset=offset,
                        committed_leader_epoch=-1,
                        committed_metadata="meta",
                    )
                ],
            )
        ],
    )
    return int(client.request(request, 7).topics[0].partitions[0].error_code)


def fetch_committed(client: RawClient, topic: str = "t") -> int:
    T = OffsetFetchRequest.OffsetFetchRequestTopic
    request = OffsetFetchRequest(
        group_id=GROUP, topics=[T(name=topic, partition_indexes=[0])], require_stable=False
    )
    return int(client.request(request, 7).topics[0].partitions[0].committed_offset)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path / "data", group_initial_rebalance_delay_ms=0, group_min_session_timeout_ms=500
    ) as b:
        b.run(b.broker.create_topic, "t", 1, {})
        yield b


def test_single_member_round_and_commit(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as c:
        first = join(c)
        assert first.error_code == 79  # MEMBER_ID_REQUIRED: rejoin with the id given
        assert first.member_id
        joined = join(c, member_id=first.member_id)
        assert joined.error_code == 0
        assert joined.leader == joined.member_id == first.member_id
        assert joined.protocol_name == "range"
        assert [m.member_id for m in joined.members] == [joined.member_id]
        synced = sync(
            c, joined.generation_id, joined.member_id, [(joined.member_id, b"assignment")]
        )
        assert (synced.error_code, synced.assignment) == (0, b"assignment")
        assert heartbeat(c, joined.generation_id, joined.member_id) == 0
        assert commit(c, joined.generation_id, joined.member_id, 42) == 0
        assert fetch_committed(c) == 42


def test_stale_generation_and_unknown_member_are_refused(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as c:
        joined = join_member(c)
        gen, member = joined.generation_id, joined.member_id
        assert sync(c, gen, member, [(member, b"a")]).error_code == 0
        assert commit(c, gen, member, 5) == 0
        assert commit(c, gen - 1, member, 6) == 22  # ILLEGAL_GENERATION
        assert commit(c, gen, "nobody", 7) == 25  # UNKNOWN_MEMBER_ID
        assert heartbeat(c, gen + 3, member) == 22
        assert heartbeat(c, gen, "nobody") == 25
        assert sync(c, gen - 1, member).error_code == 22
        assert fetch_committed(c) == 5, "refused commits change nothing"
        assert heartbeat(c, gen, member) == 0, "the group is still consistent"


def test_join_with_no_common_protocol(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as a, RawClient(broker.bootstrap) as b:
        joined = join_member(a, protocols=[P(name="range", metadata=b"")])
        assert (
            sync(a, joined.generation_id, joined.member_id, [(joined.member_id, b"x")]).error_code
            == 0
        )
        other = join(b, protocols=[P(name="roundrobin", metadata=b"")])
        assert other.error_code == 23  # INCONSISTENT_GROUP_PROTOCOL
        wrong_type = join(b, protocol_type="connect")
        assert wrong_type.error_code == 23
        empty = join(b, protocols=[])
        assert empty.error_code == 23
        assert heartbeat(a, joined.generation_id, joined.member_id) == 0, "no rebalance was started"


def test_sync_from_non_leader_with_assignments(tmp_path: Path) -> None:
    # group.initial.rebalance.delay.ms lets both members into the first round
    with (
        BrokerThread(tmp_path / "data", group_initial_rebalance_delay_ms=500) as broker,
        RawClient(broker.bootstrap) as a,
        RawClient(broker.bootstrap) as b,
    ):
        first = join(a)
        second = join(b)
        results: dict[str, Any] = {}
        # Two members join one round: their JoinGroup calls wait for each other.
        t = threading.Thread(
            target=lambda: results.setdefault("a", join(a, member_id=first.member_id))
        )
        t.start()
        results["b"] = join(b, member_id=second.member_id)
        t.join(10)
        gen = results["a"].generation_id
        assert results["b"].generation_id == gen
        leader = results["a"].leader
        follower = next(r for r in results.values() if r.member_id != leader)
        leader_client, follower_client = (a, b) if results["a"].member_id == leader else (b, a)
        bad = sync(follower_client, gen, follower.member_id, [(follower.member_id, b"mine!")])
        assert bad.error_code == 42  # INVALID_REQUEST: only the leader assigns
        waiting: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: waiting.setdefault("f", sync(follower_client, gen, follower.member_id))
        )
        t.start()
        good = sync(leader_client, gen, leader, [(leader, b"L"), (follower.member_id, b"F")])
        t.join(10)
        assert good.assignment == b"L"
        assert waiting["f"].assignment == b"F", (
            "the follower gets the leader's assignment, not its own"
        )


def test_rebalance_when_a_member_leaves(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as a, RawClient(broker.bootstrap) as b:
        one = join_member(a)
        assert sync(a, one.generation_id, one.member_id, [(one.member_id, b"all")]).error_code == 0
        first_b = join(b)
        # b's join starts a rebalance: a learns it from its heartbeat and rejoins.
        t = threading.Thread(target=lambda: join(b, member_id=first_b.member_id))
        t.start()
        import time

        deadline = time.monotonic() + 5
        while heartbeat(a, one.generation_id, one.member_id) != 27 and time.monotonic() < deadline:
            time.sleep(0.05)
        rejoined = join(a, member_id=one.member_id)
        t.join(10)
        assert rejoined.generation_id == one.generation_id + 1
        L = LeaveGroupRequest
        left = b.request(
            L(group_id=GROUP, members=[L.MemberIdentity(member_id=first_b.member_id)]), 3
        )
        assert left.error_code == 0
        assert heartbeat(a, rejoined.generation_id, one.member_id) == 27  # REBALANCE_IN_PROGRESS
        again = join(a, member_id=one.member_id)
        assert again.generation_id == rejoined.generation_id + 1
        assert [m.member_id for m in again.members] == [one.member_id]


def test_static_member_restart_keeps_generation_and_fences_the_old_id(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as c:
        joined = join(c, instance="instance-1")
        assert joined.error_code == 0, "static members get an id at once"
        gen, old_id = joined.generation_id, joined.member_id
        assert sync(c, gen, old_id, [(old_id, b"a")], instance="instance-1").error_code == 0
        # As Kafka: the restarted static member (here also the leader) takes its old place
        # in the stable group with no new round; its previous assignment is kept.
        restarted = join(c, instance="instance-1")
        assert restarted.error_code == 0
        assert restarted.member_id != old_id
        assert restarted.generation_id == gen, "no rebalance"
        assert restarted.leader == restarted.member_id
        kept = sync(c, gen, restarted.member_id, [], instance="instance-1")
        assert (kept.error_code, kept.assignment) == (0, b"a")
        assert (
            heartbeat(c, restarted.generation_id, old_id, instance="instance-1") == 82
        )  # FENCED_INSTANCE_ID


def test_session_timeout_evicts_a_silent_member(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as c:
        request = JoinGroupRequest(
            group_id=GROUP,
            session_timeout_ms=600,
            rebalance_timeout_ms=600,
            member_id="",
            group_instance_id=None,
            protocol_type="consumer",
            protocols=[P(name="range", metadata=b"")],
        )
        first = c.request(request, 5)
        request.member_id = first.member_id
        joined = c.request(request, 5)
        assert (
            sync(c, joined.generation_id, joined.member_id, [(joined.member_id, b"")]).error_code
            == 0
        )
        import time

        time.sleep(1.5)
        assert heartbeat(c, joined.generation_id, joined.member_id) == 25  # evicted
    s = broker.scrape()
    assert total(s, "streambus_consumer_group_members_total", group=GROUP) == 0


def test_offsets_topic_is_internal(broker: BrokerThread) -> None:
    with RawClient(broker.bootstrap) as c:
        assert (
            commit(c, -1, "", 3) == 0
        )  # a consumer with no membership may commit to an empty group
        listing = c.request(MetadataRequest(topics=None, allow_auto_topic_creation=False), 9)
        assert [t.name for t in listing.topics] == ["t"]
        asked = c.request(
            MetadataRequest(
                topics=[MetadataRequest.MetadataRequestTopic(name="__consumer_offsets")],
                allow_auto_topic_creation=False,
            ),
            9,
        )
        assert asked.topics[0].is_internal
    s = broker.scrape()
    assert total(s, "streambus_topics_total") == 1
    assert total(s, "streambus_partitions_total") == 1
    assert total(s, "streambus_consumer_groups_total") == 1


def test_offsets_of_an_empty_group_expire_after_retention(broker: BrokerThread) -> None:
    import time

    with RawClient(broker.bootstrap) as c:
        assert commit(c, -1, "", 9) == 0
        assert fetch_committed(c) == 9
        now_ms = int(time.time() * 1000)
        assert broker.run(broker.broker.groups.expire_offsets, now_ms) == 0, "not yet"
        eight_days = 8 * 24 * 3600 * 1000  # past the default offsets.retention.minutes (7 days)
        assert broker.run(broker.broker.groups.expire_offsets, now_ms + eight_days) == 1
        assert fetch_committed(c) == -1
    assert total(broker.scrape(), "streambus_consumer_groups_total") == 0
