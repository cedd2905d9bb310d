"""ACLs in the replicated metadata: what ``AlterAcls`` records change.

Pure, as the rest of ``streambus.cluster``: the ACL set lives in the
:class:`~streambus.cluster.state.ClusterState` every broker applies alike; this
module names Kafka's codes, validates bindings, applies a record and matches
Kafka's binding filters (``DescribeAcls``/``DeleteAcls``). Deciding a request is
``streambus.security.authorizer``'s.

A binding is Kafka's ``AclBinding`` as one tuple of its wire values, so a set of
them is hashable, comparable and cheap to replicate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from streambus.cluster.records import AlterAcls
from streambus.errors import InvalidRequestError

# Kafka's ResourceType codes
RESOURCE_ANY, TOPIC, GROUP, CLUSTER, TRANSACTIONAL_ID = 1, 2, 3, 4, 5
RESOURCE_NAMES = {
    TOPIC: "TOPIC",
    GROUP: "GROUP",
    CLUSTER: "CLUSTER",
    TRANSACTIONAL_ID: "TRANSACTIONAL_ID",
}
CLUSTER_NAME = "kafka-cluster"  # the one name of the CLUSTER resource
# Kafka's PatternType codes
PATTERN_ANY, PATTERN_MATCH, LITERAL, PREFIXED = 1, 2, 3, 4
WILDCARD = "*"  # a LITERAL name matching every resource of its type; also "every host"
WILDCARD_PRINCIPAL = "User:*"
# Kafka's AclOperation codes
OP_ANY, ALL, READ, WRITE, CREATE, DELETE, ALTER, DESCRIBE = 1, 2, 3, 4, 5, 6, 7, 8
CLUSTER_ACTION, DESCRIBE_CONFIGS, ALTER_CONFIGS, IDEMPOTENT_WRITE = 9, 10, 11, 12
OPERATION_NAMES = {
    ALL: "ALL",
    READ: "READ",
    WRITE: "WRITE",
    CREATE: "CREATE",
    DELETE: "DELETE",
    ALTER: "ALTER",
    DESCRIBE: "DESCRIBE",
    CLUSTER_ACTION: "CLUSTER_ACTION",
    DESCRIBE_CONFIGS: "DESCRIBE_CONFIGS",
    ALTER_CONFIGS: "ALTER_CONFIGS",
    IDEMPOTENT_WRITE: "IDEMPOTENT_WRITE",
}
# Kafka's AclPermissionType codes
PERMISSION_ANY, DENY, ALLOW = 1, 2, 3

# The operations an ALLOW on the key also grants (Kafka's implied operations): who may
# read, write, delete or alter a resource may describe it; altering configs implies
# describing them. ALL grants everything.
IMPLIED_BY: dict[int, frozenset[int]] = {
    DESCRIBE: frozenset({DESCRIBE, READ, WRITE, DELETE, ALTER, ALL}),
    DESCRIBE_CONFIGS: frozenset({DESCRIBE_CONFIGS, ALTER_CONFIGS, ALL}),
}


class AclBinding(NamedTuple):
    resource_type: int
    resource_name: str
    pattern_type: int  # LITERAL or PREFIXED
    principal: str  # "User:alice", or "User:*"
    host: str  # an exact IP, or "*"
    operation: int
    permission: int  # ALLOW or DENY


class AclFilter(NamedTuple):
    """Kafka's ``AclBindingFilter``: None and the ANY codes match everything."""

    resource_type: int
    resource_name: str | None
    pattern_type: int
    principal: str | None
    host: str | None
    operation: int
    permission: int


AclSet = frozenset[AclBinding]
EMPTY: AclSet = frozenset()


def check_binding(b: AclBinding) -> None:
    """InvalidRequestError unless ``b`` is a complete binding Kafka would store."""
    if b.resource_type not in RESOURCE_NAMES:
        raise InvalidRequestError(f"resource type {b.resource_type} cannot hold an ACL")
    if b.pattern_type not in (LITERAL, PREFIXED):
        raise InvalidRequestError(
            f"an ACL's pattern type is LITERAL or PREFIXED, not {b.pattern_type}"
        )
    if not isinstance(b.resource_name, str) or not b.resource_name:
        raise InvalidRequestError("an ACL's resource name is a non-empty string")
    if b.resource_type == CLUSTER and b.resource_name != CLUSTER_NAME:
        raise InvalidRequestError(f"the only valid name for the CLUSTER resource is {CLUSTER_NAME}")
    if b.pattern_type == PREFIXED and b.resource_name == WILDCARD:
        raise InvalidRequestError("a PREFIXED ACL cannot name the wildcard '*'")
    kind, sep, name = str(b.principal).partition(":")
    if not sep or not kind or not name:
        raise InvalidRequestError(f"principal {b.principal!r} is not of the form Type:name")
    if not isinstance(b.host, str) or not b.host:
        raise InvalidRequestError("an ACL's host is '*' or an address")
    if b.operation not in OPERATION_NAMES:
        raise InvalidRequestError(f"unknown or unstorable ACL operation {b.operation}")
    if b.permission not in (ALLOW, DENY):
        raise InvalidRequestError(f"an ACL's permission is ALLOW or DENY, not {b.permission}")


def check_filter(f: AclFilter) -> None:
    """InvalidRequestError for a filter with an unknown (0) or out-of-range code."""
    if f.resource_type != RESOURCE_ANY and f.resource_type not in RESOURCE_NAMES:
        raise InvalidRequestError(f"unknown resource type filter {f.resource_type}")
    if f.pattern_type not in (PATTERN_ANY, PATTERN_MATCH, LITERAL, PREFIXED):
        raise InvalidRequestError(f"unknown pattern type filter {f.pattern_type}")
    if f.operation != OP_ANY and f.operation not in OPERATION_NAMES:
        raise InvalidRequestError(f"unknown operation filter {f.operation}")
    if f.permission not in (PERMISSION_ANY, ALLOW, DENY):
        raise InvalidRequestError(f"unknown permission type filter {f.permission}")


def matches(f: AclFilter, b: AclBinding) -> bool:
    """Kafka's ``AclBindingFilter.matches``, MATCH included: a MATCH filter naming a
    resource finds every binding that applies to it (its literal, the wildcard, and
    each prefix of it)."""
    if f.resource_type not in (RESOURCE_ANY, b.resource_type):
        return False
    if f.pattern_type not in (PATTERN_ANY, PATTERN_MATCH) and f.pattern_type != b.pattern_type:
        return False
    if f.resource_name is not None:
        if f.pattern_type in (PATTERN_ANY, b.pattern_type):
            if f.resource_name != b.resource_name:
                return False
        elif b.pattern_type == LITERAL:  # MATCH against a literal
            if b.resource_name not in (f.resource_name, WILDCARD):
                return False
        elif not f.resource_name.startswith(b.resource_name):  # MATCH against a prefix
            return False
    if f.principal is not None and f.principal != b.principal:
        return False
    if f.host is not None and f.host != b.host:
        return False
    if f.operation not in (OP_ANY, b.operation):
        return False
    return f.permission in (PERMISSION_ANY, b.permission)


def altered(acls: AclSet, record: AlterAcls) -> AclSet:
    """The set after ``record``: its deletions removed, then its creations added
    (raises InvalidRequestError, changing nothing)."""
    add = [AclBinding(*b) for b in record.creations]
    for b in add:
        check_binding(b)
    return (acls - {AclBinding(*b) for b in record.deletions}) | frozenset(add)


def to_wire(acls: AclSet) -> list[list[Any]]:
    return [list(b) for b in sorted(acls)]


def from_wire(wire: Any) -> AclSet:
    return frozenset(
        AclBinding(int(b[0]), str(b[1]), int(b[2]), str(b[3]), str(b[4]), int(b[5]), int(b[6]))
        for b in wire or ()
    )
