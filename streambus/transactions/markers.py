"""The marker writer: ends a transaction in every partition it touched.

A commit or abort marker (a control batch) goes into each partition of the
transaction: appended here through the partition service when this broker leads
the partition (then waited for on the ISR, as Kafka's coordinator writes with
acks=all), or sent as WriteTxnMarkers to the broker that leads it, over a connection dialed
(TLS, SASL) by ``streambus.security.broker_client`` as every broker connection is.

Those connections are kept (``MarkerConnections``): on a SASL_SSL inter-broker listener a
new one costs a TLS handshake and a SCRAM login (PBKDF2 on both sides), which per commit
would be most of what a transaction costs. A few per destination broker, each carrying one
request at a time (frames never interleave), so concurrent commits to one broker are not
queued behind each other's ISR waits. One is dialed again when its SASL session is about
to end (``connections.max.reauth.ms``), when the broker registers another address, and
after any failure (a request that failed in flight leaves the stream in an unknown state);
connections to brokers no longer live are closed at the next write, and all at stop.

A partition whose write fails is retried (leadership moves, a broker restarts) until it is
written or its topic is gone: a transaction in PrepareCommit must end committed
everywhere, or the coordinator could never finish it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple, Protocol

from kafka.protocol.producer import WriteTxnMarkersRequest, WriteTxnMarkersResponse

from streambus.errors import (
    ERROR_BY_CODE,
    InvalidProducerEpochError,
    StreamBusError,
    UnknownTopicOrPartitionError,
)
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import OFFSETS_TOPIC, PartitionService
from streambus.security.broker_client import (
    AUTHENTICATION_FAILURES,
    BrokerConnection,
    BrokerDialer,
)
from streambus.structs import TopicPartition

log = logging.getLogger("streambus.transactions")

WRITE_TXN_MARKERS_VERSION = 1
RETRY_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
# Kept connections per destination broker: concurrent commits' markers to one broker go out
# on up to this many at once (each waits for the ISR there); more wait for a free one.
CONNECTIONS_PER_BROKER = 4


class Marker(NamedTuple):
    producer_id: int
    producer_epoch: int
    commit: bool
    coordinator_epoch: int


class Leader(NamedTuple):
    broker_id: int
    host: str
    port: int


class LeaderLookup(Protocol):
    def __call__(self, tp: TopicPartition) -> Leader | None:
        """Who leads ``tp`` (None: the partition no longer exists). Raises a retriable
        StreamBusError while it has no leader."""


# Called once a marker is in a __consumer_offsets partition: (producer id, commit, partition).
OffsetsHook = Callable[[int, bool, int], None]


class _Peer:
    """The kept connections to one broker at one address."""

    __slots__ = ("address", "idle", "slots")

    def __init__(self, address: tuple[str, int], size: int) -> None:
        self.address = address
        self.idle: list[BrokerConnection] = []
        self.slots = asyncio.Semaphore(size)  # idle + leased <= size


class MarkerConnections:
    """Connections to other brokers, kept between WriteTxnMarkers calls (see the module
    docstring); ``lease`` lends one to one request at a time."""

    def __init__(
        self, dialer: BrokerDialer, client_id: str, size: int = CONNECTIONS_PER_BROKER
    ) -> None:
        self._dialer = dialer
        self._client_id = client_id
        self._size = size
        self._peers: dict[int, _Peer] = {}

    def __len__(self) -> int:
        """Connections kept idle now (leased ones are not counted)."""
        return sum(len(p.idle) for p in self._peers.values())

    @contextlib.asynccontextmanager
    async def lease(self, leader: Leader, timeout_s: float) -> AsyncIterator[BrokerConnection]:
        """A connection to ``leader`` for the caller alone: a kept one, else a new one dialed
        (raising what ``BrokerDialer.connect`` raises). It is kept again after the block
        unless the block raised (then closed: its stream may hold half a frame)."""
        address = (leader.host, leader.port)
        peer = self._peers.get(leader.broker_id)
        if peer is None or peer.address != address:
            if peer is not None:
                log.info(
                    "broker %d moved from %s:%d: closing its marker connections",
                    leader.broker_id,
                    *peer.address,
                )
                await self._retire(leader.broker_id)
            peer = self._peers[leader.broker_id] = _Peer(address, self._size)
        async with peer.slots:
            conn: BrokerConnection | None = None
            while peer.idle and conn is None:
                kept = peer.idle.pop()
                if kept.expiring or kept.closed:  # session about to end, or the peer hung up
                    await kept.close()
                else:
                    conn = kept
            if conn is None:
                conn = await self._dialer.connect(
                    leader.broker_id,
                    leader.host,
                    leader.port,
                    client_id=self._client_id,
                    timeout_s=timeout_s,
                )
            try:
                yield conn
            except BaseException:
                await conn.close()
                raise
            if self._peers.get(leader.broker_id) is peer and not conn.expiring:
                peer.idle.append(conn)
            else:  # retired meanwhile (moved, left, stopped), or its session ends
                await conn.close()

    async def retain(self, live: Callable[[int], bool]) -> None:
        """Close the connections to brokers for which ``live`` is False."""
        for broker_id in [b for b in self._peers if not live(b)]:
            log.info("broker %d left the cluster: closing its marker connections", broker_id)
            await self._retire(broker_id)

    async def close(self) -> None:
        """Close every kept connection (leased ones are closed when given back)."""
        for broker_id in list(self._peers):
            await self._retire(broker_id)

    async def _retire(self, broker_id: int) -> None:
        peer = self._peers.pop(broker_id)
        idle, peer.idle = peer.idle, []
        await asyncio.gather(*(conn.close() for conn in idle))


class MarkerWriter:
    def __init__(
        self,
        partitions: PartitionService,
        broker_id: int,
        leader_of: LeaderLookup,
        telemetry: BrokerTelemetry,
        *,
        timeout_s: float = 5.0,
        dialer: BrokerDialer | None = None,
        is_live: Callable[[int], bool] | None = None,
    ) -> None:
        self._partitions = partitions
        self._broker_id = broker_id
        self._leader_of = leader_of
        self._telemetry = telemetry
        self._timeout_s = timeout_s
        self._client_id = f"streambus-txn-{broker_id}"
        self.connections = MarkerConnections(dialer or BrokerDialer(), self._client_id)
        self._is_live = is_live  # which brokers are in the cluster (None: keep every one)
        self.on_offsets_marker: OffsetsHook | None = None

    async def close(self) -> None:
        """Close the kept connections to other brokers (the broker is stopping)."""
        await self.connections.close()

    async def write(self, marker: Marker, tps: Iterable[TopicPartition], parent: Any) -> None:
        """Write ``marker`` to every partition of ``tps``, retrying until each is written
        or gone. ``parent``: the EndTxn span the marker writes are children of."""
        if self._is_live is not None:
            await self.connections.retain(self._is_live)
        pending = set(tps)
        backoff = RETRY_BACKOFF_S
        while pending:
            remote: dict[Leader, list[TopicPartition]] = {}
            for tp in sorted(pending):
                try:
                    leader = self._leader_of(tp)
                except StreamBusError as exc:
                    log.info("marker for %s: no leader yet (%s); retrying", tp, exc)
                    continue
                if leader is None:
                    log.info("marker for %s dropped: the partition no longer exists", tp)
                    pending.discard(tp)
                elif leader.broker_id == self._broker_id:
                    if await self._write_local(marker, tp, parent):
                        pending.discard(tp)
                else:
                    remote.setdefault(leader, []).append(tp)
            for leader, group in remote.items():
                pending.difference_update(await self._write_remote(marker, leader, group, parent))
            if pending:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _write_local(self, marker: Marker, tp: TopicPartition, parent: Any) -> bool:
        span = self._telemetry.child_span(
            "WriteTxnMarker",
            parent,
            {
                "messaging.destination.name": tp.topic,
                "messaging.destination.partition.id": str(tp.partition),
                "streambus.txn.commit": marker.commit,
            },
        )
        try:
            written = await self.append_here(marker, tp)
        finally:
            span.end()
        return written

    async def append_here(self, marker: Marker, tp: TopicPartition) -> bool:
        """Append ``marker`` to ``tp`` led here and wait for the ISR: True once done (or
        needless: the topic is gone, or a newer producer epoch already ended it)."""
        try:
            result = self._partitions.append_marker(
                tp, marker.producer_id, marker.producer_epoch, marker.commit,
                marker.coordinator_epoch,
            )  # fmt: skip
            await self._partitions.wait_replicated(tp, result.last_offset + 1, self._timeout_s)
        except UnknownTopicOrPartitionError:
            return True
        except InvalidProducerEpochError as exc:
            # A newer epoch wrote to this partition: this transaction is over there already.
            log.info("marker for %s not needed: %s", tp, exc)
            return True
        except StreamBusError as exc:
            log.info("marker for %s not written yet: %s", tp, exc)
            return False
        if tp.topic == OFFSETS_TOPIC and self.on_offsets_marker is not None:
            self.on_offsets_marker(marker.producer_id, marker.commit, tp.partition)
        return True

    async def _write_remote(
        self, marker: Marker, leader: Leader, tps: list[TopicPartition], parent: Any
    ) -> set[TopicPartition]:
        """WriteTxnMarkers to ``leader``: the partitions it wrote (or no longer has)."""
        R = WriteTxnMarkersRequest
        by_topic: dict[str, list[int]] = {}
        for tp in tps:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        request = R(
            markers=[
                R.WritableTxnMarker(
                    producer_id=marker.producer_id,
                    producer_epoch=marker.producer_epoch,
                    transaction_result=marker.commit,
                    topics=[
                        R.WritableTxnMarker.WritableTxnMarkerTopic(name=t, partition_indexes=ps)
                        for t, ps in by_topic.items()
                    ],
                    coordinator_epoch=marker.coordinator_epoch,
                )
            ]
        )
        span = self._telemetry.child_span(
            "WriteTxnMarkers",
            parent,
            {"streambus.broker.target": leader.broker_id, "streambus.txn.partitions": len(tps)},
        )
        done: set[TopicPartition] = set()
        leased = False
        try:
            async with (
                asyncio.timeout(self._timeout_s * 2),
                self.connections.lease(leader, self._timeout_s * 2) as conn,
            ):
                leased = True
                response = await conn.request(
                    request, WriteTxnMarkersResponse, WRITE_TXN_MARKERS_VERSION, self._client_id
                )
            for result in response.markers:
                for topic in result.topics:
                    for p in topic.partitions:
                        tp = TopicPartition(topic.name, p.partition_index)
                        error = ERROR_BY_CODE.get(p.error_code)
                        if p.error_code in (
                            0,
                            UnknownTopicOrPartitionError.errno,
                            InvalidProducerEpochError.errno,
                        ):
                            done.add(tp)
                        else:
                            name = error.kafka_name if error else p.error_code
                            log.info(
                                "marker for %s refused by broker %d: %s", tp, leader.broker_id, name
                            )
        except AUTHENTICATION_FAILURES as exc:
            if leased:  # a refused login was logged by the dialer
                log.info("WriteTxnMarkers to broker %d failed: %s; retrying", leader.broker_id, exc)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            log.info("WriteTxnMarkers to broker %d failed: %s; retrying", leader.broker_id, exc)
        finally:
            span.end()
        return done
