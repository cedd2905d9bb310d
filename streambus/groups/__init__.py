"""Consumer groups: Kafka's classic group protocol and durable committed offsets."""

from streambus.groups.coordinator import GroupCoordinator, GroupSettings, JoinRequest
from streambus.groups.membership import Group, GroupState, JoinResult, Member
from streambus.groups.offsets import OffsetAndMetadata
from streambus.partitions import OFFSETS_TOPIC

__all__ = [
    "OFFSETS_TOPIC",
    "Group",
    "GroupCoordinator",
    "GroupSettings",
    "GroupState",
    "JoinRequest",
    "JoinResult",
    "Member",
    "OffsetAndMetadata",
]
