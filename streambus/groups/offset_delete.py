"""OffsetDelete: a group's committed offsets removed for chosen partitions, by Kafka's rules.

An empty group (members all gone, or a group that only ever committed) loses the offsets
asked for. A consumer group with members keeps those of topics a member still subscribes
to (GROUP_SUBSCRIBED_TO_TOPIC) and loses the rest; a group of another protocol type with
members is refused whole (NON_EMPTY_GROUP). Removal writes tombstones to
``__consumer_offsets``, so it outlives a restart and compaction drops the old records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from streambus.errors import GroupIdNotFoundError, GroupSubscribedToTopicError, NonEmptyGroupError
from streambus.groups.membership import Group, GroupState
from streambus.structs import TopicPartition

if TYPE_CHECKING:
    from streambus.groups.coordinator import GroupCoordinator

CONSUMER_PROTOCOL = "consumer"  # the protocol type of Kafka's consumer groups

# ConsumerProtocolSubscription (every version) starts:
#   version  int16
#   topics   int32 count, then per topic: int16 length + UTF-8 name
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")


def delete_offsets(
    coordinator: GroupCoordinator, group_id: str, tps: Iterable[TopicPartition]
) -> tuple[dict[TopicPartition, int], bool]:
    """Per partition asked, its error code (0: deleted, or it had no offset); and whether
    tombstones were written. Raises GROUP_ID_NOT_FOUND or NON_EMPTY_GROUP for the group."""
    group = coordinator.groups().get(group_id)
    if group is None or group.state is GroupState.DEAD:
        raise GroupIdNotFoundError(f"group {group_id!r} does not exist")
    committed = coordinator.committed(group_id)
    asked = list(dict.fromkeys(tps))
    errors = dict.fromkeys(asked, 0)
    if group.members:
        if group.protocol_type != CONSUMER_PROTOCOL:
            raise NonEmptyGroupError(
                f"group {group_id!r} of protocol type {group.protocol_type!r} has members"
            )
        subscribed = subscribed_topics(group)
        for tp in asked:
            if subscribed is None or tp.topic in subscribed:
                errors[tp] = GroupSubscribedToTopicError.errno
    eligible = [tp for tp in asked if not errors[tp] and tp in committed]
    removed = coordinator.offsets.delete(group_id, eligible) if eligible else 0
    return errors, removed > 0


def subscribed_topics(group: Group) -> set[str] | None:
    """The topics the group's members subscribe to, from their consumer protocol
    metadata; None when one cannot be read (then every topic counts as subscribed)."""
    topics: set[str] = set()
    for member in group.members.values():
        data = member.metadata(group.protocol) if group.protocol else b""
        if not data and member.protocols:
            data = member.protocols[0][1]
        try:
            pos = _INT16.size
            (count,) = _INT32.unpack_from(data, pos)
            pos += _INT32.size
            for _ in range(count):
                (length,) = _INT16.unpack_from(data, pos)
                pos += _INT16.size
                name = bytes(data[pos : pos + length])
                if len(name) != length:
                    return None
                topics.add(name.decode())
                pos += length
        except (struct.error, UnicodeDecodeError):
            return None
    return topics
