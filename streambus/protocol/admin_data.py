"""DeleteRecords, DescribeLogDirs and OffsetDelete: the operator's APIs over stored data
(``kafka-delete-records``, ``kafka-log-dirs``, ``kafka-consumer-groups --delete-offsets``).

DeleteRecords moves a partition's log start offset on its leader (followers follow it
through the log start offset of their fetches) and answers once its checkpoint is on
disk; it does not wait for the followers' copies (Kafka's purgatory does). One log
directory is described: the broker's data dir.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    DeleteRecordsRequest,
    DeleteRecordsResponse,
    DescribeLogDirsRequest,
    DescribeLogDirsResponse,
)
from kafka.protocol.consumer import OffsetDeleteRequest, OffsetDeleteResponse

from streambus.errors import (
    InvalidGroupIdError,
    InvalidTopicError,
    StreamBusError,
    error_name,
)
from streambus.groups.offset_delete import delete_offsets
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.protocol.groups import replicate_commit
from streambus.structs import TopicPartition

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()
SLICE_PARTITIONS = 500  # partitions described between yields to the event loop


@routes.api(DeleteRecordsRequest, DeleteRecordsResponse, versions=(0, 2))
async def handle_delete_records(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = DeleteRecordsResponse
    T = R.DeleteRecordsTopicResult
    topics = []
    for topic in request.topics:
        results = []
        for p in topic.partitions:
            tp = TopicPartition(topic.name, p.partition_index)
            low, error = -1, 0
            try:
                if services.partitions.is_internal(tp.topic):
                    # Kafka refuses clients this too: the broker alone trims those logs.
                    raise InvalidTopicError(f"cannot delete records of internal topic {tp.topic}")
                low = await services.partitions.delete_records(tp, int(p.offset))
            except StreamBusError as exc:
                services.telemetry.error("DeleteRecords", exc.kafka_name)
                log.info("DeleteRecords %s from %s refused: %s", tp, ctx.client_id, exc)
                error = exc.errno
            else:
                log.info(
                    "deleted records of %s-%d below offset %d for %s",
                    tp.topic,
                    tp.partition,
                    low,
                    ctx.client_id,
                )
            results.append(
                T.DeleteRecordsPartitionResult(
                    partition_index=p.partition_index, low_watermark=low, error_code=error
                )
            )
        topics.append(T(name=topic.name, partitions=results))
    return R(throttle_time_ms=0, topics=topics)


@routes.api(DescribeLogDirsRequest, DescribeLogDirsResponse, versions=(1, 5))
async def handle_describe_log_dirs(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeLogDirsResponse
    D = R.DescribeLogDirsResult
    P = D.DescribeLogDirsTopic.DescribeLogDirsPartition
    wanted: dict[str, set[int]] | None = None
    if request.topics is not None:
        wanted = {}
        for t in request.topics:
            wanted.setdefault(t.topic, set()).update(int(p) for p in t.partitions)
    by_topic: dict[str, list[Any]] = {}
    for i, (tp, size, lag) in enumerate(services.partitions.log_sizes(), 1):
        if i % SLICE_PARTITIONS == 0:
            await asyncio.sleep(0)
        if wanted is not None and tp.partition not in wanted.get(tp.topic, ()):
            continue
        by_topic.setdefault(tp.topic, []).append(
            P(
                partition_index=tp.partition,
                partition_size=size,
                offset_lag=lag,
                is_future_key=False,
            )
        )
    data_dir = services.partitions.data_dir.resolve()
    try:
        usage = shutil.disk_usage(data_dir)
        total, usable = usage.total, usage.free
    except OSError:  # Kafka's "unknown" for the volume's sizes
        total = usable = -1
    result = D(
        error_code=0,
        log_dir=str(data_dir),
        topics=[
            D.DescribeLogDirsTopic(name=name, partitions=sorted(parts, key=_index))
            for name, parts in sorted(by_topic.items())
        ],
        total_bytes=total,
        usable_bytes=usable,
        is_cordoned=False,
    )
    return R(throttle_time_ms=0, error_code=0, results=[result])


def _index(partition: Any) -> int:
    return int(partition.partition_index)


@routes.api(OffsetDeleteRequest, OffsetDeleteResponse, versions=(0, 0))
async def handle_offset_delete(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    R = OffsetDeleteResponse
    T = R.OffsetDeleteResponseTopic
    group_id = request.group_id
    asked = [
        TopicPartition(t.name, p.partition_index) for t in request.topics for p in t.partitions
    ]
    try:
        if not group_id:
            raise InvalidGroupIdError("group id must not be empty")
        services.check_coordinator(group_id)
        errors, written = delete_offsets(services.groups, group_id, asked)
        if written:  # answered once the ISR has the tombstones, as a commit is
            home = services.groups.offsets.partition_for(group_id)
            _, end, _ = services.partitions.replica_log_end(home)
            await replicate_commit(services, home, end)
    except StreamBusError as exc:
        services.telemetry.error("OffsetDelete", exc.kafka_name)
        log.info("OffsetDelete %r from %s refused: %s", group_id, ctx.client_id, exc)
        return R(error_code=exc.errno, throttle_time_ms=0, topics=[])
    by_topic: dict[str, list[Any]] = {}
    for tp in asked:
        code = errors[tp]
        if code:
            services.telemetry.error("OffsetDelete", error_name(code))
        by_topic.setdefault(tp.topic, []).append(
            T.OffsetDeleteResponsePartition(partition_index=tp.partition, error_code=code)
        )
    deleted = sum(1 for tp in asked if not errors[tp])
    log.info(
        "OffsetDelete %r from %s: %d of %d partitions", group_id, ctx.client_id, deleted, len(asked)
    )
    return R(
        error_code=0,
        throttle_time_ms=0,
        topics=[T(name=name, partitions=parts) for name, parts in by_topic.items()],
    )
