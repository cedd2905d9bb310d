"""DescribeClientQuotas (48) and AlterClientQuotas (49): the quota table, as
``kafka-configs --entity-type clients|users`` reads and writes it.

Quotas are replicated metadata (``AlterClientQuota`` records, one per entity
altered, through the quorum from whichever broker is asked) and enforced by
``streambus.quotas``. Entity types are ``user`` and ``client-id``, or ``ip``
alone (``kafka-configs --entity-type ips``); a null name is Kafka's default entity
(``<default>``). Keys: ``producer_byte_rate`` and ``consumer_byte_rate`` are
enforced, and an ip's ``connection_creation_rate`` (on accept, by the server),
``controller_mutation_rate`` (by the admin handlers) and ``request_percentage`` (by
the server, around every handler).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    AlterClientQuotasRequest,
    AlterClientQuotasResponse,
    DescribeClientQuotasRequest,
    DescribeClientQuotasResponse,
)

from streambus.cluster import acls
from streambus.cluster.client_quotas import (
    ENTITY_TYPES,
    IP,
    QuotaEntity,
    QuotaTable,
    canonical_ip,
    check_entity,
    check_op,
)
from streambus.cluster.records import AlterClientQuota
from streambus.errors import InvalidRequestError, StreamBusError
from streambus.protocol.apis import ApiRoutes, RequestContext

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

routes = ApiRoutes()

MATCH_EXACT = 0  # the entity of that type named ``match``
MATCH_DEFAULT = 1  # the default entity of that type
MATCH_ANY = 2  # any entity of that type, the default one included


@routes.api(DescribeClientQuotasRequest, DescribeClientQuotasResponse, versions=(0, 1))
async def handle_describe_client_quotas(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeClientQuotasResponse
    try:
        services.authorizer.require(ctx, acls.DESCRIBE_CONFIGS, acls.CLUSTER)
        found = describe(services.quotas.table, request.components, request.strict)
    except StreamBusError as exc:
        services.telemetry.error("DescribeClientQuotas", exc.kafka_name)
        return R(throttle_time_ms=0, error_code=exc.errno, error_message=str(exc), entries=None)
    return R(
        throttle_time_ms=0,
        error_code=0,
        error_message=None,
        entries=[
            R.EntryData(
                entity=[R.EntryData.EntityData(entity_type=t, entity_name=n) for t, n in entity],
                values=[R.EntryData.ValueData(key=k, value=v) for k, v in sorted(values.items())],
            )
            for entity, values in found
        ],
    )


def describe(
    table: QuotaTable, components: Any, strict: bool
) -> list[tuple[QuotaEntity, dict[str, float]]]:
    """The entries matching every component (and, ``strict``, naming no other type)."""
    wanted: dict[str, tuple[int, str | None]] = {}
    for c in components:
        if c.entity_type not in ENTITY_TYPES:
            raise InvalidRequestError(f"unknown quota entity type {c.entity_type!r}")
        if c.entity_type in wanted:
            raise InvalidRequestError(f"entity type {c.entity_type!r} named twice")
        if c.match_type == MATCH_EXACT and c.match is None:
            raise InvalidRequestError("an EXACT match needs a name")
        match = c.match
        if c.entity_type == IP and c.match_type == MATCH_EXACT:
            match = canonical_ip(match) or match  # as the table keeps it
        if c.match_type not in (MATCH_EXACT, MATCH_DEFAULT, MATCH_ANY):
            raise InvalidRequestError(f"unknown match type {c.match_type}")
        wanted[c.entity_type] = (c.match_type, match)
    out = []
    for entity, values in sorted(table.items(), key=lambda e: [(t, n or "") for t, n in e[0]]):
        names = dict(entity)
        if strict and set(names) != set(wanted):
            continue
        if all(_matches(names, t, m) for t, m in wanted.items()):
            out.append((entity, dict(values)))
    return out


def _matches(names: dict[str, str | None], entity_type: str, match: tuple[int, str | None]) -> bool:
    if entity_type not in names:
        return False
    kind, name = match
    if kind == MATCH_EXACT:
        return names[entity_type] == name
    if kind == MATCH_DEFAULT:
        return names[entity_type] is None
    return True


@routes.api(AlterClientQuotasRequest, AlterClientQuotasResponse, versions=(0, 1))
async def handle_alter_client_quotas(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = AlterClientQuotasResponse
    entries = []
    for entry in request.entries:
        pairs = [(e.entity_type, e.entity_name) for e in entry.entity]
        error: StreamBusError | None = None
        try:
            services.authorizer.require(ctx, acls.ALTER_CONFIGS, acls.CLUSTER)
            record = _record(pairs, entry.ops)
            if not request.validate_only:
                result = await services.quotas.submit(record)
                error = result.error()
        except StreamBusError as exc:
            error = exc
        if error is not None:
            services.telemetry.error("AlterClientQuotas", error.kafka_name)
        entries.append(
            R.EntryData(
                error_code=0 if error is None else error.errno,
                error_message=None if error is None else str(error),
                entity=[R.EntryData.EntityData(entity_type=t, entity_name=n) for t, n in pairs],
            )
        )
    return R(throttle_time_ms=0, entries=entries)


def _record(pairs: list[tuple[str, str | None]], ops: Any) -> AlterClientQuota:
    entity: QuotaEntity = tuple(sorted(pairs, key=lambda p: p[0]))
    check_entity(entity)
    if entity[0][0] == IP and entity[0][1] is not None:  # one form per address
        entity = ((IP, canonical_ip(entity[0][1])),)
    changes: dict[str, float | None] = {}
    for op in ops:
        if op.key in changes:
            raise InvalidRequestError(f"quota key {op.key!r} altered twice in one entry")
        value = None if op.remove else float(op.value)
        check_op(entity, op.key, value)
        changes[op.key] = value
    return AlterClientQuota(entity, tuple(sorted(changes.items())))
