"""The aborted-transaction index: which offsets a read_committed consumer must drop.

Every abort marker that ends a transaction with records in the partition adds one
entry to the ``.txnindex`` file of the segment the marker went to (Kafka's
``TransactionIndex``, same layout). A Fetch at read_committed answers the entries
whose range overlaps what it returns, as (producer id, first offset): the client
drops that producer's transactional records from the first offset until it meets
the producer's abort marker.

The files are derived data, like the offset indexes: the log rebuilds a segment's
index from its batches (transactional batch headers and the markers' keys) when the
file is missing, does not parse, or names a transaction the log does not hold; the
last segment's is always rebuilt on open, since a crash may separate a marker from
its entry. Entries are appended in marker order, so each file is sorted by
``last_offset``, and the log keeps all live entries in memory
(``AbortedTransactions``): one per aborted transaction, far fewer than batches.
"""

from __future__ import annotations

import logging
import os
import struct
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("streambus.storage")

TXN_INDEX_SUFFIX = ".txnindex"
_VERSION = 0

# One entry, big-endian, 34 bytes, repeated; no header, so the file size is a
# multiple of ENTRY.size:
ENTRY = struct.Struct(
    ">"
    "h"  # version: 0
    "q"  # producerId: the producer whose transaction was aborted
    "q"  # firstOffset: offset of the transaction's first record in this partition
    "q"  # lastOffset: offset of the abort marker
    "q"  # lastStableOffset: the partition's LSO once the marker was written
)


class AbortedTxn(NamedTuple):
    producer_id: int
    first_offset: int
    last_offset: int  # the abort marker's offset
    last_stable_offset: int


def encode(entries: Iterable[AbortedTxn]) -> bytes:
    return b"".join(ENTRY.pack(_VERSION, *entry) for entry in entries)


def read_index(path: Path, base_offset: int, next_offset: int) -> list[AbortedTxn] | None:
    """The entries of a segment's index file; None if it is missing or fails a check
    (size, version, order, offsets outside the segment [base_offset, next_offset))."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: unreadable, rebuilding it: %s", path, exc)
        return None
    if len(raw) % ENTRY.size:
        log.warning("%s: %d bytes is not whole entries, rebuilding it", path, len(raw))
        return None
    entries: list[AbortedTxn] = []
    previous = base_offset - 1
    for pos in range(0, len(raw), ENTRY.size):
        version, pid, first, last, lso = ENTRY.unpack_from(raw, pos)
        if (
            version != _VERSION
            or pid < 0
            or not 0 <= first <= last
            or not previous < last < next_offset
            or not 0 <= lso <= last + 1
        ):
            log.warning("%s: bad entry at byte %d, rebuilding it", path, pos)
            return None
        previous = last
        entries.append(AbortedTxn(pid, first, last, lso))
    return entries


def write_index(path: Path, entries: list[AbortedTxn]) -> None:
    """Replace a segment's index file in one rename (no fsync: it is rebuilt if lost)."""
    if not entries:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode(entries))
    tmp.replace(path)


def append_entry(path: Path, entry: AbortedTxn) -> None:
    """Add one entry at the end of a segment's index file (fsynced with the segment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, ENTRY.pack(_VERSION, *entry))
    finally:
        os.close(fd)


class AbortedTransactions:
    """Every live entry of a log's indexes, sorted by ``last_offset`` (marker order)."""

    def __init__(self) -> None:
        self._entries: list[AbortedTxn] = []
        self._lasts: list[int] = []

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[AbortedTxn]:
        return list(self._entries)

    def add(self, entry: AbortedTxn) -> None:
        if self._lasts and entry.last_offset <= self._lasts[-1]:
            raise ValueError(f"aborted transaction {entry} is not after {self._entries[-1]}")
        self._entries.append(entry)
        self._lasts.append(entry.last_offset)

    def reset(self, entries: Iterable[AbortedTxn]) -> None:
        self._entries = sorted(entries, key=lambda e: e.last_offset)
        self._lasts = [entry.last_offset for entry in self._entries]

    def overlapping(self, start: int, upto: int) -> list[AbortedTxn]:
        """Entries whose [first_offset, last_offset] overlaps [start, upto).

        Kafka's scan: from the first marker at or after ``start``, stopping after an
        entry whose last stable offset reaches ``upto`` — every transaction open when
        that marker was written had ended, so no later marker can belong to one that
        began below ``upto``.
        """
        out: list[AbortedTxn] = []
        for i in range(bisect_left(self._lasts, start), len(self._entries)):
            entry = self._entries[i]
            if entry.first_offset < upto:
                out.append(entry)
            if entry.last_stable_offset >= upto:
                break
        return out

    def truncate_head(self, log_start_offset: int) -> None:
        """Forget entries whose marker was deleted with its segment (retention)."""
        cut = bisect_left(self._lasts, log_start_offset)
        if cut:
            del self._entries[:cut]
            del self._lasts[:cut]
