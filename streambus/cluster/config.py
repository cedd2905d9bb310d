"""What the cluster core needs to know: this node, the voters, the secret, the timings.

The broker's ``BrokerConfig`` carries the user-facing settings (``--node-id``,
``--controller-quorum``, ``--raft-port``, ``--cluster-secret``,
``broker.session.timeout.ms``, ``broker.heartbeat.interval.ms``,
``auto.leader.rebalance.enable``, ``leader.imbalance.check.interval.seconds``) and builds a
:class:`ClusterConfig` from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from streambus.errors import InvalidConfigError

DEFAULT_RAFT_PORT = 9193


@dataclass(frozen=True, slots=True)
class Voter:
    node_id: int
    host: str
    port: int  # its Raft port

    @property
    def address(self) -> str:
        """pysyncobj's name for the node: ``host:port``."""
        return f"{self.host}:{self.port}"


def parse_quorum(text: str, default_port: int = DEFAULT_RAFT_PORT) -> tuple[Voter, ...]:
    """``1@host:9193,2@host2:9193,3@host3`` -> voters by id (a missing port is the default)."""
    voters: dict[int, Voter] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        node, sep, address = item.partition("@")
        if not sep or not node.strip().isdigit() or not address:
            raise InvalidConfigError(f"controller quorum entry {item!r} is not id@host[:port]")
        host, colon, port_text = address.rpartition(":")
        if not colon:
            host, port_text = address, str(default_port)
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidConfigError(f"controller quorum entry {item!r} has no valid host:port")
        node_id = int(node)
        if node_id in voters:
            raise InvalidConfigError(f"controller quorum names node {node_id} twice")
        voters[node_id] = Voter(node_id, host.strip("[]"), int(port_text))
    if not voters:
        raise InvalidConfigError("controller quorum is empty")
    addresses = [v.address for v in voters.values()]
    if len(set(addresses)) != len(addresses):
        raise InvalidConfigError("controller quorum names one host:port twice")
    return tuple(sorted(voters.values(), key=lambda v: v.node_id))


@dataclass(frozen=True, slots=True)
class RaftTimings:
    """pysyncobj's timings, in seconds. The defaults elect a new leader within a few
    seconds of losing one, with room for a busy two-core machine."""

    election_min_s: float = 1.0  # raftMinTimeout: silence from the leader before a vote
    election_max_s: float = 2.5  # raftMaxTimeout: election timeouts are drawn in between
    append_entries_period_s: float = 0.2  # the leader's heartbeat to followers
    connection_timeout_s: float = 3.0  # a silent TCP connection to a voter is dropped
    connection_retry_s: float = 1.0  # reconnecting to a voter that went away
    # A leader that hears from no majority for this long steps down, so a cut-off old
    # controller stops acting as one.
    leader_fallback_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    node_id: int
    voters: tuple[Voter, ...] = ()  # empty: a one-node cluster of this broker (LocalQuorum)
    secret: str | None = None  # required with more than one voter: encrypts Raft traffic
    raft_dir: Path | None = None  # journal and snapshot (data_dir/raft), required for Raft
    session_timeout_ms: int = 9000  # Kafka's broker.session.timeout.ms
    heartbeat_interval_ms: int = 2000  # Kafka's broker.heartbeat.interval.ms
    submit_timeout_s: float = 10.0  # a metadata write waits this long for a leader's commit
    # Kafka's auto.leader.rebalance.enable and leader.imbalance.check.interval.seconds: the
    # controller moves leadership back to each partition's preferred (first) replica.
    auto_leader_rebalance_enable: bool = True
    leader_imbalance_check_interval_s: float = 300.0
    timings: RaftTimings = dataclasses.field(default_factory=RaftTimings)

    def __post_init__(self) -> None:
        if self.voters and self.node_id not in {v.node_id for v in self.voters}:
            raise InvalidConfigError(
                f"node {self.node_id} is not one of the controller quorum's voters "
                f"{[v.node_id for v in self.voters]}"
            )
        if len(self.voters) > 1 and not self.secret:
            raise InvalidConfigError("a cluster secret is required with more than one voter")
        if self.heartbeat_interval_ms <= 0 or self.session_timeout_ms <= 0:
            raise InvalidConfigError("broker heartbeat interval and session timeout must be > 0")
        if self.leader_imbalance_check_interval_s <= 0:
            raise InvalidConfigError("leader.imbalance.check.interval.seconds must be > 0")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise InvalidConfigError(
                "broker.heartbeat.interval.ms must be below broker.session.timeout.ms"
            )

    @property
    def replicated(self) -> bool:
        """True when metadata goes through Raft (more than one voter, or one named)."""
        return bool(self.voters)

    def voter(self, node_id: int) -> Voter:
        for v in self.voters:
            if v.node_id == node_id:
                return v
        raise KeyError(node_id)
