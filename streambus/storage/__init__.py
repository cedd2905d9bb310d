"""On-disk storage: record batches, partition logs and the topic catalog.

The broker needs only what is exported here; ``segment``, ``producer_state``
and ``cleaner`` are implementation a reader can skip.
"""

from streambus.storage.batch import (
    BatchHeader,
    Record,
    build_batch,
    iter_records,
    parse_batches,
    payload_bytes,
)
from streambus.storage.catalog import LogManager, MaintenanceReport, TopicMeta
from streambus.storage.log import PartitionLog

__all__ = [
    "BatchHeader",
    "LogManager",
    "MaintenanceReport",
    "PartitionLog",
    "Record",
    "TopicMeta",
    "build_batch",
    "iter_records",
    "parse_batches",
    "payload_bytes",
]
