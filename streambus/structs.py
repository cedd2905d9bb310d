"""Immutable value types shared across the broker."""

from __future__ import annotations

from typing import NamedTuple, NewType

BrokerId = NewType("BrokerId", int)
ProducerId = NewType("ProducerId", int)
Offset = NewType("Offset", int)


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class AppendResult(NamedTuple):
    """What a partition log reports for one appended record batch."""

    base_offset: int
    last_offset: int
    log_append_time_ms: int  # -1 unless the topic uses LogAppendTime
    log_start_offset: int
    record_count: int
    payload_bytes: int  # key + value + header bytes of the batch's records
    duplicate: bool  # an idempotent retry of a batch already stored
    crc: int  # the stored batch's CRC-32C: with the base offset, it names the batch
    # flush.messages / flush.ms was reached and the fsync runs in a worker thread: the
    # append is acknowledged only after PartitionLog.wait_synced(last_offset + 1).
    needs_sync: bool = False


class ReplicatedAppend(NamedTuple):
    """What a partition log reports for batches copied from the leader's log as they were."""

    first_offset: int  # base offset of the first batch (the log end offset if none)
    last_offset: int  # last offset of the last batch (first_offset - 1 if none)
    batches: int
    records: int
    bytes: int  # whole batches stored; a trailing partial batch is not counted
    max_timestamp: int  # largest batch max timestamp, -1 if none
    # As AppendResult.needs_sync: the fsync runs in a worker thread and the offsets are
    # durable only after PartitionLog.wait_synced(last_offset + 1).
    needs_sync: bool = False
