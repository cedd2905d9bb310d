"""OffsetForLeaderEpoch: where a leader epoch ends in this leader's log.

A follower asks it before fetching after a leader change, and truncates its copy to
the answer, so no replica keeps records the leader does not have (KIP-101/KIP-279).
Consumers ask it too (KIP-320) to detect a log truncated under them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kafka.protocol.consumer import OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse

from streambus.cluster import acls
from streambus.errors import ClusterAuthorizationFailedError, StreamBusError
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.structs import TopicPartition

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

routes = ApiRoutes()
R = OffsetForLeaderEpochResponse


@routes.api(OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, versions=(2, 4))
async def handle_offset_for_leader_epoch(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    # A follower (replica_id >= 0, v3+) needs CLUSTER_ACTION; a client DESCRIBE on the topic.
    replica = ctx.api_version >= 3 and request.replica_id >= 0
    from_replica = replica and services.authorizer.authorize_cluster(ctx, acls.CLUSTER_ACTION)
    topics = []
    for topic in request.topics:
        parts = []
        for p in topic.partitions:
            error, epoch, end = 0, -1, -1
            try:
                if replica and not from_replica:
                    raise ClusterAuthorizationFailedError()
                if not replica:
                    services.authorizer.require(ctx, acls.DESCRIBE, acls.TOPIC, topic.topic)
                tp = TopicPartition(topic.topic, p.partition)
                epoch, end = services.partitions.leader_epoch_end(
                    tp, p.current_leader_epoch, p.leader_epoch
                )
            except StreamBusError as exc:
                error = exc.errno
                services.telemetry.error("OffsetForLeaderEpoch", exc.kafka_name)
            parts.append(
                R.OffsetForLeaderTopicResult.EpochEndOffset(
                    error_code=error, partition=p.partition, leader_epoch=epoch, end_offset=end
                )
            )
        topics.append(R.OffsetForLeaderTopicResult(topic=topic.topic, partitions=parts))
    return R(throttle_time_ms=0, topics=topics)
