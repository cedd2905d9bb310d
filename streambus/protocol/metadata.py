"""ApiVersions and Metadata: how clients learn what this broker serves and hosts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kafka.protocol.metadata import (
    ApiVersionsRequest,
    ApiVersionsResponse,
    MetadataRequest,
    MetadataResponse,
)

from streambus.errors import (
    KafkaStorageError,
    StreamBusError,
    UnknownTopicOrPartitionError,
    error_name,
)
from streambus.protocol.apis import ApiRoutes, RequestContext, api_versions_response

if TYPE_CHECKING:
    from streambus.partitions import OfflineTopic
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()


@routes.api(ApiVersionsRequest, ApiVersionsResponse, versions=(0, 3))
async def handle_api_versions(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    return api_versions_response(ctx.apis)


@routes.api(MetadataRequest, MetadataResponse, versions=(0, 12))
async def handle_metadata(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = MetadataResponse
    version = ctx.api_version
    requested = request.topics
    if requested is None or (version == 0 and not requested):
        names = [name for name, meta in services.partitions.topics().items() if not meta.internal]
        names += [n for n, o in services.partitions.offline_topics().items() if not o.internal]
        errors: dict[str, int] = {}
    else:
        names = []
        errors = {}
        # v4+ lets the client forbid auto-creation; before v4 it was always allowed.
        allow_create = version < 4 or bool(request.allow_auto_topic_creation)
        for entry in requested:
            name = entry.name
            if name is None:
                continue
            names.append(name)
            if name in services.partitions.topics() or name in services.partitions.offline_topics():
                continue
            if services.partitions.is_internal(name):  # only the broker creates those
                errors[name] = UnknownTopicOrPartitionError.errno
            elif allow_create and services.config.auto_create_topics_enable:
                try:
                    services.create_topic(name, services.config.num_partitions, {})
                    log.info("auto-created topic %r for %s", name, ctx.client_id)
                except StreamBusError as exc:
                    errors[name] = exc.errno
            else:
                errors[name] = UnknownTopicOrPartitionError.errno

    topics = []
    for name in names:
        error = errors.get(name, 0)
        meta = services.partitions.topics().get(name)
        offline = services.partitions.offline_topics().get(name)
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
        partitions = [
            R.MetadataResponseTopic.MetadataResponsePartition(
                error_code=0,
                partition_index=i,
                leader_id=services.broker_id,
                leader_epoch=0,
                replica_nodes=[services.broker_id],
                isr_nodes=[services.broker_id],
                offline_replicas=[],
            )
            for i in range(meta.partitions)
        ]
        topics.append(
            R.MetadataResponseTopic(
                error_code=0,
                name=name,
                topic_id=meta.topic_id,
                is_internal=meta.internal,
                partitions=partitions,
            )
        )
    host, port = services.advertised_address
    return R(
        throttle_time_ms=0,
        brokers=[
            R.MetadataResponseBroker(node_id=services.broker_id, host=host, port=port, rack=None)
        ],
        cluster_id=services.cluster_id,
        controller_id=services.broker_id,
        topics=topics,
    )


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
