"""A follower's copy loop for the partitions one leader leads (Kafka's ReplicaFetcherThread,
as one task on the event loop).

Broker to broker is the Kafka protocol on the inter-broker listener, dialed (TLS, SASL)
by ``streambus.security.broker_client`` as every broker connection is: a Fetch with this
broker's id as ``replica_id`` (the leader then reads to its log end and notes our
progress), and, before the first fetch under a new leader epoch, OffsetForLeaderEpoch
for our latest epoch, whose answer we truncate to, so this copy never keeps records the
leader lacks. Requests are encoded and responses decoded with kafka-python's message
classes, as the server does; large responses are decoded in a worker thread.

A partition whose fetch fails (the leader moved, its epoch is newer or older than ours)
rests for a second and waits for the metadata to say where to go; a lost connection is
retried with a growing pause, and so is a refused login (logged once by the dialer).
Nothing here decides roles: the replica manager adds and
removes partitions as the metadata changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka.protocol.consumer import (
    FetchRequest,
    FetchResponse,
    OffsetForLeaderEpochRequest,
    OffsetForLeaderEpochResponse,
)

from streambus.errors import OffsetOutOfRangeError, StreamBusError, error_name
from streambus.partitions import PartitionService
from streambus.security.broker_client import AUTHENTICATION_FAILURES, BrokerConnection, BrokerDialer
from streambus.structs import TopicPartition

log = logging.getLogger("streambus.replication")

FETCH_VERSION = 12  # the last Fetch naming topics by name
EPOCH_VERSION = 3  # OffsetForLeaderEpoch with replica_id, not yet flexible
PARTITION_BACKOFF_S = 1.0
MAX_RECONNECT_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class FetcherSettings:
    broker_id: int
    wait_max_ms: int = 500  # replica.fetch.wait.max.ms
    max_bytes_per_partition: int = 1024 * 1024  # replica.fetch.max.bytes
    response_max_bytes: int = 10 * 1024 * 1024  # replica.fetch.response.max.bytes
    request_timeout_s: float = 30.0
    # How this broker dials the leader (the inter-broker listener's TLS and SASL)
    dialer: BrokerDialer = field(default_factory=BrokerDialer)


@dataclass(slots=True)
class _Fetching:
    leader_epoch: int
    truncated: bool = False  # OffsetForLeaderEpoch answered and applied under this epoch
    resting_until: float = 0.0


class ReplicaFetcher:
    def __init__(
        self,
        leader_id: int,
        address: Callable[[], tuple[str, int] | None],
        service: PartitionService,
        settings: FetcherSettings,
    ) -> None:
        self.leader_id = leader_id
        self._address = address
        self._service = service
        self._settings = settings
        self._client_id = f"streambus-replica-{settings.broker_id}"
        self._parts: dict[TopicPartition, _Fetching] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def partitions(self) -> dict[TopicPartition, _Fetching]:
        return self._parts

    def add(self, tp: TopicPartition, leader_epoch: int) -> None:
        """Follow ``tp`` from this leader under ``leader_epoch`` (truncating first)."""
        current = self._parts.get(tp)
        if current is None or current.leader_epoch != leader_epoch:
            self._parts[tp] = _Fetching(leader_epoch)
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"streambus-replica-fetcher-{self.leader_id}"
            )

    def remove(self, tp: TopicPartition) -> None:
        self._parts.pop(tp, None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._parts:
                self._changed.clear()
                await self._changed.wait()
                continue
            address = self._address()
            if address is None:
                await asyncio.sleep(PARTITION_BACKOFF_S)
                continue
            conn: BrokerConnection | None = None
            try:
                conn = await self._settings.dialer.connect(
                    self.leader_id,
                    *address,
                    client_id=self._client_id,
                    timeout_s=self._settings.request_timeout_s,
                )
                backoff = 0.1
                while self._parts and not conn.expiring:
                    await self._round(conn)
            except AUTHENTICATION_FAILURES as exc:
                # A refused login was logged by the dialer; a TLS error later is a lost
                # connection. Either is retried no faster than a lost connection.
                if conn is not None:
                    log.info("replica fetcher for leader %d: %s", self.leader_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_RECONNECT_BACKOFF_S)
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.info(
                    "replica fetcher for leader %d (%s): %s; retrying in %.1f s",
                    self.leader_id,
                    address,
                    exc or type(exc).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_RECONNECT_BACKOFF_S)
            finally:
                if conn is not None:
                    await conn.close()

    async def _round(self, conn: BrokerConnection) -> None:
        now = asyncio.get_running_loop().time()
        ready = {tp: f for tp, f in self._parts.items() if f.resting_until <= now}
        if not ready:
            await asyncio.sleep(min(f.resting_until for f in self._parts.values()) - now)
            return
        untruncated = {tp: f for tp, f in ready.items() if not f.truncated}
        if untruncated:
            await self._truncate(conn, untruncated)
        fetching = {tp: f for tp, f in ready.items() if f.truncated}
        if fetching:
            await self._fetch(conn, fetching)

    def _rest(self, tp: TopicPartition, fetching: _Fetching, reason: str) -> None:
        log.info("replica of %s (leader %d): %s", tp, self.leader_id, reason)
        fetching.resting_until = asyncio.get_running_loop().time() + PARTITION_BACKOFF_S

    def _current(self, tp: TopicPartition, fetching: _Fetching) -> bool:
        """Still followed under the epoch the request was made for."""
        return self._parts.get(tp) is fetching

    # -- truncation -------------------------------------------------------------------------
    async def _truncate(
        self, conn: BrokerConnection, parts: dict[TopicPartition, _Fetching]
    ) -> None:
        service = self._service
        asked: dict[TopicPartition, int] = {}
        for tp, fetching in list(parts.items()):
            _, end, latest = service.replica_log_end(tp)
            if latest < 0:
                # No epochs in this copy (empty, or written before epochs were kept): what
                # is below its high watermark was committed; the rest is fetched again.
                replica = service.replica(tp)
                hw = replica.high_watermark if replica is not None else 0
                if end > hw:
                    self._apply_truncation(tp, fetching, hw)
                fetching.truncated = True
                parts.pop(tp)
            else:
                asked[tp] = latest
        if not parts:
            return
        R = OffsetForLeaderEpochRequest
        by_topic: dict[str, list[Any]] = {}
        for tp, fetching in parts.items():
            by_topic.setdefault(tp.topic, []).append(
                R.OffsetForLeaderTopic.OffsetForLeaderPartition(
                    partition=tp.partition,
                    current_leader_epoch=fetching.leader_epoch,
                    leader_epoch=asked[tp],
                )
            )
        request = R(
            replica_id=self._settings.broker_id,
            topics=[R.OffsetForLeaderTopic(topic=t, partitions=ps) for t, ps in by_topic.items()],
        )
        response = await conn.request(
            request, OffsetForLeaderEpochResponse, EPOCH_VERSION, self._client_id
        )
        for topic in response.topics:
            for p in topic.partitions:
                tp = TopicPartition(topic.topic, p.partition)
                asked_for = parts.get(tp)
                if asked_for is None or not self._current(tp, asked_for):
                    continue
                fetching = asked_for
                if p.error_code:
                    self._rest(tp, fetching, f"OffsetForLeaderEpoch: {error_name(p.error_code)}")
                    continue
                self._settle(tp, fetching, asked[tp], p.leader_epoch, p.end_offset)

    def _settle(
        self, tp: TopicPartition, fetching: _Fetching, asked: int, epoch: int, end: int
    ) -> None:
        """Kafka's follower truncation: to where the leader says our epoch ends, or, when
        the leader answers an older epoch, to where that epoch ends in both logs."""
        service = self._service
        _, own_end, _ = service.replica_log_end(tp)
        if epoch < 0 or end < 0:
            replica = service.replica(tp)
            target = replica.high_watermark if replica is not None else own_end
            done = True
        elif epoch == asked:
            target, done = min(end, own_end), True
        else:
            own_epoch, own_epoch_end = service.replica_epoch_end(tp, epoch)
            if own_epoch == epoch:
                target, done = min(end, own_epoch_end), True
            else:  # our copy lacks that epoch: cut to where ours ends and ask again
                target, done = min(own_epoch_end, own_end), False
        if target < own_end:
            self._apply_truncation(tp, fetching, max(target, 0))
        fetching.truncated = done

    def _apply_truncation(self, tp: TopicPartition, fetching: _Fetching, offset: int) -> None:
        start, end, _ = self._service.replica_log_end(tp)
        try:
            self._service.truncate_replica(tp, offset)
        except StreamBusError as exc:
            self._rest(tp, fetching, f"truncation to {offset} failed: {exc}")
            return
        log.info(
            "replica of %s truncated from %d to %d to match leader %d (epoch %d)",
            tp,
            end,
            max(offset, start),
            self.leader_id,
            fetching.leader_epoch,
        )

    # -- fetching ---------------------------------------------------------------------------
    async def _fetch(self, conn: BrokerConnection, parts: dict[TopicPartition, _Fetching]) -> None:
        service = self._service
        F = FetchRequest
        by_topic: dict[str, list[Any]] = {}
        for tp, fetching in parts.items():
            start, end, _ = service.replica_log_end(tp)
            by_topic.setdefault(tp.topic, []).append(
                F.FetchTopic.FetchPartition(
                    partition=tp.partition,
                    current_leader_epoch=fetching.leader_epoch,
                    fetch_offset=end,
                    last_fetched_epoch=-1,
                    log_start_offset=start,
                    partition_max_bytes=self._settings.max_bytes_per_partition,
                )
            )
        request = F(
            replica_id=self._settings.broker_id,
            max_wait_ms=self._settings.wait_max_ms,
            min_bytes=1,
            max_bytes=self._settings.response_max_bytes,
            isolation_level=0,
            session_id=0,
            session_epoch=-1,
            topics=[F.FetchTopic(topic=t, partitions=ps) for t, ps in by_topic.items()],
            forgotten_topics_data=[],
            rack_id="",
        )
        response = await conn.request(request, FetchResponse, FETCH_VERSION, self._client_id)
        for topic in response.responses:
            for p in topic.partitions:
                tp = TopicPartition(topic.topic, p.partition_index)
                asked_for = parts.get(tp)
                if asked_for is None or not self._current(tp, asked_for):
                    continue  # the metadata moved it while the fetch was out
                await self._apply(tp, asked_for, p)

    async def _apply(self, tp: TopicPartition, fetching: _Fetching, p: Any) -> None:
        service = self._service
        if p.error_code == OffsetOutOfRangeError.errno:
            _, end, _ = service.replica_log_end(tp)
            if p.log_start_offset > end:
                log.info(
                    "replica of %s: leader %d's log starts at %d, past this copy's end %d; "
                    "starting again there",
                    tp,
                    self.leader_id,
                    p.log_start_offset,
                    end,
                )
                service.restart_replica_at(tp, p.log_start_offset)
            else:
                fetching.truncated = False  # ahead of the leader: ask where to cut
            return
        if p.error_code:
            self._rest(tp, fetching, f"Fetch: {error_name(p.error_code)}")
            return
        try:
            await service.append_replicated(
                tp, p.records or b"", p.high_watermark, p.log_start_offset
            )
        except StreamBusError as exc:
            # Not the offset we asked for (the leader's log changed under us): truncate again.
            fetching.truncated = False
            self._rest(tp, fetching, f"append of fetched batches failed: {exc}")
