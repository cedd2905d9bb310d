"""The records that change the cluster's metadata, and their wire form.

A record is a small frozen dataclass. Every voter applies the same records in
the same order (see ``state.apply``), so a record carries every value the
change needs, chosen by whoever submits it (topic ids, replica placement):
applying one never consults a clock, a random source or the local disk.

Wire form (what the Raft journal stores and pysyncobj pickles): a flat dict
of JSON types only, never an object of ours, so a journal outlives the code
that wrote it and unpickling it builds nothing but dicts, lists, strings and
numbers::

    {"type": "CreateTopic",   # the record class's name
     "v": 1,                  # format version of that record type
     ...fields}               # the dataclass fields; tuples become lists,
                              # UUIDs their canonical string

A record of an unknown type or version is answered with an INVALID_REQUEST
result by ``apply``, never raised.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from streambus.errors import ERROR_BY_CODE, StreamBusError, UnknownServerError

WIRE_VERSION = 1


@dataclass(frozen=True, slots=True)
class RegisterBroker:
    """A broker announces itself; a new incarnation starts fenced."""

    broker_id: int  # the node id (``--node-id``)
    host: str  # the address clients are told to connect to
    port: int  # its Kafka listener port
    incarnation: str  # a UUID the broker draws at each start: tells a restart from a twin
    # Its schema registry REST port on ``host`` (0: none). Absent from older records.
    registry_port: int = 0
    # (listener name, advertised host, port) of each listener: Metadata answers a client
    # with the brokers' addresses on the listener it connected on
    listeners: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerHeartbeat:
    """A broker is alive; the controller notes when it applied one (its own clock)."""

    broker_id: int
    incarnation: str  # must match the registration, else STALE_BROKER_EPOCH


@dataclass(frozen=True, slots=True)
class FenceBroker:
    """The controller takes a silent broker out: its partitions' leadership moves."""

    broker_id: int
    reason: str  # for the logs of every voter ("no heartbeat for 9.4 s")


@dataclass(frozen=True, slots=True)
class UnfenceBroker:
    """A fenced broker heartbeats again: leaderless partitions it holds return to it."""

    broker_id: int


@dataclass(frozen=True, slots=True)
class CreateTopic:
    name: str
    topic_id: uuid.UUID  # drawn by the submitter
    replicas: tuple[tuple[int, ...], ...]  # per partition, its replicas' broker ids
    configs: tuple[tuple[str, str], ...] = ()  # Kafka-named overrides, sorted by key
    internal: bool = False  # __consumer_offsets and the like


@dataclass(frozen=True, slots=True)
class DeleteTopic:
    name: str


@dataclass(frozen=True, slots=True)
class ChangePartitionLeader:
    """Set a partition's leader and ISR; the leader epoch is bumped by one."""

    topic: str
    partition: int
    leader: int  # a broker in ``isr``, or -1 for none
    isr: tuple[int, ...]  # a subset of the partition's replicas
    expected_leader_epoch: int = -1  # compare-and-set: -1 skips the check


@dataclass(frozen=True, slots=True)
class AlterPartition:
    """A partition's leader shrinks or expands its ISR (Kafka's AlterPartition).

    Applied only while ``leader`` still leads at ``leader_epoch`` and the partition
    is still at ``partition_epoch``, so a stale leader, or a change raced by another
    (a fence, an election), is refused rather than undone. The result's ``value``
    is the partition's new partition epoch.
    """

    topic: str
    partition: int
    leader: int  # the broker submitting: must be the current leader
    leader_epoch: int
    partition_epoch: int
    isr: tuple[int, ...]  # the new ISR: contains the leader, a subset of the replicas


@dataclass(frozen=True, slots=True)
class CreatePartitions:
    """A topic grows: ``replicas`` are the new partitions' replica lists, in order."""

    topic: str
    replicas: tuple[tuple[int, ...], ...]  # partitions len(existing).. of the topic


@dataclass(frozen=True, slots=True)
class AlterTopicConfigs:
    name: str
    configs: tuple[tuple[str, str | None], ...]  # key -> new value, None removes the override
    replace: bool = False  # True: ``configs`` are the whole new set (Kafka's AlterConfigs)


@dataclass(frozen=True, slots=True)
class AlterBrokerConfigs:
    """Dynamic broker configs (Kafka's BROKER resource), as topic defaults by their broker
    names (``log.retention.ms``): for every broker (``entity`` "") or one (its id)."""

    entity: str  # "" for the cluster-wide default, else a broker id in decimal
    configs: tuple[tuple[str, str | None], ...]  # key -> new value, None removes it
    replace: bool = False  # True: ``configs`` are the entity's whole new set


@dataclass(frozen=True, slots=True)
class AllocateProducerIds:
    """A broker takes the next block of producer ids (Kafka's KIP-730).

    The result's ``value`` is the block's first id; the block is
    ``[value, value + block_size)``, handed out by that broker alone, so no two
    brokers ever give an idempotent producer the same id.
    """

    broker_id: int  # who takes the block (for the logs; any broker may)
    block_size: int  # ids in the block, at least 1


@dataclass(frozen=True, slots=True)
class SetClusterId:
    """The cluster's id, set once: a record that finds one already set changes nothing.

    Every broker proposes the id of its own ``meta.properties`` after registering;
    the first committed wins, and every broker answers Metadata with it.
    """

    cluster_id: str  # Kafka's form: base64url of 16 bytes, no padding


@dataclass(frozen=True, slots=True)
class AlterClientQuota:
    """Set or remove client quotas of one entity (Kafka's ClientQuotaRecord); see
    ``streambus.cluster.client_quotas``."""

    entity: tuple[tuple[str, str | None], ...]  # (type, name; None: the default entity), by type
    ops: tuple[tuple[str, float | None], ...]  # quota key -> new value, None removes it


@dataclass(frozen=True, slots=True)
class AlterAcls:
    """Remove, then add ACL bindings (Kafka's AccessControlEntryRecord and its removal);
    see ``streambus.cluster.acls``. A binding: (resource type, resource name, pattern
    type, principal, host, operation, permission), Kafka's codes."""

    creations: tuple[tuple[int, str, int, str, str, int, int], ...] = ()
    deletions: tuple[tuple[int, str, int, str, str, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class AlterScramCredential:
    """Set or delete one user's SCRAM credential for one mechanism (Kafka's
    UserScramCredentialRecord); see ``streambus.cluster.scram_credentials``."""

    user: str
    mechanism: str  # SCRAM-SHA-256 or SCRAM-SHA-512
    salt: str = ""  # base64; the three byte strings are empty for a deletion
    stored_key: str = ""  # base64 of H(ClientKey)
    server_key: str = ""  # base64 of HMAC(SaltedPassword, "Server Key")
    iterations: int = 0  # 0: delete the credential


Record = (
    RegisterBroker
    | BrokerHeartbeat
    | FenceBroker
    | UnfenceBroker
    | CreateTopic
    | DeleteTopic
    | ChangePartitionLeader
    | AlterPartition
    | CreatePartitions
    | AlterTopicConfigs
    | AlterBrokerConfigs
    | AllocateProducerIds
    | SetClusterId
    | AlterClientQuota
    | AlterAcls
    | AlterScramCredential
)

RECORD_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        RegisterBroker,
        BrokerHeartbeat,
        FenceBroker,
        UnfenceBroker,
        CreateTopic,
        DeleteTopic,
        ChangePartitionLeader,
        AlterPartition,
        CreatePartitions,
        AlterTopicConfigs,
        AlterBrokerConfigs,
        AllocateProducerIds,
        SetClusterId,
        AlterClientQuota,
        AlterAcls,
        AlterScramCredential,
    )
}


@dataclass(frozen=True, slots=True)
class Result:
    """What applying a record answered: 0, or a Kafka error code and why.

    Never on the wire: each voter's own apply answers the submitter on that voter.
    """

    error_code: int = 0
    message: str | None = None
    value: int | None = None  # what the record yields: AllocateProducerIds' first id

    @property
    def ok(self) -> bool:
        return self.error_code == 0

    @classmethod
    def of(cls, exc: StreamBusError) -> Result:
        return cls(exc.errno, exc.message)

    def error(self) -> StreamBusError | None:
        """The matching StreamBusError (to raise or answer with), None when ok."""
        if self.ok:
            return None
        return ERROR_BY_CODE.get(self.error_code, UnknownServerError)(self.message)


OK = Result()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def to_wire(record: Record) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(record).__name__, "v": WIRE_VERSION}
    for field in dataclasses.fields(record):
        out[field.name] = _jsonable(getattr(record, field.name))
    return out


def from_wire(wire: Any) -> Record:
    """The record a wire dict describes; ValueError when it describes none."""
    if not isinstance(wire, dict):
        raise ValueError(f"a record is a dict, not {type(wire).__name__}")
    cls = RECORD_TYPES.get(wire.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown record type {wire.get('type')!r}")
    if wire.get("v") != WIRE_VERSION:
        raise ValueError(f"{cls.__name__} version {wire.get('v')!r} is not {WIRE_VERSION}")
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in wire:
            kwargs[field.name] = _tuples(wire[field.name])
    try:
        if "topic_id" in kwargs:
            kwargs["topic_id"] = uuid.UUID(str(kwargs["topic_id"]))
        record: Record = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad {cls.__name__}: {exc}") from exc
    return record
