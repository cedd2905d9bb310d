"""The log of one partition: an ordered run of segments, only the last one written.

Offsets are contiguous as assigned, but retention removes whole segments from
the front and compaction removes records from closed segments, so a reader at
any offset in [log_start_offset, log_end_offset) gets the first batch whose last
offset is at or after it.

Durability: ``append`` leaves the batch in the page cache (it survives a
process kill); fsync follows flush.messages / flush.ms. A rolled segment is
fsynced by the next ``flush``/``maybe_flush`` rather than inside the produce
request that rolled it, and only the last segment is re-checked on open.

Corruption: a closed segment is verified before it is first read (see
segment.py); every bad region found is logged once at ERROR, naming the file,
byte position and offset, and counted in ``corruptions`` for the broker to
export. The log end offset is also written to ``leo.checkpoint`` at each flush
and on close: a log that opens with a lower end (its last segment cut or
zeroed) reports it and continues at the checkpoint, so no offset is handed out
twice.

Slow work leaves the event loop once the log is given a background submitter
(``set_background``, as the LogManager does): the flush.messages / flush.ms
trigger in ``append`` then starts an fsync in a worker thread instead of
syncing inline; the thread opens the files itself, so the loop may close its
own descriptors meanwhile. Maintenance is split the same way: the loop picks what to do and
swaps results in (``detach_expired``, ``start_compaction`` /
``finish_compaction``, ``flush_if_due``); files are unlinked, cleaned and
fsynced in threads. While a compaction runs the log is marked as cleaning:
retention waits, and a close aborts the cleaner and discards its result.
Without a submitter (tests, tools) everything runs inline as before.

Replication: ``append`` stamps the leader epoch in each batch and keeps the
epoch cache (epochs.py); a follower stores the leader's batches unchanged with
``append_replicated`` and cuts its log back with ``truncate_to`` /
``truncate_fully_and_start_at`` when it meets a new leader. A truncation lowers
``leo.checkpoint`` before it cuts, so it is never reported as lost data, and
rebuilds producer state from the batches that remain. The high watermark is
kept in ``hw.checkpoint`` beside it (same format), written at each flush.

Transactions: transactional batches open their producer's transaction here and
``append_marker`` (or a marker copied by ``append_replicated``) ends it; the
last stable offset stops at the oldest open transaction, and each abort adds
an entry to the aborted-transaction index (txnindex.py), one ``.txnindex`` per
segment. Open, truncation and retention keep both in step with the batches:
they are replayed from batch headers (a marker's key is read only where a
segment's index file is missing, corrupt, or the last one). Compaction stops
below the oldest open transaction, drops aborted records and keeps every marker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from streambus.errors import (
    CorruptRecordError,
    InvalidRecordError,
    KafkaStorageError,
    MessageTooLargeError,
    NotLeaderOrFollowerError,
    OffsetOutOfRangeError,
    RecordListTooLargeError,
    StreamBusError,
)
from streambus.records.batch import (
    HEADER,
    LOG_OVERHEAD,
    MIN_BATCH_LENGTH,
    BatchHeader,
    ControlRecord,
    build_control_batch,
    check_batch,
    iter_records,
    parse_batches,
    parse_control_record,
    read_header,
    set_base_offset,
    set_log_append_time,
    set_partition_leader_epoch,
    validate_records,
)
from streambus.storage import cleaner
from streambus.storage.epochs import LeaderEpochCache
from streambus.storage.health import WriteHealth
from streambus.storage.producer_state import CompletedTxn, ProducerInfo, ProducerState
from streambus.storage.segment import Segment, fsync_dir
from streambus.storage.txnindex import (
    TXN_INDEX_SUFFIX,
    AbortedTransactions,
    AbortedTxn,
    append_entry,
    read_index,
    write_index,
)
from streambus.storage.verify import BadRegion, ScanResult
from streambus.structs import AppendResult, ReplicatedAppend
from streambus.topic_config import TimestampType, TopicConfig

log = logging.getLogger("streambus.storage")

_SEGMENT_SUFFIX = ".log"
_NAME_DIGITS = 20
# Log end offset checkpoint, text: a format version line ("0"), then the offset.
CHECKPOINT_FILE = "leo.checkpoint"
# High watermark checkpoint, same format: the offset below which every record is on
# every in-sync replica, so a restart does not show consumers less than they saw.
HW_CHECKPOINT_FILE = "hw.checkpoint"
# Log start offset checkpoint, same format (Kafka's log-start-offset-checkpoint, kept per
# partition here): DeleteRecords may move the log start into the first segment, above its
# base offset, and that must outlive a restart. Absent: the first segment's base offset.
LOG_START_CHECKPOINT_FILE = "log-start.checkpoint"
_CHECKPOINT_VERSION = "0"


Scanned = tuple[Segment, int, ScanResult]  # segment, its generation when scanned, result


class Span(NamedTuple):
    """Whole batches of one segment, to be read when they are sent."""

    segment: Segment
    position: int
    length: int
    generation: int  # the segment's, when planned


class LogSlice:
    """Whole batches planned by ``PartitionLog.read_slice``, read in bounded pieces on demand.

    ``data`` holds the bytes when they were read while planning (small slices);
    otherwise ``pieces`` reads each span, batch-aligned, when asked.
    """

    __slots__ = ("data", "size", "spans")

    def __init__(self, spans: list[Span], data: bytes | memoryview | None) -> None:
        self.spans = spans
        self.data = data
        self.size = sum(span.length for span in spans)

    def __len__(self) -> int:
        return self.size

    def pieces(self) -> Iterator[bytes | memoryview]:
        if self.data is not None:
            if self.data:
                yield self.data
            return
        for span in self.spans:
            yield from span.segment.read_pieces(span.position, span.length, span.generation)


# Runs a job in a worker thread: the LogManager's executor, set with set_background.
Submit = Callable[[Callable[[], None]], "Future[None]"]


def _fsync_files(directory: Path, paths: list[Path], sync_dir: bool) -> None:
    """Worker thread: fsync files and, after a roll, the directory.

    Each file is opened here, by name: the thread never uses a descriptor the event
    loop may close meanwhile, and a queued fsync holds no descriptor. A file deleted
    in between (retention, a deleted topic) needs no sync; one replaced by compaction
    was fsynced before the swap.
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if sync_dir:
        with contextlib.suppress(FileNotFoundError):  # the topic was deleted meanwhile
            fsync_dir(directory)


@dataclass
class CompactionJob:
    """One compaction: ``run`` in a worker thread, then ``finish_compaction`` on the
    loop, then ``settle`` in a worker thread."""

    segments: list[Segment]  # the log's own closed segments being cleaned
    readers: list[Segment]  # their twins, read by the worker
    config: TopicConfig
    now_ms: int
    end: int  # first offset not cleaned
    abort: threading.Event = field(default_factory=threading.Event)
    aborted: list[AbortedTxn] = field(default_factory=list)  # transactions in the range
    future: Future[cleaner.CleanResult | None] | None = None  # set by whoever runs it
    adopted: list[tuple[Segment, Segment]] = field(default_factory=list)
    discarded: list[Segment] = field(default_factory=list)

    def run(self) -> cleaner.CleanResult | None:
        return cleaner.clean(self.readers, self.config, self.now_ms, self.abort, self.aborted)

    def settle(self) -> None:
        """Worker thread: make adopted copies durable, remove discarded ones."""
        for segment, staged in self.adopted:
            segment.settle_adopted(staged)
        for staged in self.discarded:
            staged.discard_staging()


class PartitionLog:
    # Told about every append's outcome, so a full disk is logged once per episode and
    # exported; set by the LogManager that opened the log.
    health: WriteHealth | None = None

    def __init__(
        self,
        directory: Path,
        config: TopicConfig,
        segments: list[Segment],
        clock: Callable[[], float],
    ) -> None:
        self.directory = directory
        self._config = config
        self._segments = segments
        self._clock = clock
        self._producers = ProducerState()
        self._aborted = AbortedTransactions()
        self._txn_dirty: list[Path] = []  # index files appended to since the last fsync
        self._unflushed_messages = 0
        self._first_unflushed_ms = -1
        self._needs_sync: list[Segment] = []  # rolled, not yet fsynced
        self._cleaned_up_to = -1  # first uncleanable offset of the last compaction
        self._tombstones_due_ms = -1  # when a kept tombstone may be dropped
        self._closed = False
        self._bases: list[int] = []  # segment base offsets for bisect; cleared on any change
        self.corruptions = 0  # bad regions found since open, each counted once
        # Closed segments not yet verified; may overcount once retention deleted one.
        self._unverified = sum(not seg.verified for seg in segments)
        self._checkpointed = -1  # last log end offset written to the checkpoint
        self._checkpoint_failing = False
        self._background: Submit | None = None
        self._flushing: Future[None] | None = None  # background fsync in flight
        # What the fsync in flight covers, to redo on failure: rolled segments, messages,
        # first unflushed time, and the log end offset when it started.
        self._flush_covers: tuple[list[Segment], int, int, int] = ([], 0, -1, 0)
        self._synced_end = -1  # log end offset covered by the last completed fsync
        self._cleaning: CompactionJob | None = None
        self._epochs = LeaderEpochCache(directory)  # replaced by open's
        # A log start above the first segment's base (DeleteRecords); -1: that base.
        self._start = -1
        self._start_checkpointed = -1
        self._high_watermark = self.log_start_offset
        self._hw_checkpointed = -1  # last high watermark written to its checkpoint
        # Bumped by every truncation: an fsync waiter whose offsets may have gone stops.
        self._truncations = 0
        self._segments[-1].open_for_append()

    @classmethod
    def open(
        cls, directory: Path, config: TopicConfig, *, clock: Callable[[], float] = time.time
    ) -> PartitionLog:
        directory.mkdir(parents=True, exist_ok=True)
        now_ms = int(clock() * 1000)
        for leftover in directory.glob("*.cleaned"):  # an interrupted compaction
            leftover.unlink()
        for leftover in directory.glob(f"*{TXN_INDEX_SUFFIX}.tmp"):  # an interrupted rewrite
            leftover.unlink()
        bases = sorted(
            int(p.stem)
            for p in directory.glob(f"*{_SEGMENT_SUFFIX}")
            if len(p.stem) == _NAME_DIGITS and p.stem.isdigit()
        )
        names = {f"{base:0{_NAME_DIGITS}d}" for base in bases}
        for orphan in directory.glob(f"*{TXN_INDEX_SUFFIX}"):  # its segment is gone
            if orphan.stem not in names:
                orphan.unlink()
        interval = config.index_interval_bytes
        compacts = config.cleanup_policy.compacts
        if not bases:
            segments = [Segment.create(directory, 0, interval, now_ms)]
        else:
            segments = [
                Segment.load(
                    directory,
                    base,
                    interval,
                    now_ms,
                    recover=i == len(bases) - 1,
                    upper=None if i == len(bases) - 1 else bases[i + 1],
                    contiguous=not compacts,
                    may_be_empty=compacts and i == 0,
                )
                for i, base in enumerate(bases)
            ]
        plog = cls(directory, config, segments, clock)
        for segment in segments:
            plog._report(segment, segment.take_found())
        plog._resume_at_checkpoint(now_ms)
        plog._start = plog._start_checkpointed = _read_checkpoint(
            directory / LOG_START_CHECKPOINT_FILE
        )
        epochs, rebuild = LeaderEpochCache.load(directory)
        plog._epochs = epochs
        # One walk over the headers feeds both: the producers' batches and the epochs
        # of batches the cache lacks (all of them if the file is missing or corrupt,
        # else those appended after its last write, before a crash).
        changed = plog._producers_and_epochs(rebuild)
        changed |= epochs.truncate_from_end(plog.log_end_offset, persist=False)
        changed |= epochs.truncate_from_start(plog.log_start_offset, persist=False)
        if changed or (rebuild and epochs.path.exists()):  # no fsync: the next open redoes it
            epochs.persist(durable=False)
        plog._high_watermark = plog._open_high_watermark()
        if (directory / HW_CHECKPOINT_FILE).exists():
            plog._hw_checkpointed = plog._high_watermark
        elif not bases:
            # A new log: its high watermark is known (0), unlike one of a data dir from
            # before replication, which a missing checkpoint stands for.
            plog._write_hw_checkpoint()
        for segment in plog._segments[:-1]:
            segment.release_fd()  # most old segments are never read again
        return plog

    def _producers_and_epochs(self, rebuild: bool) -> bool:
        """Rebuild producer and transaction state from every batch header, adding to the
        epoch cache the epochs it misses; True if the cache changed."""
        epochs = self._epochs
        changed = False

        def observe(header: BatchHeader) -> None:
            nonlocal changed
            epoch = header.partition_leader_epoch
            if epoch >= 0 and (rebuild or epoch > epochs.latest_epoch):
                changed |= epochs.assign(epoch, header.base_offset, persist=False)

        if rebuild:
            epochs.clear(persist=False)
        self._replay(observe)
        return changed

    def _replay(self, observe: Callable[[BatchHeader], None] | None = None) -> None:
        """Rebuild producer state, open transactions and the aborted-transaction index
        from the batches, oldest first. A closed segment whose headers do not chain is
        left for its verification to report."""
        self._producers.clear()
        entries: list[AbortedTxn] = []
        last = len(self._segments) - 1
        for i, segment in enumerate(self._segments):
            ended: list[tuple[int, BatchHeader, CompletedTxn]] = []
            try:
                for pos, header in segment.iter_headers():
                    if observe is not None:
                        observe(header)
                    done = self._producers.replay(header)
                    if done is not None:
                        ended.append((pos, header, done))
            except CorruptRecordError:
                pass
            entries.extend(self._segment_aborts(segment, ended, trusted=i < last))
        self._aborted.reset(entries)

    def _segment_aborts(
        self,
        segment: Segment,
        ended: list[tuple[int, BatchHeader, CompletedTxn]],
        *,
        trusted: bool,
    ) -> list[AbortedTxn]:
        """The aborted-transaction entries of one segment, given what its markers ended
        (``ended``, from headers alone): its index file when each entry names one of
        those markers (closed segments), else found by reading the keys of markers that
        ended a transaction with records, and the file rewritten to match. The last
        segment is always re-read: a crash may have kept a marker without its entry.

        An entry's first offset may lie below what the replay finds: compaction drops
        aborted records (all of them, or the first ones) but keeps the entry.
        """
        path = segment.txnindex_path
        loaded = read_index(path, segment.base_offset, segment.next_offset)
        if trusted and loaded is not None:
            markers = {(done.producer_id, done.last_offset): done for _, _, done in ended}
            if all(_names(markers.get((e.producer_id, e.last_offset)), e) for e in loaded):
                return loaded
            log.warning("%s: names transactions the log does not hold, rebuilding it", path)
        entries: list[AbortedTxn] = []
        for pos, header, done in ended:
            if done.first_offset < 0:
                continue
            marker = _read_marker(segment, pos, header)
            if marker is not None and not marker.commit:
                entries.append(AbortedTxn(*done))
        if loaded != entries and (entries or path.exists()):
            try:
                write_index(path, entries)
            except OSError as exc:  # rebuilt again on the next open
                log.warning("%s: cannot rewrite: %s", path, exc)
        return entries

    def _open_high_watermark(self) -> int:
        """The checkpointed high watermark within the log; the log end offset when there
        is no checkpoint (a log written before replication: everything was acknowledged)."""
        path = self.directory / HW_CHECKPOINT_FILE
        if not path.exists():
            return self.log_end_offset
        saved = _read_checkpoint(path)
        if saved < 0:  # unreadable (logged): show nothing not known to be replicated
            saved = self.log_start_offset
        return min(max(saved, self.log_start_offset), self.log_end_offset)

    def _resume_at_checkpoint(self, now_ms: int) -> None:
        """Never reuse an offset: continue at the checkpointed end if the log lost its tail."""
        saved = _read_checkpoint(self.directory / CHECKPOINT_FILE)
        self._checkpointed = saved
        end = self.log_end_offset
        if saved <= end:
            return
        active = self._active
        self.corruptions += 1
        log.error(
            "%s: corrupt log: ends at offset %d (byte %d of %s) but offsets up to %d were "
            "written (%s); offsets %d..%d are lost, continuing at %d",
            self.directory,
            end,
            active.size,
            active.log_path,
            saved - 1,
            CHECKPOINT_FILE,
            end,
            saved - 1,
            saved,
        )
        if active.size == 0:  # nothing left in it: the new segment takes its place
            self._segments.pop()
            active.delete()
        else:
            active.seal()
            self._needs_sync.append(active)
        segment = Segment.create(self.directory, saved, self._config.index_interval_bytes, now_ms)
        segment.open_for_append()
        self._segments.append(segment)
        self._bases.clear()
        fsync_dir(self.directory)

    def _write_checkpoint(self, *, durable: bool = False, end: int | None = None) -> None:
        """Record the log end offset: no offset below it is handed out again after a
        restart. Also the high watermark. ``durable`` (a truncation): fsynced, since the
        lower end must reach the disk before the cut does; ``end`` overrides the value."""
        self._write_hw_checkpoint()
        end = self.log_end_offset if end is None else end
        if end == self._checkpointed:
            return
        try:
            _write_offset_file(self.directory / CHECKPOINT_FILE, end, durable=durable)
        except OSError as exc:
            # The data is flushed; only the guard against reuse lags (a full disk). Said
            # once until a write succeeds again.
            if not self._checkpoint_failing:
                log.warning("%s: cannot write %s: %s", self.directory, CHECKPOINT_FILE, exc)
            self._checkpoint_failing = True
            return
        self._checkpoint_failing = False
        self._checkpointed = end

    def _write_hw_checkpoint(self) -> None:
        """Record the high watermark (a failure is only logged: the next flush retries,
        and a lower one after a restart merely delays consumers)."""
        hw = self._high_watermark
        if hw == self._hw_checkpointed:
            return
        try:
            _write_offset_file(self.directory / HW_CHECKPOINT_FILE, hw, durable=False)
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.directory, HW_CHECKPOINT_FILE, exc)
            return
        self._hw_checkpointed = hw

    def _report(self, segment: Segment, regions: Iterable[BadRegion]) -> None:
        for region in regions:
            self.corruptions += 1
            log.error(
                "%s: corrupt data at byte %d (to %d), offset %d: %s; %s",
                segment.log_path,
                region.start,
                region.end,
                region.offset,
                region.reason,
                "skipped" if region.end > region.start else "nothing to serve",
            )

    # -- verification ----------------------------------------------------------

    def unverified(self, offset: int, max_bytes: int) -> list[Segment]:
        """Closed segments a read of ``max_bytes`` from ``offset`` may need verified first."""
        out: list[Segment] = []
        if self._unverified <= 0 or not self.log_start_offset <= offset < self.log_end_offset:
            return out  # the common case costs no walk over the segments
        ahead = 0
        for segment in self._segments[self._segment_index(offset) :]:
            if not segment.verified:
                out.append(segment)
            ahead += segment.size
            if ahead > max_bytes:
                break
        return out

    def unverified_segments(self) -> list[Segment]:
        """Every closed segment not yet verified (all of them after an unclean stop)."""
        if self._unverified <= 0:
            return []
        return [segment for segment in self._segments[:-1] if not segment.verified]

    def scan_job(self, segment: Segment) -> Callable[[], Scanned | None]:
        """A full check of a closed segment, to run in a worker thread (it only reads);
        its result goes to ``apply_scan`` back on the owning thread."""
        generation = segment.generation
        args = self._scan_args(segment)

        def job() -> Scanned | None:
            try:
                return segment, generation, segment.scan(**args)
            except FileNotFoundError:  # deleted by retention meanwhile: nothing to serve
                return None

        return job

    def apply_scan(self, scanned: Scanned | None) -> None:
        """Adopt a ``scan``'s result unless the segment was verified or changed since."""
        if scanned is None:
            return
        segment, generation, result = scanned
        if (
            segment.verified
            or generation != segment.generation
            or segment not in self._segments
            or result.size != segment.size
        ):
            return
        self._report(segment, segment.apply_scan(result))
        segment.take_found()
        self._unverified -= 1

    def _verify(self, segment: Segment) -> None:
        if not segment.verified:
            self.apply_scan(self.scan_job(segment)())

    def _scan_args(self, segment: Segment) -> dict[str, Any]:
        i = self._segments.index(segment)
        compacts = self._config.cleanup_policy.compacts
        return {
            "upper": self._segments[i + 1].base_offset if i + 1 < len(self._segments) else None,
            "contiguous": not compacts,
            "may_be_empty": compacts and i == 0,
        }

    # -- properties ------------------------------------------------------------

    def set_background(self, submit: Submit) -> None:
        """Run fsyncs triggered by ``append`` in worker threads through ``submit``."""
        self._background = submit

    @property
    def config(self) -> TopicConfig:
        return self._config

    def update_config(self, config: TopicConfig) -> None:
        """New settings apply from the next append / maintenance run."""
        self._config = config
        self._cleaned_up_to = -1  # cleanup.policy or delete.retention.ms may have changed

    @property
    def log_start_offset(self) -> int:
        """The first offset a reader may ask for: the first segment's base offset, or
        above it once DeleteRecords moved it (never past the log end)."""
        base = self._segments[0].base_offset
        return base if self._start <= base else min(self._start, self.log_end_offset)

    def advance_log_start(self, offset: int) -> list[Segment]:
        """Move the log start offset up to ``offset`` (DeleteRecords, or a follower after
        its leader), at most to the log end; a lower ``offset`` changes nothing. Segments
        wholly below it are taken out of the log (the active one too, when the log start
        reaches the log end: a new one is rolled); the caller deletes their files and
        writes the checkpoint (``persist_log_start``), both may run in a worker thread."""
        offset = min(offset, self.log_end_offset)
        if offset <= self.log_start_offset:
            return []
        self._start = offset
        if offset == self.log_end_offset and self._active.size and self._cleaning is None:
            self.roll()
        doomed = self._detach_below_start()
        self._after_head_moved()
        return doomed

    def _detach_below_start(self) -> list[Segment]:
        """Segments below the log start offset, taken out of the log (not while a
        compaction works on that prefix: the next maintenance run takes them)."""
        doomed: list[Segment] = []
        if self._cleaning is not None:
            return doomed
        while len(self._segments) > 1 and self._segments[1].base_offset <= self._start:
            doomed.append(self._detach_oldest(f"below the log start offset {self._start}"))
        return doomed

    def persist_log_start(self) -> None:
        """Write the log start offset's checkpoint, fsynced (DeleteRecords is answered
        after it: records acknowledged as deleted must not come back after a crash)."""
        start = self.log_start_offset
        if start == self._start_checkpointed or (
            self._start_checkpointed < 0 and start == self._segments[0].base_offset
        ):
            return  # no file stands for the first segment's base offset
        _write_offset_file(self.directory / LOG_START_CHECKPOINT_FILE, start, durable=True)
        self._start_checkpointed = start

    @property
    def log_end_offset(self) -> int:
        return self._segments[-1].next_offset

    @property
    def size_bytes(self) -> int:
        return sum(seg.size for seg in self._segments)

    # -- replication state -------------------------------------------------------

    @property
    def high_watermark(self) -> int:
        """Offsets below it are on every in-sync replica (set by the replication layer)."""
        return self._high_watermark

    def set_high_watermark(self, offset: int) -> None:
        """Move the high watermark, clamped to [log_start_offset, log_end_offset]; it is
        written to ``hw.checkpoint`` at the next flush and on close."""
        self._high_watermark = min(max(offset, self.log_start_offset), self.log_end_offset)

    @property
    def latest_epoch(self) -> int:
        """The latest leader epoch in the epoch cache; -1 when it is empty."""
        return self._epochs.latest_epoch

    def epoch_entries(self) -> list[tuple[int, int]]:
        """(epoch, start offset) of every cached leader epoch, oldest first."""
        return self._epochs.entries()

    def assign_epoch_start(self, epoch: int, offset: int) -> None:
        """A new leader's epoch starts at its log end (Kafka's makeLeader), so a follower
        asking where an older epoch ends is answered even before the first append."""
        if epoch > self.latest_epoch:
            self._epochs.assign(epoch, offset, durable=False)

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """(largest cached epoch <= ``epoch``, the offset where it ends): the start of the
        next cached epoch, or the log end offset for the latest; (-1, -1) if none."""
        return self._epochs.end_offset_for(epoch, self.log_end_offset)

    # -- transactions ------------------------------------------------------------

    def last_stable_offset(self, high_watermark: int) -> int:
        """Below it every transaction has ended: the first offset of the oldest open
        transaction, at most ``high_watermark`` (never below the log start)."""
        unstable = self._producers.first_unstable_offset()
        lso = high_watermark if unstable is None else min(unstable, high_watermark)
        return max(lso, self.log_start_offset)

    def aborted_transactions(self, start: int, upto: int) -> list[tuple[int, int]]:
        """(producer id, first offset) of the aborted transactions overlapping
        [start, upto): what a read_committed Fetch of that range returns."""
        return [
            (entry.producer_id, entry.first_offset)
            for entry in self._aborted.overlapping(start, upto)
        ]

    def aborted_index(self) -> list[AbortedTxn]:
        """Every live entry of the aborted-transaction index, in marker order."""
        return self._aborted.entries()

    def ongoing_transactions(self) -> list[tuple[int, int, int, int]]:
        """(producer id, producer epoch, first offset, last timestamp ms) of every open
        transaction, oldest first."""
        return self._producers.ongoing()

    def producers(self) -> list[ProducerInfo]:
        """Every producer with state here (DescribeProducers)."""
        return self._producers.describe()

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def _active(self) -> Segment:
        return self._segments[-1]

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- writing ---------------------------------------------------------------

    def append(
        self,
        data: bytes | bytearray | memoryview,
        *,
        payload: int | None = None,
        leader_epoch: int = 0,
        coordinator: bool = False,
    ) -> AppendResult:
        """Store one record batch; a retried idempotent batch is answered, not stored. A
        transactional batch opens its producer's transaction here unless one is open; a
        batch of an epoch older than its producer's (a marker's included) is fenced.

        ``payload``: what ``validate_records`` returned for ``data`` under this log's
        config, when the caller already ran it (off the event loop, for a large batch).
        ``leader_epoch``: stamped in the batch's partitionLeaderEpoch, and recorded in
        the epoch cache if it is newer than the latest there.
        """
        config = self._config
        if len(data) > config.max_message_bytes:
            raise MessageTooLargeError(
                f"batch of {len(data)} bytes exceeds max.message.bytes {config.max_message_bytes}"
            )
        if len(data) > config.segment_bytes:
            raise RecordListTooLargeError(
                f"batch of {len(data)} bytes exceeds segment.bytes {config.segment_bytes}"
            )
        batches = parse_batches(data)
        if len(batches) != 1:
            raise InvalidRecordError(f"expected exactly one record batch, got {len(batches)}")
        header = batches[0][1]
        if header.is_control:  # markers are written by append_marker only
            raise InvalidRecordError("clients may not write control batches")
        if header.records_count < 1 or header.last_offset_delta != header.records_count - 1:
            raise InvalidRecordError(
                f"batch of {header.records_count} records has last offset delta "
                f"{header.last_offset_delta}"
            )
        if payload is None:
            payload = validate_records(
                data,
                0,
                header,
                limit=config.max_message_bytes,
                keys_required=config.cleanup_policy.compacts,
            )
        # The group coordinator's transactional offsets carry no sequence numbers.
        duplicate = None if coordinator else self._producers.check(header)
        if duplicate is not None:
            return AppendResult(
                duplicate.base_offset,
                duplicate.last_offset,
                -1,
                self.log_start_offset,
                header.records_count,
                payload,
                True,  # duplicate
                header.crc,
            )

        now_ms = self._now_ms()
        buf = bytearray(data)
        base_offset = self.log_end_offset
        set_base_offset(buf, 0, base_offset)
        set_partition_leader_epoch(buf, 0, leader_epoch)
        append_time_ms = -1
        if config.message_timestamp_type is TimestampType.LOG_APPEND_TIME:
            set_log_append_time(buf, 0, now_ms)
            append_time_ms = now_ms
        header = read_header(buf, 0)
        self._store(buf, header, now_ms)
        self._producers.update(header, base_offset)
        needs_sync = self._stored(header, leader_epoch, now_ms)
        return AppendResult(
            base_offset,
            header.last_offset,
            append_time_ms,
            self.log_start_offset,
            header.records_count,
            payload,
            False,  # duplicate
            header.crc,
            needs_sync,
        )

    def _store(self, buf: bytearray, header: BatchHeader, now_ms: int) -> None:
        """Write one batch, rolling first if it calls for it; a failure is told to health."""
        try:
            self._maybe_roll(header, now_ms)
            self._active.append(buf, header, now_ms)
        except KafkaStorageError as exc:
            if self.health is not None:
                self.health.failed(str(self.directory), exc)
            raise

    def _stored(self, header: BatchHeader, leader_epoch: int, now_ms: int) -> bool:
        """After ``_store``: the epoch cache, then the flush accounting (``needs_sync``)."""
        if leader_epoch > self._epochs.latest_epoch:
            # Not fsynced here: open re-adds an epoch lost with this write from the batch.
            self._epochs.assign(leader_epoch, header.base_offset, durable=False)
        return self._count_unflushed(header.records_count, now_ms)

    def append_marker(
        self,
        producer_id: int,
        producer_epoch: int,
        commit: bool,
        coordinator_epoch: int,
        *,
        leader_epoch: int = 0,
    ) -> AppendResult:
        """Write a transaction marker (a control batch, Kafka's layout) ending the
        producer's transaction in this partition; an abort of a transaction with records
        here adds an entry to the aborted-transaction index. A marker for a producer
        with no open transaction here is written all the same, without an entry. One
        of an epoch older than the producer's raises InvalidProducerEpochError."""
        if producer_id < 0 or producer_epoch < 0:
            raise InvalidRecordError(
                f"a marker needs a producer id and epoch, got {producer_id}/{producer_epoch}"
            )
        self._producers.check_marker(producer_id, producer_epoch)
        now_ms = self._now_ms()
        base_offset = self.log_end_offset
        buf = bytearray(
            build_control_batch(
                producer_id,
                producer_epoch,
                commit=commit,
                coordinator_epoch=coordinator_epoch,
                timestamp_ms=now_ms,
                base_offset=base_offset,
            )
        )
        set_partition_leader_epoch(buf, 0, leader_epoch)
        append_time_ms = -1
        if self._config.message_timestamp_type is TimestampType.LOG_APPEND_TIME:
            set_log_append_time(buf, 0, now_ms)
            append_time_ms = now_ms
        header = read_header(buf, 0)
        self._store(buf, header, now_ms)
        self._end_transaction(header, ControlRecord(commit, coordinator_epoch))
        needs_sync = self._stored(header, leader_epoch, now_ms)
        return AppendResult(
            base_offset,
            base_offset,
            append_time_ms,
            self.log_start_offset,
            1,
            0,  # payload: a marker carries no client data
            False,  # duplicate
            header.crc,
            needs_sync,
        )

    def _end_transaction(self, header: BatchHeader, marker: ControlRecord | None) -> None:
        """A marker was just stored in the active segment: end its producer's transaction,
        indexing it if it was an abort of records here."""
        done = self._producers.complete(header, -1 if marker is None else marker.coordinator_epoch)
        if marker is None or marker.commit or done.first_offset < 0:
            return
        entry = AbortedTxn(*done)
        self._aborted.add(entry)
        path = self._active.txnindex_path
        try:
            append_entry(path, entry)
        except OSError as exc:
            # Kept in memory; a missing file is rebuilt from the log on the next open.
            log.warning("%s: cannot append an aborted transaction: %s", path, exc)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return
        if path not in self._txn_dirty:
            self._txn_dirty.append(path)

    def _count_unflushed(self, records: int, now_ms: int) -> bool:
        """After a write: count it toward flush.messages / flush.ms and start the fsync
        they call for. True if that fsync runs in a worker thread (``needs_sync``)."""
        config = self._config
        health = self.health
        self._unflushed_messages += records
        if self._first_unflushed_ms < 0:
            self._first_unflushed_ms = now_ms
        needs_sync = False
        if (
            self._unflushed_messages >= config.flush_messages
            or now_ms - self._first_unflushed_ms >= config.flush_ms
        ):
            needs_sync = self._background is not None
            try:
                self._flush_for_append()
            except OSError as exc:
                # The batch is stored (a retry of an idempotent producer is answered as a
                # duplicate), but its durability cannot be promised.
                error = KafkaStorageError(f"{self.directory}: fsync failed: {exc}")
                error.__cause__ = exc
                if health is not None:
                    health.failed(str(self.directory), error)
                raise error from exc
        if health is not None and health.failing:
            health.succeeded()
        return needs_sync

    def append_replicated(self, data: bytes | bytearray | memoryview) -> ReplicatedAppend:
        """Store whole batches as the leader stored them (a Fetch response's records):
        their offsets, timestamps and leader epochs are kept; a trailing partial batch
        is ignored. Every batch's CRC is checked first (CorruptRecordError) and nothing
        is written if one fails; a base offset below the log end offset (or below the
        previous batch's end) raises InvalidRecordError: the caller truncates first.
        Gaps (a compacted leader log) and control batches are accepted.
        """
        view = memoryview(data)
        batches: list[tuple[int, BatchHeader]] = []
        expect = self.log_end_offset
        pos = 0
        while len(view) - pos >= LOG_OVERHEAD.size:
            _, length = LOG_OVERHEAD.unpack_from(view, pos)
            if length >= MIN_BATCH_LENGTH and pos + LOG_OVERHEAD.size + length > len(view):
                break  # cut by the fetch size limit: the next fetch brings it whole
            header = check_batch(view, pos)
            if header.base_offset < expect or header.last_offset_delta < 0:
                raise InvalidRecordError(
                    f"{self.directory}: replicated batch at offsets {header.base_offset}.."
                    f"{header.last_offset} does not follow offset {expect - 1}"
                )
            batches.append((pos, header))
            expect = header.last_offset + 1
            pos += header.size
        stored_bytes = pos
        if not batches:
            end = self.log_end_offset
            return ReplicatedAppend(end, end - 1, 0, 0, 0, -1)
        now_ms = self._now_ms()
        records = 0
        max_timestamp = -1
        epochs_changed = False
        try:
            for pos, header in batches:
                self._maybe_roll(header, now_ms)
                self._active.append(view[pos : pos + header.size], header, now_ms)
                if header.is_control and header.producer_id >= 0:
                    self._end_transaction(header, _parse_marker(view, pos, header))
                else:
                    self._producers.update(header, header.base_offset)
                if header.partition_leader_epoch >= 0:
                    epochs_changed |= self._epochs.assign(
                        header.partition_leader_epoch, header.base_offset, persist=False
                    )
                records += header.records_count
                max_timestamp = max(max_timestamp, header.max_timestamp)
        except KafkaStorageError as exc:
            # The batches before the failed one are stored: their fsync is still due.
            self._unflushed_messages += records
            if records and self._first_unflushed_ms < 0:
                self._first_unflushed_ms = now_ms
            if self.health is not None:
                self.health.failed(str(self.directory), exc)
            raise
        finally:
            if epochs_changed:
                self._epochs.persist(durable=False)  # as in append
        needs_sync = self._count_unflushed(records, now_ms)
        last = batches[-1][1]
        return ReplicatedAppend(
            batches[0][1].base_offset,
            last.last_offset,
            len(batches),
            records,
            stored_bytes,
            max_timestamp,
            needs_sync,
        )

    async def wait_synced(self, end: int) -> None:
        """Return once an fsync covered every offset below ``end`` (Kafka acknowledges a
        batch that reached flush.messages only after its fsync); the fsync itself runs in
        a worker thread. Raises KafkaStorageError if it fails, NotLeaderOrFollowerError
        if the log was truncated below ``end`` before or while it waited (those offsets
        are not this log's to promise any more)."""
        truncations = self._truncations
        while self._synced_end < end and not self._closed:
            if truncations != self._truncations or end > self.log_end_offset:
                raise NotLeaderOrFollowerError(
                    f"{self.directory}: truncated below offset {end} before its fsync"
                )
            pending = self._flushing if self._flushing is not None else self.flush_in_background()
            if pending is None:  # no background submitter: flushed inline just now
                return
            await asyncio.wrap_future(pending)
            failed = self._reap_flush()
            if failed is not None:
                raise KafkaStorageError(f"{self.directory}: fsync failed: {failed}") from failed

    def _maybe_roll(self, header: BatchHeader, now_ms: int) -> None:
        active = self._active
        if active.size == 0:
            return
        if (
            active.size + header.size > self._config.segment_bytes
            or now_ms - active.created_ms >= self._config.segment_ms
            or not active.fits(header.size, header.last_offset)
        ):
            self.roll(now_ms)

    def roll(self, now_ms: int | None = None) -> None:
        """Close the active segment and start a new one at log_end_offset."""
        now_ms = self._now_ms() if now_ms is None else now_ms
        active = self._active
        try:
            active.seal()
            segment = Segment.create(
                self.directory, active.next_offset, self._config.index_interval_bytes, now_ms
            )
            try:
                segment.open_for_append()
            except OSError:
                segment.delete()
                raise
        except OSError as exc:
            # The active segment stays active; its index files are reopened (or rewritten)
            # by the next append, and the roll is tried again then.
            active.mark_index_stale()
            raise KafkaStorageError(f"{self.directory}: segment roll failed: {exc}") from exc
        self._needs_sync.append(active)
        self._segments.append(segment)
        self._bases.clear()
        log.debug("%s: rolled to segment %d", self.directory, segment.base_offset)

    def flush(self) -> None:
        """fsync everything appended so far, inline."""
        self._reap_flush()
        for segment in self._needs_sync:
            segment.flush()
            segment.release_fd()
        if self._needs_sync:
            fsync_dir(self.directory)
            self._needs_sync.clear()
        self._active.flush()
        if self._txn_dirty:
            dirty, self._txn_dirty = self._txn_dirty, []
            _fsync_files(self.directory, dirty, False)
        self._synced_end = self.log_end_offset
        self._write_checkpoint()
        self._unflushed_messages = 0
        self._first_unflushed_ms = -1

    def flush_in_background(self) -> Future[None] | None:
        """Start an fsync of everything appended so far in a worker thread (inline and
        None without a background submitter). While one is in flight, that one."""
        if self._background is None:
            self.flush()
            return None
        self._reap_flush()
        if self._flushing is not None:
            return self._flushing
        self._active.push_index_buffers()
        # The guard against reusing offsets needs only what was handed out, not what is
        # synced: written now, while the thread syncs the data below it.
        self._write_checkpoint()
        rolled, self._needs_sync = self._needs_sync, []
        paths = [segment.log_path for segment in (*rolled, self._active)]
        paths += self._txn_dirty  # not redone if this fsync fails: rebuilt on open
        self._txn_dirty = []
        sync_dir = bool(rolled)
        for segment in rolled:
            segment.release_fd()  # its writes are in the page cache, synced by name
        self._flush_covers = (
            rolled,
            self._unflushed_messages,
            self._first_unflushed_ms,
            self.log_end_offset,
        )
        self._unflushed_messages = 0
        self._first_unflushed_ms = -1
        self._flushing = self._background(lambda: _fsync_files(self.directory, paths, sync_dir))
        return self._flushing

    def _flush_for_append(self) -> None:
        """flush.messages / flush.ms reached: fsync inline without a background submitter,
        else start an fsync in a worker thread unless one is in flight. The failure of
        the previous background fsync is raised here, to the append that finds it."""
        if self._background is None:
            self.flush()
            return
        if self._flushing is not None and not self._flushing.done():
            # What is appended meanwhile stays counted: the next append or maintenance
            # run picks it up.
            return
        failed = self._reap_flush()
        if failed is not None:
            raise failed
        self.flush_in_background()

    def _reap_flush(self) -> OSError | None:
        """Collect a finished background fsync; if it failed, its work is due again and
        its error is returned."""
        pending = self._flushing
        if pending is None or not pending.done():
            return None
        self._flushing = None
        if pending.cancelled():
            error: OSError = OSError("background fsync cancelled")
        else:
            exc = pending.exception()
            if exc is None:
                self._synced_end = max(self._synced_end, self._flush_covers[3])
                return None
            error = exc if isinstance(exc, OSError) else OSError(f"background fsync: {exc!r}")
        rolled, messages, first_ms, _end = self._flush_covers
        live = set(map(id, self._segments))
        self._needs_sync.extend(s for s in rolled if id(s) in live and s not in self._needs_sync)
        self._unflushed_messages += messages
        if first_ms >= 0 and not 0 <= self._first_unflushed_ms <= first_ms:
            self._first_unflushed_ms = first_ms
        return error

    def _flush_due(self, now_ms: int) -> bool:
        return bool(self._needs_sync) or (
            self._first_unflushed_ms >= 0
            and (
                now_ms - self._first_unflushed_ms >= self._config.flush_ms
                or self._unflushed_messages >= self._config.flush_messages
            )
        )

    def maybe_flush(self, now_ms: int) -> bool:
        """fsync if flush.ms has passed since the oldest unflushed append, or a rolled
        segment awaits its fsync. True if it flushed."""
        self._reap_flush()
        if self._flush_due(now_ms):
            self.flush()
            return True
        return False

    def flush_if_due(self, now_ms: int) -> Future[None] | None:
        """``maybe_flush`` in a worker thread: the fsync started, else None. Raises the
        error of a failed background fsync not yet reported (its work is due again)."""
        failed = self._reap_flush()
        if failed is not None:
            raise failed
        if self._flushing is None and self._flush_due(now_ms):
            return self.flush_in_background()
        return None

    # -- reading ---------------------------------------------------------------

    def _check_offset(self, offset: int) -> None:
        if not self.log_start_offset <= offset <= self.log_end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside [{self.log_start_offset}, {self.log_end_offset}]"
            )

    def _segment_index(self, offset: int) -> int:
        if not self._bases:
            self._bases = [seg.base_offset for seg in self._segments]
        return max(bisect_right(self._bases, offset) - 1, 0)

    def read(self, offset: int, max_bytes: int) -> bytes | memoryview:
        """Whole batches from the one holding ``offset``; at most ``max_bytes`` except
        that the first batch always comes whole, so a consumer can make progress."""
        got = self.read_slice(offset, max_bytes, eager_bytes=max_bytes)
        if got.data is not None:
            return got.data
        return b"".join(got.pieces())

    def read_slice(
        self, offset: int, max_bytes: int, *, eager_bytes: int, max_offset: int | None = None
    ) -> LogSlice:
        """What ``read`` returns, as spans of segments; the bytes are read now only if
        they come to at most ``eager_bytes``, else by ``LogSlice.pieces`` when sent.
        Bad regions are stepped over; closed segments are verified first. ``max_offset``:
        only batches below it (a consumer's read stops at the high watermark, which
        falls between batches)."""
        self._check_offset(offset)
        spans: list[Span] = []
        upto = self.log_end_offset if max_offset is None else min(max_offset, self.log_end_offset)
        if offset >= upto:
            return LogSlice(spans, b"")
        chunks: list[bytes | memoryview] = []
        eager = max_bytes <= eager_bytes
        remaining = max_bytes
        last = self._segment_index(upto) if upto < self.log_end_offset else len(self._segments)
        for index in range(self._segment_index(offset), len(self._segments)):
            segment = self._segments[index]
            self._verify(segment)
            position = segment.lookup(offset)  # steps over bad regions at the start too
            if position is None:  # compaction emptied the rest of this segment
                continue
            if index == last:
                stop = segment.lookup(upto)
                if stop is not None:
                    if stop <= position:
                        break
                    remaining = min(remaining, stop - position)
            elif index > last:
                break
            whole_first = not spans
            if eager:
                data = segment.read_batches(position, remaining, whole_first=whole_first)
                length = len(data)
                if data:
                    chunks.append(data)
            else:
                length = segment.span_length(position, remaining, whole_first=whole_first)
            if length:
                spans.append(Span(segment, position, length, segment.generation))
                remaining -= length
            if remaining <= 0 or position + length < segment.size:
                break
        if not eager:
            # Nothing found (a gap left by a lost tail): an empty slice, like a read at the end.
            return LogSlice(spans, None if spans else b"")
        return LogSlice(spans, b"".join(chunks) if len(chunks) != 1 else chunks[0])

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record at or above the log start offset
        stamped at or after ``timestamp_ms``."""
        for segment in self._segments:
            found = segment.find_timestamp(timestamp_ms)
            if found is not None:
                offset, ts = self._first_record_at(segment, *found, timestamp_ms)
                if offset >= self.log_start_offset:
                    return offset, ts
                return self._first_record_from(self.log_start_offset, timestamp_ms)
        return None

    def _first_record_from(self, start: int, timestamp_ms: int) -> tuple[int, int] | None:
        """``offset_for_timestamp`` when its answer lies below the log start (records
        DeleteRecords removed inside the first segment): the batches from ``start`` on."""
        for segment in self._segments[self._segment_index(start) :]:
            if segment.max_timestamp < timestamp_ms:
                continue
            for pos, header in segment.iter_headers(segment.lookup(start) or 0):
                if header.last_offset < start or header.max_timestamp < timestamp_ms:
                    continue
                data = segment.read(pos, header.size)
                try:
                    for record in iter_records(data, 0, header):
                        if record.offset >= start and record.timestamp >= timestamp_ms:
                            return record.offset, record.timestamp
                except StreamBusError:  # a codec this broker lacks: the batch is close enough
                    return max(header.base_offset, start), header.max_timestamp
        return None

    def max_timestamp_offset(self) -> tuple[int, int] | None:
        """(offset, timestamp) of the record with the largest timestamp (ListOffsets -3)."""
        best: Segment | None = None
        for segment in self._segments:
            if segment.max_timestamp >= 0 and (
                best is None or segment.max_timestamp > best.max_timestamp
            ):
                best = segment
        if best is None:
            return None
        found = best.find_timestamp(best.max_timestamp)
        return None if found is None else self._first_record_at(best, *found, best.max_timestamp)

    def _first_record_at(
        self, segment: Segment, position: int, header: BatchHeader, timestamp_ms: int
    ) -> tuple[int, int]:
        data = segment.read(position, header.size)
        try:
            for record in iter_records(data, 0, header):
                if record.timestamp >= timestamp_ms:
                    return record.offset, record.timestamp
        except StreamBusError:  # e.g. a codec this broker lacks: the batch is close enough
            pass
        return header.base_offset, header.max_timestamp

    def iter_headers(self) -> Iterator[BatchHeader]:
        """Every stored batch header, oldest first."""
        for segment in self._segments:
            for _, header in segment.iter_headers():
                yield header

    # -- truncation (a follower cut back to its leader's log) ---------------------

    def truncate_to(self, offset: int) -> None:
        """Drop every batch at or above ``offset`` (a batch holding ``offset`` goes whole).

        Segments wholly above it are deleted and the one holding it is cut, its index
        files rebuilt; producer state is rebuilt from what remains, the epoch cache and
        the high watermark follow the new end, and ``leo.checkpoint`` is lowered first
        (fsynced), so the next open does not take the cut for lost data. A compaction
        running meanwhile is aborted and its result discarded. Nothing happens when
        ``offset`` is at or past the log end; below the log start the log is emptied
        (``truncate_fully_and_start_at``). Inline: the cut segment is re-checked.
        """
        old_end = self.log_end_offset
        if offset >= old_end:
            return
        if offset < self.log_start_offset:
            self.truncate_fully_and_start_at(offset)
            return
        self._stop_cleaning()
        self._cleaned_up_to = -1
        now_ms = self._now_ms()
        i = self._segment_index(offset)
        keep = self._segments[i]
        self._verify(keep)  # lookup walks headers: a bad region must be known first
        position = keep.lookup(offset)
        cut = keep.size if position is None else position
        header_at_cut = None if position is None else keep.read(position, HEADER.size)
        cut_at = offset if header_at_cut is None else read_header(header_at_cut, 0).base_offset
        try:
            # Never above what stays (nothing is handed out until the exact end is
            # written below): a crash after the cut then finds no "lost" offsets.
            self._write_checkpoint(durable=True, end=keep.base_offset)
            doomed = self._segments[i + 1 :]
            del self._segments[i + 1 :]
            for segment in doomed:
                segment.delete()
            keep.close()
            keep.generation += 1  # a Fetch still streaming the cut bytes stops
            os.truncate(keep.log_path, cut)
            keep.index_path.unlink(missing_ok=True)  # rebuilt by the load below
            write_index(  # entries of markers cut off go (the replay re-checks the rest)
                keep.txnindex_path,
                [e for e in self._aborted.entries() if keep.base_offset <= e.last_offset < cut_at],
            )
            keep.timeindex_path.unlink(missing_ok=True)
            fresh = Segment.load(
                self.directory,
                keep.base_offset,
                self._config.index_interval_bytes,
                now_ms,
                recover=True,
            )
            fresh.open_for_append()
            self._segments[i] = fresh
        except OSError as exc:
            raise KafkaStorageError(f"{self.directory}: truncation failed: {exc}") from exc
        finally:
            self._bases.clear()
        self._report(fresh, fresh.take_found())
        self._after_truncation({id(s) for s in (*doomed, keep)})
        log.info(
            "%s: truncated to offset %d: log end offset %d -> %d (%d segments deleted)",
            self.directory,
            offset,
            old_end,
            self.log_end_offset,
            len(doomed),
        )

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Remove every segment and start empty at ``offset`` (log start = end =
        ``offset``): a follower whose fetch offset fell below the leader's log start.
        The epoch cache is cleared and the checkpoints rewritten."""
        if offset < 0:
            raise ValueError(f"cannot start a log at offset {offset}")
        self._stop_cleaning()
        self._cleaned_up_to = -1
        old_start, old_end = self.log_start_offset, self.log_end_offset
        now_ms = self._now_ms()
        old = list(self._segments)
        doomed = list(old)
        try:
            if offset < self._checkpointed:
                self._write_checkpoint(durable=True, end=offset)
            # The new segment first where its name is free, so a crash in between
            # leaves a log that ends at ``offset`` rather than an empty directory.
            if any(segment.base_offset == offset for segment in doomed):
                for segment in doomed:
                    segment.delete()
                doomed = []
            fresh = Segment.create(
                self.directory, offset, self._config.index_interval_bytes, now_ms
            )
            fresh.open_for_append()
            for segment in doomed:
                segment.delete()
            self._segments[:] = [fresh]
            self._start = offset
            fsync_dir(self.directory)
        except OSError as exc:
            raise KafkaStorageError(f"{self.directory}: truncation failed: {exc}") from exc
        finally:
            self._bases.clear()
        self._epochs.clear()
        self._after_truncation({id(s) for s in old})
        log.info(
            "%s: emptied and restarted at offset %d (was offsets %d..%d)",
            self.directory,
            offset,
            old_start,
            old_end - 1,
        )

    def _after_truncation(self, gone: set[int]) -> None:
        """Bring everything derived from the log's content in line with its new end."""
        end = self.log_end_offset
        self._truncations += 1
        self._needs_sync = [s for s in self._needs_sync if id(s) not in gone]
        rolled, messages, first_ms, covered = self._flush_covers
        self._flush_covers = (rolled, messages, first_ms, min(covered, end))
        self._synced_end = min(self._synced_end, end)
        self._unverified = sum(not segment.verified for segment in self._segments[:-1])
        self._txn_dirty.clear()
        self._replay()  # rewrites the cut segment's aborted-transaction index
        self._epochs.truncate_from_end(end)
        self._epochs.truncate_from_start(self.log_start_offset)
        self._high_watermark = min(max(self._high_watermark, self.log_start_offset), end)
        self._start = min(self._start, end)
        self.flush()  # fsyncs the cut segment, writes both checkpoints at the new end
        self.persist_log_start()

    # -- cleanup ---------------------------------------------------------------

    def _detach_oldest(self, reason: str) -> Segment:
        segment = self._segments.pop(0)
        self._bases.clear()
        if segment in self._needs_sync:
            self._needs_sync.remove(segment)
        log.info(
            "%s: deleted segment %d (%d bytes, offsets %d..%d): %s; log start offset now %d",
            self.directory,
            segment.base_offset,
            segment.size,
            segment.base_offset,
            segment.next_offset - 1,
            reason,
            self.log_start_offset,
        )
        return segment

    def enforce_retention(self, now_ms: int) -> int:
        """Delete closed segments past retention.ms or retention.bytes; the count deleted."""
        doomed = self.detach_expired(now_ms)
        for segment in doomed:
            segment.delete()
        return len(doomed)

    def detach_expired(self, now_ms: int) -> list[Segment]:
        """Take closed segments past retention.ms or retention.bytes out of the log; the
        caller deletes their files (``Segment.delete``, a worker thread may).

        Like Kafka, only a prefix of the log goes, and a segment is deleted for
        size only if the log stays at or above retention.bytes without it. Nothing
        goes while a compaction works on that prefix.
        """
        config = self._config
        if self._cleaning is not None:
            return []
        # Whatever the cleanup policy, segments below a moved log start go (Kafka's
        # deleteLogStartOffsetBreachedSegments).
        doomed = self._detach_below_start()
        if not config.cleanup_policy.deletes:
            if doomed:
                self._after_head_moved()
            return doomed
        if config.retention_ms >= 0:
            while len(self._segments) > 1:
                age = now_ms - self._segments[0].largest_time_ms
                if age <= config.retention_ms:
                    break
                reason = f"{age} ms old, retention.ms is {config.retention_ms}"
                doomed.append(self._detach_oldest(reason))
        if config.retention_bytes >= 0:
            size = self.size_bytes
            while len(self._segments) > 1:
                oldest = self._segments[0].size
                if size - oldest < config.retention_bytes:
                    break
                reason = f"log is {size} bytes, retention.bytes is {config.retention_bytes}"
                doomed.append(self._detach_oldest(reason))
                size -= oldest
        if doomed:
            self._after_head_moved()
        return doomed

    def _after_head_moved(self) -> None:
        """Bring the state kept per offset in line with a higher log start offset."""
        start = self.log_start_offset
        self._producers.truncate_head(start)
        self._aborted.truncate_head(start)
        # Not fsynced on the loop: open trims the cache to the log start again.
        if self._epochs.truncate_from_start(start, persist=False):
            self._epochs.persist(durable=False)
        self._high_watermark = max(self._high_watermark, start)

    def compact(self, now_ms: int) -> bool:
        """Keep the latest record per key in closed segments, inline; True if anything
        changed. See ``start_compaction`` for when it is skipped."""
        job = self.start_compaction(now_ms)
        if job is None:
            return False
        try:
            result = job.run()
        except BaseException:
            self.finish_compaction(job, None)
            raise
        changed = self.finish_compaction(job, result)
        job.settle()
        return changed

    def start_compaction(self, now_ms: int) -> CompactionJob | None:
        """A compaction to ``run`` in a worker thread, or None if there is nothing to do.

        Nothing to do when the topic does not compact, a compaction is already running,
        or no segment was closed since the last run and no kept tombstone has reached
        delete.retention.ms.
        """
        config = self._config
        if self._closed or self._cleaning is not None or not config.cleanup_policy.compacts:
            return None
        cleanable = cleaner.cleanable_segments(self._segments, config, now_ms)
        unstable = self._producers.first_unstable_offset()
        if unstable is not None:
            # As Kafka, never past an open transaction: whether its records stay is
            # decided by its marker.
            while cleanable and cleanable[-1].next_offset > unstable:
                cleanable.pop()
        if not cleanable:
            return None
        end = self._segments[len(cleanable)].base_offset  # first uncleanable offset
        if end == self._cleaned_up_to and not 0 <= self._tombstones_due_ms <= now_ms:
            return None
        readers = [segment.reader() for segment in cleanable]
        aborted = self._aborted.overlapping(self.log_start_offset, end)
        self._cleaning = CompactionJob(cleanable, readers, config, now_ms, end, aborted=aborted)
        return self._cleaning

    def finish_compaction(self, job: CompactionJob, result: cleaner.CleanResult | None) -> bool:
        """Swap a finished compaction's segments in (event loop, no data touched); True
        if anything changed. ``result`` None: the run failed or was aborted.

        The result is discarded if the log was closed, its settings changed or a
        cleaned segment left the log meanwhile; ``job.settle`` removes its files.
        """
        if self._cleaning is job:
            self._cleaning = None
        if result is None:
            return False
        live = set(map(id, self._segments))
        if (
            self._closed
            or job.abort.is_set()
            or job.config is not self._config
            or not all(id(segment) in live for segment in job.segments)
        ):
            job.discarded.extend(staged for _, staged in result.staged)
            return False
        self._cleaned_up_to = job.end
        self._tombstones_due_ms = result.tombstones_due_ms
        for i, staged in result.staged:
            segment = job.segments[i]
            segment.adopt(staged)
            job.adopted.append((segment, staged))
            # An emptied segment goes, except the first: it holds log_start_offset.
            if segment.size == 0 and segment is not self._segments[0]:
                self._segments.remove(segment)
                if segment in self._needs_sync:
                    self._needs_sync.remove(segment)
                segment.delete()
        self._bases.clear()
        if result.rewritten:
            log.info(
                "%s: compacted %d segments, %d records removed",
                self.directory,
                result.rewritten,
                result.records_removed,
            )
        return result.rewritten > 0

    def _stop_cleaning(self) -> None:
        """Abort a running compaction and wait for its thread (it stops within a batch),
        removing what it staged: nothing may write in a closed log's directory."""
        job = self._cleaning
        if job is None:
            return
        self._cleaning = None
        job.abort.set()
        if job.future is None:
            return
        concurrent.futures.wait([job.future])
        if job.future.cancelled() or job.future.exception() is not None:
            return
        result = job.future.result()
        if result is not None:
            for _, staged in result.staged:
                staged.discard_staging()

    def background_work(self) -> list[Future[Any]]:
        """Work in worker threads not yet finished (a running compaction is aborted)."""
        pending: list[Future[Any]] = []
        if self._cleaning is not None and self._cleaning.future is not None:
            self._cleaning.abort.set()
            pending.append(self._cleaning.future)
        if self._flushing is not None:
            pending.append(self._flushing)
        return pending

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Flush and release every file; a second call does nothing."""
        if self._closed:
            return
        self._stop_cleaning()
        self._reap_flush()
        if self._unflushed_messages or self._needs_sync or self._background is None:
            self.flush()  # after a background flush of everything, nothing left to sync
        self._write_checkpoint()  # also when a background flush left nothing to sync
        self._epochs.sync()
        for segment in self._segments:
            segment.close()
        self._closed = True

    def delete(self) -> None:
        """Remove the partition's files and directory; the log is unusable afterwards."""
        self._stop_cleaning()
        for segment in self._segments:
            segment.delete()
        self._closed = True
        shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"PartitionLog({str(self.directory)!r}, start={self.log_start_offset}, "
            f"end={self.log_end_offset}, segments={len(self._segments)})"
        )


def _names(done: CompletedTxn | None, entry: AbortedTxn) -> bool:
    """Whether an index entry fits the marker the replay found at its last offset."""
    return done is not None and (done.first_offset < 0 or done.first_offset >= entry.first_offset)


def _parse_marker(data: bytes | memoryview, pos: int, header: BatchHeader) -> ControlRecord | None:
    """The marker a control batch holds; None if it holds none or cannot be read (then
    it still ends its producer's transaction, as on replay, but indexes nothing)."""
    try:
        return parse_control_record(data, pos, header)
    except StreamBusError as exc:
        log.warning("unreadable control record at offset %d: %s", header.base_offset, exc)
        return None


def _read_marker(segment: Segment, pos: int, header: BatchHeader) -> ControlRecord | None:
    try:
        data = segment.read(pos, header.size)
    except (OSError, StreamBusError) as exc:
        log.warning("%s: cannot read the marker at byte %d: %s", segment.log_path, pos, exc)
        return None
    return _parse_marker(data, 0, header)


def _write_offset_file(path: Path, value: int, *, durable: bool) -> None:
    """Replace a checkpoint file (version line, offset line) in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="ascii") as f:
        f.write(f"{_CHECKPOINT_VERSION}\n{value}\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)
    if durable:
        fsync_dir(path.parent)


def _read_checkpoint(path: Path) -> int:
    """The checkpointed log end offset; -1 if there is none or it cannot be read."""
    try:
        version, value = path.read_text(encoding="ascii").split()
        if version != _CHECKPOINT_VERSION:
            raise ValueError(f"version {version}")
        return int(value)
    except FileNotFoundError:
        return -1
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("%s: ignoring unreadable checkpoint: %s", path, exc)
        return -1
