"""Log compaction: keep only the latest record per key in a partition's closed segments.

Two passes over the cleanable segments (closed ones, stopping at the first that
is younger than min.compaction.lag.ms):

1. map every key to the offset of its latest record, counting keyed records per
   segment, so segments where every keyed record is still the latest are left
   untouched without a second decode;
2. rewrite each other segment into ``<base>.log.cleaned`` and swap it in
   atomically (``Segment.replace_log``).

A batch that loses no record is copied byte for byte (producer ids, compression
and all). A batch that loses some becomes one uncompressed batch of its
survivors, at their original offsets (``build_batch`` with ``offset_deltas``),
without producer id; a batch that loses all disappears. Tombstones (null value)
go once their segment's newest data is older than delete.retention.ms.

The key map lives in memory (one entry per distinct key of the cleanable
segments); Kafka bounds it with log.cleaner.dedupe.buffer.size, we do not.
Records without a key (written before the topic became compacted) are kept.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

from streambus.storage.batch import (
    BatchHeader,
    Record,
    build_batch,
    iter_records,
    set_log_append_time,
)
from streambus.storage.segment import Segment
from streambus.topic_config import TopicConfig


class CleanResult(NamedTuple):
    rewritten: int  # segments replaced by a cleaned copy
    records_removed: int
    emptied: list[Segment]  # rewritten segments left without any batch
    tombstones_due_ms: int  # when the oldest kept tombstone may go; -1 if none kept


def cleanable_segments(
    segments: Sequence[Segment], config: TopicConfig, now_ms: int
) -> list[Segment]:
    """The closed segments compaction may touch: never the active (last) one."""
    out: list[Segment] = []
    for segment in segments[:-1]:
        if now_ms - segment.largest_time_ms < config.min_compaction_lag_ms:
            break
        out.append(segment)
    return out


def _rebuild(survivors: list[Record], header: BatchHeader) -> bytes:
    first = survivors[0].offset
    data = build_batch(
        [(r.key, r.value, r.headers, r.timestamp) for r in survivors],
        base_offset=first,
        offset_deltas=[r.offset - first for r in survivors],
    )
    if header.timestamp_type == 1:
        buf = bytearray(data)
        set_log_append_time(buf, 0, header.max_timestamp)
        data = bytes(buf)
    return data


def clean(segments: Sequence[Segment], config: TopicConfig, now_ms: int) -> CleanResult:
    latest: dict[bytes, int] = {}
    tombstones: set[bytes] = set()  # keys whose latest record is a tombstone
    keyed = [0] * len(segments)
    for i, segment in enumerate(segments):
        for _, header, view in segment.iter_batches():
            if header.is_control:
                continue
            for record in iter_records(view, 0, header):
                if record.key is None:
                    continue
                keyed[i] += 1
                latest[record.key] = record.offset
                if record.value is None:
                    tombstones.add(record.key)
                else:
                    tombstones.discard(record.key)

    horizon = now_ms - config.delete_retention_ms
    drop_tombstones = [segment.largest_time_ms < horizon for segment in segments]
    bases = [segment.base_offset for segment in segments]
    survivors = [0] * len(segments)
    tombstones_due_ms = -1
    for key, offset in latest.items():
        i = bisect_right(bases, offset) - 1
        if key in tombstones:
            if drop_tombstones[i]:
                continue
            due = segments[i].largest_time_ms + config.delete_retention_ms + 1
            tombstones_due_ms = due if tombstones_due_ms < 0 else min(tombstones_due_ms, due)
        survivors[i] += 1

    rewritten = removed = 0
    emptied: list[Segment] = []
    for i, segment in enumerate(segments):
        if survivors[i] == keyed[i]:
            continue
        removed += _rewrite(segment, latest, drop_tombstones[i])
        rewritten += 1
        if segment.size == 0:
            emptied.append(segment)
    return CleanResult(rewritten, removed, emptied, tombstones_due_ms)


def _rewrite(segment: Segment, latest: dict[bytes, int], drop_tombstones: bool) -> int:
    """Write the segment's surviving records to its .cleaned file and swap it in."""
    removed = 0
    with segment.cleaned_path.open("wb") as out:
        for _, header, view in segment.iter_batches():
            if header.is_control:
                out.write(view)
                continue
            kept: list[Record] = []
            for record in iter_records(view, 0, header):
                if record.key is not None and (
                    latest.get(record.key) != record.offset
                    or (record.value is None and drop_tombstones)
                ):
                    continue
                kept.append(record)
            removed += header.records_count - len(kept)
            if len(kept) == header.records_count:
                out.write(view)
            elif kept:
                out.write(_rebuild(kept, header))
        out.flush()
        os.fsync(out.fileno())
    segment.replace_log()
    return removed
