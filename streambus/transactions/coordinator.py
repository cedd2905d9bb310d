"""The transaction coordinator (Kafka's TransactionCoordinator + TransactionStateManager).

A transactional id is coordinated by the leader of the ``__transaction_state``
partition it hashes to. Every change of an id's metadata is written there first
(acks=all) and only then applied in memory, so what a client was told survives
the coordinator: a new leader of the partition reads it back (``load_partition``)
and finishes any transaction it finds between PrepareCommit/PrepareAbort and its
markers.

EndTxn writes PrepareCommit (or PrepareAbort), then the markers, then
CompleteCommit; the client is answered once the markers are written, or after
``end_wait_s`` if they are still being retried (the prepared state is durable: the
markers will be written). Until then the id answers CONCURRENT_TRANSACTIONS.
A transaction open longer than its timeout is aborted by the coordinator with a
bumped epoch, which also fences the producer that left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from streambus.cluster.state import coordinator_partition
from streambus.errors import (
    ConcurrentTransactionsError,
    CoordinatorNotAvailableError,
    InvalidProducerIdMappingError,
    InvalidTransactionTimeoutError,
    InvalidTxnStateError,
    KafkaStorageError,
    NotCoordinatorError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderOrFollowerError,
    ProducerFencedError,
    RequestTimedOutError,
    StreamBusError,
)
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import AppendOrigin, PartitionService
from streambus.producer_ids import MAX_EPOCH
from streambus.records import build_batch, iter_records, walk_batches
from streambus.structs import TopicPartition
from streambus.transactions.markers import Marker, MarkerWriter
from streambus.transactions.state import (
    TRANSACTION_TOPIC,
    TransactionMetadata,
    TxnState,
    decode_key,
    decode_value,
    encode_key,
    encode_value,
    valid_transition,
)

log = logging.getLogger("streambus.transactions")

Allocate = Callable[[], Awaitable[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class TxnSettings:
    state_partitions: int = 50  # transaction.state.log.num.partitions
    max_timeout_ms: int = 900_000  # transaction.max.timeout.ms
    cleanup_interval_ms: int = 10_000  # ...abort.timed.out.transaction.cleanup.interval.ms
    write_timeout_s: float = 5.0  # how long a state write waits for the ISR
    end_wait_s: float = 5.0  # how long EndTxn waits for its markers before answering


class TransactionCoordinator:
    def __init__(
        self,
        partitions: PartitionService,
        allocate: Allocate,
        markers: MarkerWriter,
        settings: TxnSettings,
        telemetry: BrokerTelemetry,
        *,
        group_partition: Callable[[str], TopicPartition],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``allocate``: a new (producer id, epoch 0); ``group_partition``: the
        ``__consumer_offsets`` partition of a group (created on first use)."""
        self._partitions = partitions
        self._allocate = allocate
        self.markers = markers
        self.settings = settings
        self._telemetry = telemetry
        self._group_partition = group_partition
        self._clock = clock
        self._txns: dict[str, TransactionMetadata] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._completing: dict[str, asyncio.Task[None]] = {}
        self._loaded: set[int] = set()
        self._leads_all = False  # a single broker: it coordinates every id
        self._ticker: asyncio.Task[None] | None = None

    # -- placement and lifecycle -------------------------------------------------------------
    def partition_for(self, transactional_id: str) -> TopicPartition:
        meta = self._partitions.topics().get(TRANSACTION_TOPIC)
        count = meta.partitions if meta is not None else self.settings.state_partitions
        return TopicPartition(TRANSACTION_TOPIC, coordinator_partition(transactional_id, count))

    def load(self) -> None:
        """A single broker: it coordinates every transactional id; read back the partitions
        not read yet (at start, and once FindCoordinator has created the topic)."""
        self._leads_all = True
        meta = self._partitions.topics().get(TRANSACTION_TOPIC)
        for partition in range(meta.partitions if meta is not None else 0):
            if partition not in self._loaded:  # loaded ones are current (and may be completing)
                self.load_partition(partition)

    def load_partition(self, partition: int) -> None:
        """This broker now leads ``partition``: coordinate the ids stored there, and finish
        the transactions found between prepare and complete (their markers again)."""
        self.unload_partition(partition)
        tp = TopicPartition(TRANSACTION_TOPIC, partition)
        latest: dict[str, TransactionMetadata | None] = {}
        try:
            offset, end = self._partitions.offsets(tp)
            while offset < end:
                data = self._partitions.read(tp, offset, 4 * 1024 * 1024)
                if not data:
                    break
                for pos, header in walk_batches(data):
                    for record in iter_records(data, pos, header):
                        _apply(latest, record.key, record.value)
                    offset = header.last_offset + 1
        except StreamBusError as exc:
            log.warning("cannot load %s: %s", tp, exc)
            return
        self._loaded.add(partition)
        now = self._clock()
        for txn_id, meta in latest.items():
            if meta is None or self.partition_for(txn_id).partition != partition:
                continue
            if meta.start_ms >= 0:
                meta.started_monotonic = now - max(now * 1000 - meta.start_ms, 0) / 1000
            self._txns[txn_id] = meta
            if meta.state.preparing:
                log.info("%r was %s: writing its markers", txn_id, meta.state.kafka_name)
                self._complete_later(meta)
        log.info(
            "coordinating the transactional ids of %s partition %d: %d ids",
            TRANSACTION_TOPIC,
            partition,
            sum(1 for t in self._txns if self.partition_for(t).partition == partition),
        )

    def unload_partition(self, partition: int) -> None:
        self._loaded.discard(partition)
        for txn_id in [t for t in self._txns if self.partition_for(t).partition == partition]:
            del self._txns[txn_id]
            task = self._completing.pop(txn_id, None)
            if task is not None:
                task.cancel()

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._expire_forever(), name="streambus-transactions")

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *self._completing.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ticker = None
        self._completing.clear()
        await self.markers.close()  # the kept connections to other brokers

    # -- reads for metrics and the admin APIs ------------------------------------------------
    def transactions(self) -> Iterator[TransactionMetadata]:
        return iter(list(self._txns.values()))

    def describe(self, transactional_id: str) -> TransactionMetadata | None:
        self.check_coordinator(transactional_id)
        return self._txns.get(transactional_id)

    def active_count(self) -> int:
        return sum(1 for m in self._txns.values() if m.state.open)

    def oldest_open_seconds(self) -> float:
        now = self._clock()
        ages = [now - m.started_monotonic for m in self._txns.values() if m.state.open]
        return max(ages, default=0.0)

    def check_coordinator(self, transactional_id: str) -> None:
        if self._leads_all:
            return
        if TRANSACTION_TOPIC not in self._partitions.topics():
            raise CoordinatorNotAvailableError(f"{TRANSACTION_TOPIC} does not exist here yet")
        partition = self.partition_for(transactional_id).partition
        if partition not in self._loaded:
            raise NotCoordinatorError(
                f"{TRANSACTION_TOPIC} partition {partition} (transactional id "
                f"{transactional_id!r}) is not led here"
            )

    # -- InitProducerId ----------------------------------------------------------------------
    async def init_producer_id(
        self, transactional_id: str, timeout_ms: int, producer_id: int = -1, epoch: int = -1
    ) -> tuple[int, int]:
        """A producer id and epoch for ``transactional_id``; a new epoch fences every
        producer that had an older one, aborting the transaction it left open."""
        if not 0 < timeout_ms <= self.settings.max_timeout_ms:
            raise InvalidTransactionTimeoutError(
                f"transaction.timeout.ms {timeout_ms} is not in (0, "
                f"{self.settings.max_timeout_ms}] (transaction.max.timeout.ms)"
            )
        while True:
            async with self._lock(transactional_id):
                self.check_coordinator(transactional_id)
                meta = self._txns.get(transactional_id)
                if meta is None:
                    pid, new_epoch = await self._allocate()
                    now_ms = self._now_ms()
                    fresh = TransactionMetadata(
                        transactional_id, pid, new_epoch, timeout_ms, last_update_ms=now_ms
                    )
                    await self._write(fresh)
                    return pid, new_epoch
                if producer_id >= 0 and (
                    producer_id != meta.producer_id or epoch != meta.producer_epoch
                ):
                    # KIP-360: a producer recovering its own epoch, which another replaced.
                    raise ProducerFencedError(
                        f"producer {producer_id} epoch {epoch} of {transactional_id!r} is not "
                        f"the current one ({meta.producer_id}, {meta.producer_epoch})"
                    )
                waiting = self._completing.get(transactional_id)
                if meta.state is TxnState.ONGOING:
                    waiting = await self._start_abort(meta, "fenced")
                elif waiting is None and not meta.state.preparing:
                    return await self._bump(meta, timeout_ms)
            if waiting is None:
                raise ConcurrentTransactionsError(f"{transactional_id!r} is completing")
            # The old transaction's markers are being written: wait for them, then bump.
            try:
                async with asyncio.timeout(self.settings.end_wait_s):
                    await asyncio.shield(waiting)
            except TimeoutError:
                raise ConcurrentTransactionsError(
                    f"{transactional_id!r}: the previous transaction is still completing"
                ) from None

    async def _bump(self, meta: TransactionMetadata, timeout_ms: int) -> tuple[int, int]:
        new = meta.copy()
        if meta.producer_epoch >= MAX_EPOCH - 1:
            new.producer_id, new.producer_epoch = await self._allocate()
        else:
            new.producer_epoch += 1
        new.state = TxnState.EMPTY
        new.partitions = set()
        new.start_ms = -1
        new.timeout_ms = timeout_ms
        new.last_update_ms = self._now_ms()
        await self._write(new)
        return new.producer_id, new.producer_epoch

    # -- AddPartitionsToTxn, AddOffsetsToTxn --------------------------------------------------
    async def add_partitions(
        self, transactional_id: str, producer_id: int, epoch: int, tps: Iterable[TopicPartition]
    ) -> None:
        wanted = set(tps)
        async with self._lock(transactional_id):
            meta = self._current(transactional_id, producer_id, epoch)
            if meta.state.preparing or transactional_id in self._completing:
                raise ConcurrentTransactionsError(f"{transactional_id!r} is completing")
            if meta.state is TxnState.PREPARE_EPOCH_FENCE or meta.state is TxnState.DEAD:
                raise ProducerFencedError(f"{transactional_id!r} is being fenced")
            if meta.state is TxnState.ONGOING and wanted <= meta.partitions:
                return
            new = meta.copy()
            if meta.state is not TxnState.ONGOING:
                new.partitions = set()
                new.start_ms = self._now_ms()
                new.started_monotonic = self._clock()
                new.end_reason = "client"
            new.state = TxnState.ONGOING
            new.partitions |= wanted
            new.last_update_ms = self._now_ms()
            await self._write(new)

    async def add_offsets(
        self, transactional_id: str, producer_id: int, epoch: int, group_id: str
    ) -> None:
        # Check the producer first: the group's partition may need the offsets topic made.
        async with self._lock(transactional_id):
            self._current(transactional_id, producer_id, epoch)
        await self.add_partitions(
            transactional_id, producer_id, epoch, [self._group_partition(group_id)]
        )

    def check_offsets_commit(self, producer_id: int, epoch: int, group_id: str) -> None:
        """TxnOffsetCommit: refuse offsets of a transaction this coordinator holds that did not
        add the group (INVALID_TXN_STATE) or of a fenced epoch. A producer id coordinated
        elsewhere is not known here and is accepted, as Kafka before KIP-890 does."""
        meta = next((m for m in self._txns.values() if m.producer_id == producer_id), None)
        if meta is None:
            return
        if epoch < meta.producer_epoch:
            raise ProducerFencedError(
                f"producer {producer_id} epoch {epoch} is older than {meta.producer_epoch}"
            )
        if meta.state is not TxnState.ONGOING or self._group_partition(group_id) not in (
            meta.partitions
        ):
            raise InvalidTxnStateError(
                f"group {group_id!r} was not added to the transaction of "
                f"{meta.transactional_id!r} (AddOffsetsToTxn first)"
            )

    # -- EndTxn ------------------------------------------------------------------------------
    async def end_transaction(
        self, transactional_id: str, producer_id: int, epoch: int, commit: bool
    ) -> None:
        async with self._lock(transactional_id):
            meta = self._current(transactional_id, producer_id, epoch)
            state = meta.state
            wanted_end = TxnState.COMPLETE_COMMIT if commit else TxnState.COMPLETE_ABORT
            wanted_prepare = TxnState.PREPARE_COMMIT if commit else TxnState.PREPARE_ABORT
            if state is wanted_end and transactional_id not in self._completing:
                return  # a retry of an EndTxn that finished
            if state is wanted_prepare or (state is wanted_end):
                raise ConcurrentTransactionsError(f"{transactional_id!r} is completing")
            if state is not TxnState.ONGOING:
                raise InvalidTxnStateError(
                    f"{transactional_id!r} is {state.kafka_name}: cannot "
                    f"{'commit' if commit else 'abort'}"
                )
            new = meta.copy()
            new.state = wanted_prepare
            new.end_reason = "client"
            new.last_update_ms = self._now_ms()
            await self._write(new)
            task = self._complete_later(new)
        try:
            async with asyncio.timeout(self.settings.end_wait_s):
                await asyncio.shield(task)
        except TimeoutError:
            log.info("EndTxn %r answered before its markers were all written", transactional_id)

    async def abort(self, transactional_id: str, reason: str) -> None:
        """Abort ``transactional_id``'s open transaction with a bumped epoch (a timeout, or an
        operator's abort): its producer is fenced."""
        async with self._lock(transactional_id):
            meta = self._txns.get(transactional_id)
            if meta is None or meta.state is not TxnState.ONGOING:
                return
            task = await self._start_abort(meta, reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.end_wait_s):
                await asyncio.shield(task)

    async def _start_abort(self, meta: TransactionMetadata, reason: str) -> asyncio.Task[None]:
        new = meta.copy()
        if new.producer_epoch < MAX_EPOCH - 1:
            new.producer_epoch += 1  # markers with the new epoch fence the old producer's writes
        new.state = TxnState.PREPARE_ABORT
        new.end_reason = reason
        new.last_update_ms = self._now_ms()
        await self._write(new)
        return self._complete_later(new)

    def _complete_later(self, meta: TransactionMetadata) -> asyncio.Task[None]:
        txn_id = meta.transactional_id
        task = asyncio.create_task(self._complete(meta), name=f"streambus-txn-end-{txn_id}")
        self._completing[txn_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._completing.get(txn_id) is finished:
                del self._completing[txn_id]

        task.add_done_callback(done)
        return task

    async def _complete(self, meta: TransactionMetadata) -> None:
        """Markers to every partition, then Complete*; retried until it is written (or this
        broker no longer coordinates the id: the next coordinator finishes it)."""
        commit = meta.state is TxnState.PREPARE_COMMIT
        tp = self.partition_for(meta.transactional_id)
        span = self._telemetry.start_txn_span(
            meta.transactional_id,
            "commit" if commit else "abort",
            meta.end_reason,
            sorted(f"{p.topic}-{p.partition}" for p in meta.partitions),
        )
        try:
            coordinator_epoch = self._partitions.leader_epoch(tp)
            marker = Marker(meta.producer_id, meta.producer_epoch, commit, coordinator_epoch)
            while True:
                try:
                    await self.markers.write(marker, meta.partitions, span)
                    break
                except Exception:  # a bug must not leave the transaction prepared forever
                    log.exception(
                        "writing the markers of %r failed; retrying", meta.transactional_id
                    )
                    await asyncio.sleep(1.0)
            done = meta.copy()
            done.state = TxnState.COMPLETE_COMMIT if commit else TxnState.COMPLETE_ABORT
            done.last_update_ms = self._now_ms()
            while True:
                if self._txns.get(meta.transactional_id) is not meta:
                    return  # unloaded, or changed by a reload: not ours to finish
                try:
                    await self._write(done)
                    break
                except NotCoordinatorError:
                    return
                except StreamBusError as exc:
                    log.info("completing %r: %s; retrying", meta.transactional_id, exc)
                    await asyncio.sleep(0.5)
            seconds = self._clock() - meta.started_monotonic if meta.start_ms >= 0 else None
            self._telemetry.transaction_ended(commit, meta.end_reason, seconds)
        finally:
            span.end()

    # -- timeouts -----------------------------------------------------------------------------
    async def _expire_forever(self) -> None:
        interval = self.settings.cleanup_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire()
            except Exception:
                log.exception("aborting timed-out transactions failed; retrying")

    async def expire(self) -> int:
        """Abort every transaction open longer than its timeout; returns how many."""
        now_ms = self._now_ms()
        expired = [
            m.transactional_id
            for m in self._txns.values()
            if m.state is TxnState.ONGOING
            and m.start_ms >= 0
            and now_ms > m.start_ms + m.timeout_ms
        ]
        for txn_id in expired:
            log.info("transaction of %r exceeded its timeout: aborting it", txn_id)
            try:
                await self.abort(txn_id, "timeout")
            except StreamBusError as exc:
                log.info("aborting %r failed: %s; next round retries", txn_id, exc)
        return len(expired)

    # -- helpers ------------------------------------------------------------------------------
    def _lock(self, transactional_id: str) -> asyncio.Lock:
        lock = self._locks.get(transactional_id)
        if lock is None:
            lock = self._locks[transactional_id] = asyncio.Lock()
        return lock

    def _current(self, transactional_id: str, producer_id: int, epoch: int) -> TransactionMetadata:
        self.check_coordinator(transactional_id)
        meta = self._txns.get(transactional_id)
        if meta is None or meta.producer_id != producer_id:
            raise InvalidProducerIdMappingError(
                f"producer {producer_id} is not the producer of {transactional_id!r}"
            )
        if epoch != meta.producer_epoch:
            raise ProducerFencedError(
                f"producer {producer_id} epoch {epoch} of {transactional_id!r} is fenced by "
                f"epoch {meta.producer_epoch}"
            )
        return meta

    async def _write(self, new: TransactionMetadata) -> None:
        """Store ``new`` in ``__transaction_state`` (acks=all), then make it current."""
        old = self._txns.get(new.transactional_id)
        if old is not None and not valid_transition(old.state, new.state):
            raise InvalidTxnStateError(
                f"{new.transactional_id!r}: {old.state.kafka_name} -> {new.state.kafka_name}"
            )
        tp = self.partition_for(new.transactional_id)
        now_ms = self._now_ms()
        batch = build_batch([(encode_key(new.transactional_id), encode_value(new), (), now_ms)])
        try:
            result = self._partitions.append_now(tp, batch, origin=AppendOrigin.COORDINATOR)
            await self._partitions.wait_replicated(
                tp, result.last_offset + 1, self.settings.write_timeout_s
            )
        except (NotLeaderOrFollowerError, KafkaStorageError) as exc:
            raise NotCoordinatorError(str(exc)) from exc
        except (
            NotEnoughReplicasError,
            NotEnoughReplicasAfterAppendError,
            RequestTimedOutError,
        ) as exc:
            raise CoordinatorNotAvailableError(str(exc)) from exc
        if self._txns.get(new.transactional_id) is not old:
            raise ConcurrentTransactionsError(f"{new.transactional_id!r} changed meanwhile")
        self._txns[new.transactional_id] = new

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def _apply(
    latest: dict[str, TransactionMetadata | None], key: bytes | None, value: bytes | None
) -> None:
    if key is None:
        return
    try:
        txn_id = decode_key(key)
        latest[txn_id] = None if value is None else decode_value(txn_id, value)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        log.warning("skipping unreadable record in %s: %s", TRANSACTION_TOPIC, exc)
