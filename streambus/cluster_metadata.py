"""This broker's part in the cluster's metadata: the quorum and controller, local storage
reconciled to the replicated state, topic creation and deletion from any broker, group
coordinator placement.

The metadata is a Raft quorum of the configured voters, or (no --controller-quorum) a
one-node quorum of this broker, seeded from its disk at start. Either way every broker's
local storage follows the state the quorum applies: the broker wires this object between
its partition service and its handlers, and the handlers reach it through
``BrokerServices`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from streambus.cluster import (
    AlterBrokerConfigs,
    AlterTopicConfigs,
    Applied,
    BrokerInfo,
    ChangePartitionLeader,
    ClusterState,
    Controller,
    CreateTopic,
    DeleteTopic,
    LocalQuorum,
    PartitionState,
    TopicState,
    apply,
    coordinator_partition,
    make_quorum,
    plan_partitions,
    plan_topic,
    preferred_election,
    unclean_election,
)
from streambus.config import BrokerConfig
from streambus.errors import (
    CoordinatorNotAvailableError,
    DuplicateBrokerRegistrationError,
    ElectionNotNeededError,
    InvalidConfigError,
    InvalidReplicationFactorError,
    NotControllerError,
    NotCoordinatorError,
    RequestTimedOutError,
    StreamBusError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from streambus.groups import OFFSETS_TOPIC
from streambus.groups.offsets import OFFSETS_TOPIC_CONFIG
from streambus.partitions import PartitionService
from streambus.storage import LogManager
from streambus.storage.datadir import write_atomically
from streambus.structs import TopicPartition
from streambus.topic_config import with_dynamic_defaults
from streambus.transactions.state import TRANSACTION_TOPIC, TRANSACTION_TOPIC_CONFIG

# The broker's logger: these lines read (and filter) as they did when the broker held them.
log = logging.getLogger("streambus.broker")

# A single broker's dynamic broker configs (its quorum is in memory): JSON, by entity
# ("" for the cluster default, else the broker id), each a map of Kafka-named settings.
# Rewritten atomically on every change; a cluster's live in its Raft journal.
DYNAMIC_CONFIGS_FILE = "dynamic_configs.json"

# ElectLeaders' election types (Kafka's ElectionType)
PREFERRED_ELECTION = 0
UNCLEAN_ELECTION = 1


class ClusterMetadata:
    def __init__(
        self,
        config: BrokerConfig,
        partitions: PartitionService,
        logs: LogManager,
        *,
        port: Callable[[], int],
        listeners: Callable[[], tuple[tuple[str, str, int], ...]] = tuple,
    ) -> None:
        """``port`` is the broker's bound port, known once its server has started;
        ``listeners`` its (name, advertised host, port) per listener, likewise."""
        self._listeners = listeners
        self.config = config
        self.broker_id = config.broker_id
        self.partitions = partitions
        self.logs = logs
        self._port = port
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
        self._configs_synced = False  # dynamic configs reached local storage once

    @property
    def advertised_address(self) -> tuple[str, int]:
        return self.config.advertised, self._port()

    # -- start and stop ----------------------------------------------------------------------
    async def start(self, local_cluster_id: str) -> None:
        """Start the quorum and the controller. A single broker registers and seeds its
        topics at once; a cluster member joins in the background, so a broker that cannot
        reach the others (wrong secret, voters down) keeps running and keeps trying.
        ``local_cluster_id`` (meta.properties') is proposed as the cluster's until one is set."""
        await self.quorum.start()  # OSError if the Raft port cannot be bound
        self.controller = Controller(
            self.quorum,
            self.cluster_config,
            self.config.advertised,
            self._port(),
            cluster_id=local_cluster_id,
            registry_port=self.config.schema_registry_port,
            listeners=self._listeners(),
        )
        if isinstance(self.quorum, LocalQuorum):
            await self.controller.start()
            self._seed_local(self.quorum)
            self._load_dynamic_configs(self.quorum)
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

    async def stop(self) -> None:
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

    # -- local storage follows the replicated state -------------------------------------------
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

    def _load_dynamic_configs(self, quorum: LocalQuorum) -> None:
        path = Path(self.config.data_dir) / DYNAMIC_CONFIGS_FILE
        try:
            saved = json.loads(path.read_text()) if path.exists() else {}
            entities = {str(e): {str(k): str(v) for k, v in c.items()} for e, c in saved.items()}
        except (OSError, ValueError, AttributeError) as exc:
            log.error("dynamic broker configs in %s ignored: %s", path, exc)
            return
        for entity, configs in sorted(entities.items()):
            record = AlterBrokerConfigs(entity, tuple(sorted(configs.items())), replace=True)
            result = quorum.apply_now(record)
            if not result.ok:
                log.error("dynamic broker configs of %r ignored: %s", entity, result.message)
        self._sync_configs(quorum.state, save=False)

    def _sync_configs(self, state: ClusterState, *, save: bool) -> None:
        """Local storage takes the replicated configs: topic defaults from the static ones
        and the dynamic broker configs (cluster default, then this broker's), and each local
        topic its overrides (rewriting its topic.json, so a restart finds them)."""
        self._configs_synced = True
        try:
            defaults = with_dynamic_defaults(
                self.config.topic_defaults, state.broker_configs, self.broker_id
            )
        except InvalidConfigError as exc:
            log.error("dynamic broker configs not applied: %s", exc)
            defaults = self.config.topic_defaults
        if defaults != self.logs.defaults:
            self.logs.set_defaults(defaults)
            log.info("topic defaults changed by dynamic broker configs")
        local = self.logs.topics()
        for name, topic in state.topics.items():
            here = local.get(name)
            if here is None or here.topic_id != topic.topic_id:
                continue
            if dict(here.overrides) != dict(topic.configs):
                try:
                    self.logs.set_overrides(name, topic.configs)
                except StreamBusError as exc:
                    log.error("configs of topic %r not stored locally: %s", name, exc)
        if save:
            path = Path(self.config.data_dir) / DYNAMIC_CONFIGS_FILE
            wire = {e: dict(c) for e, c in sorted(state.broker_configs.items())}
            try:
                write_atomically(path, json.dumps(wire, indent=1, sort_keys=True).encode())
            except OSError as exc:
                log.error("dynamic broker configs not saved to %s: %s", path, exc)

    def _reconcile(self, applied: Applied) -> None:
        """Local storage follows the replicated state: logs for topics with a replica here,
        and the logs of a deleted topic (the same topic id only) removed."""
        before, self._seen_state = self._seen_state, applied.state
        if not applied.changed:
            return
        record = applied.record
        if isinstance(record, AlterTopicConfigs | AlterBrokerConfigs) or not self._configs_synced:
            self._sync_configs(applied.state, save=isinstance(record, AlterBrokerConfigs))
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
            if name in offline:
                continue
            if not any(self.broker_id in p.replicas for p in topic.partitions):
                continue
            here = local.get(name)
            if here is not None:
                if here.topic_id == topic.topic_id and here.partitions < len(topic.partitions):
                    self._add_local_partitions(name, len(topic.partitions))
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

    def _add_local_partitions(self, name: str, partitions: int) -> None:
        """CreatePartitions reached this broker: open the new partitions' logs."""
        try:
            self.logs.add_partitions(name, partitions)
        except StreamBusError as exc:
            self._local_failures[name] = exc
            log.error("adding local partitions of topic %r failed: %s", name, exc)
        else:
            self._local_failures.pop(name, None)

    # -- topic creation and deletion -----------------------------------------------------------
    def _plan_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        replication_factor: int,
        internal: bool,
        assignments: Sequence[Sequence[int]] | None = None,
    ) -> CreateTopic:
        """Check locally (name, configs, limits), then place the replicas over the live
        brokers, or as ``assignments`` say: the CreateTopic record to submit.
        ``replication_factor`` -1 is default.replication.factor."""
        if assignments is not None:
            partitions = len(assignments)
        elif replication_factor == -1:
            replication_factor = self.config.default_replication_factor
        elif replication_factor < 1:
            raise InvalidReplicationFactorError(
                f"replication factor {replication_factor}: at least 1, or -1 for the default"
            )
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
            assignments=assignments,
        )

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
        """Submit a new topic to the quorum (from any broker); the topic as the cluster
        holds it. NOT_CONTROLLER / REQUEST_TIMED_OUT when no leader commits it.
        ``replication_factor`` -1 is default.replication.factor; ``assignments`` (per
        partition, its replicas) place the partitions as given instead."""
        record = self._plan_topic(
            name,
            partitions,
            overrides,
            replication_factor=replication_factor,
            internal=internal,
            assignments=assignments,
        )
        if validate_only:
            # apply is pure: what it would answer now, without submitting anything
            new, result = apply(self.quorum.state, record)
            if not result.ok:
                raise result.error() or StreamBusError(result.message)
            return new.topics[name]
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

    async def create_partitions(
        self,
        name: str,
        count: int,
        *,
        assignments: Sequence[Sequence[int]] | None = None,
        validate_only: bool = False,
    ) -> TopicState:
        """Grow a topic to ``count`` partitions through the quorum (CreatePartitions);
        every broker holding a replica opens the new partitions' logs on applying it."""
        state = self.quorum.state
        record = plan_partitions(
            state, name, count, start_index=random.randrange(1 << 16), assignments=assignments
        )
        topic = state.topics[name]
        if validate_only:
            new, result = apply(state, record)
            if not result.ok:
                raise result.error() or StreamBusError(result.message)
            return new.topics[name]
        result = await self.quorum.submit(record)
        if not result.ok:
            raise result.error() or StreamBusError(result.message)
        failure = self._local_failures.pop(name, None)
        if failure is not None:
            raise failure
        return self.quorum.state.topics.get(name) or topic

    # -- configs (DescribeConfigs / AlterConfigs / IncrementalAlterConfigs) ------------------
    async def alter_topic_configs(
        self,
        name: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool = False,
        validate_only: bool = False,
    ) -> None:
        """Change a topic's overrides through the quorum (None removes one; ``replace``:
        ``changes`` are the whole new set). Every broker hosting it applies them at once."""
        if name not in self.quorum.state.topics:
            raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
        record = AlterTopicConfigs(name, tuple(sorted(changes.items())), replace=replace)
        await self._submit_config(record, validate_only)

    async def alter_broker_configs(
        self,
        entity: str,
        changes: Mapping[str, str | None],
        *,
        replace: bool = False,
        validate_only: bool = False,
    ) -> None:
        """Change dynamic broker configs (``entity`` "" for every broker, else one id)."""
        record = AlterBrokerConfigs(entity, tuple(sorted(changes.items())), replace=replace)
        await self._submit_config(record, validate_only)

    async def _submit_config(
        self, record: AlterTopicConfigs | AlterBrokerConfigs, validate_only: bool
    ) -> None:
        if validate_only:
            _, result = apply(self.quorum.state, record)  # pure: what it would answer
        else:
            result = await self.quorum.submit(record)
        if not result.ok:
            raise result.error() or StreamBusError(result.message)

    async def elect_leaders(
        self, election_type: int, partitions: Iterable[tuple[str, int]] | None
    ) -> list[tuple[str, int, StreamBusError | None]]:
        """ElectLeaders: each partition's outcome (None: a new leader was elected).
        ``partitions`` None is every partition; those needing no election are then left
        out of the answer, as Kafka leaves them out."""
        state = self.quorum.state
        every = partitions is None
        wanted = (
            [(t.name, i) for t in state.topics.values() for i in range(len(t.partitions))]
            if partitions is None
            else list(partitions)
        )
        plan = unclean_election if election_type == UNCLEAN_ELECTION else preferred_election
        out: list[tuple[str, int, StreamBusError | None]] = []
        for topic, partition in wanted:
            error: StreamBusError | None = None
            try:
                record: ChangePartitionLeader = plan(self.quorum.state, topic, partition)
                result = await self.quorum.submit(record)
                error = result.error()
            except StreamBusError as exc:
                error = exc
            if every and isinstance(error, ElectionNotNeededError):
                continue
            out.append((topic, partition, error))
        return out

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

    # -- group coordinator placement -------------------------------------------------------------
    def create_offsets_topic_now(self) -> None:
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
        self._create_internal_now(
            self.quorum,
            OFFSETS_TOPIC,
            self.config.offsets_topic_num_partitions,
            self._offsets_replication_factor(),
            OFFSETS_TOPIC_CONFIG,
        )

    def _create_internal_now(
        self,
        quorum: LocalQuorum,
        name: str,
        partitions: int,
        replication_factor: int,
        configs: Mapping[str, str],
    ) -> None:
        """A single broker's internal topic, created at once (its first use needs it)."""
        record = plan_topic(
            quorum.state,
            name,
            partitions,
            replication_factor,
            start_index=0,
            topic_id=uuid.uuid4(),
            configs=configs,
            internal=True,
        )
        result = quorum.apply_now(record)
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
                replication_factor=self._offsets_replication_factor(),
                internal=True,
            )

    def _offsets_replication_factor(self) -> int:
        """Kafka's creation rule: offsets.topic.replication.factor, or every live broker
        when fewer are live (a young cluster still gets its coordinator)."""
        live = len(self.quorum.state.live_brokers())
        return max(1, min(self.config.offsets_topic_replication_factor, live))

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

    # -- transaction coordinator placement --------------------------------------------------------
    def _transaction_topic_configs(self, replication_factor: int) -> dict[str, str]:
        # min.insync.replicas never above the replicas it has (a one-broker cluster).
        min_isr = min(self.config.transaction_state_log_min_isr, replication_factor)
        return {**TRANSACTION_TOPIC_CONFIG, "min.insync.replicas": str(min_isr)}

    async def ensure_transaction_topic(self) -> None:
        """FindCoordinator TRANSACTION: create ``__transaction_state`` if needed (at once on a
        single broker, through the quorum in a cluster)."""
        if TRANSACTION_TOPIC in self.quorum.state.topics:
            if isinstance(self.quorum, LocalQuorum):
                self._create_hosted(self.quorum.state)  # a local creation that failed before
            return
        live = len(self.quorum.state.live_brokers())
        factor = max(1, min(self.config.transaction_state_log_replication_factor, live))
        configs = self._transaction_topic_configs(factor)
        partitions = self.config.transaction_state_log_num_partitions
        if isinstance(self.quorum, LocalQuorum):
            self._create_internal_now(self.quorum, TRANSACTION_TOPIC, partitions, factor, configs)
            return
        with contextlib.suppress(TopicAlreadyExistsError):  # another broker was faster
            await self.create_cluster_topic(
                TRANSACTION_TOPIC, partitions, configs, replication_factor=factor, internal=True
            )

    def transaction_coordinator(self, transactional_id: str) -> BrokerInfo:
        """The live broker leading the id's ``__transaction_state`` partition."""
        state = self.quorum.state
        topic = state.topics.get(TRANSACTION_TOPIC)
        if topic is None:
            raise CoordinatorNotAvailableError(f"{TRANSACTION_TOPIC} does not exist yet")
        partition = coordinator_partition(transactional_id, len(topic.partitions))
        leader = topic.partitions[partition].leader
        if isinstance(self.quorum, LocalQuorum) or leader == self.broker_id:
            host, port = self.advertised_address
            return BrokerInfo(self.broker_id, host, port, "", False)
        info = state.brokers.get(leader)
        if info is None or info.fenced:
            raise CoordinatorNotAvailableError(
                f"{TRANSACTION_TOPIC} partition {partition} ({transactional_id!r}) has no live "
                "leader"
            )
        return info

    def partition_leader(self, tp: TopicPartition) -> BrokerInfo | None:
        """Who leads ``tp`` (the marker writer's question): None once it no longer exists;
        CoordinatorNotAvailableError while it has no live leader."""
        state = self.quorum.state
        topic = state.topics.get(tp.topic)
        if topic is None or isinstance(self.quorum, LocalQuorum):
            return self._here() if tp.topic in self.partitions.topics() else None
        if not 0 <= tp.partition < len(topic.partitions):
            return None
        leader = topic.partitions[tp.partition].leader
        if leader == self.broker_id:
            return self._here()
        info = state.brokers.get(leader)
        if info is None or info.fenced:
            raise CoordinatorNotAvailableError(f"{tp.topic}-{tp.partition} has no live leader")
        return info

    def _here(self) -> BrokerInfo:
        # No address: this broker is asked by id only (its port may not be bound yet, while
        # start-up finishes transactions found prepared).
        return BrokerInfo(self.broker_id, self.config.advertised, 0, "", False)

    # -- what the cluster metrics read -------------------------------------------------------------
    def controller_id(self) -> int:
        leader = self.quorum.leader_id
        return -1 if leader is None else leader

    def offline_partitions(self) -> int:
        """Partitions the cluster has no leader for."""
        return self.quorum.state.offline_partitions()

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


def _topic_of(record: CreateTopic) -> TopicState:
    """The topic a CreateTopic record describes, before (or without) applying it."""
    return TopicState(
        record.name,
        record.topic_id,
        record.internal,
        dict(record.configs),
        tuple(PartitionState(r, r, r[0], 0) for r in record.replicas),
    )
