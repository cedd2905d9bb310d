"""Payload sizes of recently stored batches, so Fetch need not walk their records again.

Produce already measures each batch's key + value + header bytes while
validating it; consumers mostly read what was just produced. Entries are
keyed by the batch's CRC as well as its position, so a batch rewritten by
compaction (same base offset, other records) never matches a stale entry.
"""

from __future__ import annotations

from streambus.structs import TopicPartition

BatchKey = tuple[TopicPartition, int, int]  # partition, base offset, CRC-32C


class PayloadSizes:
    def __init__(self, max_entries: int = 65536) -> None:
        self._sizes: dict[BatchKey, int] = {}
        self._max = max_entries

    def remember(self, tp: TopicPartition, base_offset: int, crc: int, payload: int) -> None:
        sizes = self._sizes
        sizes[(tp, base_offset, crc)] = payload
        if len(sizes) > self._max:
            del sizes[next(iter(sizes))]  # the oldest: dicts keep insertion order

    def get(self, tp: TopicPartition, base_offset: int, crc: int) -> int | None:
        return self._sizes.get((tp, base_offset, crc))
