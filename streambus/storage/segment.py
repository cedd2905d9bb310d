"""One log segment: a ``.log`` file of record batches and its two derived indexes.

Files, named like Kafka's by the segment's base offset as 20 zero-padded digits::

    00000000000000000000.log        batches exactly as stored, back to back
    00000000000000000000.index      sparse offset index (OFFSET_ENTRY)
    00000000000000000000.timeindex  sparse time index (TIME_ENTRY)

The ``.log`` is written with unbuffered ``os.write``: once ``append`` returns the
bytes are in the page cache and survive a SIGKILL. The indexes are derived data,
written through a buffered file and rebuilt from the ``.log`` whenever they are
missing, torn or inconsistent, so they never need an fsync of their own on the
produce path.

A segment is *verified* before any of its batches is served: the active one by
``append`` (each batch checked as it arrives) and by recovery on open, a closed
one by a full scan (``verify.scan``) on its first read. What the scan rejects
becomes a bad region that every reader steps over; closed segments are never
truncated, so the evidence stays on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from streambus.errors import CorruptRecordError, KafkaStorageError
from streambus.records.batch import (
    HEADER,
    LOG_OVERHEAD,
    MIN_BATCH_LENGTH,
    NO_TIMESTAMP,
    BatchHeader,
    Buffer,
    check_batch,
    read_header,
)
from streambus.storage.verify import BadRegion, ScanResult, scan

log = logging.getLogger("streambus.storage")

# Offset index entry, big-endian, 8 bytes. One entry per index_interval_bytes of
# .log; lookups take the last entry at or below the target and scan forward.
OFFSET_ENTRY = struct.Struct(
    ">"
    "I"  # relative offset: batch baseOffset - segment base offset
    "I"  # position: byte position of that batch in the .log
)
# Time index entry, big-endian, 12 bytes. Appended alongside an offset index entry
# when the segment's max timestamp grew since the last one, and once more when the
# segment is sealed, so the last entry always holds the segment's max timestamp.
TIME_ENTRY = struct.Struct(
    ">"
    "q"  # max timestamp of the segment up to and including that batch
    "I"  # relative offset of the batch that raised the max timestamp to this value
)

_WINDOW = 16 * 1024  # bytes read per step while walking batch headers
_CHUNK = 1024 * 1024  # bytes read per step while walking whole batches
_MAX_RELATIVE = 0xFFFFFFFF  # both index fields are uint32
PIECE = 1024 * 1024  # largest piece of a record set read at once while it is being sent


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


def fsync_dir(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segment:
    """A ``.log`` file plus in-memory copies of its indexes for bisecting."""

    def __init__(self, directory: Path, base_offset: int, index_interval_bytes: int) -> None:
        name = segment_name(base_offset)
        self.base_offset = base_offset
        self.log_path = directory / f"{name}.log"
        self.index_path = directory / f"{name}.index"
        self.timeindex_path = directory / f"{name}.timeindex"
        self.cleaned_path = directory / f"{name}.log.cleaned"
        self.txnindex_path = directory / f"{name}.txnindex"  # kept by the log (txnindex.py)
        self.index_interval_bytes = index_interval_bytes
        self.next_offset = base_offset  # last stored offset + 1
        self.max_timestamp = NO_TIMESTAMP
        self.created_ms = 0  # when the segment started, for segment.ms
        self.last_append_ms = 0  # last write (file mtime after a reopen)
        self._fd = -1
        self._size = 0
        self._offsets = array("I")  # offset index, relative offsets
        self._positions = array("I")  # offset index, file positions
        self._times = array("q")  # time index, timestamps
        self._time_offsets = array("I")  # time index, relative offsets
        self._offset_of_max = 0  # relative offset of the batch holding max_timestamp
        self._bytes_since_index = 0
        self._index_file: BinaryIO | None = None
        self._time_file: BinaryIO | None = None
        self.verified = False  # every batch checked (see the module docstring)
        self._bad: dict[int, int] = {}  # bad regions never served: start -> end position
        self.found: list[BadRegion] = []  # regions found on open, for the log to report
        # Bumped when the .log is replaced or deleted: a record set planned from the old
        # file must not be read from the new one.
        self.generation = 0
        self._deleted = False
        self._index_stale = False  # index files need rewriting from memory before use
        self._truncate_pending = False  # a failed append's bytes are still past _size

    # -- opening ---------------------------------------------------------------

    @classmethod
    def create(
        cls, directory: Path, base_offset: int, index_interval_bytes: int, now_ms: int
    ) -> Segment:
        seg = cls(directory, base_offset, index_interval_bytes)
        seg._open_fd()
        try:
            seg._size = os.fstat(seg._fd).st_size
            seg.created_ms = seg.last_append_ms = now_ms
            if seg._size:  # a leftover file of that name: trust nothing about it
                seg.recover()
            else:
                seg._rewrite_indexes()
        except BaseException:
            # No descriptor leaks and, for a new empty segment, no files stay behind
            # (a full disk or EMFILE during a roll or a topic creation).
            empty = seg._size == 0
            seg._close_index_files_quietly()
            seg.release_fd()
            if empty:
                for path in (seg.log_path, seg.index_path, seg.timeindex_path):
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
            raise
        seg.verified = True
        return seg

    @classmethod
    def load(
        cls,
        directory: Path,
        base_offset: int,
        index_interval_bytes: int,
        now_ms: int,
        *,
        recover: bool,
        upper: int | None = None,
        contiguous: bool = False,
        may_be_empty: bool = True,
    ) -> Segment:
        """Open an existing segment; ``recover`` re-checks every batch and cuts a torn
        tail (the last segment). A closed segment is checked here only if its indexes
        do not fit its .log, otherwise on its first read (``verify``); ``upper``,
        ``contiguous`` and ``may_be_empty`` are :func:`verify.scan`'s."""
        seg = cls(directory, base_offset, index_interval_bytes)
        seg._open_fd()
        stat = os.fstat(seg._fd)
        seg._size = stat.st_size
        seg.created_ms = now_ms
        seg.last_append_ms = stat.st_mtime_ns // 1_000_000
        if recover:
            seg.recover()
        else:
            loaded = seg._load_indexes()
            if not loaded:
                seg._reset_indexes()  # half-read entries must not be cross-checked
            if not loaded or not seg._scan_tail():
                seg.apply_scan(seg.scan(upper, contiguous=contiguous, may_be_empty=may_be_empty))
        if recover and seg._size and not seg._bad:
            # segment.ms counts from the first batch, as Kafka does, so a restart does
            # not postpone the roll; a clock in the future counts as now.
            first = read_header(os.pread(seg._fd, HEADER.size, 0), 0)
            if first.max_timestamp >= 0:
                seg.created_ms = min(first.max_timestamp, now_ms)
        return seg

    def _open_fd(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    def release_fd(self) -> None:
        """Close the .log descriptor until the next read needs it (closed segments)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _load_indexes(self) -> bool:
        """Read both index files; False if either is missing or does not fit the .log."""
        try:
            raw_index = self.index_path.read_bytes()
            raw_time = self.timeindex_path.read_bytes()
        except FileNotFoundError:
            return False
        if len(raw_index) % OFFSET_ENTRY.size or len(raw_time) % TIME_ENTRY.size:
            return False
        prev_off, prev_pos = -1, -1
        for rel, pos in OFFSET_ENTRY.iter_unpack(raw_index):
            if rel <= prev_off or pos <= prev_pos or pos >= self._size:
                return False
            self._offsets.append(rel)
            self._positions.append(pos)
            prev_off, prev_pos = rel, pos
        prev_ts = NO_TIMESTAMP
        for ts, rel in TIME_ENTRY.iter_unpack(raw_time):
            if ts <= prev_ts:
                return False
            self._times.append(ts)
            self._time_offsets.append(rel)
            prev_ts = ts
        if self._times:
            self.max_timestamp = self._times[-1]
            self._offset_of_max = self._time_offsets[-1]
        return True

    def _scan_tail(self) -> bool:
        """next_offset and max timestamp from the batches after the last index entry;
        False if the headers there do not even chain (the segment needs a full scan)."""
        start = self._positions[-1] if self._positions else 0
        try:
            for _, header in self.iter_headers(start):
                self.next_offset = header.last_offset + 1
                self._note_timestamp(header)
        except CorruptRecordError:
            return False
        self._bytes_since_index = self._size - start
        return True

    # -- recovery --------------------------------------------------------------

    def recover(self) -> int:
        """Re-check every batch, cut a torn tail, rebuild both indexes.

        A bad region with valid batches after it is kept and skipped (and left in
        ``found`` for the log to report): only what no valid batch follows is a
        torn write. Returns the number of bytes dropped.
        """
        self._open_fd()
        result = self.scan(None, contiguous=False, may_be_empty=True)
        dropped = 0
        if result.regions and result.regions[-1].end == result.size:
            tail = result.regions.pop()
            dropped = result.size - tail.start
            log.warning(
                "%s: truncating %d bytes at position %d: %s",
                self.log_path,
                dropped,
                tail.start,
                tail.reason,
            )
            os.ftruncate(self._fd, tail.start)
            result.size = tail.start
        self._size = result.size
        self.apply_scan(result, rewrite=True)
        return dropped

    def scan(self, upper: int | None, *, contiguous: bool, may_be_empty: bool) -> ScanResult:
        """Check every batch (see ``verify.scan``); reads only, safe in a worker thread."""
        indexed = dict(zip(self._positions, self._offsets, strict=True))
        return scan(
            self.log_path,
            self.base_offset,
            self.index_interval_bytes,
            upper=upper,
            contiguous=contiguous,
            may_be_empty=may_be_empty,
            indexed=indexed,
        )

    def apply_scan(self, result: ScanResult, *, rewrite: bool = False) -> list[BadRegion]:
        """Take a scan's indexes and bad regions; the regions are returned (and kept in
        ``found``) for the caller to report."""
        changed = rewrite or (
            result.offsets != self._offsets
            or result.positions != self._positions
            or result.times != self._times
        )
        self._offsets, self._positions = result.offsets, result.positions
        self._times, self._time_offsets = result.times, result.time_offsets
        self.next_offset = result.next_offset
        self.max_timestamp = result.max_timestamp
        self._offset_of_max = result.offset_of_max
        self._bytes_since_index = result.bytes_since_index
        self._bad = {r.start: r.end for r in result.regions if r.end > r.start}
        self.verified = True
        if changed:
            self._rewrite_indexes()
        self.found += result.regions
        return result.regions

    def take_found(self) -> list[BadRegion]:
        found, self.found = self.found, []
        return found

    def _serve_end(self, position: int) -> int:
        """Where the batches readable from ``position`` end: a bad region or the file's end."""
        end = self._size
        for start in self._bad:
            if position <= start < end:
                end = start
        return end

    def _reset_indexes(self) -> None:
        for arr in (self._offsets, self._positions, self._times, self._time_offsets):
            del arr[:]
        self.next_offset = self.base_offset
        self.max_timestamp = NO_TIMESTAMP
        self._offset_of_max = 0
        self._bytes_since_index = 0

    def _rewrite_indexes(self) -> None:
        self._close_index_files()
        with self.index_path.open("wb") as f:
            for entry in zip(self._offsets, self._positions, strict=True):
                f.write(OFFSET_ENTRY.pack(*entry))
        with self.timeindex_path.open("wb") as f:
            for entry in zip(self._times, self._time_offsets, strict=True):
                f.write(TIME_ENTRY.pack(*entry))

    # -- writing ---------------------------------------------------------------

    def append(self, data: Buffer, header: BatchHeader, now_ms: int) -> None:
        """Write one validated batch whose base offset is already assigned.

        All or nothing: if the .log or an index file cannot be written (ENOSPC, EIO,
        ...) the .log is cut back to where it was, the in-memory indexes forget the
        batch, and KafkaStorageError is raised; the next append starts from the same
        offset and position.
        """
        try:
            if self._truncate_pending:
                os.ftruncate(self._fd, self._size)
                self._truncate_pending = False
            if self._index_stale:
                self._repair_index_files()
        except OSError as exc:
            raise KafkaStorageError(f"{self.log_path}: cannot prepare for append: {exc}") from exc
        pos = self._size
        undo = self._undo_point()
        view = memoryview(data)
        indexing = False
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._size += len(data)
            indexing = True
            self._index_batch(pos, header)
        except OSError as exc:
            # Never leave half a batch behind: the next append would land after it.
            self._roll_back(pos, undo, indexing)
            raise KafkaStorageError(f"{self.log_path}: write failed: {exc}") from exc
        self.last_append_ms = now_ms

    def _undo_point(self) -> tuple[int, int, int, int, int, int]:
        return (
            len(self._offsets),
            len(self._times),
            self.next_offset,
            self.max_timestamp,
            self._offset_of_max,
            self._bytes_since_index,
        )

    def _roll_back(
        self, pos: int, undo: tuple[int, int, int, int, int, int], indexing: bool
    ) -> None:
        offsets, times, self.next_offset, self.max_timestamp, self._offset_of_max, since = undo
        self._bytes_since_index = since
        del self._offsets[offsets:], self._positions[offsets:]
        del self._times[times:], self._time_offsets[times:]
        self._size = pos
        try:
            os.ftruncate(self._fd, pos)
        except OSError:
            self._truncate_pending = True  # retried before the next write lands after it
        if indexing:
            # What a failed buffered write left in the index files is unknown: they are
            # rewritten from memory before the next append.
            self.mark_index_stale()

    def mark_index_stale(self) -> None:
        """Drop the open index files (their content is in doubt); the next append or
        seal rewrites them from the in-memory indexes."""
        self._close_index_files_quietly()
        self._index_stale = True

    def _close_index_files_quietly(self) -> None:
        for f in (self._index_file, self._time_file):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()  # closes the descriptor even when the flush fails
        self._index_file = self._time_file = None

    def _repair_index_files(self) -> None:
        self._rewrite_indexes()
        self._index_stale = False
        self.open_for_append()

    def _index_batch(self, pos: int, header: BatchHeader) -> None:
        rel = header.base_offset - self.base_offset
        self._note_timestamp(header)
        if self._bytes_since_index >= self.index_interval_bytes:
            self._offsets.append(rel)
            self._positions.append(pos)
            if self._index_file is not None:
                self._index_file.write(OFFSET_ENTRY.pack(rel, pos))
            self._maybe_append_time_entry()
            self._bytes_since_index = 0
        self._bytes_since_index += header.size
        self.next_offset = header.last_offset + 1

    def _note_timestamp(self, header: BatchHeader) -> None:
        if header.max_timestamp > self.max_timestamp:
            self.max_timestamp = header.max_timestamp
            self._offset_of_max = header.base_offset - self.base_offset

    def _last_time_entry(self) -> int:
        return self._times[-1] if self._times else NO_TIMESTAMP

    def _maybe_append_time_entry(self) -> None:
        if self.max_timestamp > self._last_time_entry():
            self._times.append(self.max_timestamp)
            self._time_offsets.append(self._offset_of_max)
            if self._time_file is not None:
                self._time_file.write(TIME_ENTRY.pack(self.max_timestamp, self._offset_of_max))

    def open_for_append(self) -> None:
        """Make this the active segment: index entries now also go to the files."""
        if self._index_file is None or self._time_file is None:
            try:
                self._index_file = self._index_file or self.index_path.open("ab")
                self._time_file = self.timeindex_path.open("ab")
            except OSError:
                self.mark_index_stale()
                raise

    def fits(self, size: int, last_offset: int) -> bool:
        """Whether a batch can go here without overflowing the uint32 index fields."""
        return (
            self._size + size <= _MAX_RELATIVE and last_offset - self.base_offset <= _MAX_RELATIVE
        )

    def seal(self) -> None:
        """Stop appending: record the final max timestamp, push index files to the OS."""
        try:
            if self._index_stale:
                self._repair_index_files()
            if self.max_timestamp > self._last_time_entry():
                self.open_for_append()
                self._maybe_append_time_entry()
            self._close_index_files()
        except OSError:
            self.mark_index_stale()
            raise

    def flush(self) -> None:
        """fsync the .log (the indexes are rebuilt if a crash tears them)."""
        if self._fd >= 0:
            os.fsync(self._fd)
        for f in (self._index_file, self._time_file):
            if f is not None:
                f.flush()

    def _close_index_files(self) -> None:
        for f in (self._index_file, self._time_file):
            if f is not None:
                f.close()
        self._index_file = self._time_file = None

    def close(self) -> None:
        self.seal()
        self.release_fd()

    def delete(self) -> None:
        self.generation += 1
        self._deleted = True
        self._close_index_files()
        self.release_fd()
        for path in (
            self.log_path,
            self.index_path,
            self.timeindex_path,
            self.cleaned_path,
            self.txnindex_path,
        ):
            path.unlink(missing_ok=True)

    # -- compaction hand-over ----------------------------------------------------
    # The cleaner works in a worker thread on twins of closed segments, never on the
    # objects the event loop reads through: a twin reads with a descriptor of its own and
    # writes a staged copy under ``.cleaned`` names; the loop then ``adopt``s the copy in
    # one step (renames and field swaps, no data touched), so a reader sees the old
    # segment or the new one, never a mix.

    def reader(self) -> Segment:
        """A twin of this closed segment for a worker thread: same file and facts, its
        own descriptor (opened on first read; the thread releases it)."""
        twin = Segment(self.log_path.parent, self.base_offset, self.index_interval_bytes)
        twin._size = self._size
        twin.next_offset = self.next_offset
        twin.max_timestamp = self.max_timestamp
        twin.created_ms = self.created_ms
        twin.last_append_ms = self.last_append_ms
        return twin

    def staging(self) -> Segment:
        """An empty segment of the same base offset whose files carry the ``.cleaned``
        suffix (removed on open if a crash leaves them), filled with ``append``."""
        twin = Segment(self.log_path.parent, self.base_offset, self.index_interval_bytes)
        for attr in ("log_path", "index_path", "timeindex_path"):
            path: Path = getattr(twin, attr)
            staged = path.with_name(path.name + ".cleaned")
            staged.unlink(missing_ok=True)  # a leftover of an interrupted run
            setattr(twin, attr, staged)
        twin.cleaned_path = twin.log_path
        twin.created_ms = self.created_ms
        twin.last_append_ms = self.last_append_ms
        twin._open_fd()
        twin.open_for_append()
        return twin

    def finish_staging(self, staged: Segment) -> None:
        """Seal and fsync a filled staging segment, keeping this one's mtime (cleaning
        does not make data younger). Worker thread."""
        staged.seal()
        staged.flush()
        staged.last_append_ms = self.last_append_ms
        mtime = os.stat(self.log_path).st_mtime_ns
        os.utime(staged.log_path, ns=(mtime, mtime))

    def adopt(self, staged: Segment) -> None:
        """Swap in a finished staging segment: its ``.log`` replaces this one's and its
        in-memory indexes replace this one's. Event loop, a few syscalls.

        This segment's index files are removed before the rename and the staged ones are
        moved in by ``settle_adopted`` after the directory is fsynced: a crash in between
        leaves a .log without indexes, which the next open rebuilds. The replaced .log
        stays open, its descriptor handed to ``staged``: freeing hundreds of megabytes of
        blocks happens when ``settle_adopted`` closes it, not inside the rename.
        """
        self.generation += 1  # a Fetch streaming the old file stops rather than mix the two
        self._close_index_files()
        old = self._fd if self._fd >= 0 else os.open(self.log_path, os.O_RDONLY)
        self.index_path.unlink(missing_ok=True)
        self.timeindex_path.unlink(missing_ok=True)
        os.replace(staged.log_path, self.log_path)
        self._fd, staged._fd = staged._fd, old
        self._size = staged._size
        self.next_offset = staged.next_offset
        self.max_timestamp = staged.max_timestamp
        self._offset_of_max = staged._offset_of_max
        self._bytes_since_index = staged._bytes_since_index
        self._offsets, self._positions = staged._offsets, staged._positions
        self._times, self._time_offsets = staged._times, staged._time_offsets
        staged.log_path = self.log_path
        self.verified = True  # the cleaner wrote it from CRC-checked batches, in order

    def settle_adopted(self, staged: Segment) -> None:
        """Make an ``adopt`` durable and give the segment its index files back. Worker
        thread; a segment deleted meanwhile is left alone."""
        staged.release_fd()  # the replaced .log: its blocks are freed here
        try:
            fsync_dir(self.log_path.parent)
        except FileNotFoundError:  # the topic was deleted: its directory went with it
            return
        for src, dst in (
            (staged.index_path, self.index_path),
            (staged.timeindex_path, self.timeindex_path),
        ):
            if self.log_path.exists():
                os.replace(src, dst)
            else:
                src.unlink(missing_ok=True)

    def discard_staging(self) -> None:
        """Remove a staging segment's files (a cleaning thrown away)."""
        self._close_index_files()
        self.release_fd()
        for path in (self.log_path, self.index_path, self.timeindex_path):
            path.unlink(missing_ok=True)

    def push_index_buffers(self) -> None:
        """Hand buffered index entries to the OS (no fsync: indexes are rebuilt if torn)."""
        for f in (self._index_file, self._time_file):
            if f is not None:
                f.flush()

    # -- reading ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def largest_time_ms(self) -> int:
        """Age of the newest data: max record timestamp, else the last write."""
        return self.max_timestamp if self.max_timestamp >= 0 else self.last_append_ms

    def read(self, position: int, size: int) -> bytes:
        if self._deleted:  # reopening would create an empty file of that name
            raise KafkaStorageError(f"{self.log_path} was deleted")
        self._open_fd()
        return os.pread(self._fd, size, position)

    def read_batches(
        self, position: int, max_bytes: int, *, whole_first: bool
    ) -> bytes | memoryview:
        """Whole batches from ``position`` totalling at most ``max_bytes``; with
        ``whole_first`` the first batch is returned even if it alone is bigger.
        Stops before a bad region."""
        available = self._serve_end(position) - position
        if available <= 0:
            return b""
        data = self.read(position, min(max_bytes, available))
        cut = 0
        while cut + LOG_OVERHEAD.size <= len(data):
            _, length = LOG_OVERHEAD.unpack_from(data, cut)
            if cut + length + LOG_OVERHEAD.size > len(data):
                break
            cut += length + LOG_OVERHEAD.size
        if cut == 0 and whole_first:
            head = self.read(position, LOG_OVERHEAD.size)
            _, length = LOG_OVERHEAD.unpack_from(head, 0)
            return self.read(position, length + LOG_OVERHEAD.size)
        # A view, not a slice: Fetch responses are large, and every copy of them shows in
        # the consume path's profile.
        return data if cut == len(data) else memoryview(data)[:cut]

    def span_length(self, position: int, max_bytes: int, *, whole_first: bool) -> int:
        """Bytes of the whole batches from ``position`` that fit ``max_bytes`` (the first
        one whatever its size with ``whole_first``), reading headers only."""
        end, total = self._serve_end(position), 0
        for pos, header in self.iter_headers(position):
            if pos != position + total or pos + header.size > end:
                break  # a bad region starts here
            if total + header.size > max_bytes and not (whole_first and total == 0):
                break
            total += header.size
        return total

    def read_pieces(self, position: int, length: int, generation: int) -> Iterator[memoryview]:
        """The bytes [position, position + length), planned from whole batches, in
        batch-aligned pieces of at most PIECE bytes (a bigger batch comes whole)."""
        end = position + length
        while position < end:
            if generation != self.generation:
                raise KafkaStorageError(f"{self.log_path} changed while it was being sent")
            data = memoryview(self.read(position, min(PIECE, end - position)))
            cut = 0
            while cut + LOG_OVERHEAD.size <= len(data):
                _, size = LOG_OVERHEAD.unpack_from(data, cut)
                if cut + size + LOG_OVERHEAD.size > len(data):
                    break
                cut += size + LOG_OVERHEAD.size
            if cut == 0:  # one batch bigger than PIECE: bounded by max.message.bytes
                _, size = LOG_OVERHEAD.unpack_from(data, 0)
                whole = min(size + LOG_OVERHEAD.size, end - position)
                data = memoryview(self.read(position, whole))
                cut = len(data)
            if generation != self.generation or cut == 0:
                raise KafkaStorageError(f"{self.log_path} changed while it was being sent")
            yield data[:cut]
            position += cut

    def iter_headers(self, start: int = 0) -> Iterator[tuple[int, BatchHeader]]:
        """(position, header) of each batch from ``start``, reading no record bytes
        beyond a small window and stepping over bad regions; assumes the file was
        recovered or verified."""
        self._open_fd()
        pos, end = start, self._size
        buf, buf_pos = b"", start
        bad = self._bad
        while pos + HEADER.size <= end:
            if bad and pos in bad:
                pos = bad[pos]
                continue
            off = pos - buf_pos
            if off + HEADER.size > len(buf):
                buf, buf_pos, off = os.pread(self._fd, _WINDOW, pos), pos, 0
            header = read_header(buf, off)
            if header.batch_length < MIN_BATCH_LENGTH:
                raise CorruptRecordError(f"{self.log_path}: bad batch length at {pos}")
            yield pos, header
            pos += header.size

    def iter_batches(self, start: int = 0) -> Iterator[tuple[int, BatchHeader, memoryview]]:
        """(position, header, bytes) of each batch, CRC-checked, stepping over known bad
        regions; raises at the first bad one found."""
        self._open_fd()
        pos, end = start, self._size
        chunk, chunk_pos = memoryview(b""), start
        last_read = (-1, -1)
        bad = self._bad
        while pos < end:
            if bad and pos in bad:
                pos = bad[pos]
                continue
            off = pos - chunk_pos
            want = HEADER.size
            if off + LOG_OVERHEAD.size <= len(chunk):
                _, length = LOG_OVERHEAD.unpack_from(chunk, off)
                want = max(length + LOG_OVERHEAD.size, HEADER.size)
            want = min(want, end - pos)  # a garbage length must not make us read gigabytes
            if off + want > len(chunk) and last_read != (pos, want):
                chunk, chunk_pos = memoryview(os.pread(self._fd, max(_CHUNK, want), pos)), pos
                last_read = (pos, want)
                continue
            header = check_batch(chunk[: off + want], off)
            yield pos, header, chunk[off : off + header.size]
            pos += header.size

    def lookup(self, offset: int) -> int | None:
        """Position of the first batch whose last offset is >= ``offset``, if any."""
        i = bisect_right(self._offsets, offset - self.base_offset) - 1
        start = self._positions[i] if i >= 0 else 0
        for pos, header in self.iter_headers(start):
            if header.last_offset >= offset:
                return pos
        return None

    def find_timestamp(self, timestamp_ms: int) -> tuple[int, BatchHeader] | None:
        """First batch whose max timestamp is >= ``timestamp_ms``."""
        if self.max_timestamp < timestamp_ms:
            return None
        # Every batch up to the last entry below the target is below it too.
        i = bisect_left(self._times, timestamp_ms) - 1
        start = 0
        if i >= 0:
            start = self.lookup(self.base_offset + self._time_offsets[i]) or 0
        for pos, header in self.iter_headers(start):
            if header.max_timestamp >= timestamp_ms:
                return pos, header
        return None
