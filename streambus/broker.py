"""The broker: lifecycle, shared state, and the facts its metrics read.

Lifecycle is STOPPED → STARTING → RUNNING → STOPPING → STOPPED (the seed's
``streambus_broker_status`` gauge). Stopping is ordered: stop accepting
connections, let in-flight requests finish, flush every log, close.

The broker's part in the cluster's metadata (quorum, controller, topics created and
deleted through it, group coordinator placement) is ``ClusterMetadata``'s; the broker
starts and stops it with itself and answers for it where handlers and tools call.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from opentelemetry import metrics, trace

from streambus.app import build_server
from streambus.cluster import Applied, BrokerInfo, Quorum, TopicState
from streambus.cluster_metadata import ClusterMetadata
from streambus.config import BrokerConfig
from streambus.errors import KafkaStorageError, StreamBusError
from streambus.groups import OFFSETS_TOPIC, GroupCoordinator, GroupSettings
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import PartitionService, QuorumLeadership
from streambus.producer_ids import ProducerIdAllocator
from streambus.protocol.fetch_sessions import FetchSessionCache
from streambus.quotas import QuotaManager
from streambus.replication.fetcher import FetcherSettings
from streambus.replication.manager import ReplicaManager
from streambus.schemas.auth import RegistrySecurity
from streambus.schemas.forward import Forwarder
from streambus.schemas.registry import SchemaRegistry
from streambus.schemas.remote import RemoteSchemas, SchemasLeader
from streambus.schemas.rest import RegistryServer
from streambus.schemas.storage import (
    SCHEMAS_REPLICATION_FACTOR,
    SCHEMAS_TOPIC,
    SCHEMAS_TOPIC_CONFIG,
)
from streambus.security.audit import AuditLog
from streambus.security.authorizer import Authorizer
from streambus.security.broker_client import BrokerDialer, InterBrokerSecurity
from streambus.security.credentials import CredentialStore
from streambus.security.readiness import SecurityState
from streambus.storage import LogManager
from streambus.storage.datadir import (
    DataDirLock,
    load_cluster_id,
    prepare_data_dir,
    raise_open_files_limit,
)
from streambus.storage.health import WriteHealth
from streambus.storage.verify import mark_clean_shutdown, take_clean_shutdown
from streambus.structs import TopicPartition
from streambus.transactions import (
    TRANSACTION_TOPIC,
    Leader,
    MarkerWriter,
    TransactionCoordinator,
    TxnSettings,
)

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
        # Every append, read and wait for an append goes through this one service.
        self.partitions = PartitionService(
            self.logs,
            self.telemetry,
            stopping=lambda: self.stopping,
            leadership=QuorumLeadership(lambda: self.cluster.quorum.state, self.broker_id),
        )
        # The quorum and controller, and local storage kept to the replicated state.
        self.cluster = ClusterMetadata(
            config,
            self.partitions,
            self.logs,
            port=lambda: self.port,
            listeners=lambda: tuple(
                (x.name, *self._server.advertised(x.name)) for x in self._server.listeners
            ),
        )
        # A single broker's quorum is in memory: its producer_ids file is the durable reservation.
        replicated = self.cluster.cluster_config.replicated
        pid_file = None if replicated else self.data_dir / "producer_ids"
        self.producer_ids = ProducerIdAllocator(self.cluster.quorum, pid_file, self.storage_health)
        self.groups = GroupCoordinator(
            self.partitions,
            GroupSettings(
                initial_rebalance_delay_ms=config.group_initial_rebalance_delay_ms,
                min_session_timeout_ms=config.group_min_session_timeout_ms,
                max_session_timeout_ms=config.group_max_session_timeout_ms,
                consumer_session_timeout_ms=config.group_consumer_session_timeout_ms,
                consumer_heartbeat_interval_ms=config.group_consumer_heartbeat_interval_ms,
                offsets_retention_minutes=config.offsets_retention_minutes,
                offsets_topic_partitions=config.offsets_topic_num_partitions,
            ),
            create_offsets_topic=self.cluster.create_offsets_topic_now,
        )
        # How this broker dials the others (fetchers, markers): the inter-broker listener's
        # TLS and SASL. A single broker dials no one.
        dialer = BrokerDialer(InterBrokerSecurity.from_config(config) if replicated else None)
        # Transactions: a transactional id is coordinated by the leader of its
        # __transaction_state partition; markers go to each partition's leader.
        self.transactions = TransactionCoordinator(
            self.partitions,
            self.producer_ids.allocate,
            MarkerWriter(
                self.partitions,
                config.broker_id,
                self._partition_leader,
                self.telemetry,
                dialer=dialer,
                # the state is replaced as records apply: look it up at each call
                is_live=lambda broker_id: self.cluster.quorum.state.is_live(broker_id),  # noqa: PLW0108
            ),
            TxnSettings(
                state_partitions=config.transaction_state_log_num_partitions,
                max_timeout_ms=config.transaction_max_timeout_ms,
                cleanup_interval_ms=(
                    config.transaction_abort_timed_out_transaction_cleanup_interval_ms
                ),
            ),
            self.telemetry,
            group_partition=self._group_partition,
        )
        self.transactions.markers.on_offsets_marker = self.groups.complete_transaction
        # Roles from the metadata: leaders track their followers, followers fetch.
        self.replication = ReplicaManager(
            self.partitions,
            self.cluster.quorum,
            self.telemetry,
            FetcherSettings(
                config.broker_id,
                wait_max_ms=config.replica_fetch_wait_max_ms,
                max_bytes_per_partition=config.replica_fetch_max_bytes,
                response_max_bytes=config.replica_fetch_response_max_bytes,
                dialer=dialer,
            ),
            lag_time_max_ms=config.replica_lag_time_max_ms,
        )
        if replicated:
            # A group is coordinated by the leader of its __consumer_offsets partition:
            # leading one means loading its groups, losing it means letting them go.
            self.replication.on_leadership(self._offsets_leadership)
            self.replication.on_leadership(self._transactions_leadership)
        # The schema registry: state from _schemas, REST on schema_registry_port (0: off).
        # Every broker follows _schemas; writes go to its partition's leader (forwarded).
        self.schemas = SchemaRegistry(
            self.partitions,
            self.telemetry,
            create_topic=lambda: self.create_cluster_topic(
                SCHEMAS_TOPIC,
                1,
                SCHEMAS_TOPIC_CONFIG,
                # Confluent's kafkastore.topic.replication.factor (3), or every live broker.
                replication_factor=max(
                    1, min(SCHEMAS_REPLICATION_FACTOR, len(self.quorum.state.live_brokers()))
                ),
                internal=True,
            ),
            stopping=lambda: self.stopping,
            remote=RemoteSchemas(self._schemas_leader, config.broker_id, dialer),
        )
        # Produced records of topics with schema validation on are checked against its state,
        # which is loaded from _schemas whether or not this broker serves the REST API.
        self.partitions.schema_validation.source = self.schemas
        self.local_cluster_id = ""  # meta.properties'; the quorum's wins once it has one
        self.quotas = QuotaManager(
            lambda: self.cluster.quorum,
            self.telemetry,
            self.data_dir,
            window_num=config.quota_window_num,
            window_size_s=config.quota_window_size_seconds,
        )
        # ACLs and credentials loaded (a single broker's files) or caught up (a cluster's
        # Raft log): until then authentications and authorizations wait (server.py).
        self.security = SecurityState()
        self._awaited_incarnation: str | None = None
        if replicated:
            self.cluster.quorum.on_change(self._caught_up)
        self.audit = AuditLog(
            config.audit_log,
            self.telemetry,
            max_bytes=config.audit_log_max_bytes,
            backup_count=config.audit_log_backup_count,
        )
        self.authorizer = Authorizer(
            lambda: self.cluster.quorum,
            self.telemetry,
            self.audit,
            self.data_dir,
            enabled=config.authorizer_enabled,
            super_users=config.super_users,
            allow_everyone_if_no_acl_found=config.allow_everyone_if_no_acl_found,
            audit_allowed=config.audit_log_allowed,
            state=self.security,
        )
        self.credentials = CredentialStore(
            lambda: self.cluster.quorum, self.data_dir, state=self.security
        )
        self._registry_server = None
        if config.schema_registry_port:  # after the authorizer and credentials it checks with
            registry_tls = config.schema_registry_tls()
            self._registry_server = RegistryServer(
                self.schemas,
                self.telemetry,
                config.host,
                config.schema_registry_port,
                Forwarder(
                    self.schemas,
                    self.broker_id,
                    self._schemas_leader,
                    registry_tls.client() if registry_tls else None,
                ),
                ssl_context=registry_tls.server() if registry_tls else None,
                security=RegistrySecurity(
                    config.schema_registry_authentication,
                    self.credentials,
                    self.authorizer,
                    self.telemetry,
                    self.audit,
                ),
            )
        self.fetch_sessions = FetchSessionCache(config.max_incremental_fetch_session_cache_slots)
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
            if not self.cluster.cluster_config.replicated:
                self.groups.load()  # in a cluster, as partitions of __consumer_offsets are led
                self.transactions.load()  # and of __transaction_state
            try:
                self.schemas.load()
            except StreamBusError as exc:  # _schemas offline: the broker serves Kafka anyway
                log.error("schema registry: _schemas could not be read: %s", exc)
            self.audit.open()
            if not self.cluster.cluster_config.replicated:
                # Before any listener opens, so no client meets an empty ACL set or credential
                # table: the in-memory quorum takes records before it starts.
                self.quotas.load_local()
                self.authorizer.load_local()
                self.credentials.load_local()
                self.security.mark_loaded()
            await self._server.start()
            try:
                await self.cluster.start(self.local_cluster_id)
                if self.cluster.controller is not None and not self.security.loaded:
                    self._awaited_incarnation = self.cluster.controller.incarnation
                    self._caught_up()
                self.replication.start()
                self.schemas.tail.start()
                if self._registry_server is not None:
                    await self._registry_server.start()
            except BaseException:
                if self._registry_server is not None:
                    await self._registry_server.stop()
                await self.schemas.tail.stop()
                await self.replication.stop()
                await self.cluster.stop()
                await self._server.stop(0)
                raise
        except BaseException:
            self.security.unload()
            self._awaited_incarnation = None
            self.logs.close()
            self._lock.release()
            self.status = BrokerStatus.STOPPED
            raise
        self._maintenance = asyncio.create_task(self._maintain(), name="streambus-maintenance")
        if not clean:
            self._verifier = asyncio.create_task(self._verify_logs(), name="streambus-verify")
        self.groups.start()
        self.transactions.start()
        self.status = BrokerStatus.RUNNING
        log.info(
            "broker %d running: cluster %s, %d topics, data in %s",
            self.broker_id,
            self.cluster_id,
            self.topic_count(),
            self.data_dir,
        )

    def _caught_up(self, applied: Applied | None = None) -> None:
        """A cluster member's metadata has caught up once its own registration of this start
        (its incarnation) is applied here: every record committed before it is applied too,
        ACLs and credentials included, whatever the journal replay left stale."""
        awaited = self._awaited_incarnation
        if awaited is None or self.security.loaded:
            return
        state = applied.state if applied is not None else self.cluster.quorum.state
        me = state.brokers.get(self.broker_id)
        if me is not None and me.incarnation == awaited:
            self._awaited_incarnation = None
            self.security.mark_loaded()
            log.info("broker %d: ACLs and credentials caught up with the cluster", self.broker_id)

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
        await self.transactions.stop()  # markers not yet written are finished by the next start
        if self._registry_server is not None:
            await self._registry_server.stop()
        await self.schemas.tail.stop()
        await self._server.stop(self.config.shutdown_timeout_s)
        await self.replication.stop()
        await self.cluster.stop()
        self.security.unload()
        self._awaited_incarnation = None
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
        await asyncio.to_thread(self.audit.close)  # writes what is queued
        if clean:
            with contextlib.suppress(OSError):
                mark_clean_shutdown(self.data_dir)
        self._lock.release()
        self.status = BrokerStatus.STOPPED
        self._stopped.set()
        log.info("broker %d stopped", self.broker_id)

    # -- cluster: one-line delegations to ClusterMetadata, for BrokerServices and tools -----
    @property
    def quorum(self) -> Quorum:
        return self.cluster.quorum

    @property
    def failure(self) -> str | None:
        """Why this broker cannot go on (a duplicate node id), once it cannot."""
        return self.cluster.failure

    async def wait_failed(self) -> None:
        """Returns if the broker cannot go on (``failure`` says why; logged once)."""
        await self.cluster.wait_failed()

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
    ) -> TopicState:
        return await self.cluster.create_cluster_topic(
            name,
            partitions,
            overrides,
            replication_factor=replication_factor,
            internal=internal,
            validate_only=validate_only,
            assignments=assignments,
        )

    async def create_partitions(
        self,
        name: str,
        count: int,
        *,
        assignments: Sequence[Sequence[int]] | None = None,
        validate_only: bool = False,
    ) -> TopicState:
        return await self.cluster.create_partitions(
            name, count, assignments=assignments, validate_only=validate_only
        )

    async def elect_leaders(
        self, election_type: int, partitions: Iterable[tuple[str, int]] | None
    ) -> list[tuple[str, int, StreamBusError | None]]:
        return await self.cluster.elect_leaders(election_type, partitions)

    def create_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        validate_only: bool = False,
    ) -> TopicState:
        return self.cluster.create_topic(name, partitions, overrides, validate_only=validate_only)

    async def alter_topic_configs(
        self,
        name: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool = False,
        validate_only: bool = False,
    ) -> None:
        await self.cluster.alter_topic_configs(
            name, changes, replace=replace, validate_only=validate_only
        )

    async def alter_broker_configs(
        self,
        entity: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool = False,
        validate_only: bool = False,
    ) -> None:
        await self.cluster.alter_broker_configs(
            entity, changes, replace=replace, validate_only=validate_only
        )

    async def delete_cluster_topic(self, name: str) -> uuid.UUID:
        return await self.cluster.delete_cluster_topic(name)

    def delete_topic(self, name: str) -> uuid.UUID:
        return self.cluster.delete_topic(name)

    async def ensure_offsets_topic(self) -> None:
        await self.cluster.ensure_offsets_topic()

    def group_coordinator(self, group_id: str) -> BrokerInfo:
        return self.cluster.group_coordinator(group_id)

    def check_coordinator(self, group_id: str) -> None:
        self.cluster.check_coordinator(group_id)

    def controller_id(self) -> int:
        return self.cluster.controller_id()

    async def ensure_transaction_topic(self) -> None:
        await self.cluster.ensure_transaction_topic()
        if not self.cluster.cluster_config.replicated:
            self.transactions.load()  # a single broker coordinates every id from the start

    def transaction_coordinator(self, transactional_id: str) -> BrokerInfo:
        return self.cluster.transaction_coordinator(transactional_id)

    def _partition_leader(self, tp: TopicPartition) -> Leader | None:
        info = self.cluster.partition_leader(tp)
        return None if info is None else Leader(info.broker_id, info.host, info.port)

    def _group_partition(self, group_id: str) -> TopicPartition:
        self.groups.offsets.ensure_topic()
        return self.groups.offsets.partition_for(group_id)

    # -- start-up, waits and addresses -------------------------------------------------------
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

    def listener_address(self, listener: str) -> tuple[str, int]:
        return self._server.advertised(listener)

    def listener_port(self, listener: str) -> int:
        """The bound port of listener ``listener`` (tests bind port 0)."""
        return self._server.listener_port(listener)

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

    def _offsets_leadership(self, tp: TopicPartition, leads: bool) -> None:
        if tp.topic != OFFSETS_TOPIC:
            return
        if leads:
            self.groups.load_partition(tp.partition)
        else:
            self.groups.unload_partition(tp.partition)

    def _schemas_leader(self) -> SchemasLeader:
        """Who leads _schemas partition 0, from the metadata, and its registry address."""
        state = self.cluster.quorum.state
        topic = state.topics.get(SCHEMAS_TOPIC)
        if topic is None or not topic.partitions:
            return SchemasLeader(False)
        leader = topic.partitions[0].leader
        info = state.brokers.get(leader)
        if info is None:
            return SchemasLeader(True)
        return SchemasLeader(True, leader, info.host, info.registry_port, info.port)

    def _transactions_leadership(self, tp: TopicPartition, leads: bool) -> None:
        if tp.topic != TRANSACTION_TOPIC:
            return
        if leads:
            self.transactions.load_partition(tp.partition)
        else:
            self.transactions.unload_partition(tp.partition)

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
        return sum(1 for _ in self.groups.member_counts())

    def group_member_counts(self) -> Iterable[tuple[str, int]]:
        return self.groups.member_counts()

    def group_rebalances(self) -> Iterable[tuple[str, int]]:
        return self.groups.rebalance_counts()

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
        return self.logs.offline_partition_count() + self.cluster.offline_partitions()

    def cluster_size(self) -> int:
        return self.cluster.cluster_size()

    def cluster_leader(self) -> int:
        return self.cluster.cluster_leader()

    def raft_term(self) -> int:
        return self.cluster.raft_term()

    def raft_commit_index(self) -> int:
        return self.cluster.raft_commit_index()

    def partitions_led(self) -> int:
        return self.cluster.partitions_led()

    def replica_count(self) -> int:
        return len(self.partitions.replicas())

    def under_replicated_count(self) -> int:
        return sum(1 for r in self.replication.led() if len(r.isr) < len(r.replicas))

    def under_min_isr_count(self) -> int:
        count = 0
        for r in self.replication.led():
            if len(r.isr) < self.logs.log(r.tp).config.min_insync_replicas:
                count += 1
        return count

    def replica_lags(self) -> Iterable[tuple[str, int, int]]:
        for r in self.replication.led():
            if r.replicated:
                yield r.tp.topic, r.tp.partition, r.lag_messages(self.logs.log(r.tp).log_end_offset)

    def storage_write_failing(self) -> int:
        return int(self.storage_health.failing)

    def storage_write_errors(self) -> Iterable[tuple[str, int]]:
        return self.storage_health.errors().items()

    def storage_available_bytes(self) -> int:
        return shutil.disk_usage(self.data_dir).free if self.data_dir.exists() else 0

    def transactions_active(self) -> int:
        return self.transactions.active_count()

    def transaction_oldest_open_seconds(self) -> float:
        return self.transactions.oldest_open_seconds()

    def schema_count(self) -> int:
        return self.schemas.schema_count()

    def schema_subject_count(self) -> int:
        return self.schemas.subject_count()

    @property
    def schema_registry_port(self) -> int:
        """The REST port bound (0: the registry's REST API is off)."""
        return self._registry_server.port if self._registry_server is not None else 0
