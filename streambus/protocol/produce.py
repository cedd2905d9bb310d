"""Produce and InitProducerId: accepting record batches into partition logs.

A batch is validated (size, CRC-32C, record framing), de-duplicated for
idempotent producers, and stored exactly as it arrived apart from its base
offset, all by the partition service (``streambus.partitions``). acks=all and
acks=1 are the same on a single broker: the batch is in the log (written to
the OS, so it survives the broker process dying) before the response goes
out. acks=0 gets no response at all. A producer over its byte-rate quota is
answered with a throttle time and its connection muted (``streambus.quotas``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kafka.protocol.producer import (
    InitProducerIdRequest,
    InitProducerIdResponse,
    ProduceRequest,
    ProduceResponse,
)
from opentelemetry import trace

from streambus.cluster import acls
from streambus.errors import (
    ClusterAuthorizationFailedError,
    InvalidRecordError,
    InvalidRequiredAcksError,
    KafkaStorageError,
    StreamBusError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    error_name,
)
from streambus.instrumentation import MAX_LINKS, TRACE_SCAN_BYTES
from streambus.protocol.apis import ApiRoutes, Chunk, RequestContext, encode_response
from streambus.protocol.transactions import init_transactional_producer
from streambus.quotas import PRODUCE
from streambus.records.batch import (
    header_values,
    walk_batches,
)
from streambus.structs import TopicPartition

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

PartitionResponse = ProduceResponse.TopicProduceResponse.PartitionProduceResponse
RecordError = PartitionResponse.BatchIndexAndErrorMessage
TRACEPARENT = "traceparent"


# Partitions appended between yields to the event loop: a request naming 100,000
# partitions must not hold every other client (heartbeats included) for seconds.
PARTITIONS_PER_SLICE = 100  # partitions appended between yields: a slice stays ~10 ms
# A response naming more partitions than this is encoded in a worker thread.
ENCODE_IN_THREAD_OVER = 500
# Rejected partitions named in a request's one log line.
LOGGED_REJECTIONS = 5


def _encode(reply: Any, version: int, correlation_id: int) -> list[Chunk]:
    """A response, or the frame a worker thread already encoded (see ``handle_produce``)."""
    if isinstance(reply, bytearray):
        return [reply]
    return [encode_response(reply, version, correlation_id)]


@routes.api(ProduceRequest, ProduceResponse, versions=(3, 9), encoder=_encode)
async def handle_produce(services: BrokerServices, ctx: RequestContext, request: Any) -> Any | None:
    started = time.perf_counter()
    tel = services.telemetry
    acks = request.acks
    span: trace.Span | None = None
    if tel.tracing_enabled():
        span = await _start_span(services, request)
    refused = _refusal(request) or _txn_refusal(services, ctx, request)
    topics_out = []
    touched: list[str] = []
    rejected: list[tuple[str, int, StreamBusError]] = []
    # acks=all: appended here, answered once the ISR has them (waited for all at once)
    pending: list[tuple[TopicPartition, Any, int]] = []
    done = 0
    try:
        for topic_data in request.topic_data:
            topic = topic_data.name
            touched.append(topic)
            parts = []
            topic_refused = refused
            if topic_refused is None and not services.authorizer.authorize(
                ctx, acls.WRITE, acls.TOPIC, topic
            ):
                topic_refused = TopicAuthorizationFailedError()
            for pd in topic_data.partition_data:
                tp = TopicPartition(topic, pd.index)
                part, end = await _append_one(
                    services, topic, pd, topic_refused, rejected, acks=acks
                )
                parts.append(part)
                if acks == -1 and end is not None and services.partitions.replicated(tp):
                    pending.append((tp, part, end))
                done += 1
                if done % PARTITIONS_PER_SLICE == 0:
                    await asyncio.sleep(0)
            topics_out.append(
                ProduceResponse.TopicProduceResponse(name=topic, partition_responses=parts)
            )
        if pending:
            await _wait_replicated(services, pending, request.timeout_ms, span, rejected)
    finally:
        elapsed = time.perf_counter() - started
        for topic in touched:
            tel.produce_latency(topic, elapsed)
        # Errors are counted per request and code, not per partition: a request naming
        # 100,000 unknown partitions costs one counter update.
        errors = Counter(p.error_code for t in topics_out for p in t.partition_responses)
        for code, count in errors.items():
            if code:
                tel.error("Produce", error_name(code), count)
        if span is not None:
            _finish_span(span, topics_out)
        if rejected:
            _log_rejections(ctx, rejected)
    # Kafka's produce quota: the record bytes of the request count; over the quota, the
    # connection is muted for the throttle time after the answer (before it, below v6).
    produced = sum(len(pd.records or b"") for td in request.topic_data for pd in td.partition_data)
    throttle = services.quotas.record(PRODUCE, ctx.principal, ctx.client_id, produced)
    ctx.throttle.ms, ctx.throttle.delay_response = throttle, ctx.api_version < 6
    if acks == 0:
        return None
    response = ProduceResponse(responses=topics_out, throttle_time_ms=throttle)
    if done > ENCODE_IN_THREAD_OVER:
        # Encoding costs about as much per partition as appending; for a response this
        # large it would hold the loop in one piece, so a worker thread does it.
        return await asyncio.to_thread(
            encode_response, response, ctx.api_version, ctx.correlation_id
        )
    return response


def _refusal(request: Any) -> StreamBusError | None:
    """An error that applies to every partition of the request, if there is one."""
    if request.acks not in (0, 1, -1):
        return InvalidRequiredAcksError(f"acks={request.acks} (must be 0, 1 or -1)")
    return None


def _txn_refusal(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> StreamBusError | None:
    """A transactional produce needs WRITE on its transactional id (Kafka's check)."""
    txn_id = getattr(request, "transactional_id", None)
    if txn_id and not services.authorizer.authorize(ctx, acls.WRITE, acls.TRANSACTIONAL_ID, txn_id):
        return TransactionalIdAuthorizationFailedError()
    return None


def _log_rejections(ctx: RequestContext, rejected: list[tuple[str, int, StreamBusError]]) -> None:
    """One line per request, however many partitions it named."""
    first = ", ".join(
        f"{topic}-{partition}: {exc.kafka_name}: {exc}"
        for topic, partition, exc in rejected[:LOGGED_REJECTIONS]
    )
    more = len(rejected) - LOGGED_REJECTIONS
    log.warning(
        "produce from %s (%s): %d partition(s) rejected: %s%s",
        ctx.client_id,
        ctx.peer,
        len(rejected),
        first,
        f" and {more} more" if more > 0 else "",
    )


async def _append_one(
    services: BrokerServices,
    topic: str,
    pd: Any,
    refused: StreamBusError | None,
    rejected: list[tuple[str, int, StreamBusError]],
    *,
    acks: int,
) -> tuple[Any, int | None]:
    """The partition's response, and the end offset acks=all waits for (None: answered)."""
    partition = pd.index
    try:
        if refused is not None:
            raise refused
        result = await services.partitions.append(
            TopicPartition(topic, partition), pd.records, acks=acks
        )
    except StreamBusError as exc:
        _refused(topic, partition, exc, rejected)
        return _failed(partition, exc), None
    response = PartitionResponse(
        index=partition,
        error_code=0,
        base_offset=result.base_offset,
        log_append_time_ms=result.log_append_time_ms,
        log_start_offset=result.log_start_offset,
    )
    return response, result.last_offset + 1


def _refused(
    topic: str, partition: int, exc: StreamBusError, rejected: list[tuple[str, int, StreamBusError]]
) -> None:
    if isinstance(exc, KafkaStorageError):  # logged once per episode by storage health
        log.debug("produce to %s-%d failed: %s", topic, partition, exc)
    else:
        rejected.append((topic, partition, exc))


def _failed(partition: int, exc: StreamBusError) -> Any:
    # INVALID_RECORD names each failing record (Produce v8+; older versions drop the field).
    named = exc.record_errors if isinstance(exc, InvalidRecordError) else ()
    return PartitionResponse(
        index=partition,
        error_code=exc.errno,
        base_offset=-1,
        log_append_time_ms=-1,
        log_start_offset=-1,
        error_message=str(exc),
        record_errors=[
            RecordError(batch_index=index, batch_index_error_message=message)
            for index, message in named
        ],
    )


async def _wait_replicated(
    services: BrokerServices,
    pending: list[tuple[TopicPartition, Any, int]],
    timeout_ms: int,
    span: trace.Span | None,
    rejected: list[tuple[str, int, StreamBusError]],
) -> None:
    """acks=all: every appended partition waits for its ISR, all at once, under the
    request's timeout; a partition that fails gets its error instead of its offset. The
    wait is its own span under the produce span, so a slow follower shows in the trace."""
    partitions = services.partitions
    child = None
    if span is not None and span.is_recording():
        child = services.telemetry.child_span(
            "replicate", span, {"messaging.batch.partition_count": len(pending)}
        )
    results = await asyncio.gather(
        *(partitions.wait_replicated(tp, end, timeout_ms / 1000) for tp, _, end in pending),
        return_exceptions=True,
    )
    failed = 0
    for (tp, part, _), outcome in zip(pending, results, strict=True):
        if isinstance(outcome, StreamBusError):
            failed += 1
            _refused(tp.topic, tp.partition, outcome, rejected)
            fresh = _failed(tp.partition, outcome)
            part.error_code, part.error_message = fresh.error_code, fresh.error_message
            part.base_offset = part.log_append_time_ms = part.log_start_offset = -1
        elif isinstance(outcome, BaseException):
            raise outcome
    if child is not None:
        if failed:
            child.set_status(trace.StatusCode.ERROR, f"{failed} partition(s) not replicated")
        child.end()


async def _start_span(services: BrokerServices, request: Any) -> trace.Span:
    """One SERVER span for the request, joined to the producers' traces from record headers.

    Counting the records walks every batch header; the search for trace context stops at
    MAX_LINKS traceparents or TRACE_SCAN_BYTES, and a request naming thousands of
    partitions yields to the loop between slices of them."""
    tel = services.telemetry
    partitions = [(td.name, pd.index) for td in request.topic_data for pd in td.partition_data]
    count = 0
    found: dict[bytes, None] = {}
    budget = TRACE_SCAN_BYTES
    for i, (_topic, _partition, data) in enumerate(_batches(request), 1):
        if i % PARTITIONS_PER_SLICE == 0:
            await asyncio.sleep(0)
        try:
            for pos, header in walk_batches(data):
                count += header.records_count
                if len(found) < MAX_LINKS and budget > 0:
                    budget -= header.size
                    want = MAX_LINKS - len(found)
                    found.update(dict.fromkeys(header_values(data, pos, header, TRACEPARENT, want)))
        except (StreamBusError, struct.error):
            continue  # the append rejects this batch and says why; the span just lacks its links
    contexts = tel.contexts_from_traceparents(found)
    return tel.start_record_span("produce", "send", partitions, count, contexts)


def _finish_span(span: trace.Span, topics_out: list[Any]) -> None:
    results = [p for t in topics_out for p in t.partition_responses]
    if len(results) == 1 and results[0].error_code == 0:
        span.set_attribute("messaging.kafka.offset", results[0].base_offset)
    failed = [p for p in results if p.error_code]
    if failed:
        span.set_status(trace.StatusCode.ERROR, f"{len(failed)} partition(s) rejected")
    span.end()


def _batches(request: Any) -> Iterator[tuple[str, int, bytes]]:
    for td in request.topic_data:
        for pd in td.partition_data:
            if pd.records:
                yield td.name, pd.index, pd.records


@routes.api(InitProducerIdRequest, InitProducerIdResponse, versions=(0, 4))
async def handle_init_producer_id(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    if request.transactional_id:
        if not services.authorizer.authorize(
            ctx, acls.WRITE, acls.TRANSACTIONAL_ID, request.transactional_id
        ):
            return _init_refused(services, TransactionalIdAuthorizationFailedError())
        return await init_transactional_producer(services, ctx, request)
    if not services.authorizer.authorize_idempotent(ctx):
        return _init_refused(services, ClusterAuthorizationFailedError())
    try:
        pid, epoch = await services.producer_ids.allocate(
            getattr(request, "producer_id", -1), getattr(request, "producer_epoch", -1)
        )
    except StreamBusError as exc:  # KafkaStorageError, COORDINATOR_LOAD_IN_PROGRESS: no block
        services.telemetry.error("InitProducerId", exc.kafka_name)
        return InitProducerIdResponse(
            throttle_time_ms=0, error_code=exc.errno, producer_id=-1, producer_epoch=-1
        )
    return InitProducerIdResponse(
        throttle_time_ms=0, error_code=0, producer_id=pid, producer_epoch=epoch
    )


def _init_refused(services: BrokerServices, exc: StreamBusError) -> Any:
    services.telemetry.error("InitProducerId", exc.kafka_name)
    return InitProducerIdResponse(
        throttle_time_ms=0, error_code=exc.errno, producer_id=-1, producer_epoch=-1
    )
