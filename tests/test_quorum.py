"""Three real pysyncobj voters on loopback in one process, one event loop.

Each RaftQuorum has its own pysyncobj tick thread and real TCP sockets; waits
poll with a deadline. Raft timings are short so elections take well under a
second on an idle machine; nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from streambus.cluster import (
    Applied,
    ClusterConfig,
    Controller,
    CreateTopic,
    RaftQuorum,
    RaftTimings,
    RegisterBroker,
    Voter,
)
from streambus.errors import NotControllerError
from tests.harness import free_port

FAST = RaftTimings(
    election_min_s=0.3,
    election_max_s=0.8,
    append_entries_period_s=0.05,
    connection_timeout_s=1.5,
    connection_retry_s=0.3,
    leader_fallback_s=2.0,
)
SECRET = "s3cret-for-tests"  # noqa: S105 - a test cluster's secret


async def eventually(predicate: Callable[[], Any], timeout_s: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


class Cluster:
    def __init__(self, root: Path, size: int = 3, **overrides: Any) -> None:
        self.root = root
        self.voters = tuple(Voter(i, "127.0.0.1", free_port()) for i in range(1, size + 1))
        self.overrides = overrides
        self.nodes: dict[int, RaftQuorum] = {}

    def config(self, node_id: int, secret: str = SECRET) -> ClusterConfig:
        return ClusterConfig(
            node_id=node_id,
            voters=self.voters,
            secret=secret,
            raft_dir=self.root / f"node{node_id}" / "raft",
            timings=FAST,
            submit_timeout_s=10,
            **self.overrides,
        )

    async def start(
        self, node_id: int, secret: str = SECRET, seen: list[Applied] | None = None
    ) -> RaftQuorum:
        q = RaftQuorum(self.config(node_id, secret))
        if seen is not None:
            q.on_change(seen.append)
        await q.start()
        self.nodes[node_id] = q
        return q

    async def stop(self, node_id: int) -> None:
        await self.nodes.pop(node_id).stop()

    def running(self) -> list[RaftQuorum]:
        return list(self.nodes.values())

    async def leader(self, among: list[RaftQuorum] | None = None) -> RaftQuorum:
        """The one node all of ``among`` agree leads."""
        nodes = among if among is not None else self.running()

        def agreed() -> RaftQuorum | None:
            leaders = [q for q in nodes if q.is_leader]
            ids = {q.leader_id for q in nodes}
            if len(leaders) == 1 and ids == {leaders[0].node_id}:
                return leaders[0]
            return None

        leader: RaftQuorum = await eventually(agreed)
        return leader


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        for node_id in list(c.nodes):
            await c.stop(node_id)


def _register(n: int) -> RegisterBroker:
    return RegisterBroker(n, "127.0.0.1", 9000 + n, f"incarnation-{n}")


async def test_three_voters_elect_one_leader_and_replicate_from_a_follower(
    cluster: Cluster,
) -> None:
    for n in (1, 2, 3):
        await cluster.start(n)
    leader = await cluster.leader()
    assert leader.term >= 1
    for q in cluster.running():
        assert await eventually(lambda q=q: q.live_voters() == {1, 2, 3})

    follower = next(q for q in cluster.running() if not q.is_leader)
    result = await follower.submit(_register(7))
    assert result.ok
    # the submitter has applied it when submit returns; the others soon after
    assert 7 in follower.state.brokers
    for q in cluster.running():
        await eventually(lambda q=q: 7 in q.state.brokers)
        assert q.state.brokers[7].fenced  # a new incarnation starts fenced

    refused = await follower.submit(
        CreateTopic("t", uuid.uuid4(), ((99,),))  # broker 99 is unknown
    )
    assert refused.error_code == 39  # INVALID_REPLICA_ASSIGNMENT, not an exception
    await eventually(
        lambda: all(q.commit_index >= follower.commit_index for q in cluster.nodes.values())
    )
    states = [q.state for q in cluster.running()]
    assert all(s == states[0] for s in states)


async def test_leader_loss_elects_a_new_leader_and_a_restarted_node_catches_up(
    cluster: Cluster,
) -> None:
    for n in (1, 2, 3):
        await cluster.start(n)
    leader = await cluster.leader()
    assert (await leader.submit(_register(1))).ok
    old_term, old_id = leader.term, leader.node_id
    await cluster.stop(old_id)

    survivors = cluster.running()
    new_leader = await cluster.leader(survivors)
    assert new_leader.node_id != old_id
    assert new_leader.term > old_term
    survivor = next(q for q in survivors if q is not new_leader)  # submit from a follower
    assert (await survivor.submit(_register(2))).ok

    # the stopped node restarts from its journal and learns what it missed
    back = await cluster.start(old_id)
    await eventually(lambda: {1, 2} <= set(back.state.brokers))
    await eventually(lambda: back.leader_id == new_leader.node_id)
    assert (await back.submit(_register(3))).ok
    for q in cluster.running():
        await eventually(lambda q=q: set(q.state.brokers) == {1, 2, 3})


async def test_state_survives_a_restart_of_every_voter_from_snapshot_and_journal(
    cluster: Cluster,
) -> None:
    for n in (1, 2, 3):
        await cluster.start(n)
    leader = await cluster.leader()
    assert (await leader.submit(_register(1))).ok
    topic_id = uuid.uuid4()
    assert (await leader.submit(CreateTopic("kept", topic_id, ((1,), (1,))))).ok
    for q in cluster.running():  # a snapshot on every voter, then one more journal entry
        q.compact()
    for n in (1, 2, 3):
        await eventually(lambda n=n: (cluster.root / f"node{n}" / "raft" / "snapshot").exists())
    assert (await leader.submit(_register(2))).ok
    for q in cluster.running():
        await eventually(lambda q=q: 2 in q.state.brokers)
    version = leader.state.metadata_version

    def commit_index_stored(n: int) -> int:
        # pysyncobj writes the journal's commit index once a second, not at shutdown
        meta = cluster.root / f"node{n}" / "raft" / "journal.meta"
        stored: dict[str, int] = pickle.loads(meta.read_bytes())  # noqa: S301 - our own file
        return stored.get("raftCommitIndex", 0)

    await eventually(lambda: commit_index_stored(1) >= cluster.nodes[1].commit_index)
    for n in (1, 2, 3):
        await cluster.stop(n)

    seen: list[Applied] = []
    for n in (1, 2, 3):
        await cluster.start(n, seen=seen if n == 1 else None)
    await cluster.leader()
    for q in cluster.running():
        await eventually(lambda q=q: q.state.metadata_version == version)
        assert q.state.topics["kept"].topic_id == topic_id
        assert set(q.state.brokers) == {1, 2}
    # node 1 rebuilt the older records from its snapshot and re-applied the rest from
    # its journal, marked as replayed (where pysyncobj cut the snapshot is its choice)
    replayed = [a.record for a in seen if a.replayed]
    history = [_register(1), CreateTopic("kept", topic_id, ((1,), (1,))), _register(2)]
    assert replayed
    assert replayed == history[-len(replayed) :]
    assert (await cluster.nodes[1].submit(_register(3))).ok
    assert seen[-1].record == _register(3)
    assert not seen[-1].replayed


async def test_a_voter_with_the_wrong_secret_never_joins(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambus.cluster")
    good = [await cluster.start(1), await cluster.start(2)]
    intruder = await cluster.start(3, secret="not-the-secret")  # noqa: S106
    leader = await cluster.leader(good)
    assert (await leader.submit(_register(1))).ok
    follower = next(q for q in good if q is not leader)
    assert (await follower.submit(_register(2))).ok
    await eventually(lambda: all(set(q.state.brokers) == {1, 2} for q in good))

    # give the intruder's connection attempts time to be turned away, then look again
    await eventually(lambda: leader.commit_index > 3 and intruder.term == 0, timeout_s=5)
    assert intruder.ever_connected() == frozenset()
    assert intruder.live_voters() == {3}
    assert intruder.leader_id is None
    assert intruder.state.brokers == {}
    assert all(3 not in q.live_voters() for q in good)
    await eventually(
        lambda: any(
            "voter 3 has reached none of the other voters" in r.getMessage() for r in caplog.records
        ),
        timeout_s=15,
    )
    with pytest.raises(NotControllerError):
        await intruder.submit(_register(3), timeout_s=1)


async def test_controller_fences_a_silent_broker_and_unfences_it_when_back(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambus.cluster")
    cluster.overrides = {"session_timeout_ms": 1500, "heartbeat_interval_ms": 200}
    controllers: dict[int, Controller] = {}

    async def start_broker(n: int) -> None:
        q = await cluster.start(n)
        c = Controller(q, q._config, "127.0.0.1", 9000 + n)
        await c.start()
        controllers[n] = c

    await asyncio.gather(*(start_broker(n) for n in (1, 2, 3)))
    leader = await cluster.leader()
    for q in cluster.running():
        await eventually(
            lambda q=q: (
                len(q.state.brokers) == 3 and not any(b.fenced for b in q.state.brokers.values())
            )
        )
    victim = next(n for n in (1, 2, 3) if n != leader.node_id)
    assert (await leader.submit(CreateTopic("spread", uuid.uuid4(), ((1,), (2,), (3,))))).ok
    assert leader.state.leader_of("spread", victim - 1) == victim

    await controllers.pop(victim).stop()
    await cluster.stop(victim)
    await eventually(lambda: leader.state.brokers[victim].fenced)
    assert leader.state.leader_of("spread", victim - 1) == -1  # its only replica is gone
    assert leader.state.partition("spread", victim - 1).leader_epoch == 1  # type: ignore[union-attr]
    assert any(f"broker {victim} fenced: no heartbeat" in r.getMessage() for r in caplog.records)

    await start_broker(victim)
    await eventually(lambda: not leader.state.brokers[victim].fenced)
    await eventually(lambda: leader.state.leader_of("spread", victim - 1) == victim)
    assert leader.state.partition("spread", victim - 1).leader_epoch == 2  # type: ignore[union-attr]
    for c in controllers.values():
        await c.stop()
