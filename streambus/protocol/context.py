"""What protocol handlers may use of the broker: the ``BrokerServices`` Protocol.

Handlers type against this, never against ``Broker``: the protocol layer then
imports nothing above it, and whatever provides these services (the broker
today, a cluster member tomorrow) can serve the same handlers. Partition data
is reached only through ``partitions``; storage stays out of sight.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from streambus.cluster import BrokerInfo, Quorum, TopicState
from streambus.config import BrokerConfig
from streambus.errors import StreamBusError
from streambus.groups import GroupCoordinator
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import PartitionService
from streambus.producer_ids import ProducerIdAllocator
from streambus.protocol.fetch_sessions import FetchSessionCache
from streambus.quotas import QuotaManager
from streambus.schemas.registry import SchemaRegistry
from streambus.security.authorizer import Authorizer
from streambus.security.credentials import CredentialStore
from streambus.transactions import TransactionCoordinator


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
    def transactions(self) -> TransactionCoordinator: ...
    @property
    def telemetry(self) -> BrokerTelemetry: ...
    @property
    def quotas(self) -> QuotaManager: ...
    @property
    def fetch_sessions(self) -> FetchSessionCache: ...
    @property
    def schemas(self) -> SchemaRegistry:
        """The schema registry's state (what produced records are validated against)."""
        ...

    @property
    def authorizer(self) -> Authorizer: ...
    @property
    def credentials(self) -> CredentialStore: ...
    def listener_address(self, listener: str) -> tuple[str, int]:
        """Where clients of listener ``listener`` reach this broker (its advertised address)."""
        ...

    @property
    def quorum(self) -> Quorum:
        """The cluster's metadata: ``quorum.state`` is what Metadata answers from."""
        ...

    def controller_id(self) -> int:
        """The Raft leader's node id, -1 during an election."""
        ...

    # Topic metadata writes go through the quorum (a record submitted from any broker);
    # every broker's local storage follows the state.
    async def create_cluster_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        replication_factor: int = -1,
        internal: bool = False,
        validate_only: bool = False,
        assignments: Sequence[Sequence[int]] | None = None,
    ) -> TopicState: ...

    async def create_partitions(
        self,
        name: str,
        count: int,
        *,
        assignments: Sequence[Sequence[int]] | None = None,
        validate_only: bool = False,
    ) -> TopicState: ...

    async def elect_leaders(
        self, election_type: int, partitions: Iterable[tuple[str, int]] | None
    ) -> list[tuple[str, int, StreamBusError | None]]: ...

    async def delete_cluster_topic(self, name: str) -> uuid.UUID: ...

    # Dynamic configs go through the quorum too: a topic's overrides, and broker configs
    # for every broker (entity "") or one (its id).
    async def alter_topic_configs(
        self,
        name: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool = False,
        validate_only: bool = False,
    ) -> None: ...

    async def alter_broker_configs(
        self,
        entity: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool = False,
        validate_only: bool = False,
    ) -> None: ...

    # Group coordination: a group lives on the leader of its __consumer_offsets partition.
    async def ensure_offsets_topic(self) -> None: ...
    def group_coordinator(self, group_id: str) -> BrokerInfo: ...
    def check_coordinator(self, group_id: str) -> None: ...

    # Transaction coordination: an id lives on the leader of its __transaction_state partition.
    async def ensure_transaction_topic(self) -> None: ...
    def transaction_coordinator(self, transactional_id: str) -> BrokerInfo: ...
