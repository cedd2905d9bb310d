"""A broker without a copy of ``_schemas`` follows it from the partition's leader.

``_schemas`` has at most three replicas, so on a cluster of four brokers or more some
host none: their REST reads and their produce validation would see no schema. Such a
broker fetches the partition from its leader over the Kafka protocol, as a consumer
(replica id -1: the leader answers up to its high watermark, committed records only,
which is what a local copy's tail applies too), long-polling so an idle registry costs
one request per wait. The records go through the same tail (``follower.SchemasTail``)
at the same offsets, so a broker later given a copy continues from where it stood.

The connection is dialed as every broker-to-broker one is (``security.broker_client``:
the inter-broker listener's TLS and SASL), so the leader sees this broker's principal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kafka.protocol.consumer import FetchRequest, FetchResponse

from streambus.errors import OffsetOutOfRangeError, error_name
from streambus.schemas.errors import RemoteFetchError
from streambus.schemas.storage import SCHEMAS_PARTITION
from streambus.security.broker_client import BrokerConnection, BrokerDialer

log = logging.getLogger("streambus.schemas")

FETCH_VERSION = 12  # the last Fetch naming topics by name, as the replica fetcher's
WAIT_MS = 500  # the leader holds an empty fetch this long
MAX_BYTES = 4 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Fetched:
    records: bytes  # whole batches, the first may start before the offset asked
    high_watermark: int
    log_start_offset: int


@dataclass(frozen=True, slots=True)
class SchemasLeader:
    """Who leads ``_schemas`` partition 0: ``broker_id`` -1 when nobody does; ``exists``
    False while the topic is not in the metadata. ``port`` is its Kafka (inter-broker)
    port, ``registry_port`` its REST one (0: it serves none)."""

    exists: bool
    broker_id: int = -1
    host: str = ""
    registry_port: int = 0
    port: int = 0


class RemoteSchemas:
    """Fetches ``_schemas`` partition 0 from its leader, over one kept connection."""

    def __init__(
        self, leader: Callable[[], SchemasLeader], broker_id: int, dialer: BrokerDialer
    ) -> None:
        self._leader = leader
        self._broker_id = broker_id
        self._dialer = dialer
        self._client_id = f"streambus-schemas-{broker_id}"
        self._conn: BrokerConnection | None = None
        self._at: tuple[int, str, int] | None = None

    def address(self) -> tuple[int, str, int] | None:
        """The leader's id and Kafka address; None: unknown, or this broker."""
        leader = self._leader()
        if leader.broker_id < 0 or leader.broker_id == self._broker_id or not leader.port:
            return None
        return leader.broker_id, leader.host, leader.port

    async def fetch(self, offset: int) -> Fetched | None:
        """Records from ``offset`` (None: no leader to ask). Raises OSError, EOFError,
        TimeoutError on the connection, RemoteFetchError on the leader's error code."""
        address = self.address()
        if address is None:
            await self.close()
            return None
        if self._conn is None or self._at != address or self._conn.expiring:
            await self.close()
            self._conn = await self._dialer.connect(
                *address, client_id=self._client_id, timeout_s=REQUEST_TIMEOUT_S
            )
            self._at = address
        F = FetchRequest
        request = F(
            replica_id=-1,
            max_wait_ms=WAIT_MS,
            min_bytes=1,
            max_bytes=MAX_BYTES,
            isolation_level=0,
            session_id=0,
            session_epoch=-1,
            topics=[
                F.FetchTopic(
                    topic=SCHEMAS_PARTITION.topic,
                    partitions=[
                        F.FetchTopic.FetchPartition(
                            partition=SCHEMAS_PARTITION.partition,
                            current_leader_epoch=-1,
                            fetch_offset=offset,
                            last_fetched_epoch=-1,
                            log_start_offset=-1,
                            partition_max_bytes=MAX_BYTES,
                        )
                    ],
                )
            ],
            forgotten_topics_data=[],
            rack_id="",
        )
        try:
            response = await self._conn.request(
                request, FetchResponse, FETCH_VERSION, self._client_id
            )
        except BaseException:
            await self.close()  # a half-read response leaves the connection unusable
            raise
        if response.error_code:
            raise RemoteFetchError(f"Fetch of _schemas: {error_name(response.error_code)}")
        for topic in response.responses:
            for p in topic.partitions:
                if p.partition_index != SCHEMAS_PARTITION.partition:
                    continue
                if p.error_code == OffsetOutOfRangeError.errno:
                    return Fetched(b"", p.high_watermark, p.log_start_offset)
                if p.error_code:
                    raise RemoteFetchError(f"Fetch of _schemas: {error_name(p.error_code)}")
                return Fetched(bytes(p.records or b""), p.high_watermark, p.log_start_offset)
        return Fetched(b"", -1, -1)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn, self._at = self._conn, None, None
            await conn.close()
