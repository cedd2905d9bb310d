"""Message classes for the KIP-848 group APIs: ConsumerGroupHeartbeat (68) and
ConsumerGroupDescribe (69).

kafka-python 3.0.12 ships no classes for them. Its message classes are built by a
metaclass from Kafka's JSON message specs; :class:`_DeclaredSchema` feeds that same
metaclass a schema declared here instead of a JSON file it ships, so encoding,
decoding, compact types and tagged fields all come from kafka-python's code.

The declarations follow Kafka 4.4's message specs at the versions its Java consumer
and librdkafka 2.x negotiate: both APIs are flexible from v0. ConsumerGroupHeartbeat
v1 adds the subscribed regex (and the client chooses its member id); ConsumerGroupDescribe
v1 adds each member's type.
"""

from __future__ import annotations

from typing import Any

from kafka.protocol.api_message import ApiMessage, ApiMessageData
from kafka.protocol.data_container import SlotsBuilder
from kafka.protocol.schemas import StructField

__all__ = [
    "ConsumerGroupDescribeRequest",
    "ConsumerGroupDescribeResponse",
    "ConsumerGroupHeartbeatRequest",
    "ConsumerGroupHeartbeatResponse",
]


class _DeclaredSchema(ApiMessageData):  # type: ignore[misc]  # kafka-python is untyped
    """kafka-python's message metaclass, given the schema as a class keyword."""

    def __new__(
        mcs,
        name: str,
        bases: tuple[type, ...],
        attrs: dict[str, Any],
        schema: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Any:
        attrs["_json"] = schema
        attrs["_struct"] = StructField(schema)
        return SlotsBuilder.__new__(mcs, name, bases, attrs, **kw)

    def __init__(
        cls,  # noqa: N805  # a metaclass's instance is a class
        name: str,
        bases: tuple[type, ...],
        attrs: dict[str, Any],
        schema: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, bases, attrs, **kw)


def _field(
    name: str,
    type_: str,
    *,
    versions: str = "0+",
    nullable: str | None = None,
    default: Any = None,
    fields: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": type_, "versions": versions}
    if nullable is not None:
        out["nullableVersions"] = nullable
    if default is not None:
        out["default"] = default
    if fields is not None:
        out["fields"] = fields
    return out


def _message(api_key: int, kind: str, name: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiKey": api_key,
        "type": kind,
        "name": name,
        "validVersions": "0-1",
        "flexibleVersions": "0+",
        "fields": fields,
    }


def _nullable_string(name: str, versions: str = "0+") -> dict[str, Any]:
    return _field(name, "string", versions=versions, nullable=versions, default="null")


# The partitions of one topic, named by topic id (the heartbeat speaks ids, not names).
def _heartbeat_partitions() -> list[dict[str, Any]]:
    return [_field("TopicId", "uuid"), _field("Partitions", "[]int32")]


_HEARTBEAT_REQUEST = _message(
    68,
    "request",
    "ConsumerGroupHeartbeatRequest",
    [
        _field("GroupId", "string"),
        _field("MemberId", "string"),
        # 0 joins, -1 leaves, -2 a static member leaving that will come back
        _field("MemberEpoch", "int32"),
        # The optional fields are null when unchanged since the member's last heartbeat.
        _nullable_string("InstanceId"),
        _nullable_string("RackId"),
        _field("RebalanceTimeoutMs", "int32", default=-1),
        _field("SubscribedTopicNames", "[]string", nullable="0+", default="null"),
        _nullable_string("SubscribedTopicRegex", versions="1+"),
        _nullable_string("ServerAssignor"),
        # The partitions the member owns: how the coordinator learns a revocation is done.
        _field(
            "TopicPartitions",
            "[]TopicPartitions",
            nullable="0+",
            default="null",
            fields=_heartbeat_partitions(),
        ),
    ],
)

_HEARTBEAT_RESPONSE = _message(
    68,
    "response",
    "ConsumerGroupHeartbeatResponse",
    [
        _field("ThrottleTimeMs", "int32"),
        _field("ErrorCode", "int16"),
        _nullable_string("ErrorMessage"),
        _nullable_string("MemberId"),
        _field("MemberEpoch", "int32"),
        _field("HeartbeatIntervalMs", "int32"),
        # null: the assignment did not change since the member's last heartbeat
        _field(
            "Assignment",
            "Assignment",
            nullable="0+",
            default="null",
            fields=[_field("TopicPartitions", "[]TopicPartitions", fields=_heartbeat_partitions())],
        ),
    ],
)

_DESCRIBE_REQUEST = _message(
    69,
    "request",
    "ConsumerGroupDescribeRequest",
    [_field("GroupIds", "[]string"), _field("IncludeAuthorizedOperations", "bool")],
)


def _described_assignment() -> list[dict[str, Any]]:
    return [
        _field(
            "TopicPartitions",
            "[]TopicPartitions",
            fields=[
                _field("TopicId", "uuid"),
                _field("TopicName", "string"),
                _field("Partitions", "[]int32"),
            ],
        )
    ]


_DESCRIBE_RESPONSE = _message(
    69,
    "response",
    "ConsumerGroupDescribeResponse",
    [
        _field("ThrottleTimeMs", "int32"),
        _field(
            "Groups",
            "[]DescribedGroup",
            fields=[
                _field("ErrorCode", "int16"),
                _nullable_string("ErrorMessage"),
                _field("GroupId", "string"),
                _field("GroupState", "string"),
                _field("GroupEpoch", "int32"),
                _field("AssignmentEpoch", "int32"),
                _field("AssignorName", "string"),
                _field(
                    "Members",
                    "[]Member",
                    fields=[
                        _field("MemberId", "string"),
                        _nullable_string("InstanceId"),
                        _nullable_string("RackId"),
                        _field("MemberEpoch", "int32"),
                        _field("ClientId", "string"),
                        _field("ClientHost", "string"),
                        _field("SubscribedTopicNames", "[]string"),
                        _nullable_string("SubscribedTopicRegex"),
                        _field("Assignment", "Assignment", fields=_described_assignment()),
                        _field("TargetAssignment", "Assignment", fields=_described_assignment()),
                        # -1 unknown, 0 classic member, 1 consumer member
                        _field("MemberType", "int8", versions="1+", default="-1"),
                    ],
                ),
                _field("AuthorizedOperations", "int32", default="-2147483648"),
            ],
        ),
    ],
)


def _declare(schema: dict[str, Any]) -> Any:
    return _DeclaredSchema(schema["name"], (ApiMessage,), {"__module__": __name__}, schema=schema)


ConsumerGroupHeartbeatRequest = _declare(_HEARTBEAT_REQUEST)
ConsumerGroupHeartbeatResponse = _declare(_HEARTBEAT_RESPONSE)
ConsumerGroupDescribeRequest = _declare(_DESCRIBE_REQUEST)
ConsumerGroupDescribeResponse = _declare(_DESCRIBE_RESPONSE)
