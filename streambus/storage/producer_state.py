"""Idempotent-producer bookkeeping for one partition (KIP-98 sequence numbers).

A retried produce request must not store its batch twice. For every producer
id the partition remembers the epoch and the last five batches it wrote (the
producer keeps at most five requests in flight), so a retry of any of them is
answered with the offsets it got the first time. Nothing is persisted: the log
itself is the snapshot, rebuilt from batch headers when the log opens or is
truncated (a replica cut back to its leader's log forgets the batches it lost,
so their retries are appended again rather than answered as duplicates).
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


class _Producer:
    __slots__ = ("batches", "epoch")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches: deque[CachedBatch] = deque(maxlen=CACHED_BATCHES)


def last_sequence(header: BatchHeader) -> int:
    return (header.base_sequence + header.last_offset_delta) % _SEQUENCE_SPACE


class ProducerState:
    """producer id -> (epoch, last five batches) for one partition."""

    def __init__(self) -> None:
        self._producers: dict[int, _Producer] = {}

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

    def update(self, header: BatchHeader, base_offset: int) -> None:
        """Remember a batch just written at ``base_offset``. A control batch (a transaction
        marker) carries no sequence numbers and is not remembered, as in Kafka."""
        if header.producer_id < 0 or header.is_control:
            return
        producer = self._producers.get(header.producer_id)
        if producer is None or producer.epoch != header.producer_epoch:
            producer = self._producers[header.producer_id] = _Producer(header.producer_epoch)
        producer.batches.append(
            CachedBatch(
                header.base_sequence,
                last_sequence(header),
                base_offset,
                base_offset + header.last_offset_delta,
            )
        )

    def rebuild(self, headers: Iterable[BatchHeader]) -> None:
        """Replay the headers of every stored batch, oldest first."""
        self._producers.clear()
        for header in headers:
            self.update(header, header.base_offset)

    def truncate_head(self, log_start_offset: int) -> None:
        """Forget producers whose last batch was deleted, as a reopen would."""
        gone = [
            pid
            for pid, producer in self._producers.items()
            if producer.batches and producer.batches[-1].last_offset < log_start_offset
        ]
        for pid in gone:
            del self._producers[pid]
