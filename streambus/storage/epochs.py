"""Leader epoch cache of one partition: where each leader epoch's data starts in the log.

A follower that meets a new leader asks it for the end offset of the follower's
latest epoch (OffsetForLeaderEpoch) and cuts its own log there, so the two logs
agree before it fetches; a leader answers from this cache. Kafka's
``LeaderEpochFileCache``: entries ``(epoch, start_offset)``, both strictly
increasing, the start offset being the base offset of the first batch written
in that epoch (whose ``partitionLeaderEpoch`` field holds it).

On disk, ``leader-epoch-checkpoint`` in the partition directory, Kafka's text
format (ASCII, one item per line, ``\\n`` line ends)::

    0                  format version
    2                  number of entries that follow
    0 0                epoch, then its start offset, one entry per line
    3 1500

It is rewritten whole on every change: a temporary file, fsynced, renamed over
the old one, the directory fsynced, so a crash leaves the old or the new file.
Only the write an append causes (a new epoch's first batch) skips the fsyncs
(the log's close syncs it): the produce path does not wait on the disk for it,
and a crash that loses or tears that write loses nothing, because
``PartitionLog.open`` walks every batch header anyway and adds the epochs the
file lacks. An unreadable file is logged at ERROR and the cache rebuilt from
the batches' ``partitionLeaderEpoch`` the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from streambus.storage.segment import fsync_dir

log = logging.getLogger("streambus.storage")

EPOCH_FILE = "leader-epoch-checkpoint"
_VERSION = 0
UNDEFINED_EPOCH = -1
UNDEFINED_OFFSET = -1


class CorruptEpochFileError(ValueError):
    """The checkpoint cannot be parsed; never leaves the storage package."""


def _parse(text: str) -> list[tuple[int, int]]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) < 2:
        raise CorruptEpochFileError("missing version or entry count line")
    if int(lines[0]) != _VERSION:
        raise CorruptEpochFileError(f"unknown version {lines[0]!r}")
    count = int(lines[1])
    if count != len(lines) - 2:
        raise CorruptEpochFileError(f"{len(lines) - 2} entries, the count line says {count}")
    entries: list[tuple[int, int]] = []
    for line in lines[2:]:
        fields = line.split(" ")
        if len(fields) != 2:
            raise CorruptEpochFileError(f"bad entry line {line!r}")
        epoch, start = int(fields[0]), int(fields[1])
        if epoch < 0 or start < 0:
            raise CorruptEpochFileError(f"negative value in entry {line!r}")
        if entries and (epoch <= entries[-1][0] or start < entries[-1][1]):
            raise CorruptEpochFileError(f"entry {line!r} does not follow {entries[-1]}")
        entries.append((epoch, start))
    return entries


class LeaderEpochCache:
    """``(epoch, start_offset)`` entries of one partition, kept in ``leader-epoch-checkpoint``.

    Owned by the partition's ``PartitionLog`` (one thread at a time); every method
    that changes the entries persists them before it returns.
    """

    def __init__(self, directory: Path, entries: Iterable[tuple[int, int]] = ()) -> None:
        self.path = directory / EPOCH_FILE
        self._entries: list[tuple[int, int]] = list(entries)
        self._failing = False  # the last write failed: the file lags the entries
        self.unsynced = False  # written without fsync: ``sync`` (at close) syncs it

    @classmethod
    def load(cls, directory: Path) -> tuple[LeaderEpochCache, bool]:
        """The cache in ``directory`` and whether it must be rebuilt from the log
        (the file is missing or corrupt; a corrupt one is logged at ERROR)."""
        cache = cls(directory)
        try:
            text = cache.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return cache, True
        except (OSError, UnicodeDecodeError) as exc:
            log.error("%s: unreadable, rebuilding it from the log: %s", cache.path, exc)
            return cache, True
        try:
            cache._entries = _parse(text)
        except ValueError as exc:  # CorruptEpochFileError or a non-numeric field
            log.error("%s: corrupt, rebuilding it from the log: %s", cache.path, exc)
            return cache, True
        return cache, False

    # -- reading -----------------------------------------------------------------

    def entries(self) -> list[tuple[int, int]]:
        return list(self._entries)

    @property
    def latest_epoch(self) -> int:
        return self._entries[-1][0] if self._entries else UNDEFINED_EPOCH

    def end_offset_for(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """``(largest epoch <= epoch, its end offset)``: the end is the start offset of the
        next epoch in the cache, or ``log_end_offset`` for the latest one;
        ``(-1, -1)`` when no cached epoch is <= ``epoch`` (an empty cache, or ``epoch``
        older than every entry, or -1).

        Kafka's ``endOffsetFor`` answers the same for every epoch in the cache or
        between two of its entries; for an epoch older than every entry it answers
        ``(epoch, start of the first entry)`` and for one above the latest ``(-1, -1)``.
        """
        floor = -1
        for i, (cached, _start) in enumerate(self._entries):
            if cached > epoch:
                break
            floor = i
        if floor < 0:
            return UNDEFINED_EPOCH, UNDEFINED_OFFSET
        if floor + 1 < len(self._entries):
            return self._entries[floor][0], self._entries[floor + 1][1]
        return self._entries[floor][0], log_end_offset

    # -- changing ----------------------------------------------------------------

    def assign(
        self, epoch: int, start_offset: int, *, persist: bool = True, durable: bool = True
    ) -> bool:
        """Record that ``epoch`` starts at ``start_offset`` (Kafka's ``assign``): nothing
        to do if it is the latest epoch already at or below that offset; entries it
        contradicts (an epoch >= it, or a start >= its start) are dropped first, with a
        warning unless it merely replaces the latest entry's start. True if it changed."""
        if epoch < 0 or start_offset < 0:
            return False
        if self._entries:
            latest, latest_start = self._entries[-1]
            if epoch == latest and start_offset >= latest_start:
                return False
        removed: list[tuple[int, int]] = []
        while self._entries and (
            self._entries[-1][0] >= epoch or self._entries[-1][1] >= start_offset
        ):
            removed.append(self._entries.pop())
        if len(removed) > 1 or (removed and removed[0][1] != start_offset):
            log.warning(
                "%s: epoch %d at offset %d replaces conflicting entries %s",
                self.path,
                epoch,
                start_offset,
                removed[::-1],
            )
        self._entries.append((epoch, start_offset))
        if persist:
            self.persist(durable=durable)
        return True

    def truncate_from_end(self, end_offset: int, *, persist: bool = True) -> bool:
        """Drop entries starting at or above ``end_offset`` (the log was cut there)."""
        keep = len(self._entries)
        while keep and self._entries[keep - 1][1] >= end_offset:
            keep -= 1
        if keep == len(self._entries):
            return False
        del self._entries[keep:]
        if persist:
            self.persist()
        return True

    def truncate_from_start(self, start_offset: int, *, persist: bool = True) -> bool:
        """The log now starts at ``start_offset``: drop entries below it, keeping the
        one that covers it with its start raised to ``start_offset``."""
        covering = -1
        for i, (_epoch, start) in enumerate(self._entries):
            if start > start_offset:
                break
            covering = i
        if covering < 0 or (covering == 0 and self._entries[0][1] == start_offset):
            return False
        epoch = self._entries[covering][0]
        self._entries[: covering + 1] = [(epoch, start_offset)]
        if persist:
            self.persist()
        return True

    def clear(self, *, persist: bool = True) -> None:
        self._entries.clear()
        if persist:
            self.persist()

    def persist(self, *, durable: bool = True) -> bool:
        """Write the file atomically; False if that failed (a full disk: logged once until
        a write succeeds, and retried by ``persist_if_dirty`` at the log's next flush).
        The entries in memory stay right meanwhile, and a reopen reconciles the file with
        the batches, so a failed write loses nothing."""
        lines = [str(_VERSION), str(len(self._entries))]
        lines += [f"{epoch} {start}" for epoch, start in self._entries]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, ("\n".join(lines) + "\n").encode("ascii"))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if durable:
                fsync_dir(self.path.parent)
        except OSError as exc:
            if not self._failing:
                log.warning("%s: cannot write: %s", self.path, exc)
            self._failing = True
            return False
        self._failing = False
        self.unsynced = not durable
        return True

    def sync(self) -> None:
        """At close: redo a write that failed, fsync one that was left unsynced."""
        if self._failing or self.unsynced:
            self.persist()
