"""The cluster's replicated metadata: brokers, topics, partitions, and ``apply``.

Pure and deterministic: no clock, no randomness, no I/O. Every voter applies
the same records in the same order and so holds the same :class:`ClusterState`.
States are frozen and copy-on-write: ``apply`` returns a new state sharing
what did not change, so a reader holding a state always sees a consistent one
while the next is being built on another thread.

Liveness is not in the state (it would need a clock): the controller notes
heartbeats on its own clock and submits ``FenceBroker``/``UnfenceBroker``.
A partition's leader is -1 when none of its in-sync replicas is live.

Leadership follows Kafka's KRaft controller: a fenced broker leaves every ISR it
is in (the last member stays, so the partition can come back with it), and a
partition whose leader goes moves to the first live ISR member in replica order.
Only a topic whose own config sets ``unclean.leader.election.enable=true`` lets an
out-of-sync live replica lead (the broker-wide default is not in the replicated
state, so it cannot decide an election every voter makes alike). Every leader
change bumps the leader epoch; every leader or ISR change bumps the partition
epoch, which ``AlterPartition`` compares so a stale ISR change is refused.

Two cluster-wide values live here too, so that every broker answers alike: the
cluster id (set once, by the first ``SetClusterId`` committed) and the next
free producer id (``AllocateProducerIds`` hands out blocks from it; the Raft
log, or a single broker's ``producer_ids`` file, is what keeps it durable).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from streambus.cluster import acls as cluster_acls
from streambus.cluster import client_quotas, scram_credentials
from streambus.cluster.records import (
    OK,
    AllocateProducerIds,
    AlterAcls,
    AlterBrokerConfigs,
    AlterClientQuota,
    AlterPartition,
    AlterScramCredential,
    AlterTopicConfigs,
    BrokerHeartbeat,
    ChangePartitionLeader,
    CreatePartitions,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    Record,
    RegisterBroker,
    Result,
    SetClusterId,
    UnfenceBroker,
)
from streambus.errors import (
    BrokerIdNotRegisteredError,
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
    StaleBrokerEpochError,
    StreamBusError,
    TopicAlreadyExistsError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
)
from streambus.storage.catalog import validate_topic_name
from streambus.topic_config import BROKER_SYNONYMS, TopicConfig, parse_value

NO_LEADER = -1
MAX_PRODUCER_ID = (1 << 63) - 1  # Kafka's producer ids are int64


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    broker_id: int
    host: str
    port: int
    incarnation: str  # the UUID of the broker's current start
    fenced: bool  # True: registered but not heartbeating (or not yet unfenced)
    registry_port: int = 0  # its schema registry REST port on ``host``; 0: none
    listeners: tuple[tuple[str, str, int], ...] = ()  # (name, advertised host, port)

    def address(self, listener: str) -> tuple[str, int] | None:
        """Where clients of ``listener`` reach this broker; the registered address for a
        broker that registered no listeners, None for one without that listener."""
        if not self.listeners:
            return self.host, self.port
        for name, host, port in self.listeners:
            if name == listener:
                return host, port
        return None


@dataclass(frozen=True, slots=True)
class PartitionState:
    replicas: tuple[int, ...]  # broker ids; the first is the preferred leader
    isr: tuple[int, ...]  # in-sync replicas, a subset of replicas
    leader: int  # a broker id, or -1 (offline)
    leader_epoch: int  # +1 on every leader change
    partition_epoch: int = 0  # +1 on every change of leader or ISR


@dataclass(frozen=True, slots=True)
class TopicState:
    name: str
    topic_id: uuid.UUID
    internal: bool
    configs: Mapping[str, str]  # Kafka-named overrides only (read-only view)
    partitions: tuple[PartitionState, ...]


def _frozen_map(d: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class ClusterState:
    brokers: Mapping[int, BrokerInfo] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    topics: Mapping[str, TopicState] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    metadata_version: int = 0  # how many applied records changed the state
    cluster_id: str = ""  # "" until the first SetClusterId
    next_producer_id: int = 0  # the first producer id no broker has been given
    # Dynamic broker configs by entity: "" the cluster-wide default, "<id>" one broker.
    # Kafka-named broker settings (``log.retention.ms``), each a topic default's synonym.
    broker_configs: Mapping[str, Mapping[str, str]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    # Client quotas by entity (see streambus.cluster.client_quotas)
    client_quotas: client_quotas.QuotaTable = dataclasses.field(
        default_factory=lambda: client_quotas.EMPTY
    )
    # ACL bindings (see streambus.cluster.acls)
    acls: cluster_acls.AclSet = cluster_acls.EMPTY
    # SCRAM credentials by user and mechanism (see streambus.cluster.scram_credentials)
    scram_credentials: scram_credentials.CredentialTable = dataclasses.field(
        default_factory=lambda: scram_credentials.EMPTY
    )

    def live_brokers(self) -> list[BrokerInfo]:
        """Registered and unfenced, by id: what Metadata lists and placement uses."""
        return [b for _, b in sorted(self.brokers.items()) if not b.fenced]

    def is_live(self, broker_id: int) -> bool:
        b = self.brokers.get(broker_id)
        return b is not None and not b.fenced

    def partition(self, topic: str, partition: int) -> PartitionState | None:
        t = self.topics.get(topic)
        if t is None or not 0 <= partition < len(t.partitions):
            return None
        return t.partitions[partition]

    def leader_of(self, topic: str, partition: int) -> int:
        p = self.partition(topic, partition)
        return NO_LEADER if p is None else p.leader

    def partitions_led_by(self, broker_id: int) -> int:
        return sum(1 for t in self.topics.values() for p in t.partitions if p.leader == broker_id)

    def offline_partitions(self) -> int:
        return sum(1 for t in self.topics.values() for p in t.partitions if p.leader == NO_LEADER)

    def is_replica(self, broker_id: int, topic: str, partition: int) -> bool:
        p = self.partition(topic, partition)
        return p is not None and broker_id in p.replicas

    def under_replicated(self, leader: int | None = None) -> int:
        """Partitions whose ISR is smaller than their replicas (led by ``leader`` only,
        when given: Kafka counts each on its leader)."""
        return sum(
            1
            for t in self.topics.values()
            for p in t.partitions
            if len(p.isr) < len(p.replicas) and (leader is None or p.leader == leader)
        )

    def under_min_isr(self, default_min_isr: int = 1, leader: int | None = None) -> int:
        """Partitions whose ISR is below their topic's ``min.insync.replicas`` (the
        topic's override, else ``default_min_isr``, the broker's default), led by
        ``leader`` only when given. Offline partitions are not counted."""
        count = 0
        for t in self.topics.values():
            raw = t.configs.get("min.insync.replicas")
            need = int(raw) if raw is not None else default_min_isr
            count += sum(
                1
                for p in t.partitions
                if p.leader != NO_LEADER
                and len(p.isr) < need
                and (leader is None or p.leader == leader)
            )
        return count

    def hosted_by(self, broker_id: int) -> list[tuple[str, int]]:
        """(topic, partition) of every replica assigned to ``broker_id``."""
        return [
            (t.name, i)
            for t in self.topics.values()
            for i, p in enumerate(t.partitions)
            if broker_id in p.replicas
        ]


# --- apply -----------------------------------------------------------------------------------


def apply(state: ClusterState, record: Record) -> tuple[ClusterState, Result]:
    """The state after ``record``, and its result. Never raises: errors are results.

    A record answered with an error leaves ``state`` itself (the same object),
    so ``new is state`` tells a reader that nothing changed.
    """
    handler = _HANDLERS.get(type(record))
    if handler is None:
        return state, Result(InvalidRequestError.errno, f"unknown record {record!r}")
    try:
        out = handler(state, record)
    except StreamBusError as exc:
        return state, Result.of(exc)
    except Exception as exc:  # a malformed record: the same answer on every voter
        return state, Result(UnknownServerError.errno, f"{type(record).__name__}: {exc!r}")
    new, result = out if isinstance(out, tuple) else (out, OK)
    if new is state:
        return state, result
    return dataclasses.replace(new, metadata_version=state.metadata_version + 1), result


def _with_broker(state: ClusterState, info: BrokerInfo) -> ClusterState:
    brokers = dict(state.brokers)
    brokers[info.broker_id] = info
    return dataclasses.replace(state, brokers=MappingProxyType(brokers))


def _with_topics(state: ClusterState, changed: Mapping[str, TopicState | None]) -> ClusterState:
    topics = dict(state.topics)
    for name, topic in changed.items():
        if topic is None:
            topics.pop(name, None)
        else:
            topics[name] = topic
    return dataclasses.replace(state, topics=MappingProxyType(topics))


def _registered(state: ClusterState, broker_id: int) -> BrokerInfo:
    info = state.brokers.get(broker_id)
    if info is None:
        raise BrokerIdNotRegisteredError(f"broker {broker_id} is not registered")
    return info


def _register(state: ClusterState, r: RegisterBroker) -> ClusterState:
    if not isinstance(r.broker_id, int) or r.broker_id < 0:
        raise InvalidRequestError(f"broker id {r.broker_id!r} is not a non-negative integer")
    old = state.brokers.get(r.broker_id)
    if old is not None and old.incarnation == r.incarnation:
        if (old.host, old.port, old.registry_port, old.listeners) == (
            r.host,
            r.port,
            r.registry_port,
            r.listeners,
        ):
            return state  # a retried registration
        return _with_broker(
            state,
            dataclasses.replace(
                old, host=r.host, port=r.port, registry_port=r.registry_port, listeners=r.listeners
            ),
        )
    if old is not None and not old.fenced:
        raise DuplicateBrokerRegistrationError(
            f"broker {r.broker_id} is registered and live as another incarnation "
            f"({old.host}:{old.port}); a restart is accepted once that one is fenced"
        )
    return _with_broker(
        state,
        BrokerInfo(r.broker_id, r.host, r.port, r.incarnation, True, r.registry_port, r.listeners),
    )


def _heartbeat(state: ClusterState, r: BrokerHeartbeat) -> ClusterState:
    info = _registered(state, r.broker_id)
    if info.incarnation != r.incarnation:
        raise StaleBrokerEpochError(
            f"broker {r.broker_id} heartbeat from incarnation {r.incarnation}, "
            f"registered is {info.incarnation}"
        )
    return state


def _unclean_allowed(state: ClusterState, topic: TopicState) -> bool:
    """The topic's own override, else the cluster-wide dynamic default (both replicated;
    the static broker default is not: see the module docstring)."""
    key = "unclean.leader.election.enable"
    default = state.broker_configs.get("", {}).get(key, "false")
    return topic.configs.get(key, default).lower() == "true"


def _changed(p: PartitionState, leader: int, isr: tuple[int, ...]) -> PartitionState:
    """``p`` with a new leader and ISR, its epochs bumped as Kafka bumps them."""
    if leader == p.leader and isr == p.isr:
        return p
    return PartitionState(
        p.replicas,
        isr,
        leader,
        p.leader_epoch + (leader != p.leader),
        p.partition_epoch + 1,
    )


def _elect(
    state: ClusterState, topic: TopicState, p: PartitionState, isr: tuple[int, ...]
) -> tuple[int, tuple[int, ...]]:
    """Leader and ISR for ``p`` given ``isr``: the current leader while it is live and in
    sync, else the first live ISR member in replica order, else (unclean election
    allowed) the first live replica alone in the ISR, else none."""
    if p.leader in isr and state.is_live(p.leader):
        return p.leader, isr
    for b in p.replicas:
        if b in isr and state.is_live(b):
            return b, isr
    if _unclean_allowed(state, topic):
        for b in p.replicas:
            if state.is_live(b):
                return b, (b,)
    return NO_LEADER, isr


def _reelect(
    state: ClusterState, touches: Callable[[PartitionState], bool], drop: int
) -> ClusterState:
    """Elect again every partition ``touches`` selects, ``drop`` leaving its ISR first
    (unless it is the last member); -1 drops nobody."""
    changed: dict[str, TopicState | None] = {}
    for topic in state.topics.values():
        parts = list(topic.partitions)
        for i, p in enumerate(parts):
            if not touches(p):
                continue
            isr = p.isr
            if drop in isr and len(isr) > 1:
                isr = tuple(b for b in isr if b != drop)
            leader, isr = _elect(state, topic, p, isr)
            parts[i] = _changed(p, leader, isr)
        if parts != list(topic.partitions):
            changed[topic.name] = dataclasses.replace(topic, partitions=tuple(parts))
    return _with_topics(state, changed) if changed else state


def _fence(state: ClusterState, r: FenceBroker) -> ClusterState:
    info = _registered(state, r.broker_id)
    if info.fenced:
        return state
    state = _with_broker(state, dataclasses.replace(info, fenced=True))
    b = r.broker_id
    return _reelect(state, lambda p: b in p.isr or p.leader == b, drop=b)


def _unfence(state: ClusterState, r: UnfenceBroker) -> ClusterState:
    info = _registered(state, r.broker_id)
    if not info.fenced:
        return state
    state = _with_broker(state, dataclasses.replace(info, fenced=False))
    # Leaderless partitions it holds may be led again (by it, or by any live ISR member);
    # it rejoins the ISR of the others only when their leader sees it caught up.
    b = r.broker_id
    return _reelect(state, lambda p: p.leader == NO_LEADER and b in p.replicas, drop=NO_LEADER)


def _check_configs(configs: Iterable[tuple[str, str | None]]) -> None:
    TopicConfig().with_overrides(dict(configs))  # raises InvalidConfigError


def _check_replicas(
    state: ClusterState, name: str, index: int, replicas: tuple[int, ...], width: int
) -> None:
    if not replicas:
        raise InvalidReplicationFactorError(f"partition {index} of {name!r} has no replicas")
    if len(replicas) != width:
        raise InvalidReplicaAssignmentError(
            f"partition {index} of {name!r} has {len(replicas)} replicas, partition 0 {width}"
        )
    if len(set(replicas)) != len(replicas):
        raise InvalidReplicaAssignmentError(f"partition {index} of {name!r} repeats a broker")
    unknown = [b for b in replicas if b not in state.brokers]
    if unknown:
        raise InvalidReplicaAssignmentError(
            f"partition {index} of {name!r} names unregistered brokers {unknown}"
        )


def _new_partition(state: ClusterState, replicas: tuple[int, ...]) -> PartitionState:
    """A new, empty partition: every live replica is in sync (there is nothing to copy);
    with none live, all of them, so the first to return can lead."""
    live = tuple(b for b in replicas if state.is_live(b))
    return PartitionState(tuple(replicas), live or tuple(replicas), live[0] if live else -1, 0, 0)


def _create_topic(state: ClusterState, r: CreateTopic) -> ClusterState:
    validate_topic_name(r.name)
    if r.name in state.topics:
        raise TopicAlreadyExistsError(f"topic {r.name!r} already exists")
    if not r.replicas:
        raise InvalidPartitionsError(f"topic {r.name!r} has no partitions")
    width = len(r.replicas[0])
    for i, replicas in enumerate(r.replicas):
        _check_replicas(state, r.name, i, tuple(replicas), width)
    parts = [_new_partition(state, tuple(replicas)) for replicas in r.replicas]
    try:
        _check_configs(r.configs)
    except InvalidConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidConfigError(str(exc)) from exc
    topic = TopicState(
        r.name, r.topic_id, bool(r.internal), _frozen_map(dict(r.configs)), tuple(parts)
    )
    return _with_topics(state, {r.name: topic})


def _create_partitions(state: ClusterState, r: CreatePartitions) -> ClusterState:
    topic = state.topics.get(r.topic)
    if topic is None:
        raise UnknownTopicOrPartitionError(f"topic {r.topic!r} does not exist")
    if not r.replicas:
        raise InvalidPartitionsError(f"no partitions to add to {r.topic!r}")
    width = len(topic.partitions[0].replicas)
    first = len(topic.partitions)
    for i, replicas in enumerate(r.replicas):
        _check_replicas(state, r.topic, first + i, tuple(replicas), width)
    added = tuple(_new_partition(state, tuple(replicas)) for replicas in r.replicas)
    return _with_topics(
        state, {r.topic: dataclasses.replace(topic, partitions=topic.partitions + added)}
    )


def _delete_topic(state: ClusterState, r: DeleteTopic) -> ClusterState:
    if r.name not in state.topics:
        raise UnknownTopicOrPartitionError(f"topic {r.name!r} does not exist")
    return _with_topics(state, {r.name: None})


def _change_leader(state: ClusterState, r: ChangePartitionLeader) -> ClusterState:
    topic = state.topics.get(r.topic)
    if topic is None or not 0 <= r.partition < len(topic.partitions):
        raise UnknownTopicOrPartitionError(f"{r.topic}-{r.partition} does not exist")
    p = topic.partitions[r.partition]
    if r.expected_leader_epoch not in (-1, p.leader_epoch):
        raise FencedLeaderEpochError(
            f"{r.topic}-{r.partition} is at leader epoch {p.leader_epoch}, "
            f"not {r.expected_leader_epoch}"
        )
    if not r.isr or not set(r.isr) <= set(p.replicas) or len(set(r.isr)) != len(r.isr):
        raise InvalidReplicaAssignmentError(
            f"ISR {list(r.isr)} is not a non-empty subset of replicas {list(p.replicas)}"
        )
    if r.leader != NO_LEADER:
        if r.leader not in r.isr:
            raise InvalidReplicaAssignmentError(f"leader {r.leader} is not in ISR {list(r.isr)}")
        if not state.is_live(r.leader):
            raise InvalidReplicaAssignmentError(f"leader {r.leader} is not a live broker")
    parts = list(topic.partitions)
    parts[r.partition] = PartitionState(
        p.replicas, tuple(r.isr), r.leader, p.leader_epoch + 1, p.partition_epoch + 1
    )
    return _with_topics(state, {r.topic: dataclasses.replace(topic, partitions=tuple(parts))})


def _alter_partition(state: ClusterState, r: AlterPartition) -> tuple[ClusterState, Result]:
    """Kafka's checks, in Kafka's order (ReplicationControlManager)."""
    topic = state.topics.get(r.topic)
    if topic is None or not 0 <= r.partition < len(topic.partitions):
        raise UnknownTopicOrPartitionError(f"{r.topic}-{r.partition} does not exist")
    p = topic.partitions[r.partition]
    where = f"{r.topic}-{r.partition}"
    if r.leader_epoch != p.leader_epoch:
        raise FencedLeaderEpochError(
            f"{where} is at leader epoch {p.leader_epoch}, not {r.leader_epoch}"
        )
    if r.leader != p.leader:
        raise InvalidRequestError(f"{where} is led by {p.leader}, not {r.leader}")
    if r.partition_epoch != p.partition_epoch:
        raise InvalidUpdateVersionError(
            f"{where} is at partition epoch {p.partition_epoch}, not {r.partition_epoch}"
        )
    isr = tuple(r.isr)
    if r.leader not in isr:
        raise InvalidRequestError(f"{where}: ISR {list(isr)} leaves out its leader {r.leader}")
    if not set(isr) <= set(p.replicas) or len(set(isr)) != len(isr):
        raise InvalidRequestError(
            f"{where}: ISR {list(isr)} is not a subset of replicas {list(p.replicas)}"
        )
    ineligible = [b for b in isr if b not in p.isr and not state.is_live(b)]
    if ineligible:
        raise IneligibleReplicaError(f"{where}: brokers {ineligible} are not live")
    if isr == p.isr:
        return state, Result(value=p.partition_epoch)
    new = PartitionState(p.replicas, isr, p.leader, p.leader_epoch, p.partition_epoch + 1)
    parts = list(topic.partitions)
    parts[r.partition] = new
    state = _with_topics(state, {r.topic: dataclasses.replace(topic, partitions=tuple(parts))})
    return state, Result(value=new.partition_epoch)


def _alter_configs(state: ClusterState, r: AlterTopicConfigs) -> ClusterState:
    topic = state.topics.get(r.name)
    if topic is None:
        raise UnknownTopicOrPartitionError(f"topic {r.name!r} does not exist")
    configs = {} if r.replace else dict(topic.configs)
    for key, value in r.configs:
        if value is None:
            configs.pop(key, None)
        else:
            configs[key] = value
    try:
        _check_configs(configs.items())
        _check_configs((key, None) for key, _ in r.configs)  # unknown keys even when removed
    except InvalidConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidConfigError(str(exc)) from exc
    if configs == dict(topic.configs):
        return state
    return _with_topics(state, {r.name: dataclasses.replace(topic, configs=_frozen_map(configs))})


def _alter_broker_configs(state: ClusterState, r: AlterBrokerConfigs) -> ClusterState:
    if not isinstance(r.entity, str) or (r.entity and not r.entity.isdigit()):
        raise InvalidRequestError(f"broker {r.entity!r} is not a broker id (or '' for all)")
    configs = {} if r.replace else dict(state.broker_configs.get(r.entity, {}))
    for key, value in r.configs:
        topic_key = BROKER_SYNONYMS.get(key)
        if topic_key is None:
            raise InvalidRequestError(f"{key} cannot be updated dynamically")
        if value is None:
            configs.pop(key, None)
        else:
            parse_value(topic_key, value)  # raises InvalidConfigError
            configs[key] = value
    if configs == dict(state.broker_configs.get(r.entity, {})):
        return state
    entities = dict(state.broker_configs)
    if configs:
        entities[r.entity] = _frozen_map(configs)
    else:
        entities.pop(r.entity, None)
    return dataclasses.replace(state, broker_configs=MappingProxyType(entities))


def _allocate_producer_ids(
    state: ClusterState, r: AllocateProducerIds
) -> tuple[ClusterState, Result]:
    if not isinstance(r.broker_id, int) or r.broker_id < 0:
        raise InvalidRequestError(f"broker id {r.broker_id!r} is not a non-negative integer")
    if not isinstance(r.block_size, int) or r.block_size < 1:
        raise InvalidRequestError(f"producer id block size {r.block_size!r} is below 1")
    first = state.next_producer_id
    if r.block_size > MAX_PRODUCER_ID - first:
        raise InvalidRequestError(
            f"a block of {r.block_size} producer ids from {first} passes the largest id"
        )
    new = dataclasses.replace(state, next_producer_id=first + r.block_size)
    return new, Result(value=first)


def _set_cluster_id(state: ClusterState, r: SetClusterId) -> ClusterState:
    cid = r.cluster_id
    if not isinstance(cid, str) or not cid or not all(c.isalnum() or c in "-_" for c in cid):
        raise InvalidRequestError(f"{cid!r} is not a cluster id")
    if state.cluster_id:  # set once: the first committed wins, on every voter
        return state
    return dataclasses.replace(state, cluster_id=cid)


# A handler answers the new state, or the new state and a result carrying a value.
_Handler = Callable[[ClusterState, Any], ClusterState | tuple[ClusterState, Result]]
_HANDLERS: dict[type[Any], _Handler] = {
    RegisterBroker: _register,
    BrokerHeartbeat: _heartbeat,
    FenceBroker: _fence,
    UnfenceBroker: _unfence,
    CreateTopic: _create_topic,
    DeleteTopic: _delete_topic,
    ChangePartitionLeader: _change_leader,
    AlterPartition: _alter_partition,
    CreatePartitions: _create_partitions,
    AlterTopicConfigs: _alter_configs,
    AlterBrokerConfigs: _alter_broker_configs,
    AllocateProducerIds: _allocate_producer_ids,
    SetClusterId: _set_cluster_id,
    AlterClientQuota: lambda state, r: dataclasses.replace(
        state, client_quotas=client_quotas.altered(state.client_quotas, r)
    ),
    AlterAcls: lambda state, r: dataclasses.replace(
        state, acls=cluster_acls.altered(state.acls, r)
    ),
    AlterScramCredential: lambda state, r: dataclasses.replace(
        state, scram_credentials=scram_credentials.altered(state.scram_credentials, r)
    ),
}


# --- placement and coordinators --------------------------------------------------------------


def assign_replicas(
    broker_ids: Sequence[int],
    partitions: int,
    replication_factor: int,
    start_index: int,
    replica_shift: int | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Kafka's rack-unaware assignment (``AdminUtils.assignReplicasToBrokersRackUnaware``).

    Partition ``p``'s first replica is broker ``(p + start_index) % n`` of the sorted
    ids; followers follow at a shift that grows every ``n`` partitions, so leaders
    and followers both spread. The caller draws ``start_index`` (and the shift,
    which defaults to it) at random, so topics do not all start on the same broker.
    """
    brokers = sorted(set(broker_ids))
    n = len(brokers)
    if partitions < 1:
        raise InvalidPartitionsError(f"{partitions} partitions: at least 1 is needed")
    if replication_factor < 1:
        raise InvalidReplicationFactorError(f"replication factor {replication_factor} is below 1")
    if replication_factor > n:
        raise InvalidReplicationFactorError(
            f"replication factor {replication_factor} is larger than the {n} live brokers"
        )
    start = start_index % n
    shift = (start_index if replica_shift is None else replica_shift) % n
    out: list[tuple[int, ...]] = []
    for p in range(partitions):
        if p > 0 and p % n == 0:
            shift += 1
        first = (p + start) % n
        replicas = [brokers[first]]
        for j in range(replication_factor - 1):
            replicas.append(brokers[(first + 1 + (shift + j) % (n - 1)) % n])
        out.append(tuple(replicas))
    return tuple(out)


def plan_topic(
    state: ClusterState,
    name: str,
    partitions: int,
    replication_factor: int,
    *,
    start_index: int,
    topic_id: uuid.UUID,
    configs: Mapping[str, str] | None = None,
    internal: bool = False,
    assignments: Sequence[Sequence[int]] | None = None,
) -> CreateTopic:
    """The CreateTopic record for a new topic placed over the live brokers, or as
    ``assignments`` (per partition, its replicas) place it when given.

    The caller draws ``start_index`` (``random.randrange``) and ``topic_id``
    (``uuid.uuid4()``), so the record, not ``apply``, carries every choice.
    Raises InvalidPartitionsError / InvalidReplicationFactorError; ``apply`` checks
    an explicit assignment (same width, no repeats, registered brokers).
    """
    if assignments is not None:
        replicas = tuple(tuple(int(b) for b in a) for a in assignments)
    else:
        live = [b.broker_id for b in state.live_brokers()]
        if not live:
            raise InvalidReplicationFactorError("no live brokers to place replicas on")
        replicas = assign_replicas(live, partitions, replication_factor, start_index)
    return CreateTopic(name, topic_id, replicas, tuple(sorted((configs or {}).items())), internal)


def plan_partitions(
    state: ClusterState,
    name: str,
    count: int,
    *,
    start_index: int,
    assignments: Sequence[Sequence[int]] | None = None,
) -> CreatePartitions:
    """The CreatePartitions record growing ``name`` to ``count`` partitions.

    New partitions keep the topic's replication factor. Placed as Kafka's
    ``addPartitions`` places them: the round robin continues from where partition
    0's first replica stands among the live brokers (``start_index``, drawn by the
    caller, when that broker is not live), so leaders keep spreading.
    """
    topic = state.topics.get(name)
    if topic is None:
        raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
    existing = len(topic.partitions)
    if count < existing:
        raise InvalidPartitionsError(
            f"topic {name!r} has {existing} partitions, more than the requested {count}"
        )
    if count == existing:
        raise InvalidPartitionsError(f"topic {name!r} already has {existing} partitions")
    if assignments is not None:
        if len(assignments) != count - existing:
            raise InvalidReplicaAssignmentError(
                f"increasing the partitions of {name!r} by {count - existing} "
                f"but {len(assignments)} assignments given"
            )
        return CreatePartitions(name, tuple(tuple(int(b) for b in a) for a in assignments))
    live = [b.broker_id for b in state.live_brokers()]
    if not live:
        raise InvalidReplicationFactorError("no live brokers to place replicas on")
    first = topic.partitions[0].replicas[0]
    start = sorted(live).index(first) if first in live else start_index
    placed = assign_replicas(live, count, len(topic.partitions[0].replicas), start)
    return CreatePartitions(name, placed[existing:])


def _partition_of(state: ClusterState, topic: str, partition: int) -> PartitionState:
    p = state.partition(topic, partition)
    if p is None:
        raise UnknownTopicOrPartitionError(f"{topic}-{partition} does not exist")
    return p


def preferred_election(state: ClusterState, topic: str, partition: int) -> ChangePartitionLeader:
    """The record moving leadership to the partition's first replica (ElectLeaders
    PREFERRED). ELECTION_NOT_NEEDED when it leads, PREFERRED_LEADER_NOT_AVAILABLE when
    it is not live and in sync."""
    p = _partition_of(state, topic, partition)
    preferred = p.replicas[0]
    if p.leader == preferred:
        raise ElectionNotNeededError(f"{topic}-{partition} is led by its preferred replica")
    if preferred not in p.isr or not state.is_live(preferred):
        raise PreferredLeaderNotAvailableError(
            f"{topic}-{partition}: preferred replica {preferred} is not live and in sync"
        )
    return ChangePartitionLeader(topic, partition, preferred, p.isr, p.leader_epoch)


def unclean_election(state: ClusterState, topic: str, partition: int) -> ChangePartitionLeader:
    """The record giving a leaderless partition a leader (ElectLeaders UNCLEAN): a live
    ISR member if there is one, else the first live replica alone in the ISR."""
    p = _partition_of(state, topic, partition)
    if p.leader != NO_LEADER:
        raise ElectionNotNeededError(f"{topic}-{partition} has a leader ({p.leader})")
    for b in p.replicas:
        if b in p.isr and state.is_live(b):
            return ChangePartitionLeader(topic, partition, b, p.isr, p.leader_epoch)
    for b in p.replicas:
        if state.is_live(b):
            return ChangePartitionLeader(topic, partition, b, (b,), p.leader_epoch)
    raise EligibleLeadersNotAvailableError(f"{topic}-{partition} has no live replica")


def preferred_elections(state: ClusterState) -> list[ChangePartitionLeader]:
    """Every preferred election that can be made now (the controller's periodic check)."""
    out: list[ChangePartitionLeader] = []
    for name, topic in sorted(state.topics.items()):
        for i, p in enumerate(topic.partitions):
            preferred = p.replicas[0]
            if p.leader != preferred and preferred in p.isr and state.is_live(preferred):
                out.append(ChangePartitionLeader(name, i, preferred, p.isr, p.leader_epoch))
    return out


def java_string_hashcode(text: str) -> int:
    """Java's ``String.hashCode``: ``s[0]*31^(n-1) + ... + s[n-1]`` over UTF-16 code
    units, in signed 32-bit arithmetic."""
    h = 0
    units = text.encode("utf-16-be", "surrogatepass")
    for i in range(0, len(units), 2):
        h = (31 * h + (units[i] << 8 | units[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def coordinator_partition(group_id: str, num_partitions: int) -> int:
    """The ``__consumer_offsets`` partition of a group: Kafka's
    ``Utils.abs(groupId.hashCode()) % n``, where ``Utils.abs(MIN_VALUE)`` is 0."""
    h = java_string_hashcode(group_id)
    return (0 if h == -(1 << 31) else abs(h)) % num_partitions


# --- wire form of a whole state (the Raft snapshot) ------------------------------------------


def state_to_wire(state: ClusterState) -> dict[str, Any]:
    """JSON types only, for the Raft full-dump file: see ``state_from_wire``."""
    return {
        "v": 1,
        "metadata_version": state.metadata_version,
        "cluster_id": state.cluster_id,
        "next_producer_id": state.next_producer_id,
        "broker_configs": {e: dict(c) for e, c in sorted(state.broker_configs.items())},
        "client_quotas": client_quotas.table_to_wire(state.client_quotas),
        "acls": cluster_acls.to_wire(state.acls),
        "scram_credentials": scram_credentials.table_to_wire(state.scram_credentials),
        "brokers": [
            [
                b.broker_id,
                b.host,
                b.port,
                b.incarnation,
                b.fenced,
                b.registry_port,
                [list(x) for x in b.listeners],
            ]
            for _, b in sorted(state.brokers.items())
        ],
        "topics": [
            {
                "name": t.name,
                "topic_id": str(t.topic_id),
                "internal": t.internal,
                "configs": dict(t.configs),
                # per partition: [replicas, isr, leader, leader_epoch, partition_epoch]
                "partitions": [
                    [list(p.replicas), list(p.isr), p.leader, p.leader_epoch, p.partition_epoch]
                    for p in t.partitions
                ],
            }
            for _, t in sorted(state.topics.items())
        ],
    }


def state_from_wire(wire: Mapping[str, Any]) -> ClusterState:
    if wire.get("v") != 1:
        raise ValueError(f"cluster state version {wire.get('v')!r} is not 1")
    brokers = {
        int(b[0]): BrokerInfo(
            int(b[0]),
            str(b[1]),
            int(b[2]),
            str(b[3]),
            bool(b[4]),
            int(b[5]) if len(b) > 5 else 0,
            # absent from snapshots written before listeners were registered
            tuple((str(n), str(h), int(p)) for n, h, p in (b[6] if len(b) > 6 else ())),
        )
        for b in wire["brokers"]
    }
    topics = {
        t["name"]: TopicState(
            str(t["name"]),
            uuid.UUID(t["topic_id"]),
            bool(t["internal"]),
            _frozen_map({str(k): str(v) for k, v in t["configs"].items()}),
            tuple(
                # snapshots written before partition epochs: start it at the leader epoch
                PartitionState(
                    tuple(p[0]), tuple(p[1]), int(p[2]), int(p[3]), int(p[4 if len(p) > 4 else 3])
                )
                for p in t["partitions"]
            ),
        )
        for t in wire["topics"]
    }
    return ClusterState(
        MappingProxyType(brokers),
        MappingProxyType(topics),
        int(wire["metadata_version"]),
        # absent from snapshots written before these were replicated
        str(wire.get("cluster_id", "")),
        int(wire.get("next_producer_id", 0)),
        broker_configs=MappingProxyType(
            {
                str(e): _frozen_map({str(k): str(v) for k, v in c.items()})
                for e, c in wire.get("broker_configs", {}).items()
            }
        ),
        client_quotas=client_quotas.table_from_wire(wire.get("client_quotas")),
        acls=cluster_acls.from_wire(wire.get("acls")),
        scram_credentials=scram_credentials.table_from_wire(wire.get("scram_credentials")),
    )
