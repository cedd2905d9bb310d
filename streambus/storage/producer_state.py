"""Idempotent-producer bookkeeping for one partition (KIP-98 sequence numbers).

A retried produce request must not store its batch twice. For every producer
id the partition remembers the epoch and the last five batches it wrote (the
producer keeps at most five requests in flight), so a retry of any of them is
answered with the offsets it got the first time. Nothing is persisted: the log
itself is the snapshot, rebuilt from batch headers when the log opens or is
truncated (a replica cut back to its leader's log forgets the batches it lost,
so their retries are appended again rather than answered as duplicates).

Transactions (KIP-98): a producer's first transactional batch since its last
marker opens its transaction in this partition (Kafka's currentTxnFirstOffset);
its commit or abort marker (a control batch) ends it. The smallest first offset
of the open transactions bounds the last stable offset. A marker also carries the
producer's epoch: a newer one becomes the producer's epoch (its sequence cache is
reset), so any later batch of an older epoch is fenced, transactional or not. On
replay a control batch with a producer id is taken for a marker (KRaft's other
control records are written without one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from streambus.errors import InvalidProducerEpochError, OutOfOrderSequenceNumberError
from streambus.records.batch import BatchHeader

CACHED_BATCHES = 5  # max.in.flight.requests.per.connection an idempotent producer may use
_SEQUENCE_SPACE = 1 << 31  # sequences run 0 .. Int32.MAX and wrap to 0


class CachedBatch(NamedTuple):
    first_seq: int
    last_seq: int
    base_offset: int
    last_offset: int


class ProducerInfo(NamedTuple):
    """One producer as DescribeProducers reports it."""

    producer_id: int
    producer_epoch: int
    last_sequence: int  # -1 if none cached (only markers seen in this epoch)
    last_timestamp_ms: int
    coordinator_epoch: int  # of its last marker; -1 if none (or not read on replay)
    current_txn_start_offset: int  # -1 if no transaction is open


class CompletedTxn(NamedTuple):
    """A transaction ended by a marker; ``first_offset`` -1 if it had no records here."""

    producer_id: int
    first_offset: int
    last_offset: int  # the marker's offset
    last_stable_offset: int  # of the partition once it ended


class _Producer:
    __slots__ = ("batches", "coordinator_epoch", "epoch", "last_timestamp", "txn_first")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches: deque[CachedBatch] = deque(maxlen=CACHED_BATCHES)
        self.last_timestamp = -1
        self.coordinator_epoch = -1
        self.txn_first = -1  # first offset of the open transaction, -1 if none


def last_sequence(header: BatchHeader) -> int:
    return (header.base_sequence + header.last_offset_delta) % _SEQUENCE_SPACE


class ProducerState:
    """producer id -> (epoch, last five batches) for one partition."""

    def __init__(self) -> None:
        self._producers: dict[int, _Producer] = {}
        self._open: dict[int, int] = {}  # producer id -> first offset of its transaction

    def __len__(self) -> int:
        return len(self._producers)

    def check(self, header: BatchHeader) -> CachedBatch | None:
        """The stored batch ``header`` duplicates, or None if it may be written.

        Raises ``InvalidProducerEpochError`` for a fenced (older) epoch and
        ``OutOfOrderSequenceNumberError`` for a sequence gap within an epoch.
        """
        if header.producer_id < 0:
            return None
        producer = self._producers.get(header.producer_id)
        if producer is None:
            # Unknown producer: its state may have been removed by retention, so accept
            # whatever sequence it starts at, as Kafka does since KIP-360.
            return None
        if header.producer_epoch < producer.epoch:
            raise InvalidProducerEpochError(
                f"producer {header.producer_id} epoch {header.producer_epoch} is older than "
                f"the current epoch {producer.epoch}"
            )
        if header.producer_epoch > producer.epoch or not producer.batches:
            return None
        first, last = header.base_sequence, last_sequence(header)
        for cached in producer.batches:
            if cached.first_seq == first and cached.last_seq == last:
                return cached
        expected = (producer.batches[-1].last_seq + 1) % _SEQUENCE_SPACE
        if first != expected:
            raise OutOfOrderSequenceNumberError(
                f"producer {header.producer_id} epoch {header.producer_epoch}: expected "
                f"sequence {expected}, got {first}"
            )
        return None

    def check_marker(self, producer_id: int, producer_epoch: int) -> None:
        """Refuse a marker of an epoch older than the producer's (InvalidProducerEpochError)."""
        producer = self._producers.get(producer_id)
        if producer is not None and producer_epoch < producer.epoch:
            raise InvalidProducerEpochError(
                f"marker for producer {producer_id} epoch {producer_epoch} is older than "
                f"the current epoch {producer.epoch}"
            )

    def _entry(self, producer_id: int, epoch: int) -> _Producer:
        producer = self._producers.get(producer_id)
        if producer is None:
            producer = self._producers[producer_id] = _Producer(epoch)
        elif producer.epoch != epoch:
            # A new epoch starts a new sequence space; an open transaction stays open
            # (its marker, of the new epoch, ends it).
            producer.epoch = epoch
            producer.batches.clear()
        return producer

    def update(self, header: BatchHeader, base_offset: int) -> None:
        """Remember a batch just written at ``base_offset``; a transactional one opens its
        producer's transaction unless one is open. A control batch (a marker) is for
        ``complete``; it carries no sequence numbers and is not remembered here."""
        if header.producer_id < 0 or header.is_control:
            return
        producer = self._entry(header.producer_id, header.producer_epoch)
        producer.last_timestamp = header.max_timestamp
        if header.is_transactional and producer.txn_first < 0:
            producer.txn_first = base_offset
            self._open[header.producer_id] = base_offset
        producer.batches.append(
            CachedBatch(
                header.base_sequence,
                last_sequence(header),
                base_offset,
                base_offset + header.last_offset_delta,
            )
        )

    def complete(self, header: BatchHeader, coordinator_epoch: int = -1) -> CompletedTxn:
        """A marker was written (``header``, at its base offset): end its producer's
        transaction, adopting the marker's epoch."""
        pid = header.producer_id
        producer = self._entry(pid, header.producer_epoch)
        producer.last_timestamp = header.max_timestamp
        if coordinator_epoch >= 0:
            producer.coordinator_epoch = coordinator_epoch
        first = producer.txn_first
        producer.txn_first = -1
        self._open.pop(pid, None)
        marker = header.base_offset
        lso = min(self._open.values(), default=marker + 1)
        return CompletedTxn(pid, first, marker, min(lso, marker + 1))

    def first_unstable_offset(self) -> int | None:
        """The first offset of the oldest open transaction; None if none is open."""
        return min(self._open.values(), default=None)

    def ongoing(self) -> list[tuple[int, int, int, int]]:
        """(producer id, epoch, first offset, last timestamp) of each open transaction."""
        out = []
        for pid, first in sorted(self._open.items(), key=lambda item: item[1]):
            producer = self._producers[pid]
            out.append((pid, producer.epoch, first, producer.last_timestamp))
        return out

    def describe(self) -> list[ProducerInfo]:
        """Every producer this partition knows."""
        return [
            ProducerInfo(
                pid,
                producer.epoch,
                producer.batches[-1].last_seq if producer.batches else -1,
                producer.last_timestamp,
                producer.coordinator_epoch,
                producer.txn_first,
            )
            for pid, producer in sorted(self._producers.items())
        ]

    def clear(self) -> None:
        self._producers.clear()
        self._open.clear()

    def rebuild(self, headers: Iterable[BatchHeader]) -> None:
        """Replay the headers of every stored batch, oldest first."""
        self.clear()
        for header in headers:
            self.replay(header)

    def replay(self, header: BatchHeader) -> CompletedTxn | None:
        """Take in one stored batch; what a marker ended, if it is one."""
        if header.is_control:
            if header.producer_id < 0:
                return None
            return self.complete(header)
        self.update(header, header.base_offset)
        return None

    def truncate_head(self, log_start_offset: int) -> None:
        """Forget producers whose last batch was deleted, as a reopen would."""
        gone = [
            pid
            for pid, producer in self._producers.items()
            if producer.batches
            and producer.batches[-1].last_offset < log_start_offset
            and producer.txn_first < 0
        ]
        for pid in gone:
            del self._producers[pid]
