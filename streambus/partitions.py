"""The partition service: the one path by which anything appends to, reads from or waits
on a partition (Kafka's ``ReplicaManager``, between ``KafkaApis`` and ``UnifiedLog``).

An append is validated, stored, counted, remembered (payload size, so Fetch need not
walk the records again) and announced to waiting fetches here, whoever makes it: a
producer, the group coordinator writing ``__consumer_offsets``, and later a replica
fetcher. Protocol handlers and the group coordinator see partitions only through this
service; ``storage/`` stays below it, knowing nothing of metrics or the wire.

Leadership is asked here too, once per partition per request: every append and read
first asks ``Leadership.check`` whether this broker may serve the partition. A single
broker leads everything (``LeadsEverything``); a cluster answers from its metadata,
and NotLeaderOrFollowerError is the answer clients follow to the right broker.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from streambus.errors import (
    FencedLeaderEpochError,
    InvalidRecordError,
    InvalidRequestError,
    InvalidTopicError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderOrFollowerError,
    OffsetOutOfRangeError,
    RequestTimedOutError,
    StreamBusError,
    UnknownLeaderEpochError,
)
from streambus.instrumentation import BrokerTelemetry
from streambus.payload_sizes import PayloadSizes
from streambus.records.batch import (
    HEADER,
    Buffer,
    compression_of,
    parse_batches,
    recompressed,
    validate_records,
)
from streambus.replication.replica import Replica, Role
from streambus.schemas.validation import SchemaValidation
from streambus.storage import LogManager, PartitionLog, TopicMeta
from streambus.storage.catalog import OfflineTopic
from streambus.storage.log import LogSlice
from streambus.storage.producer_state import ProducerInfo
from streambus.storage.segment import Segment
from streambus.structs import AppendResult, ReplicatedAppend, TopicPartition
from streambus.topic_config import TopicConfig

if TYPE_CHECKING:
    import uuid
    from pathlib import Path

    from streambus.cluster.state import ClusterState

__all__ = [
    "INTERNAL_TOPICS",
    "OFFSETS_TOPIC",
    "AppendOrigin",
    "AppendResult",
    "Leadership",
    "LeadsEverything",
    "LogSlice",
    "OfflineTopic",
    "PartitionOffsets",
    "PartitionService",
    "QuorumLeadership",
    "TopicMeta",
]

OFFSETS_TOPIC = "__consumer_offsets"
# Topics only the broker writes, creates and deletes (Kafka's Topic.INTERNAL_TOPICS).
# Their names are reserved even before the broker creates them, so no client can
# create one first with settings of its own.
INTERNAL_TOPICS = frozenset({OFFSETS_TOPIC, "__transaction_state"})

# ListOffsets' special timestamps.
LATEST = -1
EARLIEST = -2
MAX_TIMESTAMP = -3  # the record with the largest timestamp (KIP-734, v7+)
EARLIEST_LOCAL = -4  # the first offset on local disk (KIP-405, v8+): the log start here
LATEST_TIERED = -5  # the last offset in tiered storage (KIP-1005, v9+): none here
# The first offset not yet uploaded to tiered storage (KIP-1023, v11+): none here, as
# Kafka answers for a topic without remote storage (UnifiedLog's
# fetchEarliestPendingUploadOffset), since nothing is ever pending upload.
EARLIEST_PENDING_UPLOAD = -6

# A compressed batch at least this large is decompressed and checked in a worker
# thread before it is appended; smaller ones cost less than the hand-over.
OFF_LOOP_COMPRESSED_BYTES = 32 * 1024
# One thread checks segments before they are first served (see verify_for_read).
_VERIFIER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streambus-verify")


class AppendOrigin(enum.Enum):
    """Who appends (Kafka's ``AppendOrigin``): it decides what is allowed and counted."""

    CLIENT = "client"  # a producer: internal topics refused; counted as produced/stored
    COORDINATOR = "coordinator"  # the broker's own writes (committed offsets)


class Leadership(Protocol):
    """Whether this broker may serve a partition now; a cluster answers from its metadata."""

    def check(self, tp: TopicPartition) -> None:
        """Raise NotLeaderOrFollowerError when another broker leads ``tp``."""


class LeadsEverything:
    """One broker: it leads every partition it has."""

    def check(self, tp: TopicPartition) -> None:
        return None


class QuorumLeadership:
    """A cluster member: it serves a partition the replicated state says it leads.

    A partition the state does not know (a topic only on this disk) is left to the
    local log to answer (UNKNOWN_TOPIC_OR_PARTITION, or served while the state catches up).
    """

    def __init__(self, state: Callable[[], ClusterState], broker_id: int) -> None:
        self._state = state
        self._broker_id = broker_id

    def check(self, tp: TopicPartition) -> None:
        p = self._state().partition(tp.topic, tp.partition)
        if p is None or p.leader == self._broker_id:
            return
        leader = "none" if p.leader < 0 else f"broker {p.leader}"
        raise NotLeaderOrFollowerError(
            f"broker {self._broker_id} does not lead {tp.topic}-{tp.partition} (leader: {leader})"
        )


class PartitionOffsets(NamedTuple):
    log_start_offset: int
    high_watermark: int  # the log end offset while there is one replica


class PartitionService:
    def __init__(
        self,
        logs: LogManager,
        telemetry: BrokerTelemetry,
        *,
        stopping: Callable[[], bool],
        leadership: Leadership | None = None,
    ) -> None:
        self._logs = logs
        self._telemetry = telemetry
        self._stopping = stopping
        self.leadership: Leadership = leadership or LeadsEverything()
        self._payload_sizes = PayloadSizes()
        # Produced records of topics with schema validation on are checked here; the
        # broker sets ``schema_validation.source`` to its registry when it runs one.
        self.schema_validation = SchemaValidation(telemetry)
        self._waiters: dict[TopicPartition, set[asyncio.Future[None]]] = {}
        self._long_polls: set[asyncio.Future[None]] = set()
        # Segment checks in flight: a second fetch of the same segment waits for the first
        # one's check instead of running the same scan again.
        self._scans: dict[Segment, asyncio.Future[None]] = {}
        # Replication state of the partitions the replica manager gave a role; one it has
        # not (a single broker's, before the metadata names it) is its own only replica.
        self._replicas: dict[TopicPartition, Replica] = {}
        # Told when a follower outside the ISR has caught up (the manager asks the
        # controller to add it).
        self.on_may_join: Callable[[Replica, int], None] | None = None
        self._clock = time.monotonic

    def _partition(self, tp: TopicPartition) -> PartitionLog:
        """The local log of ``tp`` if this broker serves it. The leader check comes first:
        a broker that does not host a partition the cluster knows answers
        NOT_LEADER_OR_FOLLOWER, not UNKNOWN_TOPIC_OR_PARTITION, so clients refresh
        Metadata and go to the leader."""
        replica = self._replicas.get(tp)
        if replica is None:
            self.leadership.check(tp)
        elif not replica.is_leader:
            raise NotLeaderOrFollowerError(
                f"broker {replica.broker_id} follows {tp.topic}-{tp.partition} "
                f"(leader: broker {replica.leader_id})"
            )
        return self._logs.log(tp)

    # -- roles (set by the replica manager from the cluster metadata) ---------------------
    def replica(self, tp: TopicPartition) -> Replica | None:
        return self._replicas.get(tp)

    def replicated(self, tp: TopicPartition) -> bool:
        """More than one replica: acks=all then waits for the others."""
        replica = self._replicas.get(tp)
        return replica is not None and replica.replicated

    def replicas(self) -> Mapping[TopicPartition, Replica]:
        return self._replicas

    def become_leader(
        self,
        tp: TopicPartition,
        *,
        broker_id: int,
        leader_epoch: int,
        partition_epoch: int,
        replicas: tuple[int, ...],
        isr: tuple[int, ...],
    ) -> Replica:
        """Lead ``tp`` at ``leader_epoch`` (again: an ISR change under the same epoch only
        updates the members). The new epoch starts at the log end, as Kafka's makeLeader."""
        current = self._replicas.get(tp)
        plog = self._logs.log(tp)
        if current is not None and current.is_leader and current.leader_epoch == leader_epoch:
            current.set_members(replicas, isr, partition_epoch)
            self._advance(tp, current, plog)
            return current
        if current is not None:
            current.fail_waiters(NotLeaderOrFollowerError(f"{tp} changed leader"))
        end = plog.log_end_offset
        if len(replicas) > 1:  # a sole replica's epochs are recorded by its appends
            plog.assign_epoch_start(leader_epoch, end)
        replica = Replica(
            tp,
            broker_id,
            Role.LEADER,
            broker_id,
            leader_epoch,
            partition_epoch,
            replicas,
            isr,
            high_watermark=min(plog.high_watermark, end),
            epoch_start_offset=end,
        )
        replica.start_leading(self._clock())
        self._replicas[tp] = replica
        self._advance(tp, replica, plog)
        return replica

    def become_follower(
        self,
        tp: TopicPartition,
        *,
        broker_id: int,
        leader_id: int,
        leader_epoch: int,
        partition_epoch: int,
        replicas: tuple[int, ...],
        isr: tuple[int, ...],
    ) -> Replica:
        """Follow ``leader_id`` (-1: no leader yet). Produce requests waiting on this
        broker's leadership are answered NOT_LEADER_OR_FOLLOWER."""
        current = self._replicas.get(tp)
        plog = self._logs.log(tp)
        if current is not None and current.is_leader:
            current.fail_waiters(NotLeaderOrFollowerError(f"{tp} changed leader"))
        replica = Replica(
            tp,
            broker_id,
            Role.FOLLOWER,
            leader_id,
            leader_epoch,
            partition_epoch,
            replicas,
            isr,
            high_watermark=min(plog.high_watermark, plog.log_end_offset),
        )
        self._replicas[tp] = replica
        self._wake(tp)  # long polls on it answer now: the consumer goes to the new leader
        return replica

    def drop_replica(self, tp: TopicPartition) -> None:
        replica = self._replicas.pop(tp, None)
        if replica is not None:
            replica.fail_waiters(NotLeaderOrFollowerError(f"{tp} is no longer hosted here"))
            self._wake(tp)

    # -- appends --------------------------------------------------------------------------
    async def append(
        self,
        tp: TopicPartition,
        records: Buffer | None,
        *,
        origin: AppendOrigin = AppendOrigin.CLIENT,
        acks: int = 1,
    ) -> AppendResult:
        """Append one record batch and return once the leader may acknowledge it: written
        to the OS, and fsynced too when it reached flush.messages/flush.ms (the fsync runs
        in a worker thread). A large compressed batch is checked in a worker thread first.
        With ``acks=-1`` an ISR smaller than min.insync.replicas refuses it first; the
        caller then waits for the ISR with ``wait_replicated``."""
        self._check_origin(tp.topic, origin)
        if records is None:
            raise InvalidRequestError("produce request without records")
        payload = None
        config = self._partition(tp).config
        codec = _recompress_to(records, config) if origin is AppendOrigin.CLIENT else None
        if codec is not None:  # the topic's compression.type: a worker thread's CPU work
            level, limit = config.compression_level(codec), config.max_message_bytes
            records = await asyncio.to_thread(recompressed, records, codec, level, limit)
        if origin is AppendOrigin.CLIENT and SchemaValidation.wanted(config):
            off_loop = _decompress_off_loop(records, config)
            payload = await self.schema_validation.check(
                tp.topic, records, config, off_loop=off_loop
            )
            if self._logs.log(tp).config is not config:  # changed while we waited: check again
                payload = None
        elif _decompress_off_loop(records, config):
            payload = await asyncio.to_thread(_validate, records, config)
            if self._logs.log(tp).config is not config:  # changed while we waited: check again
                payload = None
        plog = self._partition(tp)
        replica = self._replicas.get(tp)
        if acks == -1 and replica is not None:
            _check_min_isr(replica, plog.config, NotEnoughReplicasError)
        epoch = replica.leader_epoch if replica is not None else 0
        result = plog.append(records, payload=payload, leader_epoch=epoch)
        if result.needs_sync:
            await plog.wait_synced(result.last_offset + 1)
        self._appended(tp, result, origin)
        return result

    async def wait_replicated(self, tp: TopicPartition, end: int, timeout_s: float) -> None:
        """Return once every ISR member has the log below ``end`` (acks=all): the high
        watermark reached it. REQUEST_TIMED_OUT after ``timeout_s``; NOT_LEADER_OR_FOLLOWER
        if leadership moves meanwhile; NOT_ENOUGH_REPLICAS_AFTER_APPEND if the ISR that
        has it is smaller than min.insync.replicas."""
        replica = self._replicas.get(tp)
        if replica is None:
            return
        if replica.high_watermark < end:
            future = replica.wait_for(end)
            try:
                async with asyncio.timeout(max(timeout_s, 0.0)):
                    await future
            except TimeoutError:
                replica.forget_waiter(future)
                raise RequestTimedOutError(
                    f"{tp.topic}-{tp.partition}: offsets below {end} not replicated to the ISR "
                    f"{list(replica.isr)} within {timeout_s * 1000:.0f} ms"
                ) from None
        if self._replicas.get(tp) is not replica or not replica.is_leader:
            raise NotLeaderOrFollowerError(f"{tp.topic}-{tp.partition} changed leader")
        _check_min_isr(replica, self._logs.log(tp).config, NotEnoughReplicasAfterAppendError)

    def append_now(
        self,
        tp: TopicPartition,
        records: Buffer,
        *,
        origin: AppendOrigin = AppendOrigin.COORDINATOR,
    ) -> AppendResult:
        """Append a small batch the broker built itself, on the loop, without waiting for
        an fsync (committed offsets: written to the OS before the commit is answered)."""
        self._check_origin(tp.topic, origin)
        plog = self._partition(tp)
        replica = self._replicas.get(tp)
        epoch = replica.leader_epoch if replica is not None else 0
        result = plog.append(records, leader_epoch=epoch)
        self._appended(tp, result, origin)
        return result

    def append_transactional(self, tp: TopicPartition, records: Buffer) -> AppendResult:
        """The group coordinator's transactional offsets (``append_now``, the batch carrying
        its producer id and epoch but no sequence numbers)."""
        plog = self._partition(tp)
        replica = self._replicas.get(tp)
        epoch = replica.leader_epoch if replica is not None else 0
        result = plog.append(records, leader_epoch=epoch, coordinator=True)
        self._appended(tp, result, AppendOrigin.COORDINATOR)
        return result

    def _check_origin(self, topic: str, origin: AppendOrigin) -> None:
        if origin is AppendOrigin.CLIENT and self.is_internal(topic):
            # What Kafka's ReplicaManager answers: only the broker appends there.
            raise InvalidTopicError(f"cannot append to internal topic {topic}")

    def _appended(self, tp: TopicPartition, result: AppendResult, origin: AppendOrigin) -> None:
        client = origin is AppendOrigin.CLIENT
        if client:
            self._telemetry.produced(
                tp.topic, tp.partition, result.record_count, result.payload_bytes
            )
        if result.duplicate:
            return
        if client:
            self._telemetry.stored(
                tp.topic, tp.partition, result.record_count, result.payload_bytes
            )
        self._payload_sizes.remember(tp, result.base_offset, result.crc, result.payload_bytes)
        replica = self._replicas.get(tp)
        if replica is not None:
            replica.appended(result.last_offset + 1, self._clock())
            self._advance(tp, replica, self._logs.log(tp))
        self._wake(tp)  # follower fetches wait for appends; consumers see them at the HW

    def _advance(self, tp: TopicPartition, replica: Replica, plog: PartitionLog) -> None:
        """Move the leader's high watermark to the smallest end over the ISR, and act on it:
        acks=all waits done, replication latency observed, consumer long polls woken."""
        if not replica.is_leader:
            return
        hw = replica.high_watermark_at(plog.log_end_offset)
        if hw <= replica.high_watermark:
            return
        replica.high_watermark = hw
        plog.set_high_watermark(hw)
        replica.release()
        for seconds in replica.covered(self._clock()):
            self._telemetry.replication_latency(tp.topic, seconds)
        self._wake(tp)

    # -- reads ----------------------------------------------------------------------------
    def offsets(self, tp: TopicPartition) -> PartitionOffsets:
        plog = self._partition(tp)
        return PartitionOffsets(plog.log_start_offset, self._high_watermark(tp, plog))

    def _high_watermark(self, tp: TopicPartition, plog: PartitionLog) -> int:
        replica = self._replicas.get(tp)
        if replica is None:
            return plog.log_end_offset
        return min(replica.high_watermark, plog.log_end_offset)

    def read_slice(
        self,
        tp: TopicPartition,
        offset: int,
        max_bytes: int,
        *,
        eager_bytes: int,
        committed: bool = False,
    ) -> LogSlice:
        """Whole batches from ``offset`` below the high watermark (what consumers may see;
        ``committed``: below the last stable offset, read_committed's limit): the first
        ``eager_bytes`` read now, the rest planned as spans of the log, read in bounded
        pieces as they are written."""
        plog = self._partition(tp)
        upto = self._high_watermark(tp, plog)
        if committed:
            upto = plog.last_stable_offset(upto)
        return plog.read_slice(offset, max_bytes, eager_bytes=eager_bytes, max_offset=upto)

    # -- transactions ---------------------------------------------------------------------
    def last_stable_offset(self, tp: TopicPartition) -> int:
        """Below it every transaction has ended: read_committed consumers read up to it."""
        plog = self._partition(tp)
        return plog.last_stable_offset(self._high_watermark(tp, plog))

    def aborted_transactions(
        self, tp: TopicPartition, start: int, upto: int
    ) -> list[tuple[int, int]]:
        """(producer id, first offset) of aborted transactions overlapping [start, upto)."""
        return self._partition(tp).aborted_transactions(start, upto)

    def producers(self, tp: TopicPartition) -> list[ProducerInfo]:
        """Every producer with state in ``tp`` (DescribeProducers)."""
        return self._partition(tp).producers()

    def ongoing_transactions(self, tp: TopicPartition) -> list[tuple[int, int, int, int]]:
        return self._partition(tp).ongoing_transactions()

    def append_marker(
        self,
        tp: TopicPartition,
        producer_id: int,
        producer_epoch: int,
        commit: bool,
        coordinator_epoch: int,
    ) -> AppendResult:
        """Write a transaction marker (a control batch) on the loop; the caller waits for
        the ISR with ``wait_replicated(tp, result.last_offset + 1, ...)``."""
        plog = self._partition(tp)
        replica = self._replicas.get(tp)
        epoch = replica.leader_epoch if replica is not None else 0
        result = plog.append_marker(
            producer_id, producer_epoch, commit, coordinator_epoch, leader_epoch=epoch
        )
        self._appended(tp, result, AppendOrigin.COORDINATOR)
        return result

    def read(self, tp: TopicPartition, offset: int, max_bytes: int) -> bytes | memoryview:
        return self._partition(tp).read(offset, max_bytes)

    # A broker reading its own copy of an internal topic, whatever its role (the schema
    # registry follows _schemas on every replica): committed offsets only are applied.
    def copy_offsets(self, tp: TopicPartition) -> PartitionOffsets:
        plog = self._logs.log(tp)
        return PartitionOffsets(plog.log_start_offset, self._high_watermark(tp, plog))

    def read_copy(self, tp: TopicPartition, offset: int, max_bytes: int) -> bytes | memoryview:
        return self._logs.log(tp).read(offset, max_bytes)

    # -- the leader's side of follower fetches --------------------------------------------
    def follower_fetch(
        self,
        tp: TopicPartition,
        follower: int,
        offset: int,
        current_leader_epoch: int,
        max_bytes: int,
        *,
        eager_bytes: int,
    ) -> tuple[PartitionOffsets, LogSlice]:
        """A follower's Fetch from ``offset``: its progress noted (the high watermark may
        move, the follower may rejoin the ISR), then whole batches up to the log end."""
        plog = self._partition(tp)
        replica = self._replicas.get(tp)
        if replica is not None:
            _check_epoch(tp, replica, current_leader_epoch)
            if follower not in replica.replicas:
                raise NotLeaderOrFollowerError(
                    f"broker {follower} is not a replica of {tp.topic}-{tp.partition}"
                )
            end = plog.log_end_offset
            replica.follower_fetched(follower, min(offset, end), end, self._clock())
            self._advance(tp, replica, plog)
            if replica.may_join(follower) and self.on_may_join is not None:
                self.on_may_join(replica, follower)
        offsets = PartitionOffsets(plog.log_start_offset, self._high_watermark(tp, plog))
        return offsets, plog.read_slice(offset, max_bytes, eager_bytes=eager_bytes)

    def leader_epoch_end(
        self, tp: TopicPartition, current_leader_epoch: int, epoch: int
    ) -> tuple[int, int]:
        """OffsetForLeaderEpoch: (the largest epoch <= ``epoch``, where it ends) here."""
        plog = self._partition(tp)
        replica = self._replicas.get(tp)
        if replica is not None:
            _check_epoch(tp, replica, current_leader_epoch)
        return plog.end_offset_for_epoch(epoch)

    def check_epoch(self, tp: TopicPartition, current_leader_epoch: int) -> None:
        """A client's Fetch/ListOffsets naming a leader epoch (KIP-320): FENCED or UNKNOWN
        when it is not this leader's."""
        replica = self._replicas.get(tp)
        if replica is not None:
            _check_epoch(tp, replica, current_leader_epoch)

    def leader_epoch(self, tp: TopicPartition) -> int:
        replica = self._replicas.get(tp)
        return replica.leader_epoch if replica is not None else 0

    # -- the follower's side: its copy of the leader's log --------------------------------
    def _followed(self, tp: TopicPartition) -> tuple[Replica, PartitionLog]:
        replica = self._replicas.get(tp)
        if replica is None or replica.is_leader:
            raise NotLeaderOrFollowerError(f"this broker does not follow {tp}")
        return replica, self._logs.log(tp)

    def replica_log_end(self, tp: TopicPartition) -> tuple[int, int, int]:
        """(log start, log end, latest epoch) of this broker's copy."""
        plog = self._logs.log(tp)
        return plog.log_start_offset, plog.log_end_offset, plog.latest_epoch

    def replica_epoch_end(self, tp: TopicPartition, epoch: int) -> tuple[int, int]:
        return self._logs.log(tp).end_offset_for_epoch(epoch)

    def truncate_replica(self, tp: TopicPartition, offset: int) -> None:
        replica, plog = self._followed(tp)
        plog.truncate_to(offset)
        replica.high_watermark = min(replica.high_watermark, plog.log_end_offset)

    def restart_replica_at(self, tp: TopicPartition, offset: int) -> None:
        """The leader's log starts past this copy's end: begin again, empty, at ``offset``."""
        replica, plog = self._followed(tp)
        plog.truncate_fully_and_start_at(offset)
        replica.high_watermark = offset

    async def append_replicated(
        self,
        tp: TopicPartition,
        records: Buffer,
        leader_high_watermark: int,
        leader_log_start: int = -1,
    ) -> ReplicatedAppend | None:
        """Store batches fetched from the leader as it stored them; this copy's high
        watermark and log start offset follow the leader's."""
        replica, plog = self._followed(tp)
        appended = None
        if len(records):
            appended = plog.append_replicated(records)
            if appended.needs_sync:
                await plog.wait_synced(appended.last_offset + 1)
            if appended.records:
                self._telemetry.replicated(tp.topic, appended.records, appended.bytes)
        hw = min(leader_high_watermark, plog.log_end_offset)
        if hw > replica.high_watermark:
            replica.high_watermark = hw
            plog.set_high_watermark(hw)
            self._wake(tp)  # what reads this copy up to its high watermark (_schemas' tail)
        if leader_log_start > plog.log_start_offset:  # DeleteRecords on the leader
            doomed = plog.advance_log_start(min(leader_log_start, plog.high_watermark))
            await asyncio.to_thread(_settle_log_start, plog, doomed)
        return appended

    async def verify_for_read(
        self, wanted: Sequence[tuple[TopicPartition, int, int]], *, slice_size: int
    ) -> None:
        """Verify, in a worker thread, the closed segments reads of ``(partition, offset,
        max_bytes)`` may touch for the first time, yielding every ``slice_size`` partitions."""
        jobs: list[tuple[PartitionLog, Segment]] = []
        waits: set[asyncio.Future[None]] = set()
        for i, (tp, offset, max_bytes) in enumerate(wanted, 1):
            if i % slice_size == 0:
                await asyncio.sleep(0)
            try:
                plog = self._partition(tp)
            except StreamBusError:  # unknown, offline or led elsewhere: the read says so
                continue
            for segment in plog.unverified(offset, max_bytes):
                running = self._scans.get(segment)
                if running is not None:
                    waits.add(running)
                elif all(segment is not seg for _, seg in jobs):
                    jobs.append((plog, segment))
        if jobs:
            waits.add(self._start_scans(jobs))
        if waits:
            # Shielded: a fetch whose client goes must not cancel a check others wait on.
            await asyncio.gather(*(asyncio.shield(w) for w in waits))

    def _start_scans(self, jobs: list[tuple[PartitionLog, Segment]]) -> asyncio.Future[None]:
        """Check ``jobs`` on the one verifier thread (many fetches at once queue there rather
        than crowd the event loop out of the interpreter); results are adopted on the loop."""
        scans = [plog.scan_job(segment) for plog, segment in jobs]
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(_VERIFIER, lambda: [scan() for scan in scans])
        done: asyncio.Future[None] = loop.create_future()

        def adopt(fut: asyncio.Future[list[Any]]) -> None:
            for _, segment in jobs:
                self._scans.pop(segment, None)
            if fut.cancelled():
                done.cancel()
                return
            error = fut.exception()
            if error is not None:
                done.set_exception(error)
                return
            for (plog, _), result in zip(jobs, fut.result(), strict=True):
                plog.apply_scan(result)
            done.set_result(None)

        running.add_done_callback(adopt)
        # Retrieved here too, so a failure nobody waits for any more is not reported as lost.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        for _, segment in jobs:
            self._scans[segment] = done
        return done

    def list_offset(
        self, tp: TopicPartition, timestamp: int, *, committed: bool = False
    ) -> tuple[int, int]:
        """ListOffsets: (timestamp, offset) for LATEST (-1: the high watermark, or the last
        stable offset for a read_committed client), EARLIEST (-2) or the first record at or
        after ``timestamp``; (-1, -1) when no record is that new."""
        plog = self._partition(tp)
        hw = self._high_watermark(tp, plog)
        fetchable = plog.last_stable_offset(hw) if committed else hw
        if timestamp == LATEST:
            return -1, fetchable
        if timestamp in (EARLIEST, EARLIEST_LOCAL):  # no tiered storage: all of it is local
            return -1, plog.log_start_offset
        if timestamp in (LATEST_TIERED, EARLIEST_PENDING_UPLOAD):
            return -1, -1  # what Kafka answers for a topic without remote storage
        if timestamp == MAX_TIMESTAMP:
            found = plog.max_timestamp_offset()
        elif timestamp < 0:
            raise InvalidRequestError(f"unsupported ListOffsets timestamp {timestamp}")
        else:
            found = plog.offset_for_timestamp(timestamp)
        # Kafka's answer when no record is that new, or none a client may read yet is
        if found is None or found[0] >= fetchable:
            return -1, -1
        offset, ts = found
        return ts, offset

    async def delete_records(self, tp: TopicPartition, offset: int) -> int:
        """DeleteRecords: move the log start offset to ``offset`` (-1: the high watermark),
        deleting whole segments below it; answers the new log start offset (the low
        watermark). OFFSET_OUT_OF_RANGE past the high watermark. The checkpoint is
        fsynced and the files unlinked in a worker thread before the answer."""
        plog = self._partition(tp)
        hw = self._high_watermark(tp, plog)
        target = hw if offset == -1 else offset
        if not 0 <= target <= hw:
            raise OffsetOutOfRangeError(
                f"{tp.topic}-{tp.partition}: cannot delete records below offset {offset}: "
                f"the high watermark is {hw}"
            )
        doomed = plog.advance_log_start(target)
        await asyncio.to_thread(_settle_log_start, plog, doomed)
        self._wake(tp)  # followers waiting in a fetch learn the new log start now
        return plog.log_start_offset

    def log_sizes(self) -> list[tuple[TopicPartition, int, int]]:
        """(partition, bytes on disk, offset lag) of every partition stored here
        (DescribeLogDirs): the lag is how far this copy's end is behind the high watermark."""
        found = []
        for tp, plog in self._logs.logs():
            replica = self._replicas.get(tp)
            hw = plog.log_end_offset if replica is None else replica.high_watermark
            found.append((tp, plog.size_bytes, max(hw - plog.log_end_offset, 0)))
        return found

    @property
    def data_dir(self) -> Path:
        return self._logs.data_dir

    def payload_size(self, tp: TopicPartition, base_offset: int, crc: int) -> int | None:
        """Payload bytes of a batch appended recently, as measured when it was validated."""
        return self._payload_sizes.get(tp, base_offset, crc)

    # -- waiting for appends (long-poll fetch) --------------------------------------------
    def _wake(self, tp: TopicPartition) -> None:
        waiters = self._waiters.pop(tp, None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_for_append(
        self,
        tps: Iterable[TopicPartition],
        timeout_s: float,
        cancel: asyncio.Future[None] | None = None,
    ) -> None:
        """Wait until one of ``tps`` gets an append, ``timeout_s`` passes, ``cancel``
        completes (the client left) or the broker stops; the caller looks at which."""
        if (cancel is not None and cancel.done()) or self._stopping():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = list(tps)
        for tp in keys:
            self._waiters.setdefault(tp, set()).add(waiter)
        # Every wait is also in one service-wide set, so stopping ends waits that name no
        # partition (a Fetch of no topics) as surely as the others.
        self._long_polls.add(waiter)

        def wake(_: object) -> None:
            if not waiter.done():
                waiter.set_result(None)

        if cancel is not None:
            cancel.add_done_callback(wake)
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._long_polls.discard(waiter)
            if cancel is not None:
                cancel.remove_done_callback(wake)
            for tp in keys:
                waiting = self._waiters.get(tp)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._waiters[tp]

    def wake_all(self) -> None:
        """End every wait now (shutdown): each fetch answers with what it has."""
        for waiter in list(self._long_polls):
            if not waiter.done():
                waiter.set_result(None)

    # -- topics ---------------------------------------------------------------------------
    def topics(self) -> Mapping[str, TopicMeta]:
        return self._logs.topics()

    def offline_topics(self) -> Mapping[str, OfflineTopic]:
        return self._logs.offline_topics()

    def is_internal(self, topic: str) -> bool:
        if topic in INTERNAL_TOPICS:
            return True
        meta = self._logs.topics().get(topic)
        return meta is not None and meta.internal

    @property
    def topic_defaults(self) -> TopicConfig:
        return self._logs.defaults

    def create_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        internal: bool = False,
        validate_only: bool = False,
        topic_id: uuid.UUID | None = None,
    ) -> TopicMeta:
        if validate_only:
            return self._logs.validate_topic(
                name, partitions, overrides, internal=internal, topic_id=topic_id
            )
        return self._logs.create_topic(
            name, partitions, overrides, internal=internal, topic_id=topic_id
        )

    def restore_topic(self, name: str, partitions: int, overrides: Mapping[str, str]) -> bool:
        """Rewrite the lost metadata of an internal topic whose data is still there."""
        return self._logs.restore_metadata(name, partitions, overrides, internal=True)

    def delete_topic(self, name: str) -> TopicMeta:
        meta = self._logs.delete_topic(name)
        self._telemetry.forget_topic(name)
        return meta


def _settle_log_start(plog: PartitionLog, doomed: list[Segment]) -> None:
    """In a worker thread: the log start offset's checkpoint, then the files of the
    segments below it (a crash in between leaves them to the next maintenance run)."""
    plog.persist_log_start()
    for segment in doomed:
        segment.delete()


def _check_epoch(tp: TopicPartition, replica: Replica, current: int) -> None:
    if current < 0:  # the client did not say (older versions, -1)
        return
    if current < replica.leader_epoch:
        raise FencedLeaderEpochError(
            f"{tp.topic}-{tp.partition}: leader epoch {current} is older than "
            f"{replica.leader_epoch}"
        )
    if current > replica.leader_epoch:
        raise UnknownLeaderEpochError(
            f"{tp.topic}-{tp.partition}: leader epoch {current} is newer than "
            f"{replica.leader_epoch}"
        )


def _check_min_isr(replica: Replica, config: TopicConfig, error: type[StreamBusError]) -> None:
    if len(replica.isr) < config.min_insync_replicas:
        raise error(
            f"{replica.tp.topic}-{replica.tp.partition}: ISR {list(replica.isr)} is smaller "
            f"than min.insync.replicas {config.min_insync_replicas}"
        )


def _recompress_to(records: Buffer, config: TopicConfig) -> int | None:
    """The codec the batch must be rewritten in, None to store it as sent (the topic's
    compression.type is ``producer`` or the batch's own; a runt is refused by the append)."""
    codec = config.compression_codec
    if codec is None or len(records) < HEADER.size or compression_of(records) == codec:
        return None
    return codec


def _decompress_off_loop(records: Buffer, config: TopicConfig) -> bool:
    """A compressed batch worth a worker thread; one over the size limit is refused
    by the append at once, without decompressing anything."""
    return (
        OFF_LOOP_COMPRESSED_BYTES <= len(records) <= config.max_message_bytes
        and compression_of(records) != 0
    )


def _validate(records: Buffer, config: TopicConfig) -> int:
    """In a worker thread: the append's checks of the batch's records, ending with their
    payload bytes. Only ``records`` and ``config`` are read, and neither changes meanwhile;
    the append repeats the cheap header checks on the loop and skips the decompression."""
    batches = parse_batches(records)
    if len(batches) != 1:
        raise InvalidRecordError(f"expected exactly one record batch, got {len(batches)}")
    pos, header = batches[0]
    return validate_records(
        records,
        pos,
        header,
        limit=config.max_message_bytes,
        keys_required=config.cleanup_policy.compacts,
    )
