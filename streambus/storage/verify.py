"""Checking a segment's ``.log`` before its batches are served: length, magic, CRC and offsets.

The CRC covers a batch from its attributes on, so it cannot catch a changed base
offset or a file cut short at a batch boundary; those are caught by the offsets:
each batch must start after the previous one ends, stay inside the segment's
range (its base offset up to the next segment's), and agree with the offset
index where the index names its position. What fails is not repaired: it
becomes a *bad region* that readers skip, the way they skip a compaction gap,
and the scan resynchronises at the next position holding a batch that passes
every check (its magic byte, a plausible length and offsets, then its CRC).

The scan opens a descriptor of its own and only reads, so it can run in a
worker thread while the event loop serves other segments.

A clean stop leaves ``CLEAN_SHUTDOWN`` in the data directory (Kafka's
``.kafka_cleanshutdown``); a start that does not find it verifies every closed
segment in the background rather than waiting for each one's first read.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

from streambus.storage.batch import (
    ATTRIBUTES_OFFSET,
    HEADER,
    LOG_OVERHEAD,
    MAGIC_OFFSET,
    MIN_BATCH_LENGTH,
    NO_TIMESTAMP,
    BatchHeader,
    read_header,
)

_CHUNK = 1024 * 1024  # bytes read per step
CLEAN_SHUTDOWN = ".clean_shutdown"  # empty file: the last stop closed every log
_MAGIC = b"\x02"


@dataclass(frozen=True, slots=True)
class BadRegion:
    """Bytes [start, end) of a ``.log`` that are never served."""

    start: int  # byte position of the first bad byte
    end: int  # position of the next valid batch, or the file's size
    offset: int  # first offset the region may have held (the one after the last good batch)
    reason: str


@dataclass(slots=True)
class ScanResult:
    """What a full scan of one ``.log`` found, and the indexes rebuilt from its valid batches."""

    size: int
    regions: list[BadRegion] = field(default_factory=list)
    next_offset: int = 0
    max_timestamp: int = NO_TIMESTAMP
    offset_of_max: int = 0  # relative offset of the batch holding max_timestamp
    bytes_since_index: int = 0
    offsets: array[int] = field(default_factory=lambda: array("I"))
    positions: array[int] = field(default_factory=lambda: array("I"))
    times: array[int] = field(default_factory=lambda: array("q"))
    time_offsets: array[int] = field(default_factory=lambda: array("I"))


class _Window:
    """A moving window over the file, so walking batches costs one read per _CHUNK."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = b""
        self.pos = 0

    def view(self, pos: int, n: int) -> memoryview | None:
        """File bytes [pos, pos + n), or None if the file ends before."""
        if pos + n > self.size:
            return None
        if pos < self.pos or pos + n > self.pos + len(self.buf):
            self.buf = os.pread(self.fd, max(_CHUNK, n), pos)
            self.pos = pos
        start = pos - self.pos
        return memoryview(self.buf)[start : start + n]


@dataclass(slots=True)
class _Checker:
    win: _Window
    base: int  # the segment's base offset
    high: int | None  # the next segment's base offset
    indexed: dict[int, int]  # position -> relative offset, from the offset index

    def check_at(self, pos: int, low: int) -> BatchHeader | str:
        """The header of a valid batch at ``pos`` with offsets from ``low``, or why not."""
        win = self.win
        head = win.view(pos, HEADER.size)
        if head is None:
            return f"{win.size - pos} trailing bytes are not a whole batch header"
        _, length = LOG_OVERHEAD.unpack_from(head)
        if length < MIN_BATCH_LENGTH:
            return f"batch length {length} is below the minimum {MIN_BATCH_LENGTH}"
        if head[MAGIC_OFFSET] != 2:
            return f"magic byte {head[MAGIC_OFFSET]} is not 2"
        whole = win.view(pos, length + LOG_OVERHEAD.size)
        if whole is None:
            return f"batch of {length + LOG_OVERHEAD.size} bytes runs past the end of the file"
        header = read_header(whole, 0)
        actual = crc32c.crc32c(whole[ATTRIBUTES_OFFSET:])
        if actual != header.crc:
            return f"CRC {actual:#010x} does not match the stored {header.crc:#010x}"
        if header.last_offset_delta < 0 or header.base_offset < low:
            return f"base offset {header.base_offset} is below the expected {low}"
        if self.high is not None and header.last_offset >= self.high:
            return f"offsets up to {header.last_offset} reach the next segment's base {self.high}"
        rel = self.indexed.get(pos)
        if rel is not None and header.base_offset - self.base != rel:
            return f"base offset {header.base_offset} disagrees with the index ({self.base + rel})"
        return header

    def resync(self, pos: int, low: int) -> tuple[int, BatchHeader] | None:
        """The first position after ``pos`` holding a valid batch, with its header."""
        win = self.win
        p = pos + 1
        while p + HEADER.size <= win.size:
            win.view(p, min(_CHUNK, win.size - p))
            i = win.buf.find(_MAGIC, p - win.pos + MAGIC_OFFSET)
            if i < 0:
                p = max(p + 1, win.pos + len(win.buf) - MAGIC_OFFSET)
                continue
            candidate = win.pos + i - MAGIC_OFFSET
            found = self.check_at(candidate, low)
            if isinstance(found, BatchHeader):
                return candidate, found
            p = candidate + 1
        return None


def scan(
    path: Path,
    base_offset: int,
    index_interval_bytes: int,
    *,
    upper: int | None,
    contiguous: bool,
    may_be_empty: bool,
    indexed: dict[int, int] | None = None,
) -> ScanResult:
    """Check every batch of ``path``.

    ``upper``: the next segment's base offset (None for the last segment).
    ``contiguous``: offsets must run up to ``upper`` (a log that is never compacted).
    ``may_be_empty``: an empty file is no loss (the first segment of a compacted log).
    ``indexed``: position -> relative offset from the offset index, to cross-check.
    """
    indexed = indexed or {}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        result = ScanResult(size, next_offset=base_offset)
        checker = _Checker(_Window(fd, size), base_offset, upper, indexed)
        pos, expect = 0, base_offset
        while pos < size:
            found = checker.check_at(pos, expect)
            if isinstance(found, str):
                after = checker.resync(pos, expect)
                end = size if after is None else after[0]
                result.regions.append(BadRegion(pos, end, expect, found))
                if after is None:
                    break
                pos, header = after
            else:
                header = found
            _index(result, base_offset, index_interval_bytes, pos, header)
            expect = header.last_offset + 1
            pos += header.size
        if upper is not None and expect < upper:
            if size == 0 and not may_be_empty:
                result.regions.append(
                    BadRegion(0, 0, expect, f"segment is empty; offsets {expect}..{upper - 1} lost")
                )
            elif contiguous and not (result.regions and result.regions[-1].end == size):
                result.regions.append(
                    BadRegion(
                        size,
                        size,
                        expect,
                        f"segment ends at offset {expect - 1}; offsets {expect}..{upper - 1} lost",
                    )
                )
        return result
    finally:
        os.close(fd)


def _index(result: ScanResult, base: int, interval: int, pos: int, header: BatchHeader) -> None:
    """Segment._index_batch's rule, for indexes built away from the segment."""
    rel = header.base_offset - base
    if header.max_timestamp > result.max_timestamp:
        result.max_timestamp = header.max_timestamp
        result.offset_of_max = rel
    if result.bytes_since_index >= interval:
        result.offsets.append(rel)
        result.positions.append(pos)
        last_time = result.times[-1] if result.times else NO_TIMESTAMP
        if result.max_timestamp > last_time:
            result.times.append(result.max_timestamp)
            result.time_offsets.append(result.offset_of_max)
        result.bytes_since_index = 0
    result.bytes_since_index += header.size
    result.next_offset = header.last_offset + 1


def take_clean_shutdown(data_dir: Path) -> bool:
    """Whether the last stop was clean; the marker is removed, as the broker now runs."""
    marker = data_dir / CLEAN_SHUTDOWN
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    return True


def mark_clean_shutdown(data_dir: Path) -> None:
    """Every log is flushed and closed: the next start need not verify them all."""
    (data_dir / CLEAN_SHUTDOWN).touch()
