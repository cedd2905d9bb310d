"""Consumer groups: Kafka's classic group protocol and durable committed offsets."""

from streambus.groups.coordinator import GroupCoordinator, GroupSettings, JoinRequest
from streambus.groups.membership import Group, GroupState, JoinResult, Member
from streambus.groups.offsets import OFFSETS_TOPIC, OffsetAndMetadata

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
