"""CreateTopics, DeleteTopics, CreatePartitions and ElectLeaders: metadata writes, each
submitted to the cluster's quorum through ``BrokerServices``.

The first three count the partitions they create or delete against the caller's
``controller_mutation_rate`` (KIP-599, ``streambus.quotas``): from the versions that
know THROTTLING_QUOTA_EXCEEDED a topic met over the quota gets it; older versions are
done and throttled."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    CreatePartitionsRequest,
    CreatePartitionsResponse,
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
    ElectLeadersRequest,
    ElectLeadersResponse,
)

from streambus.cluster import acls
from streambus.errors import (
    ClusterAuthorizationFailedError,
    InvalidReplicaAssignmentError,
    InvalidRequestError,
    StreamBusError,
    TopicAuthorizationFailedError,
)
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.quotas import MutationQuota

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

# DescribeConfigs' ConfigSource values, as CreateTopics v5+ reports them.
SOURCE_TOPIC = 1
SOURCE_DEFAULT = 5

# Per API: (first version answering THROTTLING_QUOTA_EXCEEDED, first version whose
# client waits out throttle_time_ms itself (KIP-219); below it the response is held).
CREATE_TOPICS_VERSIONS = (6, 3)
DELETE_TOPICS_VERSIONS = (5, 2)
CREATE_PARTITIONS_VERSIONS = (3, 1)


def _mutation_quota(
    services: BrokerServices, ctx: RequestContext, versions: tuple[int, int]
) -> MutationQuota:
    return services.quotas.mutation_quota(
        ctx.principal, ctx.client_id, strict=ctx.api_version >= versions[0]
    )


def _throttle(ctx: RequestContext, quota: MutationQuota, versions: tuple[int, int]) -> int:
    """The request's throttle time: in the response, and the connection muted that long."""
    ms = quota.finish()
    ctx.throttle.ms, ctx.throttle.delay_response = ms, ctx.api_version < versions[1]
    return ms


@routes.api(CreateTopicsRequest, CreateTopicsResponse, versions=(0, 7))
async def handle_create_topics(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = CreateTopicsResponse
    validate_only = bool(getattr(request, "validate_only", False))
    quota = _mutation_quota(services, ctx, CREATE_TOPICS_VERSIONS)
    results = []
    for topic in request.topics:
        result = R.CreatableTopicResult(name=topic.name, error_code=0, error_message=None)
        try:
            if not services.authorizer.may_create_topic(ctx, topic.name):
                raise TopicAuthorizationFailedError()
            if services.partitions.is_internal(topic.name):
                raise InvalidRequestError(f"creation of internal topic {topic.name} is prohibited")
            partitions, assignments = _placement(services, topic)
            overrides = {c.name: c.value for c in topic.configs}
            if not validate_only:  # Kafka counts no validation against the quota
                quota.check()
            meta = await services.create_cluster_topic(
                topic.name,
                partitions,
                overrides,
                replication_factor=int(topic.replication_factor),
                assignments=assignments,
                validate_only=validate_only,
            )
        except StreamBusError as exc:
            services.telemetry.error("CreateTopics", exc.kafka_name)
            log.info("CreateTopics %r from %s refused: %s", topic.name, ctx.client_id, exc)
            result.error_code = exc.errno
            result.error_message = str(exc)
            results.append(result)
            continue
        if not validate_only:
            quota.record(len(meta.partitions))
            log.info(
                "created topic %r with %d partitions for %s",
                meta.name,
                len(meta.partitions),
                ctx.client_id,
            )
        result.topic_id = meta.topic_id
        result.num_partitions = len(meta.partitions)
        result.replication_factor = len(meta.partitions[0].replicas)
        effective = services.partitions.topic_defaults.with_overrides(meta.configs).to_kafka()
        result.configs = [
            R.CreatableTopicResult.CreatableTopicConfigs(
                name=key,
                value=value,
                read_only=False,
                config_source=SOURCE_TOPIC if key in meta.configs else SOURCE_DEFAULT,
                is_sensitive=False,
            )
            for key, value in effective.items()
        ]
        results.append(result)
    return R(throttle_time_ms=_throttle(ctx, quota, CREATE_TOPICS_VERSIONS), topics=results)


def _placement(services: BrokerServices, topic: Any) -> tuple[int, list[list[int]] | None]:
    """The partition count, and the explicit assignment (per partition, its replicas)
    when the request gives one (Kafka's rules: then neither count nor factor is set)."""
    if not topic.assignments:
        if topic.num_partitions == -1:
            return services.config.num_partitions, None
        return int(topic.num_partitions), None
    if topic.num_partitions != -1 or topic.replication_factor != -1:
        raise InvalidRequestError(
            "both num_partitions or replication_factor and replica assignments were set; "
            "both cannot be used at the same time"
        )
    by_index = {int(a.partition_index): [int(b) for b in a.broker_ids] for a in topic.assignments}
    if sorted(by_index) != list(range(len(topic.assignments))):
        raise InvalidReplicaAssignmentError(
            f"partitions {sorted(by_index)} of the assignment are not 0..n-1, each once"
        )
    return len(by_index), [by_index[i] for i in range(len(by_index))]


@routes.api(DeleteTopicsRequest, DeleteTopicsResponse, versions=(0, 6))
async def handle_delete_topics(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = DeleteTopicsResponse
    # v6 moved names into a list of (name, topic id) entries
    names = [t.name for t in request.topics] if ctx.api_version >= 6 else list(request.topic_names)
    quota = _mutation_quota(services, ctx, DELETE_TOPICS_VERSIONS)
    results = []
    for name in names:
        result = R.DeletableTopicResult(name=name, error_code=0, error_message=None)
        try:
            services.authorizer.require(ctx, acls.DELETE, acls.TOPIC, name)
            if services.partitions.is_internal(name):
                raise InvalidRequestError(f"internal topic {name} cannot be deleted")
            known = services.quorum.state.topics.get(name)
            if known is not None:
                quota.check()
            result.topic_id = await services.delete_cluster_topic(name)
            if known is not None:
                quota.record(len(known.partitions))
            log.info("deleted topic %r for %s", name, ctx.client_id)
        except StreamBusError as exc:
            services.telemetry.error("DeleteTopics", exc.kafka_name)
            log.info("DeleteTopics %r from %s refused: %s", name, ctx.client_id, exc)
            result.error_code = exc.errno
            result.error_message = str(exc)
        results.append(result)
    return R(throttle_time_ms=_throttle(ctx, quota, DELETE_TOPICS_VERSIONS), responses=results)


@routes.api(CreatePartitionsRequest, CreatePartitionsResponse, versions=(0, 3))
async def handle_create_partitions(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = CreatePartitionsResponse
    names = [t.name for t in request.topics]
    validate_only = bool(request.validate_only)
    quota = _mutation_quota(services, ctx, CREATE_PARTITIONS_VERSIONS)
    results = []
    for topic in request.topics:
        result = R.CreatePartitionsTopicResult(name=topic.name, error_code=0, error_message=None)
        try:
            if names.count(topic.name) > 1:
                raise InvalidRequestError(f"topic {topic.name!r} appears twice in the request")
            services.authorizer.require(ctx, acls.ALTER, acls.TOPIC, topic.name)
            if services.partitions.is_internal(topic.name):
                # Growing it would move groups to other coordinator partitions.
                raise InvalidRequestError(f"internal topic {topic.name} cannot be grown")
            assignments = (
                None
                if topic.assignments is None
                else [[int(b) for b in a.broker_ids] for a in topic.assignments]
            )
            known = services.quorum.state.topics.get(topic.name)
            before = len(known.partitions) if known is not None else 0
            if not validate_only and known is not None and int(topic.count) > before:
                quota.check()
            meta = await services.create_partitions(
                topic.name, int(topic.count), assignments=assignments, validate_only=validate_only
            )
        except StreamBusError as exc:
            services.telemetry.error("CreatePartitions", exc.kafka_name)
            log.info("CreatePartitions %r from %s refused: %s", topic.name, ctx.client_id, exc)
            result.error_code = exc.errno
            result.error_message = str(exc)
        else:
            if not validate_only:
                quota.record(len(meta.partitions) - before)
                log.info(
                    "topic %r now has %d partitions (for %s)",
                    topic.name,
                    len(meta.partitions),
                    ctx.client_id,
                )
        results.append(result)
    return R(throttle_time_ms=_throttle(ctx, quota, CREATE_PARTITIONS_VERSIONS), results=results)


@routes.api(ElectLeadersRequest, ElectLeadersResponse, versions=(0, 2))
async def handle_elect_leaders(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = ElectLeadersResponse
    # v0 knows preferred elections only (its request has no type)
    election_type = int(request.election_type) if ctx.api_version >= 1 else 0
    wanted = (
        None
        if request.topic_partitions is None
        else [(t.topic, int(p)) for t in request.topic_partitions for p in t.partitions]
    )
    by_topic: dict[str, list[Any]] = {}
    if not services.authorizer.authorize_cluster(ctx, acls.ALTER):
        services.telemetry.error("ElectLeaders", ClusterAuthorizationFailedError.kafka_name)
        return R(
            throttle_time_ms=0,
            error_code=ClusterAuthorizationFailedError.errno,
            replica_election_results=[],
        )
    if election_type not in (0, 1):
        bad = InvalidRequestError(f"election type {election_type} is neither 0 nor 1")
        outcomes: list[tuple[str, int, StreamBusError | None]] = [
            (t, p, bad) for t, p in wanted or []
        ]
    else:
        outcomes = await services.elect_leaders(election_type, wanted)
    elected = 0
    for topic, partition, error in outcomes:
        if error is None:
            elected += 1
        else:
            services.telemetry.error("ElectLeaders", error.kafka_name)
        by_topic.setdefault(topic, []).append(
            R.ReplicaElectionResult.PartitionResult(
                partition_id=partition,
                error_code=0 if error is None else error.errno,
                error_message=None if error is None else str(error),
            )
        )
    log.info(
        "ElectLeaders (%s) from %s: %d of %d partitions elected",
        "unclean" if election_type == 1 else "preferred",
        ctx.client_id,
        elected,
        len(outcomes),
    )
    return R(
        throttle_time_ms=0,
        error_code=0,
        replica_election_results=[
            R.ReplicaElectionResult(topic=topic, partition_result=parts)
            for topic, parts in by_topic.items()
        ],
    )
