"""Kafka's record-batch format (v2): reading, checking and building batches.

Used alike by storage (what is on disk), protocol (what travels) and the group
coordinator (what it writes to ``__consumer_offsets``); it knows nothing of
any of them. ``compression`` holds the bounded decompression of a batch's
records.
"""

from streambus.records.batch import (
    BatchHeader,
    Record,
    build_batch,
    iter_records,
    parse_batches,
    payload_bytes,
    walk_batches,
)

__all__ = [
    "BatchHeader",
    "Record",
    "build_batch",
    "iter_records",
    "parse_batches",
    "payload_bytes",
    "walk_batches",
]
