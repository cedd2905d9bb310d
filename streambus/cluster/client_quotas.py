"""Client quotas in the replicated metadata: what ``AlterClientQuota`` records change.

Pure, as the rest of ``streambus.cluster``: the quota table lives in the
:class:`~streambus.cluster.state.ClusterState` every broker applies alike, and
this module only validates a record and builds the table after it.

An entity is Kafka's: one or two ``(type, name)`` pairs, types ``user`` and
``client-id``, sorted by type, or one ``ip`` alone (KIP-612); a name of None is
Kafka's default entity (``<default>``), which matches every user, client id or
address without a more specific entry. An ip entity names a literal address (Kafka
would resolve a host name; a lookup has no place in applying a record). Keys are
Kafka's quota names, each for its entity kind: byte rates, ``request_percentage``
and ``controller_mutation_rate`` for users and client ids, ``connection_creation_rate``
(connections per second, a whole number as Kafka's INT config) for ips only; values
are floats.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from streambus.cluster.records import AlterClientQuota
from streambus.errors import InvalidRequestError

USER = "user"
CLIENT_ID = "client-id"
IP = "ip"
ENTITY_TYPES = (USER, CLIENT_ID, IP)
PRODUCER_BYTE_RATE = "producer_byte_rate"
CONSUMER_BYTE_RATE = "consumer_byte_rate"
REQUEST_PERCENTAGE = "request_percentage"
CONTROLLER_MUTATION_RATE = "controller_mutation_rate"
QUOTA_KEYS = (PRODUCER_BYTE_RATE, CONSUMER_BYTE_RATE, REQUEST_PERCENTAGE, CONTROLLER_MUTATION_RATE)
CONNECTION_CREATION_RATE = "connection_creation_rate"
IP_QUOTA_KEYS = (CONNECTION_CREATION_RATE,)

# ((type, name or None for the default entity), ...) sorted by type
QuotaEntity = tuple[tuple[str, str | None], ...]
QuotaTable = Mapping[QuotaEntity, Mapping[str, float]]

EMPTY: QuotaTable = MappingProxyType({})


def check_entity(entity: QuotaEntity) -> None:
    """InvalidRequestError unless ``entity`` is one user and/or one client id, sorted, or
    one ip (a literal address, or the default)."""
    types = [t for t, _ in entity]
    if not types or len(set(types)) != len(types) or any(t not in ENTITY_TYPES for t in types):
        raise InvalidRequestError(
            f"a quota entity is a user and/or a client-id, each at most once, or an ip, "
            f"not {entity!r}"
        )
    if IP in types:
        if len(types) > 1:  # Kafka's message for the same refusal
            raise InvalidRequestError(
                "Invalid quota entity combination, IP entity should not be combined with "
                "User or ClientId entities."
            )
        name = entity[0][1]
        if name is not None and canonical_ip(name) is None:
            raise InvalidRequestError(f"{name!r} is not a valid IP address")
    if types != sorted(types):
        raise InvalidRequestError(f"quota entity {entity!r} is not sorted by type")
    for _, name in entity:
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidRequestError(f"a quota entity's name is a non-empty string: {entity!r}")


def canonical_ip(name: str) -> str | None:
    """The address as the server sees a peer's (``::1``, not ``0:0:0:0:0:0:0:1``);
    None for a name that is no literal address."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


def check_op(entity: QuotaEntity, key: str, value: float | None) -> None:
    """InvalidRequestError unless ``key`` is a quota of ``entity``'s kind and ``value``
    (None: removed) a number above 0 (whole, for a connection rate)."""
    keys = IP_QUOTA_KEYS if any(t == IP for t, _ in entity) else QUOTA_KEYS
    if key not in keys:
        raise InvalidRequestError(
            f"unknown quota key {key!r} for this entity (known: {', '.join(keys)})"
        )
    if value is not None and (not isinstance(value, int | float) or not value > 0):
        raise InvalidRequestError(f"quota {key}={value!r}: a quota is a number above 0")
    if value is not None and key == CONNECTION_CREATION_RATE and value != int(value):
        raise InvalidRequestError(f"quota {key}={value!r}: a connection rate is a whole number")


def altered(table: QuotaTable, record: AlterClientQuota) -> QuotaTable:
    """The table after ``record`` (raises InvalidRequestError, changing nothing)."""
    entity = tuple((str(t), n) for t, n in record.entity)
    check_entity(entity)
    values = dict(table.get(entity, {}))
    for key, value in record.ops:
        check_op(entity, key, value)
        if value is None:
            values.pop(key, None)
        else:
            values[key] = float(value)
    out = dict(table)
    if values:
        out[entity] = MappingProxyType(values)
    else:
        out.pop(entity, None)
    return MappingProxyType(out)


def table_to_wire(table: QuotaTable) -> list[Any]:
    """[[[[type, name], ...], {key: value}], ...] in a stable order."""
    return [
        [[list(pair) for pair in entity], dict(values)]
        for entity, values in sorted(
            table.items(), key=lambda item: [(t, n or "") for t, n in item[0]]
        )
    ]


def table_from_wire(wire: Any) -> QuotaTable:
    table: dict[QuotaEntity, Mapping[str, float]] = {}
    for entity, values in wire or ():
        key = tuple((str(t), None if n is None else str(n)) for t, n in entity)
        table[key] = MappingProxyType({str(k): float(v) for k, v in values.items()})
    return MappingProxyType(table)
