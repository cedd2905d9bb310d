"""Committed offsets, kept durably in the broker's own log (the ``__consumer_offsets`` topic).

Each commit appends one record batch to the partition of ``__consumer_offsets``
that the group hashes to, through the partition service like any produce, so a
commit that was acknowledged survives a crash of the broker process. The
topic is compacted: the latest record per (group, topic, partition) key is the
committed offset; a tombstone (null value) deletes it. On start the topic is
read back in full to rebuild the in-memory table.

Keys and values use Kafka's own formats, so tools that understand Kafka's
``__consumer_offsets`` can read them. The consumer protocol's group state is kept in the
same partitions (:mod:`streambus.groups.consumer_records`): the load hands those records
to the coordinator, and :meth:`OffsetStore.write_records` appends them.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from streambus.cluster.state import coordinator_partition
from streambus.errors import KafkaStorageError
from streambus.groups import consumer_records
from streambus.partitions import OFFSETS_TOPIC, AppendOrigin, PartitionService
from streambus.records import build_batch, iter_records, walk_batches
from streambus.records.batch import TRANSACTIONAL_MASK, with_attributes
from streambus.structs import TopicPartition

log = logging.getLogger("streambus.groups")

OFFSETS_TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.bytes": str(100 * 1024 * 1024)}

# Offset commit key, version 1 (Kafka's OffsetCommitKey):
#   version    int16   1
#   group      string  int16 length + UTF-8
#   topic      string  int16 length + UTF-8
#   partition  int32
_KEY_VERSION = struct.Struct(">h")
_STRING_LENGTH = struct.Struct(">h")
_PARTITION = struct.Struct(">i")
KEY_VERSION = 1

# Offset commit value, version 3 (Kafka's OffsetCommitValue):
#   version           int16   3
#   offset            int64   the next offset the group will read
#   leader_epoch      int32   -1 when the client did not say
#   metadata          string  int16 length + UTF-8, client-chosen
#   commit_timestamp  int64   ms since the epoch, broker clock
_VALUE_HEAD = struct.Struct(">hqi")
_TIMESTAMP = struct.Struct(">q")
VALUE_VERSION = 3


class OffsetAndMetadata(NamedTuple):
    offset: int
    leader_epoch: int
    metadata: str
    commit_timestamp_ms: int


def _string(text: str) -> bytes:
    raw = text.encode()
    return _STRING_LENGTH.pack(len(raw)) + raw


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    (length,) = _STRING_LENGTH.unpack_from(data, pos)
    pos += _STRING_LENGTH.size
    return data[pos : pos + length].decode(), pos + length


def encode_key(group: str, tp: TopicPartition) -> bytes:
    return (
        _KEY_VERSION.pack(KEY_VERSION)
        + _string(group)
        + _string(tp.topic)
        + _PARTITION.pack(tp.partition)
    )


def decode_key(data: bytes) -> tuple[str, TopicPartition] | None:
    """(group, partition) of an offset-commit key; None for Kafka's other key kinds."""
    (version,) = _KEY_VERSION.unpack_from(data, 0)
    if version not in (0, 1):
        return None  # group metadata (2) and anything newer: not offsets
    group, pos = _read_string(data, 2)
    topic, pos = _read_string(data, pos)
    (partition,) = _PARTITION.unpack_from(data, pos)
    return group, TopicPartition(topic, partition)


def encode_value(value: OffsetAndMetadata) -> bytes:
    return (
        _VALUE_HEAD.pack(VALUE_VERSION, value.offset, value.leader_epoch)
        + _string(value.metadata)
        + _TIMESTAMP.pack(value.commit_timestamp_ms)
    )


def decode_value(data: bytes) -> OffsetAndMetadata:
    version, offset, epoch = _VALUE_HEAD.unpack_from(data, 0)
    if version < 3:
        raise ValueError(f"offset value version {version} is not written by StreamBus")
    metadata, pos = _read_string(data, _VALUE_HEAD.size)
    (timestamp,) = _TIMESTAMP.unpack_from(data, pos)
    return OffsetAndMetadata(offset, epoch, metadata, timestamp)


@dataclass
class OffsetStore:
    """The committed-offsets table, mirrored to ``__consumer_offsets``."""

    service: PartitionService
    partitions: int
    # Creates the topic through the cluster's metadata (the broker's hook); None: locally.
    create_topic: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self._offsets: dict[str, dict[TopicPartition, OffsetAndMetadata]] = {}
        # Transactional offsets written but not yet committed or aborted by their marker
        # (Kafka's pendingTransactionalOffsetCommits): producer id -> group -> offsets.
        self._pending: dict[int, dict[str, dict[TopicPartition, OffsetAndMetadata]]] = {}
        # Consumer-protocol group records read by the last load, for the coordinator to take.
        self._group_records: dict[bytes, bytes | None] = {}

    def partition_for(self, group: str) -> TopicPartition:
        # Kafka's hash of the group id, over the partitions the topic has (it may predate a
        # change of offsets.topic.num.partitions), so every broker names the same coordinator.
        meta = self.service.topics().get(OFFSETS_TOPIC)
        count = meta.partitions if meta is not None else self.partitions
        return TopicPartition(OFFSETS_TOPIC, coordinator_partition(group, count))

    def ensure_topic(self) -> None:
        """Create the topic on first use. A creation that fails (a full disk) leaves
        nothing behind, so the next commit simply tries again."""
        if OFFSETS_TOPIC in self.service.topics():
            return
        offline = self.service.offline_topics().get(OFFSETS_TOPIC)
        if offline is not None and not self._restore():
            raise KafkaStorageError(f"{OFFSETS_TOPIC} is offline: {offline.path}: {offline.reason}")
        if offline is None and self.create_topic is not None:
            self.create_topic()
        elif offline is None:
            self.service.create_topic(
                OFFSETS_TOPIC, self.partitions, OFFSETS_TOPIC_CONFIG, internal=True
            )

    def _restore(self) -> bool:
        """Bring back a topic whose topic.json was lost (by a crash or a full disk while it
        was made): the broker knows what this topic's metadata must say."""
        return self.service.restore_topic(OFFSETS_TOPIC, self.partitions, OFFSETS_TOPIC_CONFIG)

    def load(self, only: int | None = None) -> int:
        """Rebuild the table from the log; returns the number of committed offsets loaded.
        ``only``: reload just the groups whose home is that partition (this broker just
        became its leader: what it holds of them was copied as a follower since)."""
        if OFFSETS_TOPIC in self.service.offline_topics() and only is None:
            self._restore()
        if OFFSETS_TOPIC not in self.service.topics():
            return 0
        # A group's records belong in its own partition (partition_for). Records found in
        # another one were written under an earlier placement: they count only where the
        # group's own partition says nothing newer about that topic-partition.
        own: _Loaded = {}
        earlier: _Loaded = {}
        count = self.service.topics()[OFFSETS_TOPIC].partitions
        homes: dict[str, int] = {}

        def home_of(group: str) -> int:
            home = homes.get(group)
            if home is None:
                home = homes[group] = coordinator_partition(group, count)
            return home

        pending: dict[int, dict[int, list[tuple[bytes | None, bytes | None]]]] = {}
        for partition in range(count) if only is None else (only,):
            tp = TopicPartition(OFFSETS_TOPIC, partition)
            offset, end = self.service.offsets(tp)
            open_txns = pending.setdefault(partition, {})
            while offset < end:
                data = self.service.read(tp, offset, 4 * 1024 * 1024)
                if not data:
                    break
                for pos, header in walk_batches(data):
                    offset = header.last_offset + 1
                    records = [(r.key, r.value) for r in iter_records(data, pos, header)]
                    if header.is_control:
                        # A marker: the producer's offsets count from here if it committed.
                        held = open_txns.pop(header.producer_id, [])
                        if records and _is_commit(records[0][0]):
                            records = held
                        else:
                            continue
                    elif header.is_transactional:
                        open_txns.setdefault(header.producer_id, []).extend(records)
                        continue
                    for key, value in records:
                        _apply_record(
                            key,
                            value,
                            partition=partition,
                            home_of=home_of,
                            own=own,
                            earlier=earlier,
                            group_records=self._group_records,
                        )
        if only is not None:
            self.unload(only)
            earlier.clear()  # another partition's records: that partition's leader has them
        for open_txns in pending.values():
            for pid, held in open_txns.items():
                for key, value in held:
                    decoded = _decode_offset(key, value)
                    if decoded is not None:
                        group, tp, entry = decoded
                        self._pending.setdefault(pid, {}).setdefault(group, {})[tp] = entry
        for group in own.keys() | earlier.keys():
            merged = {**earlier.get(group, {}), **own.get(group, {})}
            table = {tp: value for tp, value in merged.items() if value is not None}
            if table:
                self._offsets[group] = table
        return (
            sum(len(self._offsets.get(g, ())) for g in own)
            if only is not None
            else sum(len(v) for v in self._offsets.values())
        )

    def take_group_records(self) -> list[tuple[bytes, bytes]]:
        """The consumer-protocol group records the loads read (latest per key, deleted
        keys left out); handed over once, as the coordinator replays them."""
        records = [(k, v) for k, v in self._group_records.items() if v is not None]
        self._group_records = {}
        return records

    def write_records(
        self, group: str, entries: list[tuple[bytes, bytes | None]]
    ) -> tuple[TopicPartition, int]:
        """Append already-encoded records (None: a tombstone) to the group's partition."""
        self.ensure_topic()
        now = int(time.time() * 1000)
        batch = build_batch([(key, value, (), now) for key, value in entries])
        home = self.partition_for(group)
        result = self.service.append_now(home, batch, origin=AppendOrigin.COORDINATOR)
        return home, result.last_offset + 1

    def unload(self, partition: int) -> list[str]:
        """Forget the groups whose home is ``partition`` (another broker leads it now)."""
        gone = [g for g in self._offsets if self.partition_for(g).partition == partition]
        for group in gone:
            del self._offsets[group]
        for pid in list(self._pending):
            groups = self._pending[pid]
            for group in [g for g in groups if self.partition_for(g).partition == partition]:
                del groups[group]
            if not groups:
                del self._pending[pid]
        return gone

    # -- transactional offsets (TxnOffsetCommit) ----------------------------------------------
    def commit_transactional(
        self,
        group: str,
        producer_id: int,
        producer_epoch: int,
        offsets: Mapping[TopicPartition, OffsetAndMetadata],
    ) -> tuple[TopicPartition, int] | None:
        """Write ``offsets`` as part of the producer's transaction: they are pending until
        the transaction's marker reaches the group's partition (``complete_transaction``)."""
        if not offsets:
            return None
        self.ensure_topic()
        now = int(time.time() * 1000)
        batch = build_batch(
            [(encode_key(group, tp), encode_value(v), (), now) for tp, v in offsets.items()],
            producer_id=producer_id,
            producer_epoch=producer_epoch,
        )
        home = self.partition_for(group)
        result = self.service.append_transactional(home, with_attributes(batch, TRANSACTIONAL_MASK))
        self._pending.setdefault(producer_id, {}).setdefault(group, {}).update(offsets)
        return home, result.last_offset + 1

    def complete_transaction(self, producer_id: int, commit: bool, partition: int) -> int:
        """The marker of ``producer_id``'s transaction is in ``partition``: its pending
        offsets of the groups homed there become committed (or are dropped). Returns how many
        offsets were committed."""
        groups = self._pending.get(producer_id)
        if not groups:
            return 0
        applied = 0
        for group in [g for g in groups if self.partition_for(g).partition == partition]:
            offsets = groups.pop(group)
            if commit:
                self._offsets.setdefault(group, {}).update(offsets)
                applied += len(offsets)
        if not groups:
            del self._pending[producer_id]
        return applied

    def has_pending(self, group: str) -> bool:
        return any(group in groups for groups in self._pending.values())

    def pending_partitions(self, group: str) -> set[TopicPartition]:
        """Partitions with offsets of ``group`` waiting on a transaction's marker."""
        return {tp for groups in self._pending.values() for tp in groups.get(group, {})}

    def commit(
        self, group: str, offsets: Mapping[TopicPartition, OffsetAndMetadata]
    ) -> tuple[TopicPartition, int] | None:
        """Record ``offsets``; raises the storage error if the append fails. Answers the
        ``__consumer_offsets`` partition and the end offset the ISR must reach for the
        commit to survive its coordinator (None: nothing written)."""
        if not offsets:
            return None
        written = self._write(group, [(tp, encode_value(v)) for tp, v in offsets.items()])
        self._offsets.setdefault(group, {}).update(offsets)
        return written

    def delete(self, group: str, tps: Iterable[TopicPartition] | None = None) -> int:
        """Tombstone a group's offsets (all of them by default); returns how many were removed."""
        table = self._offsets.get(group, {})
        targets = list(table) if tps is None else [tp for tp in tps if tp in table]
        if not targets:
            return 0
        self._write(group, [(tp, None) for tp in targets])
        for tp in targets:
            del table[tp]
        if not table:
            self._offsets.pop(group, None)
        return len(targets)

    def _write(
        self, group: str, entries: list[tuple[TopicPartition, bytes | None]]
    ) -> tuple[TopicPartition, int]:
        self.ensure_topic()
        now = int(time.time() * 1000)
        batch = build_batch([(encode_key(group, tp), value, (), now) for tp, value in entries])
        home = self.partition_for(group)
        result = self.service.append_now(home, batch, origin=AppendOrigin.COORDINATOR)
        return home, result.last_offset + 1

    def fetch(self, group: str) -> Mapping[TopicPartition, OffsetAndMetadata]:
        return self._offsets.get(group, {})

    def groups(self) -> Iterator[str]:
        return iter(list(self._offsets))

    def committed(self) -> Iterator[tuple[str, TopicPartition, int]]:
        for group, table in self._offsets.items():
            for tp, value in table.items():
                yield group, tp, value.offset


_Loaded = dict[str, dict[TopicPartition, OffsetAndMetadata | None]]


def _apply_record(
    key: bytes | None,
    value: bytes | None,
    *,
    partition: int,
    home_of: Callable[[str], int],
    own: _Loaded,
    earlier: _Loaded,
    group_records: dict[bytes, bytes | None],
) -> None:
    """File one loaded record under its group's own partition or an earlier placement's;
    a consumer-protocol group record found in its group's own partition goes to
    ``group_records``."""
    if key is None:
        return
    try:
        decoded = decode_key(key)
        if decoded is None:
            parsed = consumer_records.parse_key(key)
            if parsed is not None and home_of(parsed[1]) == partition:
                group_records[key] = value
            return
        group, tp = decoded
        # A tombstone is kept as None so that it also hides an earlier placement's record.
        entry = None if value is None else decode_value(value)
        (own if home_of(group) == partition else earlier).setdefault(group, {})[tp] = entry
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        log.warning("skipping unreadable record in %s: %s", OFFSETS_TOPIC, exc)


def _is_commit(key: bytes | None) -> bool:
    """A control record's key: version int16, type int16 (0 abort, 1 commit)."""
    return key is not None and len(key) >= 4 and struct.unpack_from(">hh", key)[1] == 1


def _decode_offset(
    key: bytes | None, value: bytes | None
) -> tuple[str, TopicPartition, OffsetAndMetadata] | None:
    if key is None or value is None:
        return None
    try:
        decoded = decode_key(key)
        return None if decoded is None else (decoded[0], decoded[1], decode_value(value))
    except (struct.error, ValueError, UnicodeDecodeError):
        return None
