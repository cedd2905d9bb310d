"""DescribeAcls (29), CreateAcls (30) and DeleteAcls (31): the ACLs as ``kafka-acls`` and
admin clients manage them.

ACLs are replicated metadata (``AlterAcls`` records through the quorum from whichever
broker is asked); ``streambus.security.authorizer`` decides with them. Versions 1-3
(Kafka 4 removed 0). With the authorizer off every call answers SECURITY_DISABLED, as
Kafka does without ``authorizer.class.name``. Describing needs DESCRIBE on the cluster,
creating and deleting ALTER on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    CreateAclsRequest,
    CreateAclsResponse,
    DeleteAclsRequest,
    DeleteAclsResponse,
    DescribeAclsRequest,
    DescribeAclsResponse,
)

from streambus.cluster.acls import (
    ALTER,
    DESCRIBE,
    AclBinding,
    AclFilter,
    check_binding,
    check_filter,
    matches,
)
from streambus.cluster.records import AlterAcls
from streambus.errors import (
    ClusterAuthorizationFailedError,
    SecurityDisabledError,
    StreamBusError,
)
from streambus.protocol.apis import ApiRoutes, RequestContext

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

routes = ApiRoutes()


def _refusal(
    services: BrokerServices, ctx: RequestContext, operation: int
) -> StreamBusError | None:
    """Why this ACL call may not proceed: the authorizer is off, or the principal lacks
    ``operation`` on the cluster; None when it may."""
    if not services.authorizer.enabled:
        return SecurityDisabledError("no authorizer is configured on the broker")
    if not services.authorizer.authorize_cluster(ctx, operation):
        return ClusterAuthorizationFailedError()
    return None


def _filter(f: Any) -> AclFilter:
    return AclFilter(
        f.resource_type_filter,
        f.resource_name_filter,
        f.pattern_type_filter,
        f.principal_filter,
        f.host_filter,
        f.operation,
        f.permission_type,
    )


@routes.api(DescribeAclsRequest, DescribeAclsResponse, versions=(1, 3))
async def handle_describe_acls(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = DescribeAclsResponse
    error = _refusal(services, ctx, DESCRIBE)
    found: dict[tuple[int, str, int], list[AclBinding]] = {}
    if error is None:
        wanted = _filter(request)
        try:
            check_filter(wanted)
        except StreamBusError as exc:
            error = exc
        else:
            for b in sorted(services.authorizer.acls):
                if matches(wanted, b):
                    found.setdefault((b.resource_type, b.resource_name, b.pattern_type), []).append(
                        b
                    )
    if error is not None:
        services.telemetry.error("DescribeAcls", error.kafka_name)
        return R(throttle_time_ms=0, error_code=error.errno, error_message=str(error), resources=[])
    return R(
        throttle_time_ms=0,
        error_code=0,
        error_message=None,
        resources=[
            R.DescribeAclsResource(
                resource_type=rtype,
                resource_name=name,
                pattern_type=pattern,
                acls=[
                    R.DescribeAclsResource.AclDescription(
                        principal=b.principal,
                        host=b.host,
                        operation=b.operation,
                        permission_type=b.permission,
                    )
                    for b in bindings
                ],
            )
            for (rtype, name, pattern), bindings in found.items()
        ],
    )


@routes.api(CreateAclsRequest, CreateAclsResponse, versions=(1, 3))
async def handle_create_acls(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = CreateAclsResponse
    error = _refusal(services, ctx, ALTER)
    results: list[StreamBusError | None] = []
    valid: list[AclBinding] = []
    for c in request.creations:
        if error is not None:
            results.append(error)
            continue
        binding = AclBinding(
            c.resource_type,
            c.resource_name,
            c.resource_pattern_type,
            c.principal,
            c.host,
            c.operation,
            c.permission_type,
        )
        try:
            check_binding(binding)
        except StreamBusError as exc:
            results.append(exc)
            continue
        results.append(None)
        valid.append(binding)
    if valid:
        outcome: StreamBusError | None
        try:
            outcome = (await services.authorizer.submit(AlterAcls(creations=tuple(valid)))).error()
        except StreamBusError as exc:
            outcome = exc
        if outcome is not None:  # one record: all of them failed alike
            results = [outcome if r is None else r for r in results]
    out = []
    for r in results:
        if r is not None:
            services.telemetry.error("CreateAcls", r.kafka_name)
        out.append(
            R.AclCreationResult(
                error_code=0 if r is None else r.errno,
                error_message=None if r is None else str(r),
            )
        )
    return R(throttle_time_ms=0, results=out)


@routes.api(DeleteAclsRequest, DeleteAclsResponse, versions=(1, 3))
async def handle_delete_acls(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = DeleteAclsResponse
    F = R.DeleteAclsFilterResult
    error = _refusal(services, ctx, ALTER)
    current = sorted(services.authorizer.acls)
    per_filter: list[tuple[StreamBusError | None, list[AclBinding]]] = []
    doomed: set[AclBinding] = set()
    for f in request.filters:
        if error is not None:
            per_filter.append((error, []))
            continue
        wanted = _filter(f)
        try:
            check_filter(wanted)
        except StreamBusError as exc:
            per_filter.append((exc, []))
            continue
        hits = [b for b in current if matches(wanted, b)]
        doomed.update(hits)
        per_filter.append((None, hits))
    if doomed:
        outcome: StreamBusError | None
        try:
            record = AlterAcls(deletions=tuple(sorted(doomed)))
            outcome = (await services.authorizer.submit(record)).error()
        except StreamBusError as exc:
            outcome = exc
        if outcome is not None:
            per_filter = [(outcome if e is None else e, []) for e, _ in per_filter]
    results = []
    for e, hits in per_filter:
        if e is not None:
            services.telemetry.error("DeleteAcls", e.kafka_name)
        results.append(
            F(
                error_code=0 if e is None else e.errno,
                error_message=None if e is None else str(e),
                matching_acls=[
                    F.DeleteAclsMatchingAcl(
                        error_code=0,
                        error_message=None,
                        resource_type=b.resource_type,
                        resource_name=b.resource_name,
                        pattern_type=b.pattern_type,
                        principal=b.principal,
                        host=b.host,
                        operation=b.operation,
                        permission_type=b.permission,
                    )
                    for b in hits
                ],
            )
        )
    return R(throttle_time_ms=0, filter_results=results)
