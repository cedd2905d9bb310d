"""CreateTopics and DeleteTopics."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
)

from streambus.errors import InvalidReplicationFactorError, InvalidRequestError, StreamBusError
from streambus.protocol.apis import ApiRoutes, RequestContext

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

# DescribeConfigs' ConfigSource values, as CreateTopics v5+ reports them.
SOURCE_TOPIC = 1
SOURCE_DEFAULT = 5


@routes.api(CreateTopicsRequest, CreateTopicsResponse, versions=(0, 7))
async def handle_create_topics(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = CreateTopicsResponse
    validate_only = bool(getattr(request, "validate_only", False))
    results = []
    for topic in request.topics:
        result = R.CreatableTopicResult(name=topic.name, error_code=0, error_message=None)
        try:
            if services.partitions.is_internal(topic.name):
                raise InvalidRequestError(f"creation of internal topic {topic.name} is prohibited")
            partitions = _partition_count(services, topic)
            overrides = {c.name: c.value for c in topic.configs}
            meta = await services.create_cluster_topic(
                topic.name, partitions, overrides, validate_only=validate_only
            )
        except StreamBusError as exc:
            services.telemetry.error("CreateTopics", exc.kafka_name)
            log.info("CreateTopics %r from %s refused: %s", topic.name, ctx.client_id, exc)
            result.error_code = exc.errno
            result.error_message = str(exc)
            results.append(result)
            continue
        if not validate_only:
            log.info(
                "created topic %r with %d partitions for %s",
                meta.name,
                len(meta.partitions),
                ctx.client_id,
            )
        result.topic_id = meta.topic_id
        result.num_partitions = len(meta.partitions)
        result.replication_factor = 1
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
    return R(throttle_time_ms=0, topics=results)


def _partition_count(services: BrokerServices, topic: Any) -> int:
    if topic.assignments:
        for assignment in topic.assignments:
            if len(assignment.broker_ids) != 1:
                raise InvalidReplicationFactorError(
                    f"assignment names brokers {list(assignment.broker_ids)}: "
                    "replication is not supported yet (one replica per partition)"
                )
        # Explicit placement is not followed yet: the partitions are placed over the
        # live brokers like any others.
        return len(topic.assignments)
    if topic.replication_factor not in (-1, 1):
        raise InvalidReplicationFactorError(
            f"replication factor {topic.replication_factor}: replication is not supported yet "
            "(one replica per partition)"
        )
    return (
        services.config.num_partitions if topic.num_partitions == -1 else int(topic.num_partitions)
    )


@routes.api(DeleteTopicsRequest, DeleteTopicsResponse, versions=(0, 6))
async def handle_delete_topics(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = DeleteTopicsResponse
    # v6 moved names into a list of (name, topic id) entries
    names = [t.name for t in request.topics] if ctx.api_version >= 6 else list(request.topic_names)
    results = []
    for name in names:
        result = R.DeletableTopicResult(name=name, error_code=0, error_message=None)
        try:
            if services.partitions.is_internal(name):
                raise InvalidRequestError(f"internal topic {name} cannot be deleted")
            result.topic_id = await services.delete_cluster_topic(name)
            log.info("deleted topic %r for %s", name, ctx.client_id)
        except StreamBusError as exc:
            services.telemetry.error("DeleteTopics", exc.kafka_name)
            log.info("DeleteTopics %r from %s refused: %s", name, ctx.client_id, exc)
            result.error_code = exc.errno
            result.error_message = str(exc)
        results.append(result)
    return R(throttle_time_ms=0, responses=results)
