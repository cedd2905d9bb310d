"""The group APIs: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit,
OffsetFetch, ListGroups, DescribeGroups, DeleteGroups.

A group lives on the broker leading its ``__consumer_offsets`` partition (Kafka's hash
of the group id); group APIs sent to another broker answer NOT_COORDINATOR.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    DeleteGroupsRequest,
    DeleteGroupsResponse,
    DescribeGroupsRequest,
    DescribeGroupsResponse,
    ListGroupsRequest,
    ListGroupsResponse,
)
from kafka.protocol.consumer import (
    HeartbeatRequest,
    HeartbeatResponse,
    JoinGroupRequest,
    JoinGroupResponse,
    LeaveGroupRequest,
    LeaveGroupResponse,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchRequest,
    OffsetFetchResponse,
    SyncGroupRequest,
    SyncGroupResponse,
)
from kafka.protocol.metadata import FindCoordinatorRequest, FindCoordinatorResponse

from streambus.cluster import acls
from streambus.errors import (
    CoordinatorNotAvailableError,
    GroupAuthorizationFailedError,
    InvalidGroupIdError,
    InvalidRequestError,
    KafkaStorageError,
    MemberIdRequiredError,
    NotCoordinatorError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderOrFollowerError,
    OffsetMetadataTooLargeError,
    RequestTimedOutError,
    StreamBusError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    UnstableOffsetCommitError,
    error_name,
)
from streambus.groups import GroupState, JoinRequest, OffsetAndMetadata
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.structs import TopicPartition

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

GROUP_KEY = 0  # FindCoordinator key types
TRANSACTION_KEY = 1


@routes.api(FindCoordinatorRequest, FindCoordinatorResponse, versions=(0, 4))
async def handle_find_coordinator(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = FindCoordinatorResponse
    key_type = getattr(request, "key_type", GROUP_KEY)
    keys = list(request.coordinator_keys) if ctx.api_version >= 4 else [request.key]
    answers: list[tuple[str, int, str, int, int, str | None]] = []
    try:
        if key_type == GROUP_KEY:
            await services.ensure_offsets_topic()
        elif key_type == TRANSACTION_KEY:
            await services.ensure_transaction_topic()
    except StreamBusError as exc:  # no controller reachable: the client retries
        log.info("FindCoordinator: coordinator topic not created: %s", exc)
    for key in keys:
        if key_type not in (GROUP_KEY, TRANSACTION_KEY):
            err: StreamBusError = InvalidRequestError(f"unknown coordinator key type {key_type}")
        else:
            try:
                if key_type == GROUP_KEY:
                    services.authorizer.require(ctx, acls.DESCRIBE, acls.GROUP, key)
                    info = services.group_coordinator(key)
                else:
                    services.authorizer.require(ctx, acls.DESCRIBE, acls.TRANSACTIONAL_ID, key)
                    info = services.transaction_coordinator(key)
            except StreamBusError as exc:
                err = exc
            else:
                if info.broker_id == services.broker_id:
                    host, port = services.listener_address(ctx.listener)
                else:  # its address on the client's listener, as Metadata lists it
                    host, port = info.address(ctx.listener) or (info.host, info.port)
                answers.append((key, info.broker_id, host, port, 0, None))
                continue
        services.telemetry.error("FindCoordinator", err.kafka_name)
        answers.append((key, -1, "", -1, err.errno, err.message))
    if ctx.api_version >= 4:
        return R(
            throttle_time_ms=0,
            coordinators=[
                R.Coordinator(
                    key=key,
                    node_id=node,
                    host=host,
                    port=port,
                    error_code=error,
                    error_message=message,
                )
                for key, node, host, port, error, message in answers
            ],
        )
    _, node, host, port, error, message = answers[0]
    return R(
        throttle_time_ms=0,
        error_code=error,
        error_message=message,
        node_id=node,
        host=host,
        port=port,
    )


@routes.api(JoinGroupRequest, JoinGroupResponse, versions=(0, 9))
async def handle_join_group(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = JoinGroupResponse
    version = ctx.api_version
    # v0 has no rebalance timeout: Kafka uses the session timeout for both
    rebalance_timeout = request.rebalance_timeout_ms if version >= 1 else -1
    if rebalance_timeout <= 0:
        rebalance_timeout = request.session_timeout_ms
    join = JoinRequest(
        group_id=request.group_id,
        member_id=request.member_id or "",
        group_instance_id=request.group_instance_id if version >= 5 else None,
        client_id=ctx.client_id or "",
        client_host=ctx.peer.rsplit(":", 1)[0],
        session_timeout_ms=request.session_timeout_ms,
        rebalance_timeout_ms=rebalance_timeout,
        protocol_type=request.protocol_type,
        protocols=[(p.name, bytes(p.metadata)) for p in request.protocols],
        require_known_member_id=version >= 4,
    )

    def failed(code: int, member_id: str = "") -> Any:
        services.telemetry.error("JoinGroup", error_name(code))
        return R(
            throttle_time_ms=0,
            error_code=code,
            generation_id=-1,
            protocol_type=None,
            protocol_name=None if version >= 7 else "",
            leader="",
            member_id=member_id,
            members=[],
        )

    with services.telemetry.group_span("join", join.group_id, join.member_id) as span:
        try:
            services.authorizer.require(ctx, acls.READ, acls.GROUP, join.group_id)
            services.check_coordinator(join.group_id)
            result = await services.groups.join(join)
        except MemberIdRequiredError as exc:
            span.set_attribute("streambus.member_id", exc.member_id)
            return failed(exc.errno, exc.member_id)
        except StreamBusError as exc:
            log.info("JoinGroup %r from %s refused: %s", join.group_id, ctx.client_id, exc)
            span.set_attribute("streambus.error", exc.kafka_name)
            return failed(exc.errno, join.member_id)
        if result.error:
            return failed(result.error, result.member_id)
        span.set_attribute("streambus.generation", result.generation)
        span.set_attribute("streambus.member_id", result.member_id)
    return R(
        throttle_time_ms=0,
        error_code=0,
        generation_id=result.generation,
        protocol_type=result.protocol_type,
        protocol_name=result.protocol,
        leader=result.leader,
        skip_assignment=result.skip_assignment,
        member_id=result.member_id,
        members=[
            R.JoinGroupResponseMember(member_id=mid, group_instance_id=iid, metadata=meta)
            for mid, iid, meta in result.members
        ],
    )


@routes.api(SyncGroupRequest, SyncGroupResponse, versions=(0, 5))
async def handle_sync_group(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    version = ctx.api_version
    group = services.groups.groups().get(request.group_id)
    with services.telemetry.group_span("sync", request.group_id, request.member_id) as span:
        try:
            services.authorizer.require(ctx, acls.READ, acls.GROUP, request.group_id)
            services.check_coordinator(request.group_id)
            assignment = await services.groups.sync(
                request.group_id,
                generation=request.generation_id,
                member_id=request.member_id,
                instance_id=request.group_instance_id if version >= 3 else None,
                protocol_type=request.protocol_type if version >= 5 else None,
                protocol=request.protocol_name if version >= 5 else None,
                assignments=[(a.member_id, bytes(a.assignment)) for a in request.assignments],
            )
            error = 0
        except StreamBusError as exc:
            if exc.errno not in (27,):  # a rebalance is routine, not a failure
                log.info("SyncGroup %r from %s refused: %s", request.group_id, ctx.client_id, exc)
            services.telemetry.error("SyncGroup", exc.kafka_name)
            span.set_attribute("streambus.error", exc.kafka_name)
            assignment, error = b"", exc.errno
        span.set_attribute("streambus.generation", request.generation_id)
    return SyncGroupResponse(
        throttle_time_ms=0,
        error_code=error,
        protocol_type=group.protocol_type if group is not None and not error else None,
        protocol_name=group.protocol if group is not None and not error else None,
        assignment=assignment,
    )


@routes.api(HeartbeatRequest, HeartbeatResponse, versions=(0, 4))
async def handle_heartbeat(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    error = 0
    try:
        services.authorizer.require(ctx, acls.READ, acls.GROUP, request.group_id)
        services.check_coordinator(request.group_id)
        services.groups.heartbeat(
            request.group_id,
            request.generation_id,
            request.member_id,
            request.group_instance_id if ctx.api_version >= 3 else None,
        )
    except StreamBusError as exc:
        services.telemetry.error("Heartbeat", exc.kafka_name)
        error = exc.errno
    return HeartbeatResponse(throttle_time_ms=0, error_code=error)


@routes.api(LeaveGroupRequest, LeaveGroupResponse, versions=(0, 5))
async def handle_leave_group(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = LeaveGroupResponse
    if ctx.api_version < 3:
        leaving = [(request.member_id, None)]
    else:
        leaving = [(m.member_id, m.group_instance_id) for m in request.members]
    results = []
    for member_id, instance_id in leaving:
        error = 0
        try:
            services.authorizer.require(ctx, acls.READ, acls.GROUP, request.group_id)
            services.check_coordinator(request.group_id)
            services.groups.leave(request.group_id, member_id, instance_id)
        except StreamBusError as exc:
            services.telemetry.error("LeaveGroup", exc.kafka_name)
            error = exc.errno
        results.append(
            R.MemberResponse(member_id=member_id, group_instance_id=instance_id, error_code=error)
        )
    top = next((r.error_code for r in results if r.error_code), 0)
    return R(throttle_time_ms=0, error_code=top, members=results)


def offsets_to_commit(
    services: BrokerServices, request: Any, *, with_epochs: bool
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, OffsetAndMetadata]]:
    """What an OffsetCommit or TxnOffsetCommit asks to store, and the partitions refused
    (unknown, or metadata over offset.metadata.max.bytes) with their error codes."""
    limit = services.groups.settings.offset_metadata_max_bytes
    now_ms = int(time.time() * 1000)
    topics = services.partitions.topics()
    errors: dict[TopicPartition, int] = {}
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for topic in request.topics:
        meta = topics.get(topic.name)
        for p in topic.partitions:
            tp = TopicPartition(topic.name, p.partition_index)
            metadata = p.committed_metadata or ""
            if meta is None or not 0 <= tp.partition < meta.partitions:
                errors[tp] = UnknownTopicOrPartitionError.errno
            elif len(metadata.encode()) > limit:
                errors[tp] = OffsetMetadataTooLargeError.errno
            else:
                epoch = p.committed_leader_epoch if with_epochs else -1
                offsets[tp] = OffsetAndMetadata(p.committed_offset, epoch, metadata, now_ms)
    return errors, offsets


def refuse_unreadable(
    services: BrokerServices,
    ctx: RequestContext,
    errors: dict[TopicPartition, int],
    offsets: dict[TopicPartition, OffsetAndMetadata],
) -> None:
    """Committing a topic's offsets needs READ on it (Kafka's check): the others are
    answered TOPIC_AUTHORIZATION_FAILED and not stored."""
    if not services.authorizer.enabled:
        return
    topics = {tp.topic for tp in offsets}
    readable = services.authorizer.allowed_names(ctx, acls.READ, acls.TOPIC, topics)
    for tp in [tp for tp in offsets if tp.topic not in readable]:
        del offsets[tp]
        errors[tp] = TopicAuthorizationFailedError.errno


# How long a commit waits for the ISR of its __consumer_offsets partition (Kafka's
# offsets.commit.timeout.ms).
OFFSETS_COMMIT_TIMEOUT_S = 5.0


async def replicate_commit(services: BrokerServices, tp: TopicPartition, end: int) -> None:
    """A commit is answered once the ISR has it, as Kafka's coordinator writes with
    acks=all; replication errors become the group errors Kafka's coordinator answers with
    (a timeout too: clients before 3.9 do not retry REQUEST_TIMED_OUT on a commit)."""
    try:
        await services.partitions.wait_replicated(tp, end, OFFSETS_COMMIT_TIMEOUT_S)
    except (NotLeaderOrFollowerError, KafkaStorageError) as exc:
        raise NotCoordinatorError(str(exc)) from exc
    except (
        NotEnoughReplicasError,
        NotEnoughReplicasAfterAppendError,
        RequestTimedOutError,
    ) as exc:
        raise CoordinatorNotAvailableError(str(exc)) from exc


@routes.api(OffsetCommitRequest, OffsetCommitResponse, versions=(0, 9))
async def handle_offset_commit(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = OffsetCommitResponse
    started = time.perf_counter()
    version = ctx.api_version
    group_id = request.group_id
    errors, offsets = offsets_to_commit(services, request, with_epochs=version >= 6)
    refuse_unreadable(services, ctx, errors, offsets)
    with services.telemetry.group_span(
        "commit", group_id, getattr(request, "member_id", "")
    ) as span:
        group_error = 0
        try:
            if not group_id:
                raise InvalidGroupIdError("group id must not be empty")
            services.authorizer.require(ctx, acls.READ, acls.GROUP, group_id)
            services.check_coordinator(group_id)
            written = services.groups.commit(
                group_id,
                request.generation_id_or_member_epoch if version >= 1 else -1,
                request.member_id if version >= 1 else "",
                request.group_instance_id if version >= 7 else None,
                offsets,
            )
            if written is not None:
                await replicate_commit(services, *written)
        except StreamBusError as exc:
            log.info("OffsetCommit %r from %s refused: %s", group_id, ctx.client_id, exc)
            span.set_attribute("streambus.error", exc.kafka_name)
            group_error = exc.errno
        span.set_attribute("messaging.batch.message_count", len(offsets))
    by_topic: dict[str, list[Any]] = {}
    for topic in request.topics:
        for p in topic.partitions:
            tp = TopicPartition(topic.name, p.partition_index)
            code = errors.get(tp, group_error)
            if code:
                services.telemetry.error("OffsetCommit", error_name(code))
            by_topic.setdefault(topic.name, []).append(
                R.OffsetCommitResponseTopic.OffsetCommitResponsePartition(
                    partition_index=p.partition_index, error_code=code
                )
            )
    services.telemetry.commit_latency(group_id, time.perf_counter() - started)
    return R(
        throttle_time_ms=0,
        topics=[R.OffsetCommitResponseTopic(name=n, partitions=ps) for n, ps in by_topic.items()],
    )


@routes.api(OffsetFetchRequest, OffsetFetchResponse, versions=(0, 7))
async def handle_offset_fetch(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = OffsetFetchResponse
    T = R.OffsetFetchResponseTopic
    try:
        services.authorizer.require(ctx, acls.READ, acls.GROUP, request.group_id)
        services.check_coordinator(request.group_id)
    except StreamBusError as exc:
        services.telemetry.error("OffsetFetch", exc.kafka_name)
        return R(throttle_time_ms=0, topics=[], error_code=exc.errno)
    committed = services.groups.committed(request.group_id)
    unstable: set[TopicPartition] = set()
    if ctx.api_version >= 7 and request.require_stable:
        unstable = services.groups.fetch_stable(request.group_id)
    if request.topics is None:
        wanted: dict[str, list[int]] = {}
        for tp in committed:
            wanted.setdefault(tp.topic, []).append(tp.partition)
    else:
        wanted = {t.name: list(t.partition_indexes) for t in request.topics}
    readable = services.authorizer.allowed_names(ctx, acls.DESCRIBE, acls.TOPIC, wanted)
    topics = []
    for name, partitions in wanted.items():
        if name not in readable and request.topics is None:
            continue  # a listing of every committed offset shows what may be described
        parts = []
        for partition in sorted(partitions):
            tp = TopicPartition(name, partition)
            value = committed.get(tp) if name in readable else None
            error = UnstableOffsetCommitError.errno if tp in unstable else 0
            if name not in readable:
                error = TopicAuthorizationFailedError.errno
            if error:
                services.telemetry.error("OffsetFetch", UnstableOffsetCommitError.kafka_name)
            parts.append(
                T.OffsetFetchResponsePartition(
                    partition_index=partition,
                    committed_offset=value.offset if value else -1,
                    committed_leader_epoch=value.leader_epoch if value else -1,
                    metadata=value.metadata if value else "",
                    error_code=error,
                )
            )
        topics.append(T(name=name, partitions=parts))
    return R(throttle_time_ms=0, topics=topics, error_code=0)


@routes.api(ListGroupsRequest, ListGroupsResponse, versions=(0, 5))
async def handle_list_groups(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = ListGroupsResponse
    version = ctx.api_version
    # Filters match as Kafka's do: states and types case-insensitively, empty = all.
    states = {s.lower() for s in request.states_filter} if version >= 4 else set()
    types = {t.lower() for t in request.types_filter} if version >= 5 else set()
    # (group id, protocol type, state, group type)
    rows: list[tuple[str, str, str, str]] = [
        (g.group_id, g.protocol_type or "", g.state.value, "classic")
        for g in services.groups.groups().values()
    ]
    rows += [
        (g.group_id, g.protocol_type, g.state.value, "consumer")
        for g in services.groups.consumer_groups().values()
    ]
    authz = services.authorizer
    if authz.enabled and not authz.authorize(
        ctx, acls.DESCRIBE, acls.CLUSTER, acls.CLUSTER_NAME, quiet=True
    ):
        rows = [
            r for r in rows if authz.authorize(ctx, acls.DESCRIBE, acls.GROUP, r[0], quiet=True)
        ]
    listed = [
        R.ListedGroup(
            group_id=group_id, protocol_type=protocol_type, group_state=state, group_type=kind
        )
        for group_id, protocol_type, state, kind in rows
        if (not states or state.lower() in states) and (not types or kind in types)
    ]
    return R(throttle_time_ms=0, error_code=0, groups=listed)


@routes.api(DescribeGroupsRequest, DescribeGroupsResponse, versions=(0, 5))
async def handle_describe_groups(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeGroupsResponse
    G = R.DescribedGroup
    described = []
    for group_id in request.groups:
        group = services.groups.groups().get(group_id)
        if not services.authorizer.authorize(ctx, acls.DESCRIBE, acls.GROUP, group_id):
            services.telemetry.error("DescribeGroups", GroupAuthorizationFailedError.kafka_name)
            described.append(
                G(
                    error_code=GroupAuthorizationFailedError.errno,
                    group_id=group_id,
                    group_state="",
                    protocol_type="",
                    protocol_data="",
                    members=[],
                )
            )
            continue
        if group is None:
            # Kafka describes an unknown group as Dead rather than failing; so too a
            # consumer-protocol group, which DescribeGroups (classic only) does not know.
            described.append(
                G(
                    error_code=0,
                    group_id=group_id,
                    group_state=GroupState.DEAD.value,
                    protocol_type="",
                    protocol_data="",
                    members=[],
                )
            )
            continue
        stable = group.state is GroupState.STABLE
        described.append(
            G(
                error_code=0,
                group_id=group_id,
                group_state=group.state.value,
                protocol_type=group.protocol_type or "",
                protocol_data=group.protocol or "",
                members=[
                    G.DescribedGroupMember(
                        member_id=m.member_id,
                        group_instance_id=m.group_instance_id,
                        client_id=m.client_id,
                        client_host=m.client_host,
                        member_metadata=m.metadata(group.protocol or ""),
                        member_assignment=m.assignment if stable else b"",
                    )
                    for m in group.members.values()
                ],
            )
        )
    return R(throttle_time_ms=0, groups=described)


@routes.api(DeleteGroupsRequest, DeleteGroupsResponse, versions=(0, 2))
async def handle_delete_groups(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = DeleteGroupsResponse
    results = []
    for group_id in request.groups_names:
        error = 0
        try:
            services.authorizer.require(ctx, acls.DELETE, acls.GROUP, group_id)
            services.check_coordinator(group_id)
            services.groups.delete_group(group_id)
        except StreamBusError as exc:
            services.telemetry.error("DeleteGroups", exc.kafka_name)
            error = exc.errno
        results.append(R.DeletableGroupResult(group_id=group_id, error_code=error))
    return R(throttle_time_ms=0, results=results)
