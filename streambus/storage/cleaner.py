"""Log compaction: keep only the latest record per key in a partition's closed segments.

Two passes over the cleanable segments (closed ones, stopping at the first that
is younger than min.compaction.lag.ms):

1. map every key to the offset of its latest record, counting keyed records per
   segment, so segments where every keyed record is still the latest are left
   untouched without a second decode;
2. rewrite each other segment into ``<base>.log.cleaned`` (with its indexes, also
   under ``.cleaned`` names), fsynced, for the log to swap in (``Segment.adopt``).

``clean`` is the slow part and runs in a worker thread: it reads twins of the
segments (``Segment.reader``, each with a descriptor of its own) and never touches
the segments the event loop serves from; the log swaps the results in on the loop.
It checks an abort flag between batches, so a topic deleted or a broker stopped
mid-way waits for at most one batch, and removes what it staged when aborted.

A batch that loses no record is copied byte for byte (producer ids, compression
and all). A batch that loses some becomes one uncompressed batch of its
survivors, at their original offsets (``build_batch`` with ``offset_deltas``),
without producer id; a batch that loses all disappears. Tombstones (null value)
go once their segment's newest data is older than delete.retention.ms.

The key map lives in memory (one entry per distinct key of the cleanable
segments); Kafka bounds it with log.cleaner.dedupe.buffer.size, we do not.
Records without a key (written before the topic became compacted) are kept.

Transactions (Kafka's rules, a subset): the log cleans only below its oldest open
transaction and passes the aborted transactions of the range (its index). Records
of aborted transactions are dropped and never count as a key's latest value;
committed ones are compacted like any other. Markers are always kept (Kafka drops
one delete.retention.ms after its transaction's records are gone; keeping it is
safe, only less compact), so the aborted-transaction index stays true.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from streambus.records.batch import (
    BatchHeader,
    Record,
    build_batch,
    iter_records,
    read_header,
    set_log_append_time,
    set_partition_leader_epoch,
)
from streambus.storage.segment import Segment
from streambus.topic_config import TopicConfig

if TYPE_CHECKING:
    from streambus.storage.txnindex import AbortedTxn


class CleanResult(NamedTuple):
    staged: list[tuple[int, Segment]]  # (index in the input, cleaned copy to adopt)
    records_removed: int
    tombstones_due_ms: int  # when the oldest kept tombstone may go; -1 if none kept

    @property
    def rewritten(self) -> int:
        """Segments replaced by a cleaned copy."""
        return len(self.staged)


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


class _Aborted:
    """Which transactional batches belong to an aborted transaction."""

    def __init__(self, aborted: Sequence[AbortedTxn]) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        for entry in aborted:
            self._ranges.setdefault(entry.producer_id, []).append(
                (entry.first_offset, entry.last_offset)
            )

    def __contains__(self, header: BatchHeader) -> bool:
        if not header.is_transactional or header.is_control:
            return False
        ranges = self._ranges.get(header.producer_id)
        if ranges is None:
            return False
        offset = header.base_offset
        return any(first <= offset <= last for first, last in ranges)


def _rebuild(survivors: list[Record], header: BatchHeader) -> bytes:
    first = survivors[0].offset
    data = build_batch(
        [(r.key, r.value, r.headers, r.timestamp) for r in survivors],
        base_offset=first,
        offset_deltas=[r.offset - first for r in survivors],
    )
    buf = bytearray(data)
    set_partition_leader_epoch(buf, 0, header.partition_leader_epoch)  # as Kafka's cleaner
    if header.timestamp_type == 1:
        set_log_append_time(buf, 0, header.max_timestamp)
    return bytes(buf)


class _AbortedError(Exception):
    """The cleaning was called off; never leaves this module."""


_YIELD_BYTES = 64 * 1024  # batch bytes decoded between two hand-overs of the GIL


class _Pace:
    """Called between batches: stops an aborted cleaning, and hands the GIL to the event
    loop's thread often. Without that the loop waits up to the interpreter's switch
    interval (5 ms) each time it wants the GIL back, several times per request."""

    def __init__(self, abort: threading.Event) -> None:
        self._abort = abort
        self._since = 0

    def step(self, size: int) -> None:
        if self._abort.is_set():
            raise _AbortedError
        self._since += size
        if self._since >= _YIELD_BYTES:
            self._since = 0
            time.sleep(0)


def clean(
    segments: Sequence[Segment],
    config: TopicConfig,
    now_ms: int,
    abort: threading.Event | None = None,
    aborted: Sequence[AbortedTxn] = (),
) -> CleanResult | None:
    """Clean ``segments`` (twins from ``Segment.reader``) into staged copies.

    ``aborted``: the aborted transactions whose records fall in the segments.
    None if ``abort`` was set meanwhile; whatever was staged is then removed.
    """
    staged: list[tuple[int, Segment]] = []
    try:
        return _clean(
            segments, config, now_ms, abort or threading.Event(), staged, aborted=_Aborted(aborted)
        )
    except BaseException:
        for _, copy in staged:
            copy.discard_staging()
        if abort is not None and abort.is_set():
            return None
        raise
    finally:
        for segment in segments:
            segment.release_fd()


def _clean(
    segments: Sequence[Segment],
    config: TopicConfig,
    now_ms: int,
    abort: threading.Event,
    staged: list[tuple[int, Segment]],
    *,
    aborted: _Aborted,
) -> CleanResult:
    pace = _Pace(abort)
    latest: dict[bytes, int] = {}
    tombstones: set[bytes] = set()  # keys whose latest record is a tombstone
    keyed = [0] * len(segments)
    dropped = [0] * len(segments)  # records of aborted transactions
    for i, segment in enumerate(segments):
        for _, header, view in segment.iter_batches():
            pace.step(header.size)
            if header.is_control:
                continue
            if header in aborted:
                dropped[i] += header.records_count
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
        segment.release_fd()  # one descriptor at a time, however many segments

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

    removed = 0
    for i, segment in enumerate(segments):
        if survivors[i] == keyed[i] and not dropped[i]:
            continue
        copy = segment.staging()
        staged.append((i, copy))
        removed += _rewrite(
            segment,
            copy,
            latest,
            aborted,
            drop_tombstones=drop_tombstones[i],
            now_ms=now_ms,
            pace=pace,
        )
        segment.release_fd()
    return CleanResult(staged, removed, tombstones_due_ms)


def _rewrite(
    segment: Segment,
    copy: Segment,
    latest: dict[bytes, int],
    aborted: _Aborted,
    *,
    drop_tombstones: bool,
    now_ms: int,
    pace: _Pace,
) -> int:
    """Write the segment's surviving records into ``copy``, fsynced."""
    removed = 0
    for _, header, view in segment.iter_batches():
        pace.step(header.size)
        if header.is_control:
            copy.append(view, header, now_ms)
            continue
        if header in aborted:
            removed += header.records_count
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
            copy.append(view, header, now_ms)
        elif kept:
            data = _rebuild(kept, header)
            copy.append(data, read_header(data, 0), now_ms)
    segment.finish_staging(copy)
    return removed
