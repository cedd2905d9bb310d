"""ApiVersions and Metadata: how clients learn what this broker serves and hosts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from kafka.protocol.admin import DescribeClusterRequest, DescribeClusterResponse
from kafka.protocol.metadata import (
    ApiVersionsRequest,
    ApiVersionsResponse,
    MetadataRequest,
    MetadataResponse,
)

from streambus.cluster import acls
from streambus.errors import (
    InvalidRequestError,
    KafkaStorageError,
    LeaderNotAvailableError,
    MismatchedEndpointTypeError,
    StreamBusError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    UnsupportedEndpointTypeError,
    error_name,
)
from streambus.protocol.apis import ApiRoutes, RequestContext, api_versions_response

if TYPE_CHECKING:
    from streambus.partitions import OfflineTopic
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
DESCRIBE, TOPIC = acls.DESCRIBE, acls.TOPIC
routes = ApiRoutes()

# Authorized operations (KIP-430): a 32-bit field of Kafka's AclOperation codes, here the
# set of codes (the protocol library packs it; None is Kafka's "not requested", bit 31).
# With no authorizer Kafka allows every operation its ACLs know for the resource type.
#   topic:   READ 3, WRITE 4, CREATE 5, DELETE 6, ALTER 7, DESCRIBE 8,
#            DESCRIBE_CONFIGS 10, ALTER_CONFIGS 11                      (bit field 3576)
#   cluster: CREATE 5, ALTER 7, DESCRIBE 8, CLUSTER_ACTION 9, DESCRIBE_CONFIGS 10,
#            ALTER_CONFIGS 11, IDEMPOTENT_WRITE 12                      (bit field 8096)
TOPIC_OPERATIONS = frozenset({3, 4, 5, 6, 7, 8, 10, 11})
CLUSTER_OPERATIONS = frozenset({5, 7, 8, 9, 10, 11, 12})


def _operations(
    asked: Any,
    operations: frozenset[int],
    services: BrokerServices | None = None,
    ctx: RequestContext | None = None,
    resource: tuple[int, str] = (acls.CLUSTER, acls.CLUSTER_NAME),
) -> set[int] | None:
    """The operations ``ctx`` may do to ``resource`` (all of them with no authorizer)."""
    if not asked:
        return None
    if services is None or ctx is None:
        return set(operations)
    return services.authorizer.authorized_operations(ctx, *resource, operations)


@routes.api(ApiVersionsRequest, ApiVersionsResponse, versions=(0, 3))
async def handle_api_versions(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    return api_versions_response(ctx.apis)


@routes.api(MetadataRequest, MetadataResponse, versions=(0, 12))
async def handle_metadata(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = MetadataResponse
    version = ctx.api_version
    requested = request.topics
    cluster = services.quorum.state
    authz = services.authorizer
    offline_here = services.partitions.offline_topics()
    if requested is None or (version == 0 and not requested):
        names = [name for name, t in cluster.topics.items() if not t.internal]
        names += [n for n, o in offline_here.items() if not o.internal and n not in names]
        if authz.enabled:  # a listing shows only what the principal may describe
            names = [n for n in names if authz.authorize(ctx, DESCRIBE, TOPIC, n, quiet=True)]
        errors: dict[str, int] = {}
    else:
        names = []
        errors = {}
        # v4+ lets the client forbid auto-creation; before v4 it was always allowed.
        allow_create = version < 4 or bool(request.allow_auto_topic_creation)
        by_id = {t.topic_id: n for n, t in cluster.topics.items()} if version >= 10 else {}
        for entry in requested:
            name = entry.name
            if name is None:  # v10+: named by id (KIP-848 consumers learn ids first)
                name = by_id.get(entry.topic_id)
                if name is None or name in names:
                    continue
                names.append(name)
                continue
            names.append(name)
            if not authz.authorize(ctx, DESCRIBE, TOPIC, name):
                errors[name] = TopicAuthorizationFailedError.errno
                continue
            if name in cluster.topics or name in offline_here:
                continue
            if services.partitions.is_internal(name):  # only the broker creates those
                errors[name] = UnknownTopicOrPartitionError.errno
            elif allow_create and services.config.auto_create_topics_enable:
                if not authz.may_create_topic(ctx, name):
                    errors[name] = TopicAuthorizationFailedError.errno
                    continue
                try:
                    await services.create_cluster_topic(name, services.config.num_partitions, {})
                    log.info("auto-created topic %r for %s", name, ctx.client_id)
                except StreamBusError as exc:
                    errors[name] = exc.errno
            else:
                errors[name] = UnknownTopicOrPartitionError.errno

    cluster = services.quorum.state  # as it is after any auto-creation
    topic_ops = _operations(
        getattr(request, "include_topic_authorized_operations", False), TOPIC_OPERATIONS
    )
    topics = []
    for name in names:
        error = errors.get(name, 0)
        meta = cluster.topics.get(name)
        offline = offline_here.get(name)
        if offline is not None:
            topics.append(_offline_topic(services, offline))
            continue
        if error or meta is None:
            error = error or UnknownTopicOrPartitionError.errno
            services.telemetry.error("Metadata", error_name(error))
            topics.append(
                R.MetadataResponseTopic(
                    error_code=error,
                    name=name,
                    is_internal=False,
                    partitions=[],
                )
            )
            continue
        partitions = []
        for i, p in enumerate(meta.partitions):
            code = 0 if p.leader >= 0 else LeaderNotAvailableError.errno
            if code:
                services.telemetry.error("Metadata", LeaderNotAvailableError.kafka_name)
            partitions.append(
                R.MetadataResponseTopic.MetadataResponsePartition(
                    error_code=code,
                    partition_index=i,
                    leader_id=p.leader,
                    leader_epoch=p.leader_epoch,
                    replica_nodes=list(p.replicas),
                    isr_nodes=list(p.isr),
                    offline_replicas=[b for b in p.replicas if not cluster.is_live(b)],
                )
            )
        topics.append(
            R.MetadataResponseTopic(
                error_code=0,
                name=name,
                topic_id=meta.topic_id,
                is_internal=meta.internal,
                partitions=partitions,
                authorized_operations=topic_ops
                if topic_ops is None or not authz.enabled
                else _operations(True, TOPIC_OPERATIONS, services, ctx, (TOPIC, name)),
            )
        )
    fields: dict[str, Any] = {}
    if 8 <= version <= 10:
        fields["authorized_operations"] = _operations(
            request.include_cluster_authorized_operations, CLUSTER_OPERATIONS, services, ctx
        )
    return R(
        throttle_time_ms=0,
        brokers=[
            R.MetadataResponseBroker(node_id=b.node_id, host=b.host, port=b.port, rack=None)
            for b in live_brokers(services, ctx.listener)
        ],
        cluster_id=services.cluster_id,
        controller_id=services.controller_id(),
        topics=topics,
        **fields,
    )


class _Node(NamedTuple):
    node_id: int
    host: str
    port: int


def live_brokers(services: BrokerServices, listener: str) -> list[_Node]:
    """The registered, unfenced brokers; this one too while its registration is on the
    way (a client that reached it can always be told about it). Each at its address on the
    client's ``listener``, as every broker registers its listeners."""
    own = services.broker_id
    nodes = []
    for b in services.quorum.state.live_brokers():
        found = b.address(listener) if b.broker_id != own else None
        if found is not None:  # a broker without this listener is not listed, as in Kafka
            nodes.append(_Node(b.broker_id, *found))
    host, port = services.listener_address(listener)
    nodes.append(_Node(own, host, port))
    nodes.sort()
    return nodes


# DescribeCluster's endpoint types (KIP-919, v1+). StreamBus brokers serve clients; the
# Raft quorum between them is no Kafka controller listener, so a client asking this
# endpoint for controllers (`--bootstrap-controller`) is told it reached a broker, as a
# Kafka broker tells it.
BROKER_ENDPOINT, CONTROLLER_ENDPOINT = 1, 2
ENDPOINT_NAMES = {BROKER_ENDPOINT: "BROKER", CONTROLLER_ENDPOINT: "CONTROLLER"}


# v1 adds the endpoint type; v2 lists fenced brokers too, flagged, when asked (KIP-1073:
# `kafka-cluster list-endpoints --include-fenced-brokers`).
@routes.api(DescribeClusterRequest, DescribeClusterResponse, versions=(0, 2))
async def handle_describe_cluster(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeClusterResponse
    version = ctx.api_version
    wanted = getattr(request, "endpoint_type", BROKER_ENDPOINT) if version >= 1 else 1
    error: StreamBusError | None = None
    if wanted not in ENDPOINT_NAMES:  # Kafka's AuthHelper.computeDescribeClusterResponse
        error = (UnsupportedEndpointTypeError if version else InvalidRequestError)(
            f"Unsupported endpoint type {wanted}"
        )
    elif wanted != BROKER_ENDPOINT:
        error = (MismatchedEndpointTypeError if version else InvalidRequestError)(
            "The request was sent to an endpoint of type BROKER, but we wanted an endpoint "
            f"of type {ENDPOINT_NAMES[wanted]}"
        )
    if error is not None:
        services.telemetry.error("DescribeCluster", error.kafka_name)
        return R(
            throttle_time_ms=0,
            error_code=error.errno,
            error_message=error.message,
            endpoint_type=BROKER_ENDPOINT,
            cluster_id="",
            controller_id=-1,
            brokers=[],
            authorized_operations=None,
        )
    fenced = version >= 2 and request.include_fenced_brokers
    nodes = [(b, False) for b in live_brokers(services, ctx.listener)]
    if fenced:
        nodes += [(b, True) for b in fenced_brokers(services, ctx.listener)]
        nodes.sort()
    controller = services.controller_id()
    return R(
        throttle_time_ms=0,
        error_code=0,
        error_message=None,
        endpoint_type=BROKER_ENDPOINT,
        cluster_id=services.cluster_id,
        # Kafka answers -1 for a controller the client could not find among the brokers
        controller_id=controller if any(b.node_id == controller for b, _ in nodes) else -1,
        brokers=[
            R.DescribeClusterBroker(
                broker_id=b.node_id, host=b.host, port=b.port, rack=None, is_fenced=is_fenced
            )
            for b, is_fenced in nodes
        ],
        authorized_operations=_operations(
            request.include_cluster_authorized_operations, CLUSTER_OPERATIONS, services, ctx
        ),
    )


def fenced_brokers(services: BrokerServices, listener: str) -> list[_Node]:
    """The registered brokers that are fenced (not heartbeating), at their address on
    ``listener``; never this one, which answers and so is not fenced to its clients."""
    own = services.broker_id
    nodes = []
    for b in services.quorum.state.brokers.values():
        found = b.address(listener) if b.fenced and b.broker_id != own else None
        if found is not None:
            nodes.append(_Node(b.broker_id, *found))
    return sorted(nodes)


def _offline_topic(services: BrokerServices, offline: OfflineTopic) -> Any:
    """A topic whose files cannot be served: every partition KAFKA_STORAGE_ERROR, no leader."""
    R = MetadataResponse.MetadataResponseTopic
    services.telemetry.error("Metadata", KafkaStorageError.kafka_name)
    partitions = [
        R.MetadataResponsePartition(
            error_code=KafkaStorageError.errno,
            partition_index=i,
            leader_id=-1,
            leader_epoch=-1,
            replica_nodes=[services.broker_id],
            isr_nodes=[],
            offline_replicas=[services.broker_id],
        )
        for i in range(offline.partitions)
    ]
    return R(
        # With no partition to carry the error, the topic carries it.
        error_code=0 if partitions else KafkaStorageError.errno,
        name=offline.name,
        topic_id=offline.topic_id,
        is_internal=offline.internal,
        partitions=partitions,
    )
