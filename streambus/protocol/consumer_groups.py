"""The consumer group protocol's APIs (KIP-848): ConsumerGroupHeartbeat and ConsumerGroupDescribe.

The heartbeat names topics by id; the coordinator works with names, so ids are
resolved here against the topics this broker knows (an id it does not know is a
partition the member owns of a deleted topic: dropped, as nobody else can get it).
Internal topics are left out of what the coordinator sees, so a subscription regex
never matches ``__consumer_offsets`` or ``__transaction_state``.

A heartbeat is answered once the group's records are in the ISR of its
``__consumer_offsets`` partition, within the offset commit timeout, as an OffsetCommit is.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from streambus.cluster import acls
from streambus.errors import StreamBusError, error_name
from streambus.groups.consumer import Heartbeat, Partitions
from streambus.groups.coordinator import readable_topics
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.protocol.consumer_group_messages import (
    ConsumerGroupDescribeRequest,
    ConsumerGroupDescribeResponse,
    ConsumerGroupHeartbeatRequest,
    ConsumerGroupHeartbeatResponse,
)
from streambus.protocol.groups import OFFSETS_COMMIT_TIMEOUT_S

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

GROUP_ID_NOT_FOUND = 69
CONSUMER_MEMBER = 1  # ConsumerGroupDescribe v1 MemberType


@routes.api(ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, versions=(0, 1))
async def handle_consumer_group_heartbeat(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = ConsumerGroupHeartbeatResponse
    counts, ids = readable_topics(services.partitions)
    names = {tid: name for name, tid in ids.items()}
    owned: Partitions | None = None
    if request.topic_partitions is not None:
        owned = {}
        for tp in request.topic_partitions:
            name = names.get(tp.topic_id)
            if name is not None:
                owned.setdefault(name, set()).update(tp.partitions)
    hb = Heartbeat(
        group_id=request.group_id,
        member_id=request.member_id or "",
        member_epoch=request.member_epoch,
        instance_id=request.instance_id,
        rack_id=request.rack_id,
        rebalance_timeout_ms=request.rebalance_timeout_ms,
        subscribed_topic_names=(
            tuple(request.subscribed_topic_names)
            if request.subscribed_topic_names is not None
            else None
        ),
        subscribed_topic_regex=request.subscribed_topic_regex if ctx.api_version >= 1 else None,
        server_assignor=request.server_assignor,
        owned=owned,
        client_id=ctx.client_id or "",
        client_host=ctx.peer.rsplit(":", 1)[0],
        generate_member_id=ctx.api_version == 0,
    )
    interval = services.groups.settings.consumer_heartbeat_interval_ms
    try:
        services.authorizer.require(ctx, acls.READ, acls.GROUP, hb.group_id)
        services.check_coordinator(hb.group_id)
        answer = services.groups.consumer_heartbeat(hb, counts)
        await services.groups.wait_replicated(
            hb.group_id, answer.member_id, OFFSETS_COMMIT_TIMEOUT_S
        )
    except StreamBusError as exc:
        if exc.errno not in (25, 110):  # a member rejoining is routine
            log.info(
                "ConsumerGroupHeartbeat %r from %s refused: %s", hb.group_id, ctx.client_id, exc
            )
        services.telemetry.error("ConsumerGroupHeartbeat", exc.kafka_name)
        return R(
            throttle_time_ms=0,
            error_code=exc.errno,
            error_message=exc.message,
            member_id=None,
            member_epoch=-1,
            heartbeat_interval_ms=interval,
            assignment=None,
        )
    assignment = None
    if answer.assignment is not None:
        assignment = R.Assignment(
            topic_partitions=[
                R.Assignment.TopicPartitions(topic_id=ids[topic], partitions=sorted(ps))
                for topic, ps in sorted(answer.assignment.items())
                if topic in ids
            ]
        )
    return R(
        throttle_time_ms=0,
        error_code=0,
        error_message=None,
        member_id=answer.member_id,
        member_epoch=answer.member_epoch,
        heartbeat_interval_ms=interval,
        assignment=assignment,
    )


@routes.api(ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, versions=(0, 1))
async def handle_consumer_group_describe(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = ConsumerGroupDescribeResponse
    G = R.DescribedGroup
    M = G.Member
    _, ids = readable_topics(services.partitions)
    zero = uuid.UUID(int=0)

    def assignment(parts: Partitions) -> Any:
        return M.Assignment(
            topic_partitions=[
                M.Assignment.TopicPartitions(
                    topic_id=ids.get(topic, zero), topic_name=topic, partitions=sorted(ps)
                )
                for topic, ps in sorted(parts.items())
            ]
        )

    described = []
    for group_id in request.group_ids:
        try:
            services.authorizer.require(ctx, acls.DESCRIBE, acls.GROUP, group_id)
            services.check_coordinator(group_id)
        except StreamBusError as exc:
            services.telemetry.error("ConsumerGroupDescribe", exc.kafka_name)
            described.append(_failed(G, group_id, exc.errno, exc.message))
            continue
        group = services.groups.consumer_groups().get(group_id)
        if group is None:
            classic = services.groups.groups().get(group_id)
            message = (
                f"group {group_id!r} is not a consumer group"
                if classic is not None
                else f"group {group_id!r} not found"
            )
            services.telemetry.error("ConsumerGroupDescribe", error_name(GROUP_ID_NOT_FOUND))
            described.append(_failed(G, group_id, GROUP_ID_NOT_FOUND, message))
            continue
        described.append(
            G(
                error_code=0,
                error_message=None,
                group_id=group_id,
                group_state=group.state.value,
                group_epoch=group.group_epoch,
                assignment_epoch=group.assignment_epoch,
                assignor_name=group.assignor,
                members=[
                    M(
                        member_id=m.member_id,
                        instance_id=m.instance_id,
                        rack_id=m.rack_id,
                        member_epoch=m.member_epoch,
                        client_id=m.client_id,
                        client_host=m.client_host,
                        subscribed_topic_names=list(m.subscribed),
                        subscribed_topic_regex=m.regex,
                        assignment=assignment(m.assigned),
                        target_assignment=assignment(group.target.get(m.member_id, {})),
                        member_type=CONSUMER_MEMBER,
                    )
                    for m in group.members.values()
                ],
                authorized_operations=-2147483648,
            )
        )
    return R(throttle_time_ms=0, groups=described)


def _failed(described: Any, group_id: str, code: int, message: str) -> Any:
    return described(
        error_code=code,
        error_message=message,
        group_id=group_id,
        group_state="",
        group_epoch=-1,
        assignment_epoch=-1,
        assignor_name="",
        members=[],
        authorized_operations=-2147483648,
    )
