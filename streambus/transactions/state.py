"""A transactional id's metadata, its state machine, and its ``__transaction_state`` records.

One record per change of a transactional id's metadata goes to the compacted
``__transaction_state`` partition its id hashes to, in Kafka's own key/value
layout (``TransactionLogKey`` / ``TransactionLogValue`` version 0), so the latest
record per key is the id's state and Kafka's tools could read the topic. A
tombstone (null value) forgets an id.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from streambus.structs import TopicPartition

TRANSACTION_TOPIC = "__transaction_state"
TRANSACTION_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.bytes": str(100 * 1024 * 1024),
    "min.insync.replicas": "2",
}


class TxnState(enum.IntEnum):
    """Kafka's ``TransactionState`` with the byte it is stored as."""

    EMPTY = 0
    ONGOING = 1
    PREPARE_COMMIT = 2
    PREPARE_ABORT = 3
    COMPLETE_COMMIT = 4
    COMPLETE_ABORT = 5
    DEAD = 6
    PREPARE_EPOCH_FENCE = 7

    @property
    def kafka_name(self) -> str:
        """The name ListTransactions and DescribeTransactions answer with."""
        return "".join(part.capitalize() for part in self.name.split("_"))

    @property
    def preparing(self) -> bool:
        return self in (TxnState.PREPARE_COMMIT, TxnState.PREPARE_ABORT)

    @property
    def open(self) -> bool:
        """Ongoing or waiting for its markers: counted by transactions_active."""
        return self in (TxnState.ONGOING, TxnState.PREPARE_COMMIT, TxnState.PREPARE_ABORT)


# The transitions Kafka's TransactionMetadata allows (state -> the states it may come from).
_VALID_PREVIOUS: dict[TxnState, frozenset[TxnState]] = {
    TxnState.EMPTY: frozenset({TxnState.EMPTY, TxnState.COMPLETE_COMMIT, TxnState.COMPLETE_ABORT}),
    TxnState.ONGOING: frozenset(
        {TxnState.ONGOING, TxnState.EMPTY, TxnState.COMPLETE_COMMIT, TxnState.COMPLETE_ABORT}
    ),
    TxnState.PREPARE_COMMIT: frozenset({TxnState.ONGOING}),
    TxnState.PREPARE_ABORT: frozenset({TxnState.ONGOING, TxnState.PREPARE_EPOCH_FENCE}),
    TxnState.COMPLETE_COMMIT: frozenset({TxnState.PREPARE_COMMIT}),
    TxnState.COMPLETE_ABORT: frozenset({TxnState.PREPARE_ABORT}),
    TxnState.DEAD: frozenset({TxnState.EMPTY, TxnState.COMPLETE_COMMIT, TxnState.COMPLETE_ABORT}),
    TxnState.PREPARE_EPOCH_FENCE: frozenset({TxnState.ONGOING}),
}


def valid_transition(old: TxnState, new: TxnState) -> bool:
    return old in _VALID_PREVIOUS[new]


@dataclass
class TransactionMetadata:
    """What the coordinator knows of one transactional id (Kafka's TransactionMetadata)."""

    transactional_id: str
    producer_id: int
    producer_epoch: int
    timeout_ms: int
    state: TxnState = TxnState.EMPTY
    partitions: set[TopicPartition] = field(default_factory=set)
    start_ms: int = -1  # the first AddPartitionsToTxn of the current transaction
    last_update_ms: int = -1
    # Not stored: how the current transaction came to its end (client, timeout, fenced),
    # and the monotonic time its first partition was added (the duration histogram).
    end_reason: str = "client"
    started_monotonic: float = 0.0

    def copy(self) -> TransactionMetadata:
        return TransactionMetadata(
            self.transactional_id,
            self.producer_id,
            self.producer_epoch,
            self.timeout_ms,
            self.state,
            set(self.partitions),
            self.start_ms,
            self.last_update_ms,
            self.end_reason,
            self.started_monotonic,
        )


# Key (Kafka's TransactionLogKey, version 0):
#   version          int16   0
#   transactional_id string  int16 length + UTF-8
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
KEY_VERSION = 0

# Value (Kafka's TransactionLogValue, version 0):
#   version              int16   0
#   producer_id          int64
#   producer_epoch       int16
#   transaction_timeout  int32   ms
#   state                int8    TxnState
#   partitions           int32 count, then per topic:
#       topic            string  int16 length + UTF-8
#       partitions       int32 count + int32 each
#   last_update          int64   ms since the epoch
#   start                int64   ms since the epoch; -1 when no transaction is open
_VALUE_HEAD = struct.Struct(">hqhib")
_TIMES = struct.Struct(">qq")
VALUE_VERSION = 0


def _string(text: str) -> bytes:
    raw = text.encode()
    return _INT16.pack(len(raw)) + raw


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    (length,) = _INT16.unpack_from(data, pos)
    pos += _INT16.size
    if length < 0 or pos + length > len(data):
        raise ValueError(f"string of {length} bytes at {pos} runs past the record")
    return data[pos : pos + length].decode(), pos + length


def encode_key(transactional_id: str) -> bytes:
    return _INT16.pack(KEY_VERSION) + _string(transactional_id)


def decode_key(data: bytes) -> str:
    (version,) = _INT16.unpack_from(data, 0)
    if version != KEY_VERSION:
        raise ValueError(f"transaction log key version {version}")
    txn_id, _ = _read_string(data, _INT16.size)
    return txn_id


def encode_value(meta: TransactionMetadata) -> bytes:
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(meta.partitions):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    out = bytearray(
        _VALUE_HEAD.pack(
            VALUE_VERSION, meta.producer_id, meta.producer_epoch, meta.timeout_ms, meta.state
        )
    )
    out += _INT32.pack(len(by_topic))
    for topic, parts in by_topic.items():
        out += _string(topic)
        out += _INT32.pack(len(parts))
        for p in parts:
            out += _INT32.pack(p)
    out += _TIMES.pack(meta.last_update_ms, meta.start_ms)
    return bytes(out)


def decode_value(transactional_id: str, data: bytes) -> TransactionMetadata:
    version, pid, epoch, timeout, state = _VALUE_HEAD.unpack_from(data, 0)
    if version != VALUE_VERSION:
        raise ValueError(f"transaction log value version {version} is not written by StreamBus")
    pos = _VALUE_HEAD.size
    (topics,) = _INT32.unpack_from(data, pos)
    pos += _INT32.size
    partitions: set[TopicPartition] = set()
    for _ in range(max(topics, 0)):
        topic, pos = _read_string(data, pos)
        (count,) = _INT32.unpack_from(data, pos)
        pos += _INT32.size
        for _ in range(count):
            (p,) = _INT32.unpack_from(data, pos)
            pos += _INT32.size
            partitions.add(TopicPartition(topic, p))
    last_update, start = _TIMES.unpack_from(data, pos)
    return TransactionMetadata(
        transactional_id, pid, epoch, timeout, TxnState(state), partitions, start, last_update
    )
