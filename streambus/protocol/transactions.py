"""The transaction APIs: InitProducerId (with a transactional id), AddPartitionsToTxn,
AddOffsetsToTxn, EndTxn, TxnOffsetCommit, WriteTxnMarkers, ListTransactions,
DescribeTransactions and DescribeProducers.

The coordinator (``streambus.transactions``) decides; these handlers translate.
Version ranges stop below KIP-890's (AddPartitionsToTxn v4+ batches several ids
and verifies; EndTxn v5 returns a new epoch): librdkafka, kafka-python, aiokafka
and Kafka's own admin tools negotiate down to them.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    DescribeProducersRequest,
    DescribeProducersResponse,
    DescribeTransactionsRequest,
    DescribeTransactionsResponse,
    ListTransactionsRequest,
    ListTransactionsResponse,
)
from kafka.protocol.producer import (
    AddOffsetsToTxnRequest,
    AddOffsetsToTxnResponse,
    AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse,
    EndTxnRequest,
    EndTxnResponse,
    InitProducerIdResponse,
    TxnOffsetCommitRequest,
    TxnOffsetCommitResponse,
    WriteTxnMarkersRequest,
    WriteTxnMarkersResponse,
)

from streambus.cluster import acls
from streambus.errors import (
    ClusterAuthorizationFailedError,
    InvalidProducerEpochError,
    InvalidRequestError,
    OperationNotAttemptedError,
    ProducerFencedError,
    StreamBusError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    TransactionalIdNotFoundError,
    UnknownTopicOrPartitionError,
    error_name,
)
from streambus.groups import OFFSETS_TOPIC
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.protocol.groups import offsets_to_commit, refuse_unreadable, replicate_commit
from streambus.structs import TopicPartition
from streambus.transactions import Marker, TxnState

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

MARKER_WRITE_TIMEOUT_S = 5.0


def _code(exc: StreamBusError, version: int, fenced_since: int) -> int:
    """Kafka's answer for ``exc`` at this request version: PRODUCER_FENCED is
    INVALID_PRODUCER_EPOCH to clients older than KIP-588."""
    if isinstance(exc, ProducerFencedError) and version < fenced_since:
        return InvalidProducerEpochError.errno
    return exc.errno


def _refused(services: BrokerServices, ctx: RequestContext, api: str, exc: StreamBusError) -> None:
    services.telemetry.error(api, exc.kafka_name)
    log.info("%s from %s refused: %s", api, ctx.client_id, exc)


async def init_transactional_producer(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    """InitProducerId with a transactional id (the InitProducerId handler delegates here)."""
    version = ctx.api_version
    try:
        pid, epoch = await services.transactions.init_producer_id(
            request.transactional_id,
            request.transaction_timeout_ms,
            getattr(request, "producer_id", -1) if version >= 3 else -1,
            getattr(request, "producer_epoch", -1) if version >= 3 else -1,
        )
    except StreamBusError as exc:
        _refused(services, ctx, "InitProducerId", exc)
        return InitProducerIdResponse(
            throttle_time_ms=0,
            error_code=_code(exc, version, 4),
            producer_id=-1,
            producer_epoch=-1,
        )
    return InitProducerIdResponse(
        throttle_time_ms=0, error_code=0, producer_id=pid, producer_epoch=epoch
    )


@routes.api(AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, versions=(0, 3))
async def handle_add_partitions(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = AddPartitionsToTxnResponse
    state = services.quorum.state
    local = services.partitions.topics()
    wanted: list[TopicPartition] = []
    errors: dict[TopicPartition, int] = {}
    authz = services.authorizer
    txn_denied = not authz.authorize(
        ctx, acls.WRITE, acls.TRANSACTIONAL_ID, request.v3_and_below_transactional_id
    )
    writable = authz.allowed_names(
        ctx, acls.WRITE, acls.TOPIC, [t.name for t in request.v3_and_below_topics]
    )
    for topic in request.v3_and_below_topics:
        known = state.topics.get(topic.name)
        count = len(known.partitions) if known is not None else None
        if count is None and topic.name in local:
            count = local[topic.name].partitions
        for p in topic.partitions:
            tp = TopicPartition(topic.name, p)
            if txn_denied:
                errors[tp] = TransactionalIdAuthorizationFailedError.errno
            elif topic.name not in writable:
                errors[tp] = TopicAuthorizationFailedError.errno
            elif count is None or not 0 <= p < count:
                errors[tp] = UnknownTopicOrPartitionError.errno
            else:
                wanted.append(tp)
    if errors:  # Kafka adds none of them: the others are OPERATION_NOT_ATTEMPTED
        for tp in wanted:
            errors[tp] = OperationNotAttemptedError.errno
    else:
        try:
            await services.transactions.add_partitions(
                request.v3_and_below_transactional_id,
                request.v3_and_below_producer_id,
                request.v3_and_below_producer_epoch,
                wanted,
            )
        except StreamBusError as exc:
            _refused(services, ctx, "AddPartitionsToTxn", exc)
            code = _code(exc, ctx.api_version, 2)
            errors = dict.fromkeys(wanted, code)
    by_topic: dict[str, list[Any]] = {}
    for topic in request.v3_and_below_topics:
        for p in topic.partitions:
            code = errors.get(TopicPartition(topic.name, p), 0)
            by_topic.setdefault(topic.name, []).append(
                R.AddPartitionsToTxnTopicResult.AddPartitionsToTxnPartitionResult(
                    partition_index=p, partition_error_code=code
                )
            )
    return R(
        throttle_time_ms=0,
        results_by_topic_v3_and_below=[
            R.AddPartitionsToTxnTopicResult(name=name, results_by_partition=results)
            for name, results in by_topic.items()
        ],
    )


@routes.api(AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, versions=(0, 3))
async def handle_add_offsets(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    code = 0
    try:
        services.authorizer.require(
            ctx, acls.WRITE, acls.TRANSACTIONAL_ID, request.transactional_id
        )
        services.authorizer.require(ctx, acls.READ, acls.GROUP, request.group_id)
        await services.transactions.add_offsets(
            request.transactional_id, request.producer_id, request.producer_epoch, request.group_id
        )
    except StreamBusError as exc:
        _refused(services, ctx, "AddOffsetsToTxn", exc)
        code = _code(exc, ctx.api_version, 2)
    return AddOffsetsToTxnResponse(throttle_time_ms=0, error_code=code)


@routes.api(EndTxnRequest, EndTxnResponse, versions=(0, 3))
async def handle_end_txn(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    code = 0
    try:
        services.authorizer.require(
            ctx, acls.WRITE, acls.TRANSACTIONAL_ID, request.transactional_id
        )
        await services.transactions.end_transaction(
            request.transactional_id, request.producer_id, request.producer_epoch, request.committed
        )
    except StreamBusError as exc:
        _refused(services, ctx, "EndTxn", exc)
        code = _code(exc, ctx.api_version, 2)
    return EndTxnResponse(throttle_time_ms=0, error_code=code)


@routes.api(TxnOffsetCommitRequest, TxnOffsetCommitResponse, versions=(0, 3))
async def handle_txn_offset_commit(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = TxnOffsetCommitResponse
    version = ctx.api_version
    group_id = request.group_id
    errors, offsets = offsets_to_commit(services, request, with_epochs=version >= 2)
    refuse_unreadable(services, ctx, errors, offsets)
    group_error = 0
    try:
        services.authorizer.require(ctx, acls.READ, acls.GROUP, group_id)
        services.check_coordinator(group_id)
        services.transactions.check_offsets_commit(
            request.producer_id, request.producer_epoch, group_id
        )
        member = (
            (request.generation_id, request.member_id, request.group_instance_id)
            if version >= 3
            else None
        )
        written = services.groups.commit_transactional(
            group_id, request.producer_id, request.producer_epoch, member, offsets
        )
        if written is not None:
            await replicate_commit(services, *written)
    except StreamBusError as exc:
        _refused(services, ctx, "TxnOffsetCommit", exc)
        group_error = _code(exc, version, 3)
    by_topic: dict[str, list[Any]] = {}
    for topic in request.topics:
        for p in topic.partitions:
            code = errors.get(TopicPartition(topic.name, p.partition_index), group_error)
            if code:
                services.telemetry.error("TxnOffsetCommit", error_name(code))
            by_topic.setdefault(topic.name, []).append(
                R.TxnOffsetCommitResponseTopic.TxnOffsetCommitResponsePartition(
                    partition_index=p.partition_index, error_code=code
                )
            )
    return R(
        throttle_time_ms=0,
        topics=[
            R.TxnOffsetCommitResponseTopic(name=n, partitions=ps) for n, ps in by_topic.items()
        ],
    )


@routes.api(WriteTxnMarkersRequest, WriteTxnMarkersResponse, versions=(1, 2))
async def handle_write_txn_markers(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    """A coordinator (another broker's, or an operator's abort through kafka-transactions)
    asks this broker to end a transaction in partitions it leads."""
    R = WriteTxnMarkersResponse
    results = []
    may_write_markers = services.authorizer.authorize_cluster(ctx, acls.CLUSTER_ACTION)
    for m in request.markers:
        marker = Marker(m.producer_id, m.producer_epoch, m.transaction_result, m.coordinator_epoch)
        topics = []
        for topic in m.topics:
            partitions = []
            for index in topic.partition_indexes:
                tp = TopicPartition(topic.name, index)
                code = (
                    await _write_marker(services, marker, tp)
                    if may_write_markers
                    else ClusterAuthorizationFailedError.errno
                )
                if code:
                    services.telemetry.error("WriteTxnMarkers", error_name(code))
                partitions.append(
                    R.WritableTxnMarkerResult.WritableTxnMarkerTopicResult.WritableTxnMarkerPartitionResult(
                        partition_index=index, error_code=code
                    )
                )
            topics.append(
                R.WritableTxnMarkerResult.WritableTxnMarkerTopicResult(
                    name=topic.name, partitions=partitions
                )
            )
        results.append(R.WritableTxnMarkerResult(producer_id=m.producer_id, topics=topics))
    return R(markers=results)


async def _write_marker(services: BrokerServices, marker: Marker, tp: TopicPartition) -> int:
    try:
        result = services.partitions.append_marker(
            tp, marker.producer_id, marker.producer_epoch, marker.commit, marker.coordinator_epoch
        )
        await services.partitions.wait_replicated(
            tp, result.last_offset + 1, MARKER_WRITE_TIMEOUT_S
        )
    except StreamBusError as exc:
        log.info("marker for %s-%d refused: %s", tp.topic, tp.partition, exc)
        return exc.errno
    if tp.topic == OFFSETS_TOPIC:
        services.groups.complete_transaction(marker.producer_id, marker.commit, tp.partition)
    return 0


@routes.api(ListTransactionsRequest, ListTransactionsResponse, versions=(0, 2))
async def handle_list_transactions(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = ListTransactionsResponse
    names = {state.kafka_name: state for state in TxnState}
    wanted = {names[s] for s in request.state_filters if s in names}
    unknown = [s for s in request.state_filters if s not in names]
    pids = set(request.producer_id_filters)
    min_age_ms = getattr(request, "duration_filter", -1) if ctx.api_version >= 1 else -1
    pattern_text = getattr(request, "transactional_id_pattern", None)
    try:
        pattern = re.compile(pattern_text) if pattern_text else None
    except re.error as exc:
        _refused(services, ctx, "ListTransactions", InvalidRequestError(str(exc)))
        return R(
            throttle_time_ms=0,
            error_code=InvalidRequestError.errno,
            unknown_state_filters=[],
            transaction_states=[],
        )
    now_ms = int(time.time() * 1000)
    states = []
    for meta in services.transactions.transactions():
        if (request.state_filters and meta.state not in wanted) or (
            pids and meta.producer_id not in pids
        ):
            continue
        if min_age_ms >= 0 and (meta.start_ms < 0 or now_ms - meta.start_ms < min_age_ms):
            continue
        if pattern is not None and not pattern.fullmatch(meta.transactional_id):
            continue
        states.append(
            R.TransactionState(
                transactional_id=meta.transactional_id,
                producer_id=meta.producer_id,
                transaction_state=meta.state.kafka_name,
            )
        )
    return R(
        throttle_time_ms=0, error_code=0, unknown_state_filters=unknown, transaction_states=states
    )


@routes.api(DescribeTransactionsRequest, DescribeTransactionsResponse, versions=(0, 0))
async def handle_describe_transactions(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeTransactionsResponse
    out = []
    for txn_id in request.transactional_ids:
        try:
            services.authorizer.require(ctx, acls.DESCRIBE, acls.TRANSACTIONAL_ID, txn_id)
            meta = services.transactions.describe(txn_id)
            if meta is None:
                raise TransactionalIdNotFoundError(f"no transactional id {txn_id!r}")
        except StreamBusError as exc:
            _refused(services, ctx, "DescribeTransactions", exc)
            out.append(
                R.TransactionState(
                    error_code=exc.errno,
                    transactional_id=txn_id,
                    transaction_state="",
                    transaction_timeout_ms=0,
                    transaction_start_time_ms=-1,
                    producer_id=-1,
                    producer_epoch=-1,
                    topics=[],
                )
            )
            continue
        by_topic: dict[str, list[int]] = {}
        for tp in sorted(meta.partitions):
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        out.append(
            R.TransactionState(
                error_code=0,
                transactional_id=txn_id,
                transaction_state=meta.state.kafka_name,
                transaction_timeout_ms=meta.timeout_ms,
                transaction_start_time_ms=meta.start_ms,
                producer_id=meta.producer_id,
                producer_epoch=meta.producer_epoch,
                topics=[
                    R.TransactionState.TopicData(topic=t, partitions=ps)
                    for t, ps in by_topic.items()
                ],
            )
        )
    return R(throttle_time_ms=0, transaction_states=out)


@routes.api(DescribeProducersRequest, DescribeProducersResponse, versions=(0, 0))
async def handle_describe_producers(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    """The producers with state in each partition led here, and the offset their open
    transaction started at (what ``kafka-transactions find-hanging`` looks for)."""
    R = DescribeProducersResponse
    topics = []
    for topic in request.topics:
        parts = []
        for index in topic.partition_indexes:
            tp = TopicPartition(topic.name, index)
            try:
                services.authorizer.require(ctx, acls.READ, acls.TOPIC, tp.topic)
                active = [
                    R.TopicResponse.PartitionResponse.ProducerState(
                        producer_id=p.producer_id,
                        producer_epoch=p.producer_epoch,
                        last_sequence=p.last_sequence,
                        last_timestamp=p.last_timestamp_ms,
                        coordinator_epoch=p.coordinator_epoch,
                        current_txn_start_offset=p.current_txn_start_offset,
                    )
                    for p in services.partitions.producers(tp)
                ]
            except StreamBusError as exc:
                services.telemetry.error("DescribeProducers", exc.kafka_name)
                parts.append(
                    R.TopicResponse.PartitionResponse(
                        partition_index=index,
                        error_code=exc.errno,
                        error_message=str(exc),
                        active_producers=[],
                    )
                )
                continue
            parts.append(
                R.TopicResponse.PartitionResponse(
                    partition_index=index, error_code=0, error_message=None, active_producers=active
                )
            )
        topics.append(R.TopicResponse(name=topic.name, partitions=parts))
    return R(throttle_time_ms=0, topics=topics)
