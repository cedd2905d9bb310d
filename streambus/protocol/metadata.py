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
from streambus.protocol.apis import APIS, RequestContext, api
from streambus.protocol.validation import is_internal_topic

if TYPE_CHECKING:
    from streambus.broker import Broker
    from streambus.storage.catalog import OfflineTopic

log = logging.getLogger("streambus.protocol")


def api_versions_response(error_code: int = 0) -> Any:
    keys = [
        ApiVersionsResponse.ApiVersion(
            api_key=spec.key, min_version=spec.min_version, max_version=spec.max_version
        )
        for spec in sorted(APIS.values(), key=lambda s: s.key)
    ]
    return ApiVersionsResponse(error_code=error_code, api_keys=keys, throttle_time_ms=0)


@api(ApiVersionsRequest, ApiVersionsResponse, versions=(0, 3))
async def handle_api_versions(broker: Broker, ctx: RequestContext, request: Any) -> Any:
    return api_versions_response()


@api(MetadataRequest, MetadataResponse, versions=(0, 12))
async def handle_metadata(broker: Broker, ctx: RequestContext, request: Any) -> Any:
    R = MetadataResponse
    version = ctx.api_version
    requested = request.topics
    if requested is None or (version == 0 and not requested):
        names = [name for name, meta in broker.logs.topics().items() if not meta.internal]
        names += [n for n, o in broker.logs.offline_topics().items() if not o.internal]
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
            if name in broker.logs.topics() or name in broker.logs.offline_topics():
                continue
            if is_internal_topic(broker, name):  # only the broker creates those
                errors[name] = UnknownTopicOrPartitionError.errno
            elif allow_create and broker.config.auto_create_topics_enable:
                try:
                    broker.create_topic(name, broker.config.num_partitions, {})
                    log.info("auto-created topic %r for %s", name, ctx.client_id)
                except StreamBusError as exc:
                    errors[name] = exc.errno
            else:
                errors[name] = UnknownTopicOrPartitionError.errno

    topics = []
    for name in names:
        error = errors.get(name, 0)
        meta = broker.logs.topics().get(name)
        offline = broker.logs.offline_topics().get(name)
        if offline is not None:
            topics.append(_offline_topic(broker, offline))
            continue
        if error or meta is None:
            error = error or UnknownTopicOrPartitionError.errno
            broker.telemetry.error("Metadata", error_name(error))
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
                leader_id=broker.broker_id,
                leader_epoch=0,
                replica_nodes=[broker.broker_id],
                isr_nodes=[broker.broker_id],
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
    host, port = broker.advertised_address
    return R(
        throttle_time_ms=0,
        brokers=[
            R.MetadataResponseBroker(node_id=broker.broker_id, host=host, port=port, rack=None)
        ],
        cluster_id=broker.cluster_id,
        controller_id=broker.broker_id,
        topics=topics,
    )


def _offline_topic(broker: Broker, offline: OfflineTopic) -> Any:
    """A topic whose files cannot be served: every partition KAFKA_STORAGE_ERROR, no leader."""
    R = MetadataResponse.MetadataResponseTopic
    broker.telemetry.error("Metadata", KafkaStorageError.kafka_name)
    partitions = [
        R.MetadataResponsePartition(
            error_code=KafkaStorageError.errno,
            partition_index=i,
            leader_id=-1,
            leader_epoch=-1,
            replica_nodes=[broker.broker_id],
            isr_nodes=[],
            offline_replicas=[broker.broker_id],
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
