"""The broker: lifecycle, shared state, and the facts its metrics read.

Lifecycle is STOPPED → STARTING → RUNNING → STOPPING → STOPPED (the seed's
``streambus_broker_status`` gauge). Stopping is ordered: stop accepting
connections, let in-flight requests finish, flush every log, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from opentelemetry import metrics, trace

from streambus.app import build_server
from streambus.cluster import (
    Applied,
    BrokerInfo,
    ClusterState,
    Controller,
    CreateTopic,
    DeleteTopic,
    LocalQuorum,
    PartitionState,
    TopicState,
    coordinator_partition,
    make_quorum,
    plan_topic,
)
from streambus.config import BrokerConfig
from streambus.errors import (
    CoordinatorNotAvailableError,
    DuplicateBrokerRegistrationError,
    KafkaStorageError,
    NotControllerError,
    NotCoordinatorError,
    RequestTimedOutError,
    StreamBusError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from streambus.groups import OFFSETS_TOPIC, GroupCoordinator, GroupSettings, GroupState
from streambus.groups.offsets import OFFSETS_TOPIC_CONFIG
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import PartitionService, QuorumLeadership
from streambus.producer_ids import ProducerIdAllocator
from streambus.storage import LogManager
from streambus.storage.datadir import (
    DataDirLock,
    load_cluster_id,
    prepare_data_dir,
    raise_open_files_limit,
)
from streambus.storage.health import WriteHealth
from streambus.storage.verify import mark_clean_shutdown, take_clean_shutdown

log = logging.getLogger("streambus.broker")


class BrokerStatus(enum.IntEnum):
    STOPPED = 0
    STARTING = 1
    RUNNING = 2
    STOPPING = 3


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.broker_id = config.broker_id
        self.status = BrokerStatus.STOPPED
        self.data_dir = Path(config.data_dir)
        self.storage_health = WriteHealth()
        self.logs = LogManager(
            self.data_dir,
            config.topic_defaults,
            max_partitions=config.max_partitions,
            health=self.storage_health,
        )
        self._lock = DataDirLock(self.data_dir)
        self.telemetry = BrokerTelemetry(self, config.broker_id, meter_provider, tracer_provider)
        # The cluster's metadata: a Raft quorum of the configured voters, or (no
        # --controller-quorum) a one-node quorum of this broker, seeded from its disk at start.
        self.cluster_config = config.cluster()
        self.quorum = make_quorum(self.cluster_config)
        self.controller: Controller | None = None
        self._seen_state = self.quorum.state  # the state before the record being applied
        self._local_failures: dict[str, StreamBusError] = {}  # reconcile's, by topic
        self.quorum.on_change(self._reconcile)
        self._joining: asyncio.Task[None] | None = None
        self.failure: str | None = None  # why this broker cannot go on (a duplicate node id)
        self._failed = asyncio.Event()
        # Every append, read and wait for an append goes through this one service.
        self.partitions = PartitionService(
            self.logs,
            self.telemetry,
            stopping=lambda: self.stopping,
            leadership=QuorumLeadership(lambda: self.quorum.state, self.broker_id),
        )
        # A single broker's quorum is in memory: its producer_ids file is the durable reservation.
        pid_file = None if self.cluster_config.replicated else self.data_dir / "producer_ids"
        self.producer_ids = ProducerIdAllocator(self.quorum, pid_file, self.storage_health)
        self.groups = GroupCoordinator(
            self.partitions,
            GroupSettings(
                initial_rebalance_delay_ms=config.group_initial_rebalance_delay_ms,
                min_session_timeout_ms=config.group_min_session_timeout_ms,
                max_session_timeout_ms=config.group_max_session_timeout_ms,
                offsets_retention_minutes=config.offsets_retention_minutes,
                offsets_topic_partitions=config.offsets_topic_num_partitions,
            ),
            create_offsets_topic=self._create_offsets_topic_now,
        )
        self.local_cluster_id = ""  # meta.properties'; the quorum's wins once it has one
        self._server = build_server(self, config)
        self._started_at = time.monotonic()
        self._maintenance: asyncio.Task[None] | None = None
        self._verifier: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.status is not BrokerStatus.STOPPED:
            raise RuntimeError(f"broker is {self.status.name}, not STOPPED")
        self.status = BrokerStatus.STARTING
        self._started_at = time.monotonic()
        self._stopped.clear()
        try:
            prepare_data_dir(self.data_dir)
            self._lock.acquire()  # before anything in the directory is read or written
        except BaseException:
            self.status = BrokerStatus.STOPPED
            raise
        try:
            raise_open_files_limit()
            self.local_cluster_id = load_cluster_id(self.data_dir, self.broker_id)
            clean = take_clean_shutdown(self.data_dir)
            await self._load_logs()
            self.groups.load()
            await self._server.start()
            try:
                await self._start_cluster()
            except BaseException:
                await self._stop_cluster()
                await self._server.stop(0)
                raise
        except BaseException:
            self.logs.close()
            self._lock.release()
            self.status = BrokerStatus.STOPPED
            raise
        self._maintenance = asyncio.create_task(self._maintain(), name="streambus-maintenance")
        if not clean:
            self._verifier = asyncio.create_task(self._verify_logs(), name="streambus-verify")
        self.groups.start()
        self.status = BrokerStatus.RUNNING
        log.info(
            "broker %d running: cluster %s, %d topics, data in %s",
            self.broker_id,
            self.cluster_id,
            self.topic_count(),
            self.data_dir,
        )

    async def stop(self) -> None:
        if self.status is not BrokerStatus.RUNNING:
            return
        # STOPPING first: a long poll that starts from here on returns at once; then the
        # ones already waiting are woken, so in-flight requests finish before the server's
        # grace period rather than at its end.
        self.status = BrokerStatus.STOPPING
        log.info("broker %d stopping", self.broker_id)
        self.partitions.wake_all()
        await self.groups.stop()  # answers waiting JoinGroup/SyncGroup calls so they finish now
        await self._server.stop(self.config.shutdown_timeout_s)
        await self._stop_cluster()
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        if self._verifier is not None:
            self._verifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._verifier
            self._verifier = None
        clean = True
        try:
            await self.logs.flush_all_in_background()  # also waits for work in worker threads
        except OSError as exc:  # a full or failing disk: close what can be closed anyway
            log.error("flushing logs at shutdown failed: %s", exc)
            clean = False
        self.logs.close()
        if clean:
            with contextlib.suppress(OSError):
                mark_clean_shutdown(self.data_dir)
        self._lock.release()
        self.status = BrokerStatus.STOPPED
        self._stopped.set()
        log.info("broker %d stopped", self.broker_id)

    # -- cluster ---------------------------------------------------------------------------
    async def _start_cluster(self) -> None:
        """Start the quorum and the controller. A single broker registers and seeds its
        topics at once; a cluster member joins in the background, so a broker that cannot
        reach the others (wrong secret, voters down) keeps running and keeps trying."""
        await self.quorum.start()  # OSError if the Raft port cannot be bound
        self.controller = Controller(
            self.quorum,
            self.cluster_config,
            self.config.advertised,
            self.port,
            cluster_id=self.local_cluster_id,
        )
        if isinstance(self.quorum, LocalQuorum):
            await self.controller.start()
            self._seed_local(self.quorum)
        else:
            self._joining = asyncio.create_task(self._join(), name="streambus-cluster-join")

    async def _join(self) -> None:
        assert self.controller is not None
        while True:
            try:
                await self.controller.start()
                return
            except DuplicateBrokerRegistrationError as exc:
                self.failure = str(exc)
                log.error("broker %d cannot join the cluster: %s", self.broker_id, exc)
                self._failed.set()
                return
            except (NotControllerError, RequestTimedOutError) as exc:
                log.warning("broker %d not registered yet, retrying: %s", self.broker_id, exc)

    async def _stop_cluster(self) -> None:
        if self._joining is not None:
            self._joining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._joining
            self._joining = None
        if self.controller is not None:
            await self.controller.stop()
        await self.quorum.stop()

    async def wait_failed(self) -> None:
        """Returns if the broker cannot go on (``failure`` says why; logged once)."""
        await self._failed.wait()

    def _seed_local(self, quorum: LocalQuorum) -> None:
        """A single broker's metadata is what its disk holds: one record per topic."""
        me = (self.broker_id,)
        for name, meta in self.logs.topics().items():
            record = CreateTopic(
                name,
                meta.topic_id,
                (me,) * meta.partitions,
                tuple(sorted(meta.overrides.items())),
                meta.internal,
            )
            result = quorum.apply_now(record)
            if not result.ok:
                log.warning("topic %r not in the cluster metadata: %s", name, result.message)

    def _reconcile(self, applied: Applied) -> None:
        """Local storage follows the replicated state: logs for topics with a replica here,
        and the logs of a deleted topic (the same topic id only) removed."""
        before, self._seen_state = self._seen_state, applied.state
        if not applied.changed:
            return
        record = applied.record
        if isinstance(record, DeleteTopic):
            gone = before.topics.get(record.name)
            local = self.logs.topics().get(record.name) or self.logs.offline_topics().get(
                record.name
            )
            if gone is not None and local is not None and local.topic_id == gone.topic_id:
                try:
                    self.partitions.delete_topic(record.name)
                    log.info("deleted local logs of topic %r", record.name)
                except StreamBusError as exc:
                    log.error("deleting local logs of topic %r failed: %s", record.name, exc)
        self._create_hosted(applied.state)

    def _create_hosted(self, state: ClusterState) -> None:
        local, offline = self.logs.topics(), self.logs.offline_topics()
        for name, topic in state.topics.items():
            if name in local or name in offline:
                continue
            if not any(self.broker_id in p.replicas for p in topic.partitions):
                continue
            try:
                # Every partition's log is made here; only those this broker leads are served.
                self.partitions.create_topic(
                    name,
                    len(topic.partitions),
                    dict(topic.configs),
                    internal=topic.internal,
                    topic_id=topic.topic_id,
                )
            except StreamBusError as exc:
                self._local_failures[name] = exc
                log.error("creating local logs of topic %r failed: %s", name, exc)
            else:
                self._local_failures.pop(name, None)

    def _plan_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        replication_factor: int,
        internal: bool,
    ) -> CreateTopic:
        """Check locally (name, configs, limits), then place the replicas over the live
        brokers: the CreateTopic record to submit."""
        meta = self.partitions.create_topic(
            name, partitions, overrides, internal=internal, validate_only=True
        )
        state = self.quorum.state
        if name in state.topics:
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        return plan_topic(
            state,
            name,
            partitions,
            replication_factor,
            start_index=random.randrange(1 << 16),
            topic_id=meta.topic_id,
            configs=dict(meta.overrides),
            internal=internal,
        )

    async def create_cluster_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        replication_factor: int = 1,
        internal: bool = False,
        validate_only: bool = False,
    ) -> TopicState:
        """Submit a new topic to the quorum (from any broker); the topic as the cluster
        holds it. NOT_CONTROLLER / REQUEST_TIMED_OUT when no leader commits it."""
        record = self._plan_topic(
            name, partitions, overrides, replication_factor=replication_factor, internal=internal
        )
        if validate_only:
            return _topic_of(record)
        result = await self.quorum.submit(record)
        if not result.ok:
            raise result.error() or StreamBusError(result.message)
        return self._created(record)

    def create_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        validate_only: bool = False,
    ) -> TopicState:
        """``create_cluster_topic`` without waiting: a single broker's (tools and tests)."""
        record = self._plan_topic(name, partitions, overrides, replication_factor=1, internal=False)
        if validate_only:
            return _topic_of(record)
        result = self._local_quorum().apply_now(record)
        if not result.ok:
            raise result.error() or StreamBusError(result.message)
        return self._created(record)

    def _local_quorum(self) -> LocalQuorum:
        if not isinstance(self.quorum, LocalQuorum):
            raise NotControllerError("metadata of a cluster changes through the Raft quorum")
        return self.quorum

    def _created(self, record: CreateTopic) -> TopicState:
        failure = self._local_failures.pop(record.name, None)
        if failure is not None and isinstance(self.quorum, LocalQuorum):
            # One broker: a topic it could not store does not exist (as before the quorum).
            self.quorum.apply_now(DeleteTopic(record.name))
            raise failure
        return self.quorum.state.topics.get(record.name) or _topic_of(record)

    async def delete_cluster_topic(self, name: str) -> uuid.UUID:
        """Submit the deletion to the quorum; every broker deletes its logs on applying it."""
        topic = self.quorum.state.topics.get(name)
        if topic is None:
            if name in self.logs.offline_topics():  # unreadable here, never in the metadata
                return self.partitions.delete_topic(name).topic_id
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        result = await self.quorum.submit(DeleteTopic(name))
        if not result.ok:
            raise result.error() or StreamBusError(result.message)
        return topic.topic_id

    def delete_topic(self, name: str) -> uuid.UUID:
        """``delete_cluster_topic`` without waiting: a single broker's."""
        topic = self.quorum.state.topics.get(name)
        if topic is None:
            return self.partitions.delete_topic(name).topic_id
        result = self._local_quorum().apply_now(DeleteTopic(name))
        if not result.ok:
            raise result.error() or StreamBusError(result.message)
        return topic.topic_id

    def _create_offsets_topic_now(self) -> None:
        """The group coordinator's first commit on a single broker: create the topic now.
        In a cluster FindCoordinator creates it, and only its leaders coordinate groups."""
        state = self.quorum.state
        if OFFSETS_TOPIC in state.topics:
            self._create_hosted(state)  # a local creation that failed before: try again
            failure = self._local_failures.pop(OFFSETS_TOPIC, None)
            if failure is not None:
                raise failure
            return
        if not isinstance(self.quorum, LocalQuorum):
            raise CoordinatorNotAvailableError(f"{OFFSETS_TOPIC} does not exist yet")
        record = plan_topic(
            state,
            OFFSETS_TOPIC,
            self.config.offsets_topic_num_partitions,
            1,
            start_index=0,
            topic_id=uuid.uuid4(),
            configs=OFFSETS_TOPIC_CONFIG,
            internal=True,
        )
        result = self.quorum.apply_now(record)
        if not result.ok:
            raise result.error() or StreamBusError(result.message)
        self._created(record)

    async def ensure_offsets_topic(self) -> None:
        """FindCoordinator: create ``__consumer_offsets`` through the quorum if needed. A
        single broker leaves it to the first commit, as it always has."""
        if OFFSETS_TOPIC in self.quorum.state.topics or isinstance(self.quorum, LocalQuorum):
            return
        with contextlib.suppress(TopicAlreadyExistsError):  # another broker was faster
            await self.create_cluster_topic(
                OFFSETS_TOPIC,
                self.config.offsets_topic_num_partitions,
                OFFSETS_TOPIC_CONFIG,
                internal=True,
            )

    def group_coordinator(self, group_id: str) -> BrokerInfo:
        """The live broker leading the group's ``__consumer_offsets`` partition."""
        state = self.quorum.state
        topic = state.topics.get(OFFSETS_TOPIC)
        if topic is None and isinstance(self.quorum, LocalQuorum):
            host, port = self.advertised_address  # one broker coordinates every group
            return BrokerInfo(self.broker_id, host, port, "", False)
        if topic is None:
            raise CoordinatorNotAvailableError(f"{OFFSETS_TOPIC} does not exist yet")
        partition = coordinator_partition(group_id, len(topic.partitions))
        leader = topic.partitions[partition].leader
        info = state.brokers.get(leader)
        if info is None or info.fenced:
            raise CoordinatorNotAvailableError(
                f"{OFFSETS_TOPIC} partition {partition} (group {group_id!r}) has no live leader"
            )
        return info

    def check_coordinator(self, group_id: str) -> None:
        """Raise NOT_COORDINATOR unless this broker coordinates ``group_id``."""
        if OFFSETS_TOPIC not in self.quorum.state.topics and isinstance(self.quorum, LocalQuorum):
            return  # one broker: it creates the topic on the first commit
        info = self.group_coordinator(group_id)
        if info.broker_id != self.broker_id:
            raise NotCoordinatorError(
                f"group {group_id!r} is coordinated by broker {info.broker_id}, "
                f"not {self.broker_id}"
            )

    def controller_id(self) -> int:
        leader = self.quorum.leader_id
        return -1 if leader is None else leader

    async def _load_logs(self) -> None:
        """Open every partition (segment scans, producer state) in a worker thread: the
        event loop stays free (signals, /metrics) while a large data dir is recovered."""
        loading = asyncio.get_running_loop().run_in_executor(None, self.logs.load)
        try:
            await asyncio.shield(loading)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: let it finish before the logs are closed.
            with contextlib.suppress(Exception):
                await loading
            raise

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def cluster_id(self) -> str:
        return self.quorum.state.cluster_id or self.local_cluster_id

    @property
    def stopping(self) -> bool:
        return self.status is not BrokerStatus.RUNNING

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def advertised_address(self) -> tuple[str, int]:
        return self.config.advertised, self.port

    @property
    def bootstrap(self) -> str:
        host, port = self.advertised_address
        return f"{host}:{port}"

    # -- background work ---------------------------------------------------------------------
    async def _verify_logs(self) -> None:
        """After an unclean stop, verify every closed segment now, one at a time in a worker
        thread, so corruption is reported at start-up rather than at its first read."""
        jobs = [(plog, seg) for _, plog in self.logs.logs() for seg in plog.unverified_segments()]
        if not jobs:
            return
        log.info("unclean shutdown: verifying %d closed segments in the background", len(jobs))
        for plog, segment in jobs:
            try:
                plog.apply_scan(await asyncio.to_thread(plog.scan_job(segment)))
            except OSError as exc:
                log.error("verifying %s failed: %s", segment.log_path, exc)
        log.info("verified %d closed segments", len(jobs))

    async def _maintain(self) -> None:
        interval = self.config.maintenance_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                now_ms = int(time.time() * 1000)
                with contextlib.suppress(KafkaStorageError):  # a full disk, reported once
                    self.groups.expire_offsets(now_ms)  # by storage health; retried next round
                # Unlinks, fsyncs and compaction run in worker threads; this task waits.
                report = await self.logs.maintain(now_ms)
            except Exception:
                log.exception("log maintenance failed; will retry in %.0fs", interval)
                continue
            self.telemetry.compactions(report.compactions)

    # -- BrokerStats: what the observable instruments read -----------------------------------
    def uptime_seconds(self) -> float:
        if self.status is BrokerStatus.STOPPED:
            return 0.0
        return time.monotonic() - self._started_at

    def status_code(self) -> int:
        return int(self.status)

    def connection_count(self) -> int:
        return len(self._server.connections)

    def active_request_count(self) -> int:
        return self._server.active_requests

    def request_memory_bytes(self) -> int:
        return self._server.memory.used

    def topic_count(self) -> int:
        return sum(1 for meta in self.logs.topics().values() if not meta.internal)

    def partition_count(self) -> int:
        return sum(meta.partitions for meta in self.logs.topics().values() if not meta.internal)

    def segment_count(self) -> int:
        return self.logs.total_segments()

    def storage_used_bytes(self) -> int:
        return self.logs.total_size_bytes()

    def group_count(self) -> int:
        return sum(1 for g in self.groups.groups().values() if g.state is not GroupState.DEAD)

    def group_member_counts(self) -> Iterable[tuple[str, int]]:
        for group in self.groups.groups().values():
            if group.state is not GroupState.DEAD:
                yield group.group_id, len(group.members)

    def group_lags(self) -> Iterable[tuple[str, str, int, int]]:
        for group, tp, lag in self.groups.lags():
            yield group, tp.topic, tp.partition, lag

    def storage_corruptions(self) -> Iterable[tuple[str, int, int]]:
        for tp, plog in self.logs.logs():
            if plog.corruptions:
                yield tp.topic, tp.partition, plog.corruptions

    def offline_partition_count(self) -> int:
        """Partitions stored here that cannot be served, plus partitions the cluster has no
        leader for (a topic offline on disk still has a leader in the state: not twice)."""
        return self.logs.offline_partition_count() + self.quorum.state.offline_partitions()

    def cluster_size(self) -> int:
        return len(self.quorum.state.live_brokers())

    def cluster_leader(self) -> int:
        return int(self.quorum.is_leader)

    def raft_term(self) -> int:
        return self.quorum.term

    def raft_commit_index(self) -> int:
        return self.quorum.commit_index

    def partitions_led(self) -> int:
        return self.quorum.state.partitions_led_by(self.broker_id)

    def storage_write_failing(self) -> int:
        return int(self.storage_health.failing)

    def storage_write_errors(self) -> Iterable[tuple[str, int]]:
        return self.storage_health.errors().items()

    def storage_available_bytes(self) -> int:
        return shutil.disk_usage(self.data_dir).free if self.data_dir.exists() else 0


def _topic_of(record: CreateTopic) -> TopicState:
    """The topic a CreateTopic record describes, before (or without) applying it."""
    return TopicState(
        record.name,
        record.topic_id,
        record.internal,
        dict(record.configs),
        tuple(PartitionState(r, r, r[0], 0) for r in record.replicas),
    )
