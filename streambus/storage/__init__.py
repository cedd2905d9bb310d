"""On-disk storage: partition logs and the topic catalog.

The broker needs only what is exported here; ``segment``, ``producer_state``
and ``cleaner`` are implementation a reader can skip. The record-batch format
they store is ``streambus.records``.
"""

from streambus.storage.catalog import LogManager, MaintenanceReport, TopicMeta
from streambus.storage.log import PartitionLog

__all__ = [
    "LogManager",
    "MaintenanceReport",
    "PartitionLog",
    "TopicMeta",
]
