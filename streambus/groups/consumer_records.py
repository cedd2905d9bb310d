"""Consumer groups (KIP-848) as records in ``__consumer_offsets``, in Kafka's own formats.

A group's state is a set of keyed records in its home partition of the compacted
offsets topic, beside its committed offsets; the latest record per key wins and a
tombstone (null value) deletes it. On load they are replayed into the group, so a
restarted or new coordinator carries on with the same members, epochs and assignments
(members are not asked to rejoin, and nothing is reassigned).

Every key is ``int16 record type`` followed by the key's fields at version 0, strings
as ``int16 length + UTF-8`` (Kafka's key schemas are not flexible). Every value is
``int16 value version`` (0) followed by the value's fields in Kafka's flexible encoding:
compact strings (unsigned varint length + 1, 0 for null), compact arrays (unsigned
varint count + 1), 16-byte topic ids, and an empty tagged-field section (varint 0) after
each struct. The records (type: key fields -> value fields):

- 3 ConsumerGroupMetadata: group -> epoch int32
- 5 ConsumerGroupMemberMetadata: group, member -> instance id?, rack id?, client id,
  client host, subscribed topic names [string], subscribed regex?, rebalance timeout
  int32, server assignor?
- 6 ConsumerGroupTargetAssignmentMetadata: group -> assignment epoch int32
- 7 ConsumerGroupTargetAssignmentMember: group, member -> [topic id, [partition int32]]
- 8 ConsumerGroupCurrentMemberAssignment: group, member -> member epoch int32, previous
  epoch int32, state int8 (0 stable, 1 unrevoked, 2 unreleased), assigned
  [topic id, [partition]], pending revocation [topic id, [partition]]
- 16 ConsumerGroupRegularExpression: group, regex -> the topic names it resolved to
  [string], version int64 (Kafka: the metadata image's; here the group epoch when the
  resolution last changed), timestamp int64 (wall-clock ms of that resolution). Written
  when a regex's resolution changes, tombstoned when no member subscribes with it; on
  load a resolution that still matches the same topics moves no epoch.

Assignments name topics by id, as Kafka's do: a topic deleted and recreated under the
same name is another topic, and a partition of a deleted topic is dropped on load.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from streambus.groups.consumer import ConsumerGroup, ConsumerMember, MemberState, Partitions

GROUP_METADATA = 3
MEMBER_METADATA = 5
TARGET_METADATA = 6
TARGET_MEMBER = 7
CURRENT_ASSIGNMENT = 8
REGULAR_EXPRESSION = 16
RECORD_TYPES = frozenset(
    (
        GROUP_METADATA,
        MEMBER_METADATA,
        TARGET_METADATA,
        TARGET_MEMBER,
        CURRENT_ASSIGNMENT,
        REGULAR_EXPRESSION,
    )
)
GROUP_LEVEL = frozenset((GROUP_METADATA, TARGET_METADATA, REGULAR_EXPRESSION))

_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_INT8 = struct.Struct(">b")
_INT64 = struct.Struct(">q")
VALUE_VERSION = 0
_NO_TAGS = b"\x00"

_STATE_CODES = {
    MemberState.STABLE: 0,
    MemberState.UNREVOKED_PARTITIONS: 1,
    MemberState.UNRELEASED_PARTITIONS: 2,
}
_STATES = {code: state for state, code in _STATE_CODES.items()}


# -- encoding ------------------------------------------------------------------------------
def _key_string(text: str) -> bytes:
    raw = text.encode()
    return _INT16.pack(len(raw)) + raw


def group_key(kind: int, group_id: str) -> bytes:
    return _INT16.pack(kind) + _key_string(group_id)


def member_key(kind: int, group_id: str, member_id: str) -> bytes:
    return _INT16.pack(kind) + _key_string(group_id) + _key_string(member_id)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _compact_string(text: str | None) -> bytes:
    if text is None:
        return b"\x00"
    raw = text.encode()
    return _varint(len(raw) + 1) + raw


def _partitions(parts: Partitions, ids: Mapping[str, uuid.UUID]) -> bytes:
    """[topic id, [partition]] with a tagged-field section per topic."""
    entries = [(ids[t], sorted(ps)) for t, ps in sorted(parts.items()) if ps and t in ids]
    out = [_varint(len(entries) + 1)]
    for topic_id, ps in entries:
        out.append(topic_id.bytes)
        out.append(_varint(len(ps) + 1))
        out.extend(_INT32.pack(p) for p in ps)
        out.append(_NO_TAGS)
    return b"".join(out)


def _value(*parts: bytes) -> bytes:
    return _INT16.pack(VALUE_VERSION) + b"".join(parts) + _NO_TAGS


def group_records(group: ConsumerGroup) -> dict[bytes, bytes]:
    """The group-wide records: its epoch, its target assignment's epoch and its members'
    regexes with the topics each resolved to."""
    gid = group.group_id
    out = {
        group_key(GROUP_METADATA, gid): _value(_INT32.pack(group.group_epoch)),
        group_key(TARGET_METADATA, gid): _value(_INT32.pack(group.assignment_epoch)),
    }
    for regex, topics in sorted(group.resolved.items()):
        version, timestamp_ms = group.resolved_at.get(regex, (group.group_epoch, 0))
        names = [_varint(len(topics) + 1)]
        names.extend(_compact_string(t) for t in sorted(topics))
        value = _value(*names, _INT64.pack(version), _INT64.pack(timestamp_ms))
        out[member_key(REGULAR_EXPRESSION, gid, regex)] = value
    return out


def record_kind(key: bytes) -> int:
    """The record type a key of ``__consumer_offsets`` starts with."""
    return int(_INT16.unpack_from(key)[0])


def member_records(
    group: ConsumerGroup, member: ConsumerMember, ids: Mapping[str, uuid.UUID]
) -> dict[bytes, bytes]:
    """One member's records: who it is and subscribes to, its target, what it holds."""
    gid, mid = group.group_id, member.member_id
    names = [_varint(len(member.subscribed) + 1)]
    names.extend(_compact_string(t) for t in member.subscribed)
    metadata = _value(
        _compact_string(member.instance_id),
        _compact_string(member.rack_id),
        _compact_string(member.client_id),
        _compact_string(member.client_host),
        *names,
        _compact_string(member.regex),
        _INT32.pack(member.rebalance_timeout_ms),
        _compact_string(member.server_assignor),
    )
    current = _value(
        _INT32.pack(member.member_epoch),
        _INT32.pack(member.previous_epoch),
        _INT8.pack(_STATE_CODES[member.state]),
        _partitions(member.assigned, ids),
        _partitions(member.revoking, ids),
    )
    return {
        member_key(MEMBER_METADATA, gid, mid): metadata,
        member_key(TARGET_MEMBER, gid, mid): _value(_partitions(group.target.get(mid, {}), ids)),
        member_key(CURRENT_ASSIGNMENT, gid, mid): current,
    }


def all_records(group: ConsumerGroup, ids: Mapping[str, uuid.UUID]) -> dict[bytes, bytes]:
    out = group_records(group)
    for member in group.members.values():
        out.update(member_records(group, member, ids))
    return out


# -- decoding ------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def unpack(self, fmt: struct.Struct) -> int:
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(value)

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 28:
                raise ValueError("varint too long")

    def key_string(self) -> str:
        length = self.unpack(_INT16)
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode()

    def compact_string(self) -> str | None:
        length = self.varint() - 1
        if length < 0:
            return None
        raw = self.data[self.pos : self.pos + length]
        if len(raw) != length:
            raise ValueError("string runs past the record")
        self.pos += length
        return raw.decode()

    def tags(self) -> None:
        for _ in range(self.varint()):
            self.varint()  # tag
            self.pos += self.varint()  # size: unknown tagged fields are skipped

    def partitions(self, names: Mapping[uuid.UUID, str]) -> Partitions:
        out: Partitions = {}
        for _ in range(self.varint() - 1):
            topic_id = uuid.UUID(bytes=self.data[self.pos : self.pos + 16])
            self.pos += 16
            ps = {self.unpack(_INT32) for _ in range(self.varint() - 1)}
            self.tags()
            name = names.get(topic_id)
            if name is not None and ps:
                out[name] = ps
        return out


def parse_key(key: bytes) -> tuple[int, str, str | None] | None:
    """(record type, group, member or regex or None) of a consumer group record; None for
    others."""
    reader = _Reader(key)
    kind = reader.unpack(_INT16)
    if kind not in RECORD_TYPES:
        return None
    group_id = reader.key_string()
    second = reader.key_string() if kind not in (GROUP_METADATA, TARGET_METADATA) else None
    return kind, group_id, second


@dataclass
class _Loaded:
    epoch: int | None = None
    assignment_epoch: int = 0
    metadata: dict[str, bytes] = field(default_factory=dict)
    target: dict[str, bytes] = field(default_factory=dict)
    current: dict[str, bytes] = field(default_factory=dict)
    regexes: dict[str, bytes] = field(default_factory=dict)


def rebuild(
    records: Iterable[tuple[bytes, bytes]],
    names: Mapping[uuid.UUID, str],
    now: float,
    now_ms: int,
) -> dict[str, ConsumerGroup]:
    """Replay the latest (key, value) of each key, tombstones already applied, into groups.
    ``now``: the loop time the members' session and revocation timeouts count from.
    Raises ``ValueError``/``struct.error``/``UnicodeDecodeError`` on a malformed record."""
    loaded: dict[str, _Loaded] = {}
    for key, value in records:
        parsed = parse_key(key)
        if parsed is None:
            continue
        kind, gid, mid = parsed
        entry = loaded.setdefault(gid, _Loaded())
        reader = _Reader(value)
        if reader.unpack(_INT16) != VALUE_VERSION:
            raise ValueError(f"record type {kind} value version is not {VALUE_VERSION}")
        if kind == GROUP_METADATA:
            entry.epoch = reader.unpack(_INT32)
        elif kind == TARGET_METADATA:
            entry.assignment_epoch = reader.unpack(_INT32)
        elif kind == REGULAR_EXPRESSION and mid is not None:
            entry.regexes[mid] = value
        elif mid is not None:
            {
                MEMBER_METADATA: entry.metadata,
                TARGET_MEMBER: entry.target,
                CURRENT_ASSIGNMENT: entry.current,
            }[kind][mid] = value
    groups: dict[str, ConsumerGroup] = {}
    for gid, entry in loaded.items():
        if entry.epoch is None:
            continue  # the group was deleted (its metadata tombstoned)
        group = ConsumerGroup(
            gid,
            group_epoch=entry.epoch,
            assignment_epoch=entry.assignment_epoch,
            state_since_ms=now_ms,
        )
        for mid, raw in entry.metadata.items():
            member = _member(mid, raw, now)
            current = entry.current.get(mid)
            if current is not None:
                _current(member, current, names, now)
            group.members[mid] = member
            if member.instance_id is not None:
                group.static_members[member.instance_id] = mid
            target = entry.target.get(mid)
            if target is not None:
                reader = _Reader(target, _INT16.size)
                group.target[mid] = reader.partitions(names)
        if entry.regexes:
            group.resolved_over = None  # checked against the topics as they are now
        for regex, raw in entry.regexes.items():
            r = _Reader(raw, _INT16.size)
            group.resolved[regex] = frozenset(
                r.compact_string() or "" for _ in range(r.varint() - 1)
            )
            group.resolved_at[regex] = (r.unpack(_INT64), r.unpack(_INT64))
        groups[gid] = group
    return groups


def _member(member_id: str, raw: bytes, now: float) -> ConsumerMember:
    r = _Reader(raw, _INT16.size)
    instance_id = r.compact_string()
    rack_id = r.compact_string()
    client_id = r.compact_string() or ""
    client_host = r.compact_string() or ""
    subscribed = tuple(r.compact_string() or "" for _ in range(r.varint() - 1))
    regex = r.compact_string()
    rebalance_timeout_ms = r.unpack(_INT32)
    assignor = r.compact_string()
    return ConsumerMember(
        member_id=member_id,
        instance_id=instance_id,
        rack_id=rack_id,
        client_id=client_id,
        client_host=client_host,
        rebalance_timeout_ms=rebalance_timeout_ms,
        subscribed=subscribed,
        regex=regex,
        server_assignor=assignor,
        last_heartbeat=now,
    )


def _current(
    member: ConsumerMember, raw: bytes, names: Mapping[uuid.UUID, str], now: float
) -> None:
    r = _Reader(raw, _INT16.size)
    member.member_epoch = r.unpack(_INT32)
    member.previous_epoch = r.unpack(_INT32)
    member.state = _STATES.get(r.unpack(_INT8), MemberState.STABLE)
    member.assigned = r.partitions(names)
    member.revoking = r.partitions(names)
    # What it was last sent is unknown: its next heartbeat is answered in full.
    member.sent = None
    if member.revoking:
        member.revoke_deadline = now + member.rebalance_timeout_ms / 1000
