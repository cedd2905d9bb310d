"""What protocol handlers may use of the broker: the ``BrokerServices`` Protocol.

Handlers type against this, never against ``Broker``: the protocol layer then
imports nothing above it, and whatever provides these services (the broker
today, a cluster member tomorrow) can serve the same handlers. Partition data
is reached only through ``partitions``; storage stays out of sight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from streambus.config import BrokerConfig
from streambus.groups import GroupCoordinator
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import PartitionService, TopicMeta
from streambus.producer_ids import ProducerIdAllocator


class BrokerServices(Protocol):
    @property
    def config(self) -> BrokerConfig: ...
    @property
    def broker_id(self) -> int: ...
    @property
    def cluster_id(self) -> str: ...
    @property
    def advertised_address(self) -> tuple[str, int]: ...
    @property
    def stopping(self) -> bool:
        """True once the broker is no longer RUNNING: long polls answer at once."""
        ...

    @property
    def partitions(self) -> PartitionService: ...
    @property
    def groups(self) -> GroupCoordinator: ...
    @property
    def producer_ids(self) -> ProducerIdAllocator: ...
    @property
    def telemetry(self) -> BrokerTelemetry: ...

    # Topic metadata writes: the broker decides how they are made (locally today; through
    # the metadata quorum in a cluster). Reads go through ``partitions``.
    def create_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        validate_only: bool = False,
    ) -> TopicMeta: ...

    def delete_topic(self, name: str) -> TopicMeta: ...
