"""Fetch and ListOffsets: reading partition logs.

Fetch is a long poll: when fewer than ``min_bytes`` are available the request
waits (up to ``max_wait_ms``) for an append to one of its partitions, then
reads again. Batches are returned whole, as stored; the first batch of the
response is returned even when it is larger than the limits, so a consumer
always makes progress (Kafka's rule). Fetch sessions (KIP-227, v7+) are kept by
``fetch_sessions``: an incremental request reads every partition of its session
and answers only those with something new. A consumer over its fetch quota is
answered with a throttle time and muted (``streambus.quotas``).

Memory and loop time are bounded whatever the request asks: the broker's
``fetch_max_bytes`` caps every response; only its first ``EAGER_BYTES`` of
records are read while handling it, the rest are planned as spans of the log
and read in bounded pieces while the connection writes them; closed segments
are verified (CRC and offsets) in a worker thread before they are first read;
and a request for very many partitions yields to the event loop every
``SLICE_PARTITIONS`` partitions.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kafka.protocol.consumer import (
    FetchRequest,
    FetchResponse,
    ListOffsetsRequest,
    ListOffsetsResponse,
)
from opentelemetry import trace

from streambus.cluster import acls
from streambus.errors import (
    ClusterAuthorizationFailedError,
    InvalidRequestError,
    OffsetOutOfRangeError,
    StreamBusError,
    TopicAuthorizationFailedError,
    UnsupportedVersionError,
    error_name,
)
from streambus.instrumentation import MAX_LINKS, TRACE_SCAN_BYTES
from streambus.partitions import (
    EARLIEST,
    EARLIEST_LOCAL,
    EARLIEST_PENDING_UPLOAD,
    LATEST,
    LATEST_TIERED,
    MAX_TIMESTAMP,
)
from streambus.protocol.apis import ApiRoutes, ConnectionClosedError, RequestContext
from streambus.protocol.fetch_encoding import (
    Records,
    SplicedFetch,
    encode_spliced,
    marker_for,
    new_token,
)
from streambus.protocol.fetch_sessions import FetchContext, FetchPartition
from streambus.quotas import FETCH
from streambus.records.batch import header_values, iter_records, payload_bytes, walk_batches
from streambus.structs import TopicPartition

if TYPE_CHECKING:
    from streambus.partitions import LogSlice
    from streambus.protocol.context import BrokerServices

routes = ApiRoutes()
READ_COMMITTED = 1  # isolation_level: read below the last stable offset, skip aborted
PartitionData = FetchResponse.FetchableTopicResponse.PartitionData
# Records read while the request is handled, per response; beyond this they are read
# piece by piece as they are written. Normal consumer fetches (1 MiB per partition) stay
# below it and keep the single read they always had.
EAGER_BYTES = 2 * 1024 * 1024
SLICE_PARTITIONS = 500  # partitions handled between yields to the event loop
# One thread counts streamed slices: many large fetches at once then queue here instead of
# each taking a thread of the default pool, where a crowd of Python threads would leave the
# event loop waiting its turn for the interpreter.
_COUNTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streambus-fetch-count")


@dataclass(slots=True)
class _Read:
    topic: str
    partition: int
    fetch_offset: int
    error: int = 0
    records: Records = b""
    high_watermark: int = -1
    log_start_offset: int = -1
    last_stable_offset: int = -1  # -1: not asked (a follower's fetch): the high watermark
    aborted: list[tuple[int, int]] | None = None  # (producer id, first offset), read_committed


@routes.api(FetchRequest, FetchResponse, versions=(4, 12), encoder=encode_spliced)
async def handle_fetch(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    started = time.perf_counter()
    # A broker's follower fetch (replica id >= 0) reads to the log end and reports its
    # progress; a consumer's (-1) reads below the high watermark only.
    replica_id = request.replica_id
    try:
        session = _session(services, ctx, request)
    except StreamBusError as exc:  # 70, 71: the client starts over with a full request
        services.telemetry.error("Fetch", exc.kafka_name)
        return SplicedFetch(
            FetchResponse(throttle_time_ms=0, error_code=exc.errno, session_id=0, responses=[]),
            [],
        )
    wanted = session.wanted
    denied: frozenset[str] = frozenset()
    if services.authorizer.enabled:
        if replica_id >= 0 and not services.authorizer.authorize_cluster(ctx, acls.CLUSTER_ACTION):
            services.telemetry.error("Fetch", ClusterAuthorizationFailedError.kafka_name)
            return SplicedFetch(
                FetchResponse(
                    throttle_time_ms=0,
                    error_code=ClusterAuthorizationFailedError.errno,
                    session_id=0,
                    responses=[],
                ),
                [],
            )
        if replica_id < 0:
            topics = {w.topic for w in wanted}
            allowed = services.authorizer.allowed_names(ctx, acls.READ, acls.TOPIC, topics)
            denied = frozenset(topics - allowed)
    committed = replica_id < 0 and request.isolation_level == READ_COMMITTED
    asked = request.max_bytes if ctx.api_version >= 3 else 2**31 - 1
    max_bytes = min(asked, services.config.fetch_max_bytes)
    deadline = started + max(request.max_wait_ms, 0) / 1000
    # Closed segments this fetch may read for the first time are verified first, in a
    # worker thread (again after each wait: an append may have rolled a segment).
    to_verify: list[tuple[TopicPartition, int, int]] = []
    for i, (t, p, o, m, _) in enumerate(wanted, 1):
        if i % SLICE_PARTITIONS == 0:
            await asyncio.sleep(0)
        to_verify.append((TopicPartition(t, p), o, min(m, max_bytes)))
    while True:
        await services.partitions.verify_for_read(to_verify, slice_size=SLICE_PARTITIONS)
        reads, total = await _read_all(
            services, wanted, max_bytes, replica_id, committed, denied=denied
        )
        remaining = deadline - time.perf_counter()
        if (
            total >= max(request.min_bytes, 1)
            or remaining <= 0
            or any(r.error for r in reads)
            or services.stopping
        ):
            break
        tps = [TopicPartition(w.topic, w.partition) for w in wanted]
        await services.partitions.wait_for_append(tps, remaining, ctx.closed)
        if ctx.closed is not None and ctx.closed.done():
            raise ConnectionClosedError("client closed during a long poll")
    reads = session.answer(reads)
    if replica_id >= 0:
        _count_errors(services, reads)
        return await _response(request, reads, session.session_id)
    await _account(services, reads)
    elapsed = time.perf_counter() - started
    for topic in {r.topic for r in reads}:
        services.telemetry.consume_latency(topic, elapsed)
    # Kafka's fetch quota: the bytes handed out count; over the quota, the connection
    # is muted for the throttle time after this answer (before it, for v7 and older).
    throttle = services.quotas.record(
        FETCH, ctx.principal, ctx.client_id, sum(len(r.records) for r in reads)
    )
    ctx.throttle.ms, ctx.throttle.delay_response = throttle, ctx.api_version < 8
    return await _response(request, reads, session.session_id, throttle)


def _session(services: BrokerServices, ctx: RequestContext, request: Any) -> FetchContext:
    wanted = [
        FetchPartition(t.topic, p.partition, p.fetch_offset, p.partition_max_bytes, _epoch(p))
        for t in request.topics
        for p in t.partitions
    ]
    if ctx.api_version < 7:
        return FetchContext(wanted)
    forgotten = [(t.topic, p) for t in request.forgotten_topics_data or () for p in t.partitions]
    return services.fetch_sessions.context(
        ctx.api_version,
        request.session_id,
        request.session_epoch,
        wanted,
        forgotten,
        privileged=request.replica_id >= 0,
    )


def _epoch(p: Any) -> int:
    epoch = getattr(p, "current_leader_epoch", -1)
    return -1 if epoch is None else int(epoch)


async def _read_all(
    services: BrokerServices,
    wanted: Sequence[FetchPartition],
    max_bytes: int,
    replica_id: int = -1,
    committed: bool = False,
    *,
    denied: frozenset[str] = frozenset(),
) -> tuple[list[_Read], int]:
    partitions = services.partitions
    reads: list[_Read] = []
    total = 0
    eager = EAGER_BYTES
    for i, (topic, partition, offset, partition_max, epoch) in enumerate(wanted, 1):
        if i % SLICE_PARTITIONS == 0:
            await asyncio.sleep(0)  # a fetch of 100,000 partitions must not stall everyone
        read = _Read(topic, partition, offset)
        reads.append(read)
        if topic in denied:  # no READ on the topic
            read.error = TopicAuthorizationFailedError.errno
            continue
        tp = TopicPartition(topic, partition)
        budget = min(partition_max, max_bytes - total)
        got: LogSlice
        try:
            if replica_id >= 0:
                offsets, got = partitions.follower_fetch(
                    tp, replica_id, offset, epoch, max(budget, 1), eager_bytes=eager
                )
                read.log_start_offset, read.high_watermark = offsets
                if budget <= 0 and total:
                    continue
            else:
                partitions.check_epoch(tp, epoch)
                read.log_start_offset, read.high_watermark = partitions.offsets(tp)
                read.last_stable_offset = partitions.last_stable_offset(tp)
                if budget <= 0 and total:
                    continue
                got = partitions.read_slice(
                    tp, offset, max(budget, 1), eager_bytes=eager, committed=committed
                )
                if committed and len(got):
                    read.aborted = partitions.aborted_transactions(
                        tp, offset, read.last_stable_offset
                    )
        except OffsetOutOfRangeError as exc:
            read.error = exc.errno
            if replica_id >= 0:  # the follower restarts at our log start if it is behind it
                read.log_start_offset, read.high_watermark = partitions.offsets(tp)
            continue
        except StreamBusError as exc:
            read.error = exc.errno
            continue
        if total and len(got) > budget:
            continue  # only the response's first batch may exceed the limits
        if got.data is not None:
            read.records = got.data
            eager -= len(got)
        else:
            read.records = got
        total += len(got)
    return reads, total


def _pieces(records: Records) -> Iterator[bytes | memoryview]:
    if isinstance(records, bytes | memoryview):
        if records:
            yield records
    else:
        yield from records.pieces()


def _count_errors(services: BrokerServices, reads: list[_Read]) -> None:
    errors = Counter(read.error for read in reads if read.error)
    for code, count in errors.items():
        services.telemetry.error("Fetch", error_name(code), count)


async def _account(services: BrokerServices, reads: list[_Read]) -> None:
    """Count what the response hands out: per partition, never per record."""
    tel = services.telemetry
    span: trace.Span | None = None
    count_all = 0
    errors: Counter[int] = Counter()  # counted per request and code, not per partition
    for i, read in enumerate(reads, 1):
        if i % SLICE_PARTITIONS == 0:
            await asyncio.sleep(0)
        if read.error:
            errors[read.error] += 1
            continue
        if not read.records:
            continue
        tp = TopicPartition(read.topic, read.partition)
        if isinstance(read.records, bytes | memoryview):
            messages, payload = _consumed(services, tp, read.records, read.fetch_offset)
        else:
            # A streamed slice is not in memory: counting it reads it, which is disk and
            # CPU work for a worker thread, not for the loop every client shares.
            try:
                messages, payload = await asyncio.get_running_loop().run_in_executor(
                    _COUNTER, _consumed, services, tp, read.records, read.fetch_offset
                )
            except StreamBusError:  # the log changed under it; sending it fails the same way
                continue
        count_all += messages
        tel.consumed(read.topic, read.partition, messages, payload)
    for code, count in errors.items():
        tel.error("Fetch", error_name(code), count)
    if count_all and tel.tracing_enabled():
        span = _fetch_span(services, reads, count_all)
        span.end()


def _consumed(
    services: BrokerServices, tp: TopicPartition, records: Records, fetch_offset: int
) -> tuple[int, int]:
    """Messages and payload bytes at or after ``fetch_offset`` in whole stored batches."""
    partitions = services.partitions
    messages = payload = 0
    for data in _pieces(records):
        view = memoryview(data)
        for pos, header in walk_batches(data):
            if header.base_offset >= fetch_offset:
                messages += header.records_count
                size = partitions.payload_size(tp, header.base_offset, header.crc)
                payload += payload_bytes(view, pos, header) if size is None else size
            elif header.last_offset >= fetch_offset:
                # The first batch may start before the offset asked for; the
                # client skips those records, so they are not counted as consumed.
                for record in iter_records(view, pos, header):
                    if record.offset >= fetch_offset:
                        messages += 1
                        payload += _record_payload(record)
    return messages, payload


def _record_payload(record: Any) -> int:
    size = len(record.key or b"") + len(record.value or b"")
    for key, value in record.headers:
        size += len(key.encode()) + len(value or b"")
    return size


def _fetch_span(services: BrokerServices, reads: list[_Read], count: int) -> trace.Span:
    tel = services.telemetry
    with_data = [r for r in reads if r.records]
    span = tel.start_record_span(
        "fetch", "receive", [(r.topic, r.partition) for r in with_data], count
    )
    if len(with_data) == 1:
        span.set_attribute("messaging.kafka.offset", with_data[0].fetch_offset)
    if span.is_recording():
        # Links cost a scan of the records, so only spans that will be exported get them.
        for context in tel.contexts_from_traceparents(_traceparents(with_data)):
            span.add_link(context)
    return span


def _traceparents(reads: list[_Read]) -> list[bytes]:
    """Up to MAX_LINKS distinct traceparent values from the first TRACE_SCAN_BYTES of
    records: each batch is searched once, so the cost is linear and bounded."""
    found: dict[bytes, None] = {}
    budget = TRACE_SCAN_BYTES
    for read in reads:
        for data in _pieces(read.records):
            for pos, header in walk_batches(data):
                if header.last_offset < read.fetch_offset:
                    continue
                want = MAX_LINKS - len(found)
                found.update(dict.fromkeys(header_values(data, pos, header, "traceparent", want)))
                budget -= header.size
                if len(found) >= MAX_LINKS or budget <= 0:
                    return list(found)[:MAX_LINKS]
    return list(found)


async def _response(
    request: Any, reads: list[_Read], session_id: int = 0, throttle_ms: int = 0
) -> SplicedFetch:
    token = new_token()
    by_topic: dict[str, list[Any]] = {}
    parts: list[tuple[Any, bytes, Records]] = []
    for index, read in enumerate(reads):
        if index and index % SLICE_PARTITIONS == 0:
            await asyncio.sleep(0)  # 100,000 partitions' answers are built in slices too
        data = PartitionData(
            partition_index=read.partition,
            error_code=read.error,
            high_watermark=read.high_watermark,
            last_stable_offset=(
                read.high_watermark if read.last_stable_offset < 0 else read.last_stable_offset
            ),
            log_start_offset=read.log_start_offset,
            aborted_transactions=(
                None
                if read.aborted is None
                else [
                    PartitionData.AbortedTransaction(producer_id=pid, first_offset=first)
                    for pid, first in read.aborted
                ]
            ),
            preferred_read_replica=-1,
            records=read.records if read.records else b"",
        )
        if read.records:
            marker = marker_for(token, index)
            data.records = marker
            parts.append((data, marker, read.records))
        by_topic.setdefault(read.topic, []).append(data)
    response = FetchResponse(
        throttle_time_ms=throttle_ms,
        error_code=0,
        session_id=session_id,
        responses=[
            FetchResponse.FetchableTopicResponse(topic=topic, partitions=partitions)
            for topic, partitions in by_topic.items()
        ],
    )
    return SplicedFetch(response, parts)


# v7 asks for the record with the largest timestamp (-3), v8 for the earliest local
# offset (-4), v9 for the latest tiered offset (-5), v10 adds a timeout for tiered reads,
# v11 asks for the earliest offset pending upload to tiered storage (-6); all answered
# (no tiered storage: -4 is the log start, -5 and -6 have no offset). A special timestamp
# in a version older than the one that introduced it, or a negative one no version
# defines, is UNSUPPORTED_VERSION for that partition, as Kafka's ReplicaManager answers
# (a client must not learn an answer its version cannot express).
SPECIAL_TIMESTAMP_SINCE = {
    LATEST: 1,
    EARLIEST: 1,
    MAX_TIMESTAMP: 7,
    EARLIEST_LOCAL: 8,
    LATEST_TIERED: 9,
    EARLIEST_PENDING_UPLOAD: 11,
}


def _timestamp_unsupported(timestamp: int, version: int) -> bool:
    return timestamp < 0 and version < SPECIAL_TIMESTAMP_SINCE.get(timestamp, 1 << 15)


@routes.api(ListOffsetsRequest, ListOffsetsResponse, versions=(1, 11))
async def handle_list_offsets(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = ListOffsetsResponse
    topics = []
    asked = Counter(
        TopicPartition(t.name, p.partition_index) for t in request.topics for p in t.partitions
    )
    for topic in request.topics:
        parts = []
        may = services.authorizer.authorize(ctx, acls.DESCRIBE, acls.TOPIC, topic.name)
        for p in topic.partitions:
            error, timestamp, offset, epoch = 0, -1, -1, -1
            try:
                if not may:
                    raise TopicAuthorizationFailedError()
                tp = TopicPartition(topic.name, p.partition_index)
                if asked[tp] > 1:  # Kafka answers each copy of a repeated one so
                    raise InvalidRequestError(f"{tp.topic}-{tp.partition} asked twice")
                if _timestamp_unsupported(p.timestamp, ctx.api_version):
                    raise UnsupportedVersionError(
                        f"ListOffsets v{ctx.api_version} cannot ask for timestamp {p.timestamp}"
                    )
                services.partitions.check_epoch(tp, _epoch(p))
                timestamp, offset = services.partitions.list_offset(
                    tp, p.timestamp, committed=request.isolation_level == READ_COMMITTED
                )
                if offset >= 0:  # no offset found: no epoch either
                    epoch = services.partitions.leader_epoch(tp)
            except StreamBusError as exc:
                error = exc.errno
                services.telemetry.error("ListOffsets", exc.kafka_name)
            parts.append(
                R.ListOffsetsTopicResponse.ListOffsetsPartitionResponse(
                    partition_index=p.partition_index,
                    error_code=error,
                    timestamp=timestamp,
                    offset=offset,
                    leader_epoch=epoch,
                )
            )
        topics.append(R.ListOffsetsTopicResponse(name=topic.name, partitions=parts))
    return R(throttle_time_ms=0, topics=topics)
