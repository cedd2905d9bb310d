"""The cluster's pure state machine, placement, coordinator hash, and the controller
driven through a LocalQuorum on an injected clock (no sleeping, no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter
from typing import Any

import pytest

from streambus.cluster import (
    AllocateProducerIds,
    AlterPartition,
    AlterTopicConfigs,
    BrokerHeartbeat,
    ChangePartitionLeader,
    ClusterConfig,
    ClusterState,
    Controller,
    CreatePartitions,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    LocalQuorum,
    RaftStatus,
    Record,
    RegisterBroker,
    SetClusterId,
    UnfenceBroker,
    apply,
    assign_replicas,
    coordinator_partition,
    java_string_hashcode,
    parse_quorum,
    plan_partitions,
    plan_topic,
    preferred_election,
    preferred_elections,
    unclean_election,
)
from streambus.cluster.records import from_wire, to_wire
from streambus.cluster.state import MAX_PRODUCER_ID, state_from_wire, state_to_wire
from streambus.errors import (
    DuplicateBrokerRegistrationError,
    ElectionNotNeededError,
    EligibleLeadersNotAvailableError,
    FencedLeaderEpochError,
    IneligibleReplicaError,
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidReplicaAssignmentError,
    InvalidReplicationFactorError,
    InvalidRequestError,
    InvalidUpdateVersionError,
    PreferredLeaderNotAvailableError,
    UnknownTopicOrPartitionError,
)

TID = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")


def run(state: ClusterState, *records: Record) -> ClusterState:
    """Apply records that must all succeed."""
    for record in records:
        state, result = apply(state, record)
        assert result.ok, (record, result)
    return state


def error_of(state: ClusterState, record: Record) -> int:
    new, result = apply(state, record)
    assert new is state  # an error changes nothing
    assert result.message
    return result.error_code


def cluster(*ids: int) -> ClusterState:
    state = ClusterState()
    for n in ids:
        state = run(state, RegisterBroker(n, "h", 9000 + n, f"inc-{n}"), UnfenceBroker(n))
    return state


# --- brokers --------------------------------------------------------------------------------


def test_register_heartbeat_and_incarnations() -> None:
    s = run(ClusterState(), RegisterBroker(1, "h1", 9092, "a"))
    assert s.brokers[1].fenced  # registered brokers start fenced
    assert s.metadata_version == 1
    assert s.live_brokers() == []
    again, result = apply(s, RegisterBroker(1, "h1", 9092, "a"))  # a retry changes nothing
    assert result.ok
    assert again is s
    moved = run(s, RegisterBroker(1, "h2", 9093, "a"))
    assert (moved.brokers[1].host, moved.brokers[1].port) == ("h2", 9093)

    s = run(s, UnfenceBroker(1))
    assert [b.broker_id for b in s.live_brokers()] == [1]
    assert error_of(s, RegisterBroker(1, "h1", 9092, "b")) == 101  # live as another: refused
    hb, result = apply(s, BrokerHeartbeat(1, "a"))
    assert result.ok
    assert hb is s
    assert error_of(s, BrokerHeartbeat(1, "b")) == 77  # STALE_BROKER_EPOCH
    assert error_of(s, BrokerHeartbeat(5, "a")) == 102  # BROKER_ID_NOT_REGISTERED
    assert error_of(s, UnfenceBroker(5)) == 102
    assert error_of(s, FenceBroker(5, "x")) == 102
    assert error_of(ClusterState(), RegisterBroker(-1, "h", 1, "a")) == 42

    s = run(s, FenceBroker(1, "silent"))
    restarted = run(s, RegisterBroker(1, "h1", 9092, "b"))  # fenced: a restart is accepted
    assert restarted.brokers[1].incarnation == "b"
    assert restarted.brokers[1].fenced


# --- topics ---------------------------------------------------------------------------------


def test_create_topic_and_its_errors() -> None:
    s = cluster(1, 2, 3)
    version = s.metadata_version
    s = run(
        s,
        CreateTopic("t", TID, ((1, 2), (2, 3), (3, 1)), (("retention.ms", "1000"),), False),
    )
    t = s.topics["t"]
    assert s.metadata_version == version + 1
    assert t.topic_id == TID
    assert not t.internal
    assert dict(t.configs) == {"retention.ms": "1000"}
    assert [(p.replicas, p.isr, p.leader, p.leader_epoch) for p in t.partitions] == [
        ((1, 2), (1, 2), 1, 0),
        ((2, 3), (2, 3), 2, 0),
        ((3, 1), (3, 1), 3, 0),
    ]
    assert s.leader_of("t", 2) == 3
    assert s.leader_of("t", 3) == -1
    assert s.leader_of("x", 0) == -1
    assert s.hosted_by(1) == [("t", 0), ("t", 2)]
    assert s.partitions_led_by(2) == 1

    assert error_of(s, CreateTopic("t", uuid.uuid4(), ((1,),))) == 36  # TOPIC_ALREADY_EXISTS
    assert error_of(s, CreateTopic("bad name", TID, ((1,),))) == 17  # INVALID_TOPIC_EXCEPTION
    assert error_of(s, CreateTopic("u", TID, ())) == 37  # INVALID_PARTITIONS
    assert error_of(s, CreateTopic("u", TID, ((),))) == 38  # INVALID_REPLICATION_FACTOR
    assert error_of(s, CreateTopic("u", TID, ((1,), (1, 2)))) == 39  # uneven
    assert error_of(s, CreateTopic("u", TID, ((1, 1),))) == 39  # repeated broker
    assert error_of(s, CreateTopic("u", TID, ((9,),))) == 39  # unregistered broker
    assert error_of(s, CreateTopic("u", TID, ((1,),), (("no.such", "1"),))) == 40
    assert error_of(s, CreateTopic("u", TID, ((1,),), (("retention.ms", "soon"),))) == 40

    # a replica on a fenced broker is not made leader at creation
    f = run(s, FenceBroker(1, "x"), FenceBroker(3, "x"), CreateTopic("u", TID, ((1, 2), (1, 3))))
    assert [p.leader for p in f.topics["u"].partitions] == [2, -1]

    gone = run(s, DeleteTopic("t"))
    assert "t" not in gone.topics
    assert "t" in s.topics
    assert error_of(gone, DeleteTopic("t")) == 3


def test_alter_topic_configs() -> None:
    s = run(cluster(1), CreateTopic("t", TID, ((1,),), (("retention.ms", "1000"),)))
    s2 = run(s, AlterTopicConfigs("t", (("retention.ms", None), ("segment.bytes", "4096"))))
    assert dict(s2.topics["t"].configs) == {"segment.bytes": "4096"}
    same, result = apply(s2, AlterTopicConfigs("t", (("segment.bytes", "4096"),)))
    assert result.ok
    assert same is s2
    assert error_of(s2, AlterTopicConfigs("t", (("bogus.key", None),))) == 40
    assert error_of(s2, AlterTopicConfigs("t", (("segment.bytes", "big"),))) == 40
    assert error_of(s2, AlterTopicConfigs("nope", ())) == 3


def test_change_partition_leader() -> None:
    s = run(cluster(1, 2, 3), CreateTopic("t", TID, ((1, 2, 3),)))
    s = run(s, ChangePartitionLeader("t", 0, 2, (2, 3), expected_leader_epoch=0))
    p = s.topics["t"].partitions[0]
    assert (p.leader, p.isr, p.leader_epoch) == (2, (2, 3), 1)
    assert error_of(s, ChangePartitionLeader("t", 0, 3, (3,), expected_leader_epoch=0)) == 74
    assert error_of(s, ChangePartitionLeader("t", 0, 1, (2, 3))) == 39  # leader not in ISR
    assert error_of(s, ChangePartitionLeader("t", 0, 2, (2, 4))) == 39  # ISR beyond replicas
    assert error_of(s, ChangePartitionLeader("t", 0, 2, ())) == 39
    assert error_of(s, ChangePartitionLeader("t", 1, 2, (2,))) == 3
    fenced = run(s, FenceBroker(3, "x"))
    assert error_of(fenced, ChangePartitionLeader("t", 0, 3, (3,))) == 39  # not live
    offline = run(s, ChangePartitionLeader("t", 0, -1, (2,)))
    assert offline.leader_of("t", 0) == -1
    assert offline.offline_partitions() == 1


# --- fencing --------------------------------------------------------------------------------


def test_fencing_moves_leadership_to_a_live_isr_member_or_offline() -> None:
    s = run(
        cluster(1, 2, 3),
        CreateTopic("r", TID, ((1, 2), (2, 1), (1, 3))),  # replicated: leadership can move
        CreateTopic("solo", uuid.uuid4(), ((1,), (2,))),
    )
    s = run(s, FenceBroker(3, "first"))  # 3 leads nothing: it only leaves the ISR
    assert s.brokers[3].fenced
    r2 = s.topics["r"].partitions[2]
    assert (r2.leader, r2.isr, r2.leader_epoch, r2.partition_epoch) == (1, (1,), 0, 1)

    before = s
    s = run(s, FenceBroker(1, "no heartbeat"))
    r = s.topics["r"].partitions
    state_of = [(p.leader, p.isr, p.leader_epoch, p.partition_epoch) for p in r]
    assert state_of[0] == (2, (2,), 1, 1)  # moved to the live ISR member
    assert state_of[1] == (2, (2,), 0, 1)  # same leader; 1 left the ISR
    assert state_of[2] == (-1, (1,), 1, 2)  # the last ISR member stays in it: offline
    solo = s.topics["solo"].partitions
    assert (solo[0].leader, solo[0].isr, solo[0].leader_epoch) == (-1, (1,), 1)
    assert solo[1].leader == 2
    assert s.offline_partitions() == 2
    assert s.under_replicated() == 3
    assert s.under_replicated(leader=2) == 2
    assert before.topics["r"].partitions[0].leader == 1  # the old state is unchanged

    same, result = apply(s, FenceBroker(1, "again"))  # already fenced: nothing changes
    assert result.ok
    assert same is s

    s = run(s, UnfenceBroker(1))
    r = s.topics["r"].partitions
    # has a leader: stays; 1 rejoins the ISR only when that leader sees it caught up
    assert (r[0].leader, r[0].isr, r[0].leader_epoch) == (2, (2,), 1)
    assert (r[2].leader, r[2].leader_epoch, r[2].partition_epoch) == (1, 2, 3)  # restored
    assert (s.topics["solo"].partitions[0].leader, s.topics["solo"].partitions[0].leader_epoch) == (
        1,
        2,
    )
    assert s.offline_partitions() == 0
    same, result = apply(s, UnfenceBroker(1))
    assert result.ok
    assert same is s


def test_producer_id_blocks_never_overlap() -> None:
    s = ClusterState()
    blocks = []
    for broker, size in ((1, 1000), (2, 1000), (1, 5), (3, 1000)):
        new, result = apply(s, AllocateProducerIds(broker, size))
        assert result.ok
        assert result.value == s.next_producer_id
        assert new.next_producer_id == s.next_producer_id + size
        assert new.metadata_version == s.metadata_version + 1
        blocks.append(range(result.value, result.value + size))
        s = new
    assert [b.start for b in blocks] == [0, 1000, 2000, 2005]
    taken = [pid for b in blocks for pid in b]
    assert len(taken) == len(set(taken)) == s.next_producer_id == 3005

    assert error_of(s, AllocateProducerIds(1, 0)) == InvalidRequestError.errno
    assert error_of(s, AllocateProducerIds(-1, 10)) == InvalidRequestError.errno
    assert error_of(s, AllocateProducerIds(1, MAX_PRODUCER_ID)) == InvalidRequestError.errno
    failed = apply(s, AllocateProducerIds(1, 0))[1]
    assert failed.value is None  # no block on an error


def test_the_cluster_id_is_set_once() -> None:
    s = run(ClusterState(), SetClusterId("first-Id_1"))
    assert s.cluster_id == "first-Id_1"
    assert s.metadata_version == 1
    same, result = apply(s, SetClusterId("second"))
    assert result.ok  # another broker's proposal, committed later: not an error, no change
    assert same is s
    assert error_of(ClusterState(), SetClusterId("")) == InvalidRequestError.errno
    assert error_of(ClusterState(), SetClusterId("a b")) == InvalidRequestError.errno


async def test_the_controller_proposes_its_cluster_id_and_keeps_the_first() -> None:
    q = LocalQuorum(1)
    await q.start()
    first = Controller(q, _config(), "localhost", 9092, clock=Clock(), cluster_id="one")
    await first.start()
    await first.stop()
    assert q.state.cluster_id == "one"
    other = Controller(LocalQuorumView(q, 2), _config(2), "h2", 9093, cluster_id="two")
    await other.start()
    await other.stop()
    assert q.state.cluster_id == "one"


# --- wire forms -----------------------------------------------------------------------------


RECORDS: list[Any] = [
    RegisterBroker(1, "h", 9092, "inc"),
    BrokerHeartbeat(1, "inc"),
    FenceBroker(1, "why"),
    UnfenceBroker(1),
    CreateTopic("t", TID, ((1, 2), (2, 1)), (("retention.ms", "5"),), True),
    DeleteTopic("t"),
    ChangePartitionLeader("t", 0, 2, (2,), 3),
    AlterTopicConfigs("t", (("retention.ms", None), ("segment.bytes", "9"))),
    AllocateProducerIds(2, 1000),
    SetClusterId("MkU3OEVBNTcwNTJENDM2Qk"),
    AlterPartition("t", 0, 2, 3, 5, (2, 1)),
    CreatePartitions("t", ((1, 2), (2, 3))),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip_through_json_types(record: Any) -> None:
    import json

    wire = json.loads(json.dumps(to_wire(record)))  # JSON types only
    assert from_wire(wire) == record


def test_bad_wire_records_are_refused() -> None:
    for bad in ({"type": "Nope", "v": 1}, {"type": "DeleteTopic", "v": 2, "name": "t"}, [1]):
        with pytest.raises(ValueError, match=r"."):
            from_wire(bad)
    with pytest.raises(ValueError, match="bad DeleteTopic"):
        from_wire({"type": "DeleteTopic", "v": 1})


def test_state_round_trips_through_its_snapshot_form() -> None:
    s = run(
        cluster(1, 2),
        CreateTopic("t", TID, ((1, 2), (2, 1)), (("retention.ms", "5"),), True),
        FenceBroker(2, "x"),
        SetClusterId("c1"),
        AllocateProducerIds(1, 1000),
    )
    import json

    assert state_from_wire(json.loads(json.dumps(state_to_wire(s)))) == s
    assert (s.cluster_id, s.next_producer_id) == ("c1", 1000)  # kept across Raft snapshots
    older = state_to_wire(s)
    del older["cluster_id"], older["next_producer_id"]  # a snapshot from before they existed
    assert (state_from_wire(older).cluster_id, state_from_wire(older).next_producer_id) == ("", 0)
    # a snapshot from before partition epochs: each starts at its leader epoch
    for t in older["topics"]:
        t["partitions"] = [p[:4] for p in t["partitions"]]
    p = state_from_wire(older).topics["t"].partitions[1]
    assert p.leader_epoch == 1
    assert p.partition_epoch == 1


# --- placement and the coordinator hash -----------------------------------------------------


def test_placement_is_kafkas_round_robin() -> None:
    # Kafka's AdminUtils example: 5 brokers, 10 partitions, 3 replicas, start 0
    placed = assign_replicas([5, 4, 3, 2, 1], 10, 3, start_index=0)
    assert placed[0] == (1, 2, 3)
    assert placed[5] == (1, 3, 4)
    assert placed[9] == (5, 2, 3)
    leaders = Counter(p[0] for p in placed)
    assert set(leaders.values()) == {2}  # leaders spread evenly
    replicas = Counter(b for p in placed for b in p)
    assert set(replicas.values()) == {6}
    assert all(len(set(p)) == 3 for p in placed)
    # the start offset moves the first leader
    assert assign_replicas([1, 2, 3], 3, 1, start_index=1) == ((2,), (3,), (1,))
    with pytest.raises(InvalidReplicationFactorError, match="larger than the 2 live"):
        assign_replicas([1, 2], 1, 3, 0)


def test_plan_topic_places_over_live_brokers_only() -> None:
    s = run(cluster(1, 2, 3), FenceBroker(2, "x"))
    record = plan_topic(s, "p", 4, 1, start_index=0, topic_id=TID, configs={"retention.ms": "7"})
    assert record.replicas == ((1,), (3,), (1,), (3,))
    assert record.configs == (("retention.ms", "7"),)
    s = run(s, record)
    assert [p.leader for p in s.topics["p"].partitions] == [1, 3, 1, 3]
    with pytest.raises(InvalidReplicationFactorError):
        plan_topic(s, "q", 1, 3, start_index=0, topic_id=TID)
    with pytest.raises(InvalidReplicationFactorError, match="no live brokers"):
        plan_topic(ClusterState(), "q", 1, 1, start_index=0, topic_id=TID)


@pytest.mark.parametrize(
    ("group", "hashcode", "partition"),
    [
        # Java String.hashCode values (s[0]*31^(n-1) + ... over UTF-16 units, int32)
        ("", 0, 0),
        ("a", 97, 47),
        ("hello", 99162322, 22),
        ("Hello World", -862545276, 26),
        ("my-group", -1906497762, 12),
        ("\U0001f600", 1772899, 49),  # a surrogate pair: 0xD83D * 31 + 0xDE00
        ("polygenelubricants", -(2**31), 0),  # Integer.MIN_VALUE: Utils.abs gives 0
    ],
)
def test_coordinator_partition_is_kafkas_hash(group: str, hashcode: int, partition: int) -> None:
    assert java_string_hashcode(group) == hashcode
    assert coordinator_partition(group, 50) == partition


# --- config ---------------------------------------------------------------------------------


def test_parse_quorum() -> None:
    voters = parse_quorum("2@b:9300, 1@a,3@[::1]:9400")
    assert [(v.node_id, v.host, v.port) for v in voters] == [
        (1, "a", 9193),
        (2, "b", 9300),
        (3, "::1", 9400),
    ]
    for bad in ("", "x@a:1", "1@", "1@a:0", "1@a:1,1@b:2", "1@a:1,2@a:1"):
        with pytest.raises(InvalidConfigError):
            parse_quorum(bad)
    with pytest.raises(InvalidConfigError, match="secret"):
        ClusterConfig(node_id=1, voters=voters)
    with pytest.raises(InvalidConfigError, match="not one of"):
        ClusterConfig(node_id=7, voters=voters, secret="s")  # noqa: S106


# --- the controller on a LocalQuorum, on a clock the test moves -----------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(node_id: int = 1) -> ClusterConfig:
    return ClusterConfig(node_id=node_id, session_timeout_ms=9000, heartbeat_interval_ms=2000)


async def test_controller_registers_fences_and_unfences_on_its_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="streambus.cluster")
    clock = Clock()
    q = LocalQuorum(1)
    await q.start()
    c = Controller(q, _config(), "localhost", 9092, clock=clock)
    await c.start()
    c_task_alive = c._task is not None
    await c.stop()  # the test drives the rounds itself
    assert c_task_alive
    assert not q.state.brokers[1].fenced  # registered, heartbeat, unfenced at start
    assert (await q.submit(CreateTopic("t", TID, ((1,),)))).ok

    # another broker (no controller of its own here: the test heartbeats for it)
    assert (await q.submit(RegisterBroker(2, "h2", 9093, "two"))).ok
    await c.check_sessions()
    assert not q.state.brokers[2].fenced
    assert (await q.submit(CreateTopic("u", uuid.uuid4(), ((2,),)))).ok

    clock.now += 8
    assert (await q.submit(BrokerHeartbeat(1, c.incarnation))).ok
    await c.check_sessions()
    assert not q.state.brokers[2].fenced  # 8 s silent: within the 9 s session
    clock.now += 2
    assert (await q.submit(BrokerHeartbeat(1, c.incarnation))).ok
    await c.check_sessions()
    assert q.state.brokers[2].fenced
    assert not q.state.brokers[1].fenced
    assert q.state.leader_of("u", 0) == -1
    assert q.state.leader_of("t", 0) == 1
    assert any("broker 2 fenced: no heartbeat for 10.0 s" in r.getMessage() for r in caplog.records)

    clock.now += 30  # still silent: stays fenced, no flapping
    assert (await q.submit(BrokerHeartbeat(1, c.incarnation))).ok
    await c.check_sessions()
    assert q.state.brokers[2].fenced

    assert (await q.submit(BrokerHeartbeat(2, "two"))).ok  # it is back
    await c.check_sessions()
    assert not q.state.brokers[2].fenced
    assert q.state.leader_of("u", 0) == 2
    assert q.state.partition("u", 0).leader_epoch == 2  # type: ignore[union-attr]
    assert any("broker 2 unfenced" in r.getMessage() for r in caplog.records)


async def test_a_second_broker_with_a_live_node_id_is_refused() -> None:
    q = LocalQuorum(1)
    await q.start()
    first = Controller(q, _config(), "localhost", 9092, clock=Clock())
    await first.start()
    twin = Controller(q, _config(), "localhost", 9099, clock=Clock(), registration_timeout_s=0)
    with pytest.raises(DuplicateBrokerRegistrationError, match="in use by another live broker"):
        await twin.start()
    assert q.state.brokers[1].port == 9092  # the live one keeps its registration
    await first.stop()


async def test_a_restarted_broker_registers_once_its_old_incarnation_is_fenced() -> None:
    clock = Clock()
    q = LocalQuorum(1)
    await q.start()
    controller = Controller(q, _config(), "localhost", 9092, clock=clock)
    await controller.start()
    await controller.stop()
    assert (await q.submit(RegisterBroker(2, "h2", 9093, "old"))).ok
    await controller.check_sessions()
    # broker 2 restarts with a new incarnation while the old one still counts as live
    restart = asyncio.ensure_future(
        Controller(LocalQuorumView(q, 2), _config(2), "h2", 9093, clock=clock)._register()
    )
    await asyncio.sleep(0)
    assert not restart.done()  # refused for now, retrying
    clock.now += 10
    assert (await q.submit(BrokerHeartbeat(1, controller.incarnation))).ok
    await controller.check_sessions()  # the old incarnation is fenced ...
    await asyncio.wait_for(restart, 5)  # ... and the retry is accepted
    assert q.state.brokers[2].incarnation != "old"


class LocalQuorumView:
    """Another broker's handle on the same LocalQuorum (its own node id, not leader)."""

    def __init__(self, quorum: LocalQuorum, node_id: int) -> None:
        self._q = quorum
        self.node_id = node_id
        self.leading = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._q, name)

    @property
    def is_leader(self) -> bool:
        return self.leading


async def test_local_quorum_applies_on_submit_and_reports_changes() -> None:
    q = LocalQuorum(4)
    leaders: list[Any] = []
    changes: list[Any] = []
    q.on_leader_change(leaders.append)
    q.on_change(changes.append)
    await q.start()
    assert (q.is_leader, q.leader_id, q.term, q.commit_index) == (True, 4, 1, 0)
    assert q.live_voters() == {4}
    assert leaders[0].leader_id == 4
    assert (await q.submit(RegisterBroker(4, "h", 1, "i"))).ok
    refused = await q.submit(BrokerHeartbeat(4, "other"))
    assert refused.error_code == 77
    assert q.commit_index == 2  # every record applied counts, refused ones too
    assert q.state.metadata_version == 1  # only changes count
    assert [(a.log_index, a.changed, a.result.ok) for a in changes] == [
        (1, True, True),
        (2, False, False),
    ]


async def test_a_new_controller_gives_every_broker_a_full_session() -> None:
    clock = Clock()
    q = LocalQuorum(1)
    await q.start()
    view = LocalQuorumView(q, 2)  # broker 2's controller: not the leader yet
    c = Controller(view, _config(2), "h2", 9093, clock=clock)
    assert (await q.submit(RegisterBroker(1, "h1", 9092, "one"))).ok
    assert (await q.submit(UnfenceBroker(1))).ok
    clock.now += 60  # broker 1 silent for a minute, but nobody was watching on this clock
    view.leading = True
    c._on_leader(RaftStatus(2, 2, True))  # what the quorum calls when node 2 takes over
    await c.check_sessions()
    assert not q.state.brokers[1].fenced
    clock.now += 9.5
    await c.check_sessions()
    assert q.state.brokers[1].fenced


# --- replication: ISR changes, elections, growing topics ------------------------------------


def _rf3(*configs: tuple[str, str]) -> ClusterState:
    return run(cluster(1, 2, 3), CreateTopic("t", TID, ((1, 2, 3), (2, 3, 1)), configs))


def _p(s: ClusterState, partition: int = 0) -> tuple[int, tuple[int, ...], int, int]:
    p = s.topics["t"].partitions[partition]
    return p.leader, p.isr, p.leader_epoch, p.partition_epoch


def test_alter_partition_shrinks_and_expands_the_isr() -> None:
    s = _rf3()
    assert _p(s) == (1, (1, 2, 3), 0, 0)
    shrunk, result = apply(s, AlterPartition("t", 0, 1, 0, 0, (1, 2)))
    assert result.ok
    assert result.value == 1
    assert _p(shrunk) == (1, (1, 2), 0, 1)  # the leader epoch does not move
    grown, result = apply(shrunk, AlterPartition("t", 0, 1, 0, 1, (1, 2, 3)))
    assert result.ok
    assert result.value == 2
    assert _p(grown) == (1, (1, 2, 3), 0, 2)
    same, result = apply(grown, AlterPartition("t", 0, 1, 0, 2, (1, 2, 3)))  # no change
    assert same is grown
    assert result.value == 2


def test_alter_partition_refusals_carry_kafkas_codes() -> None:
    s = run(_rf3(), AlterPartition("t", 0, 1, 0, 0, (1, 2)))  # partition epoch 1
    fenced = FencedLeaderEpochError.errno
    assert error_of(s, AlterPartition("t", 0, 1, 1, 1, (1,))) == fenced  # leader epoch ahead
    assert error_of(s, AlterPartition("t", 0, 2, 0, 1, (2,))) == InvalidRequestError.errno
    assert error_of(s, AlterPartition("t", 0, 1, 0, 0, (1,))) == InvalidUpdateVersionError.errno
    assert InvalidUpdateVersionError.errno == 95
    assert error_of(s, AlterPartition("t", 0, 1, 0, 1, (2,))) == InvalidRequestError.errno
    assert error_of(s, AlterPartition("t", 0, 1, 0, 1, (1, 4))) == InvalidRequestError.errno
    assert error_of(s, AlterPartition("t", 0, 1, 0, 1, (1, 1))) == InvalidRequestError.errno
    assert error_of(s, AlterPartition("t", 7, 1, 0, 1, (1,))) == 3
    assert error_of(s, AlterPartition("x", 0, 1, 0, 1, (1,))) == 3
    # a fenced broker cannot be added back, but a fenced member may stay (the leader's view)
    f = run(s, FenceBroker(3, "x"))
    assert _p(f) == (1, (1, 2), 0, 1)  # 3 was not in the ISR: nothing moved
    assert error_of(f, AlterPartition("t", 0, 1, 0, 1, (1, 2, 3))) == IneligibleReplicaError.errno
    assert IneligibleReplicaError.errno == 107
    assert fenced == 74
    # after a leader change the old leader's request is stale
    moved = run(s, ChangePartitionLeader("t", 0, 2, (1, 2), 0))
    assert _p(moved) == (2, (1, 2), 1, 2)  # leader change bumps both epochs
    assert error_of(moved, AlterPartition("t", 0, 1, 0, 1, (1,))) == fenced


def test_fencing_removes_the_broker_from_every_isr_and_moves_leadership_in_replica_order() -> None:
    s = _rf3()
    s = run(s, FenceBroker(1, "x"))
    assert _p(s, 0) == (2, (2, 3), 1, 1)  # first live ISR member in replica order (2, not 3)
    assert _p(s, 1) == (2, (2, 3), 0, 1)  # a follower: only the ISR changes
    s = run(s, FenceBroker(2, "x"))
    assert _p(s, 0) == (3, (3,), 2, 2)
    s = run(s, FenceBroker(3, "x"))
    assert _p(s, 0) == (-1, (3,), 3, 3)  # the last member stays in the ISR
    # clean election: only 3 may lead again, however many others return
    s = run(s, UnfenceBroker(1), UnfenceBroker(2))
    assert _p(s, 0) == (-1, (3,), 3, 3)
    s = run(s, UnfenceBroker(3))
    assert _p(s, 0) == (3, (3,), 4, 4)


def test_unclean_election_by_topic_config() -> None:
    s = _rf3(("unclean.leader.election.enable", "true"))
    s = run(s, FenceBroker(2, "x"), FenceBroker(3, "x"))
    assert _p(s, 0) == (1, (1,), 0, 2)
    s = run(s, FenceBroker(1, "x"))
    assert _p(s, 0) == (-1, (1,), 1, 3)  # nobody live at all
    s = run(s, UnfenceBroker(2))  # out of sync, but unclean election is allowed
    assert _p(s, 0) == (2, (2,), 2, 4)
    # on fence too: the only ISR member goes, a live out-of-sync replica takes over
    s = run(s, UnfenceBroker(3), FenceBroker(2, "x"))
    assert _p(s, 0) == (3, (3,), 3, 5)
    # the topic default (false) is clean: nothing moves
    assert s.under_min_isr() == 0
    assert s.under_min_isr(default_min_isr=2) == 2  # both led by 3 alone
    strict = run(_rf3(("min.insync.replicas", "3")), FenceBroker(3, "x"))
    assert strict.under_min_isr() == 2
    assert strict.under_min_isr(leader=1) == 1
    clean = run(_rf3(), FenceBroker(2, "x"), FenceBroker(3, "x"), FenceBroker(1, "x"))
    assert _p(run(clean, UnfenceBroker(2)), 0) == (-1, (1,), 1, 3)


def test_preferred_and_unclean_elections() -> None:
    s = run(_rf3(), FenceBroker(1, "x"))
    assert _p(s, 0)[0] == 2
    with pytest.raises(PreferredLeaderNotAvailableError):  # 1 is fenced and out of sync
        preferred_election(s, "t", 0)
    s = run(s, UnfenceBroker(1))
    with pytest.raises(PreferredLeaderNotAvailableError):  # live, not yet back in the ISR
        preferred_election(s, "t", 0)
    assert preferred_elections(s) == []
    s = run(s, AlterPartition("t", 0, 2, 1, 1, (2, 3, 1)))  # the leader sees it caught up
    record = preferred_election(s, "t", 0)
    assert record == ChangePartitionLeader("t", 0, 1, (2, 3, 1), 1)
    assert preferred_elections(s) == [record]
    s = run(s, record)
    assert _p(s, 0) == (1, (2, 3, 1), 2, 3)
    with pytest.raises(ElectionNotNeededError):
        preferred_election(s, "t", 0)
    with pytest.raises(UnknownTopicOrPartitionError):
        preferred_election(s, "t", 5)
    assert error_of(s, record) == 74  # a stale election is refused by its epoch

    with pytest.raises(ElectionNotNeededError):  # it has a leader
        unclean_election(s, "t", 0)
    down = run(s, FenceBroker(2, "x"), FenceBroker(3, "x"), FenceBroker(1, "x"))
    with pytest.raises(EligibleLeadersNotAvailableError):
        unclean_election(down, "t", 0)
    back = run(down, UnfenceBroker(3))  # 3 is out of sync; only 1 is in the ISR
    assert back.leader_of("t", 0) == -1
    record = unclean_election(back, "t", 0)
    assert record == ChangePartitionLeader("t", 0, 3, (3,), _p(back, 0)[2])
    assert run(back, record).leader_of("t", 0) == 3


async def test_the_controller_moves_leaders_back_on_its_interval() -> None:
    clock = Clock()
    q = LocalQuorum(1)
    await q.start()
    config = ClusterConfig(
        node_id=1,
        session_timeout_ms=9000,
        heartbeat_interval_ms=2000,
        leader_imbalance_check_interval_s=60,
    )
    c = Controller(q, config, "localhost", 9092, clock=clock)
    await c.start()
    await c.stop()
    for n in (2, 3):
        assert (await q.submit(RegisterBroker(n, "h", 9000 + n, f"i{n}"))).ok
        assert (await q.submit(UnfenceBroker(n))).ok
    assert (await q.submit(CreateTopic("t", TID, ((2, 1, 3), (1, 2, 3))))).ok
    assert (await q.submit(FenceBroker(2, "x"))).ok
    assert q.state.leader_of("t", 0) == 1
    assert (await q.submit(UnfenceBroker(2))).ok
    p = q.state.partition("t", 0)
    assert p is not None
    assert (
        await q.submit(AlterPartition("t", 0, 1, p.leader_epoch, p.partition_epoch, (1, 3, 2)))
    ).ok
    await c._rebalance_when_due()
    assert q.state.leader_of("t", 0) == 1  # not due yet: the interval starts at election
    clock.now += 61
    await c._rebalance_when_due()
    assert q.state.leader_of("t", 0) == 2  # back on its preferred replica
    assert q.state.leader_of("t", 1) == 1  # already there: untouched
    assert await c.rebalance_leaders() == 0

    off = Controller(
        q, dataclasses.replace(config, auto_leader_rebalance_enable=False), "h", 1, clock=clock
    )
    assert (await q.submit(ChangePartitionLeader("t", 0, 1, (1, 3, 2)))).ok
    clock.now += 1000
    await off._rebalance_when_due()
    assert q.state.leader_of("t", 0) == 1  # auto.leader.rebalance.enable=false


def test_create_partitions_record_and_its_errors() -> None:
    s = _rf3()
    s2 = run(s, CreatePartitions("t", ((3, 1, 2),)))
    t = s2.topics["t"]
    assert len(t.partitions) == 3
    assert (t.partitions[2].replicas, t.partitions[2].isr, t.partitions[2].leader) == (
        (3, 1, 2),
        (3, 1, 2),
        3,
    )
    assert t.topic_id == TID
    assert s2.is_replica(3, "t", 2)
    assert not s2.is_replica(3, "t", 9)
    assert error_of(s, CreatePartitions("x", ((1, 2, 3),))) == 3
    assert error_of(s, CreatePartitions("t", ())) == InvalidPartitionsError.errno
    assert error_of(s, CreatePartitions("t", ((1, 2),))) == 39  # not the topic's width
    assert error_of(s, CreatePartitions("t", ((1, 2, 2),))) == 39
    assert error_of(s, CreatePartitions("t", ((1, 2, 9),))) == 39
    # a new partition on a fenced broker: the live replicas are its ISR
    f = run(s, FenceBroker(3, "x"), CreatePartitions("t", ((3, 1, 2),)))
    assert (f.topics["t"].partitions[2].leader, f.topics["t"].partitions[2].isr) == (1, (1, 2))


def test_plan_partitions_continues_kafkas_round_robin() -> None:
    s = run(cluster(1, 2, 3), CreateTopic("t", TID, assign_replicas([1, 2, 3], 2, 2, 0)))
    record = plan_partitions(s, "t", 5, start_index=0)
    assert record.topic == "t"
    whole = assign_replicas([1, 2, 3], 5, 2, 0)
    assert record.replicas == whole[2:]  # as if the topic had been made with 5
    assert plan_partitions(s, "t", 3, start_index=0, assignments=[[3, 1]]).replicas == ((3, 1),)
    with pytest.raises(InvalidPartitionsError, match="already has 2"):
        plan_partitions(s, "t", 2, start_index=0)
    with pytest.raises(InvalidPartitionsError, match="more than the requested 1"):
        plan_partitions(s, "t", 1, start_index=0)
    with pytest.raises(InvalidReplicaAssignmentError):
        plan_partitions(s, "t", 4, start_index=0, assignments=[[3, 1]])
    with pytest.raises(UnknownTopicOrPartitionError):
        plan_partitions(s, "nope", 4, start_index=0)


def test_plan_topic_with_an_explicit_assignment() -> None:
    s = cluster(1, 2, 3)
    record = plan_topic(
        s, "a", 2, -1, start_index=0, topic_id=TID, assignments=[[3, 2, 1], [1, 3, 2]]
    )
    assert record.replicas == ((3, 2, 1), (1, 3, 2))
    s = run(s, record)
    assert [p.leader for p in s.topics["a"].partitions] == [3, 1]
    bad = plan_topic(s, "b", 1, -1, start_index=0, topic_id=TID, assignments=[[1, 7]])
    assert error_of(s, bad) == 39


def test_min_insync_and_unclean_topic_configs() -> None:
    from streambus.topic_config import TopicConfig

    t = TopicConfig().with_overrides(
        {"min.insync.replicas": "2", "unclean.leader.election.enable": "true"}
    )
    assert (t.min_insync_replicas, t.unclean_leader_election_enable) == (2, True)
    assert TopicConfig().min_insync_replicas == 1
    assert not TopicConfig().unclean_leader_election_enable
    assert t.to_kafka()["unclean.leader.election.enable"] == "true"
    for bad in ({"min.insync.replicas": "0"}, {"unclean.leader.election.enable": "yes"}):
        with pytest.raises(InvalidConfigError):
            TopicConfig().with_overrides(bad)
    s = cluster(1)
    assert error_of(s, CreateTopic("u", TID, ((1,),), (("min.insync.replicas", "0"),))) == 40
