"""The group coordinator: JoinGroup/SyncGroup rounds, heartbeats, expiry, and offset commits.

A JoinGroup waits (it is Kafka's long-poll) until every known member has
rejoined or the rebalance timeout passes; then one round completes for all of
them at once, the leader receiving the members' metadata. Members that stop
heartbeating for their session timeout are evicted, which starts a rebalance.
A ticker checks those deadlines every ``TICK_S``; nothing else runs in the
background.

Every request is checked against the member id, the generation and (for static
members) the instance id, answering Kafka's error codes so clients rejoin.

Groups of the consumer protocol (KIP-848) are persisted: whatever a heartbeat, an
expiry or a deletion changes of a group's epochs, members and assignments is appended
to its ``__consumer_offsets`` partition (:mod:`streambus.groups.consumer_records`)
and, in a cluster, a heartbeat is answered only once the partition's ISR holds every
record of its group written so far (acks=all, bounded by the offset commit timeout), so
what a member is told survives a failover. The records are replayed when the partition
is loaded, so a restarted or failed-over coordinator carries on with the same members at
the same epochs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from streambus.errors import (
    ERROR_BY_CODE,
    CoordinatorNotAvailableError,
    FencedInstanceIdError,
    GroupIdNotFoundError,
    IllegalGenerationError,
    InconsistentGroupProtocolError,
    InvalidGroupIdError,
    InvalidRequestError,
    InvalidSessionTimeoutError,
    KafkaStorageError,
    MemberIdRequiredError,
    NonEmptyGroupError,
    NotCoordinatorError,
    NotLeaderOrFollowerError,
    RebalanceInProgressError,
    StaleMemberEpochError,
    StreamBusError,
    UnknownMemberIdError,
)
from streambus.groups import consumer_records
from streambus.groups.consumer import ConsumerGroup, ConsumerMember, Heartbeat, HeartbeatAnswer
from streambus.groups.membership import Group, GroupState, JoinResult, Member
from streambus.groups.offsets import OffsetAndMetadata, OffsetStore
from streambus.partitions import OFFSETS_TOPIC, PartitionService
from streambus.structs import TopicPartition

log = logging.getLogger("streambus.groups")

TICK_S = 0.1
# Groups remembered as read_committed at most (a client naming endless group ids in
# OffsetFetch must not grow the set without bound); beyond it lag uses the high watermark.
MAX_GROUPS_SEEN = 100_000


@dataclass(frozen=True, slots=True)
class GroupSettings:
    initial_rebalance_delay_ms: int = 3000  # Kafka's group.initial.rebalance.delay.ms
    min_session_timeout_ms: int = 6000  # group.min.session.timeout.ms
    max_session_timeout_ms: int = 1_800_000  # group.max.session.timeout.ms
    offsets_retention_minutes: int = 7 * 24 * 60  # offsets.retention.minutes
    offsets_topic_partitions: int = 50  # offsets.topic.num.partitions
    offset_metadata_max_bytes: int = 4096  # offset.metadata.max.bytes
    consumer_session_timeout_ms: int = 45_000  # group.consumer.session.timeout.ms
    consumer_heartbeat_interval_ms: int = 5000  # group.consumer.heartbeat.interval.ms


@dataclass(frozen=True, slots=True)
class JoinRequest:
    group_id: str
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: list[tuple[str, bytes]]
    require_known_member_id: bool  # JoinGroup v4+: a new member first gets an id to rejoin with


class GroupCoordinator:
    def __init__(
        self,
        partitions: PartitionService,
        settings: GroupSettings,
        create_offsets_topic: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._partitions = partitions
        self.offsets = OffsetStore(
            partitions, settings.offsets_topic_partitions, create_offsets_topic
        )
        self._groups: dict[str, Group] = {}  # classic protocol
        # The consumer protocol (KIP-848); a group id is in one of the two at most.
        self._consumer_groups: dict[str, ConsumerGroup] = {}
        # What the log holds of each consumer group: key -> value last written (or loaded).
        self._persisted: dict[str, dict[bytes, bytes]] = {}
        self._persisted_members: dict[str, frozenset[str]] = {}
        # Where each consumer group's last write ends, until its ISR is known to hold it.
        self._unreplicated: dict[str, tuple[TopicPartition, int]] = {}
        self._read_committed: set[str] = set()  # groups whose consumers read_committed
        self._ticker: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        loaded = self.offsets.load()
        self._load_consumer_groups()
        for group_id in self.offsets.groups():
            if group_id not in self._consumer_groups:
                self._groups.setdefault(group_id, Group(group_id, state_since_ms=_now_ms()))
        if loaded:
            log.info("loaded %d committed offsets of %d groups", loaded, len(self._groups))

    def _load_consumer_groups(self) -> None:
        """Replay the consumer groups' records the offsets load just read."""
        records = self.offsets.take_group_records()
        if not records:
            return
        counts, ids = self._topic_ids()
        names = {tid: name for name, tid in ids.items()}
        try:
            groups = consumer_records.rebuild(records, names, _loop_time(), _now_ms())
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as exc:
            log.warning("skipping unreadable consumer group records in %s: %s", OFFSETS_TOPIC, exc)
            return
        for group_id, group in groups.items():
            # What the log holds, as this group writes it; only what the refresh below
            # changes (a regex matching other topics now) is written again.
            self._persisted[group_id] = consumer_records.all_records(group, ids)
            self._persisted_members[group_id] = frozenset(group.members)
            # The loaded assignment already reflects the topics as they were: take their
            # shape as it is, so loading alone moves no epoch.
            group.refresh_topics(counts, bump=False)
            self._groups.pop(group_id, None)
            self._consumer_groups[group_id] = group
            self._persist(group)
            log.info(
                "loaded consumer group %r: epoch %d, %d members",
                group_id,
                group.group_epoch,
                len(group.members),
            )

    def _topic_ids(self) -> tuple[dict[str, int], dict[str, uuid.UUID]]:
        return readable_topics(self._partitions)

    def _persist(self, group: ConsumerGroup, member: ConsumerMember | None = None) -> None:
        """Append what changed of ``group`` since it was last written, tombstoning records
        of members gone. With ``member`` and no change of epochs or membership, only that
        member's records are compared (a heartbeat touches its own member alone)."""
        before = self._persisted.get(group.group_id, {})
        _, ids = self._topic_ids()
        group_part = consumer_records.group_records(group)
        same_group = (
            all(before.get(k) == v for k, v in group_part.items())
            and group.members.keys() == self._persisted_members.get(group.group_id, frozenset())
            # a regex no member subscribes with any more is tombstoned by the full pass
            and sum(consumer_records.record_kind(k) in consumer_records.GROUP_LEVEL for k in before)
            == len(group_part)
        )
        if member is not None and same_group:
            now = consumer_records.member_records(group, member, ids)
            changed = {k: v for k, v in now.items() if before.get(k) != v}
            after = {**before, **changed}
            entries: list[tuple[bytes, bytes | None]] = list(changed.items())
        else:
            after = consumer_records.all_records(group, ids)
            entries = [(k, v) for k, v in after.items() if before.get(k) != v]
            entries += [(k, None) for k in before if k not in after]
        if not entries:
            return
        self._unreplicated[group.group_id] = self.offsets.write_records(group.group_id, entries)
        self._persisted[group.group_id] = after
        self._persisted_members[group.group_id] = frozenset(group.members)

    def _forget(self, group_id: str) -> None:
        """Tombstone every record of a consumer group that is deleted or becomes classic."""
        before = self._persisted.pop(group_id, {})
        self._persisted_members.pop(group_id, None)
        self._unreplicated.pop(group_id, None)
        if before:
            self.offsets.write_records(group_id, [(k, None) for k in before])

    def load_partition(self, partition: int) -> None:
        """This broker now leads ``__consumer_offsets`` partition ``partition``: coordinate
        its groups from what the log holds."""
        loaded = self.offsets.load(only=partition)
        self._load_consumer_groups()
        for group_id in self.offsets.groups():
            if (
                self.offsets.partition_for(group_id).partition == partition
                and group_id not in self._consumer_groups
            ):
                self._groups.setdefault(group_id, Group(group_id, state_since_ms=_now_ms()))
        log.info(
            "coordinating the groups of %s partition %d: %d committed offsets",
            OFFSETS_TOPIC,
            partition,
            loaded,
        )

    def unload_partition(self, partition: int) -> None:
        """Another broker leads ``partition`` now: its groups' members are told
        NOT_COORDINATOR and go to find it."""
        self.offsets.unload(partition)
        for group_id in list(self._groups):
            if self.offsets.partition_for(group_id).partition != partition:
                continue
            group = self._groups.pop(group_id)
            for member in group.members.values():
                _fail_waiters(member, NotCoordinatorError.errno)
        for group_id in list(self._consumer_groups):
            if self.offsets.partition_for(group_id).partition == partition:
                # Its members are answered NOT_COORDINATOR and carry on with the new
                # coordinator, which loads the group from the log.
                del self._consumer_groups[group_id]
                self._persisted.pop(group_id, None)
                self._persisted_members.pop(group_id, None)
                self._unreplicated.pop(group_id, None)

    def start(self) -> None:
        self._stopping = False
        self._ticker = asyncio.create_task(self._tick_forever(), name="streambus-groups")

    async def stop(self) -> None:
        self._stopping = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for group in self._groups.values():
            for member in group.members.values():
                _fail_waiters(member, CoordinatorNotAvailableError.errno)

    # -- reads for metrics and admin APIs ------------------------------------------------
    def groups(self) -> Mapping[str, Group]:
        """The classic protocol's groups."""
        return self._groups

    def consumer_groups(self) -> Mapping[str, ConsumerGroup]:
        """The consumer protocol's groups."""
        return self._consumer_groups

    def member_counts(self) -> Iterator[tuple[str, int]]:
        """(group, members) of every live group of either protocol."""
        for group in self._groups.values():
            if group.state is not GroupState.DEAD:
                yield group.group_id, len(group.members)
        for cgroup in self._consumer_groups.values():
            yield cgroup.group_id, len(cgroup.members)

    def rebalance_counts(self) -> Iterator[tuple[str, int]]:
        """(group, rebalances completed since this broker coordinates it), either protocol."""
        for group in self._groups.values():
            yield group.group_id, group.rebalances
        for cgroup in self._consumer_groups.values():
            yield cgroup.group_id, cgroup.rebalances

    def lags(self) -> Iterator[tuple[str, TopicPartition, int]]:
        """(group, partition, end - committed offset) for every committed partition; the
        end is the high watermark, or for a read_committed group the last stable offset
        (what its consumers can reach)."""
        partitions = self._partitions
        topics = partitions.topics()
        for group, tp, offset in self.offsets.committed():
            meta = topics.get(tp.topic)
            if meta is None or tp.partition >= meta.partitions:
                continue
            try:
                if group in self._read_committed:
                    end = partitions.last_stable_offset(tp)
                else:
                    end = partitions.offsets(tp).high_watermark
            except StreamBusError:  # not served here (led by another broker)
                continue
            yield group, tp, max(end - offset, 0)

    def fetch_stable(self, group_id: str) -> set[TopicPartition]:
        """OffsetFetch with require_stable (KIP-447; read_committed consumers send it): the
        group is read_committed from now on (its lag is measured against the last stable
        offset); answers the partitions whose offsets wait on a transaction."""
        if group_id not in self._read_committed and len(self._read_committed) < MAX_GROUPS_SEEN:
            self._read_committed.add(group_id)
        return self.offsets.pending_partitions(group_id)

    # -- JoinGroup ---------------------------------------------------------------------------
    async def join(self, req: JoinRequest) -> JoinResult:
        if not req.group_id:
            raise InvalidGroupIdError("group id must not be empty")
        if self._stopping:
            raise CoordinatorNotAvailableError("the broker is shutting down")
        settings = self.settings
        if (
            not settings.min_session_timeout_ms
            <= req.session_timeout_ms
            <= settings.max_session_timeout_ms
        ):
            raise InvalidSessionTimeoutError(
                f"session timeout {req.session_timeout_ms} ms outside "
                f"[{settings.min_session_timeout_ms}, {settings.max_session_timeout_ms}]"
            )
        cgroup = self._consumer_groups.get(req.group_id)
        if cgroup is not None:
            if cgroup.members:
                raise InconsistentGroupProtocolError(
                    f"group {req.group_id!r} uses the consumer protocol"
                )
            del self._consumer_groups[req.group_id]  # empty: it becomes a classic group
            self._forget(req.group_id)
        group = self._groups.get(req.group_id)
        if group is None:
            if req.member_id:
                raise UnknownMemberIdError(f"group {req.group_id!r} does not exist")
            group = self._groups[req.group_id] = Group(req.group_id, state_since_ms=_now_ms())
        if group.state is GroupState.DEAD:
            raise CoordinatorNotAvailableError(f"group {req.group_id!r} is being deleted")
        known = group.members.get(req.member_id)
        if not group.supports(req.protocol_type, req.protocols) and not (
            known is not None and len(group.members) == 1
        ):
            raise InconsistentGroupProtocolError(
                f"protocols {[n for n, _ in req.protocols]} of type {req.protocol_type!r} "
                f"share nothing with group {req.group_id!r}"
            )
        now = _loop_time()
        if not req.member_id:
            return await self._join_new(group, req, now)
        if req.group_instance_id is not None:
            current = group.static_members.get(req.group_instance_id)
            if current is not None and current != req.member_id:
                raise FencedInstanceIdError(
                    f"instance {req.group_instance_id!r} is member {current}, not {req.member_id}"
                )
        if known is None:
            if req.member_id not in group.pending_members:
                raise UnknownMemberIdError(
                    f"member {req.member_id} is not in group {group.group_id!r}"
                )
            del group.pending_members[req.member_id]
            return await self._add_and_rebalance(group, req, req.member_id, now)
        return await self._rejoin(group, known, req, now)

    async def _join_new(self, group: Group, req: JoinRequest, now: float) -> JoinResult:
        member_id = f"{req.group_instance_id or req.client_id or 'member'}-{uuid.uuid4()}"
        if req.group_instance_id is not None:
            old_id = group.static_members.get(req.group_instance_id)
            old = group.members.get(old_id) if old_id else None
            if old is not None:
                return await self._replace_static(group, old, member_id, req, now)
            return await self._add_and_rebalance(group, req, member_id, now)
        if req.require_known_member_id:
            # KIP-394: the member gets its id first and joins with it, so a
            # client that dies between the two leaves no phantom member behind.
            group.pending_members[member_id] = now + req.session_timeout_ms / 1000
            raise MemberIdRequiredError(f"rejoin with member id {member_id}", member_id)
        return await self._add_and_rebalance(group, req, member_id, now)

    async def _replace_static(
        self, group: Group, old: Member, member_id: str, req: JoinRequest, now: float
    ) -> JoinResult:
        """A static member restarted: it takes over its old identity, often with no rebalance."""
        del group.members[old.member_id]
        _fail_waiters(old, FencedInstanceIdError.errno)
        member = _new_member(req, member_id, now)
        member.assignment = old.assignment
        group.members[member_id] = member
        assert req.group_instance_id is not None
        group.static_members[req.group_instance_id] = member_id
        was_leader = group.leader == old.member_id
        if was_leader:
            group.leader = member_id
        # As Kafka: in a stable group whose selected protocol the member still supports, it
        # gets its previous assignment back with no rebalance; a returning leader is told
        # to skip assigning (JoinGroup v9) and its SyncGroup answers the stored assignment.
        if group.state is GroupState.STABLE and group.protocol in {n for n, _ in req.protocols}:
            log.info(
                "static member %r of group %r rejoined as %s, no rebalance",
                req.group_instance_id,
                group.group_id,
                member_id,
            )
            return self._result(group, member, leader_view=was_leader)._replace(
                skip_assignment=was_leader
            )
        return await self._wait_for_round(group, member, now)

    async def _add_and_rebalance(
        self, group: Group, req: JoinRequest, member_id: str, now: float
    ) -> JoinResult:
        member = _new_member(req, member_id, now)
        group.members[member_id] = member
        if req.group_instance_id is not None:
            group.static_members[req.group_instance_id] = member_id
        if len(group.members) == 1:  # the first member of an empty group sets its type
            group.protocol_type = req.protocol_type
        log.info("member %s joins group %r", member_id, group.group_id)
        return await self._wait_for_round(group, member, now)

    async def _rejoin(
        self, group: Group, member: Member, req: JoinRequest, now: float
    ) -> JoinResult:
        member.last_heartbeat = now
        unchanged = member.same_protocols(req.protocols)
        member.protocols = req.protocols
        member.session_timeout_ms = req.session_timeout_ms
        member.rebalance_timeout_ms = req.rebalance_timeout_ms
        if unchanged and group.state is GroupState.COMPLETING_REBALANCE:
            return self._current_generation(group, member)
        if unchanged and group.state is GroupState.STABLE and member.member_id != group.leader:
            return self._current_generation(group, member)
        return await self._wait_for_round(group, member, now)

    def _current_generation(self, group: Group, member: Member) -> JoinResult:
        return self._result(group, member, leader_view=member.member_id == group.leader)

    async def _wait_for_round(self, group: Group, member: Member, now: float) -> JoinResult:
        waiter: asyncio.Future[JoinResult] = asyncio.get_running_loop().create_future()
        member.join_waiter = waiter
        self._prepare_rebalance(group, now, f"member {member.member_id} joining")
        self._maybe_complete_join(group, now)
        try:
            return await waiter
        finally:
            if member.join_waiter is waiter and not waiter.done():
                waiter.cancel()  # the connection went away mid-join

    def _prepare_rebalance(self, group: Group, now: float, reason: str) -> None:
        if group.state is GroupState.PREPARING_REBALANCE:
            if group.initial_rebalance:
                # A starting group waits a little longer for each new arrival (KIP-134).
                group.rebalance_deadline = min(
                    now + self.settings.initial_rebalance_delay_ms / 1000,
                    now + group.max_rebalance_timeout_ms() / 1000,
                )
            return
        if group.state is GroupState.COMPLETING_REBALANCE:
            for m in group.members.values():
                if m.sync_waiter is not None and not m.sync_waiter.done():
                    m.sync_waiter.set_result((RebalanceInProgressError.errno, b""))
        group.initial_rebalance = group.state is GroupState.EMPTY
        delay_ms = (
            self.settings.initial_rebalance_delay_ms
            if group.initial_rebalance
            else group.max_rebalance_timeout_ms()
        )
        group.rebalance_deadline = now + delay_ms / 1000
        _set_state(group, GroupState.PREPARING_REBALANCE)
        log.info("group %r rebalancing: %s", group.group_id, reason)

    def _maybe_complete_join(self, group: Group, now: float) -> None:
        if group.state is not GroupState.PREPARING_REBALANCE:
            return
        if group.initial_rebalance and now < group.rebalance_deadline:
            return
        if group.all_joined() or now >= group.rebalance_deadline:
            self._complete_join(group)

    def _complete_join(self, group: Group) -> None:
        for member in [m for m in group.members.values() if not m.awaiting_join]:
            log.info(
                "member %s of group %r did not rejoin in time; removed",
                member.member_id,
                group.group_id,
            )
            self._remove(group, member, UnknownMemberIdError.errno)
        group.generation += 1
        if not group.members:
            # Like Kafka, an empty group keeps its protocol type (described as "consumer").
            group.protocol = group.leader = None
            _set_state(group, GroupState.EMPTY)
            return
        group.protocol = group.select_protocol()
        group.rebalances += 1
        if group.leader not in group.members:
            group.leader = next(iter(group.members))
        _set_state(group, GroupState.COMPLETING_REBALANCE)
        now = _loop_time()
        for member in group.members.values():
            member.assignment = b""
            member.last_heartbeat = now
            waiter = member.join_waiter
            member.join_waiter = None
            if waiter is not None and not waiter.done():
                waiter.set_result(
                    self._result(group, member, leader_view=member.member_id == group.leader)
                )
        log.info(
            "group %r generation %d: %d members, protocol %s, leader %s",
            group.group_id,
            group.generation,
            len(group.members),
            group.protocol,
            group.leader,
        )

    def _result(self, group: Group, member: Member, *, leader_view: bool) -> JoinResult:
        protocol = group.protocol or ""
        members = (
            [
                (m.member_id, m.group_instance_id, m.metadata(protocol))
                for m in group.members.values()
            ]
            if leader_view
            else []
        )
        return JoinResult(
            0,
            group.generation,
            group.protocol_type,
            group.protocol,
            group.leader or "",
            member.member_id,
            members,
        )

    # -- SyncGroup, Heartbeat, LeaveGroup -----------------------------------------------------
    def _member(
        self, group_id: str, member_id: str, instance_id: str | None, generation: int | None
    ) -> tuple[Group, Member]:
        group = self._groups.get(group_id)
        if group is None or group.state is GroupState.DEAD:
            raise UnknownMemberIdError(f"group {group_id!r} does not exist")
        if instance_id is not None:
            current = group.static_members.get(instance_id)
            if current is not None and current != member_id:
                raise FencedInstanceIdError(f"instance {instance_id!r} is member {current}")
        member = group.members.get(member_id)
        if member is None:
            raise UnknownMemberIdError(f"member {member_id} is not in group {group_id!r}")
        if generation is not None and generation != group.generation:
            raise IllegalGenerationError(
                f"generation {generation} of group {group_id!r} is over; it is {group.generation}"
            )
        return group, member

    async def sync(
        self,
        group_id: str,
        *,
        generation: int,
        member_id: str,
        instance_id: str | None,
        protocol_type: str | None,
        protocol: str | None,
        assignments: Sequence[tuple[str, bytes]],
    ) -> bytes:
        group, member = self._member(group_id, member_id, instance_id, generation)
        if (protocol_type is not None and protocol_type != group.protocol_type) or (
            protocol is not None and protocol != group.protocol
        ):
            raise InconsistentGroupProtocolError(
                f"group {group_id!r} uses {group.protocol_type}/{group.protocol}"
            )
        member.last_heartbeat = _loop_time()
        if group.state is GroupState.PREPARING_REBALANCE:
            raise RebalanceInProgressError()
        if group.state is GroupState.STABLE:
            return member.assignment
        if member_id != group.leader:
            if assignments:
                raise InvalidRequestError(
                    f"member {member_id} sent assignments but the leader of group {group_id!r} "
                    f"is {group.leader}"
                )
            waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
            member.sync_waiter = waiter
            error, assignment = await waiter
            if error:
                raise _error_for(error)
            return assignment
        for target, assignment in assignments:
            if target in group.members:
                group.members[target].assignment = assignment
        _set_state(group, GroupState.STABLE)
        for other in group.members.values():
            if other.sync_waiter is not None and not other.sync_waiter.done():
                other.sync_waiter.set_result((0, other.assignment))
            other.sync_waiter = None
        return member.assignment

    def heartbeat(
        self, group_id: str, generation: int, member_id: str, instance_id: str | None
    ) -> None:
        group, member = self._member(group_id, member_id, instance_id, generation)
        member.last_heartbeat = _loop_time()
        if group.state is GroupState.PREPARING_REBALANCE:
            raise RebalanceInProgressError()

    def leave(self, group_id: str, member_id: str, instance_id: str | None) -> None:
        group = self._groups.get(group_id)
        if group is None:
            raise UnknownMemberIdError(f"group {group_id!r} does not exist")
        if instance_id is not None and not member_id:
            member_id = group.static_members.get(instance_id, "")
        group, member = self._member(group_id, member_id, instance_id, None)
        log.info("member %s leaves group %r", member_id, group_id)
        self._remove(group, member, UnknownMemberIdError.errno)
        self._after_departure(group, f"member {member_id} left")

    def _remove(self, group: Group, member: Member, error: int) -> None:
        group.members.pop(member.member_id, None)
        if (
            member.group_instance_id is not None
            and group.static_members.get(member.group_instance_id) == member.member_id
        ):
            del group.static_members[member.group_instance_id]
        _fail_waiters(member, error)

    def _after_departure(self, group: Group, reason: str) -> None:
        now = _loop_time()
        if group.state is GroupState.PREPARING_REBALANCE:
            self._maybe_complete_join(group, now)
        elif not group.members:
            group.generation += 1
            group.protocol = group.leader = None
            _set_state(group, GroupState.EMPTY)
        else:
            self._prepare_rebalance(group, now, reason)

    # -- time ----------------------------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(_loop_time())
            except Exception:
                log.exception("group coordinator tick failed")

    def tick(self, now: float) -> None:
        for group in list(self._groups.values()):
            for member_id, expiry in list(group.pending_members.items()):
                if now >= expiry:
                    del group.pending_members[member_id]
            expired = [
                m
                for m in group.members.values()
                if not m.awaiting_join and now - m.last_heartbeat > m.session_timeout_ms / 1000
            ]
            for member in expired:
                log.info(
                    "member %s of group %r sent no heartbeat for %d ms; evicted",
                    member.member_id,
                    group.group_id,
                    member.session_timeout_ms,
                )
                self._remove(group, member, UnknownMemberIdError.errno)
            if expired:
                self._after_departure(group, f"{len(expired)} member(s) expired")
            self._maybe_complete_join(group, now)
        timeout_ms = self.settings.consumer_session_timeout_ms
        for cgroup in self._consumer_groups.values():
            gone = cgroup.expired(now, timeout_ms)
            for cmember, reason in gone:
                log.info(
                    "member %s of consumer group %r %s; removed",
                    cmember.member_id,
                    cgroup.group_id,
                    reason,
                )
                cgroup.remove(cmember, reason)
                if not cgroup.members:
                    cgroup.state_since_ms = _now_ms()
            if gone:
                try:
                    self._persist(cgroup)
                except StreamBusError as exc:  # written on a later tick or heartbeat
                    log.warning("consumer group %r not persisted: %s", cgroup.group_id, exc)

    def expire_offsets(self, now_ms: int) -> int:
        """Drop the offsets of groups that have been empty for offsets.retention.minutes."""
        horizon = self.settings.offsets_retention_minutes * 60_000
        removed = 0
        for group in list(self._groups.values()):
            if group.state is GroupState.EMPTY and now_ms - group.state_since_ms >= horizon:
                removed += self.offsets.delete(group.group_id)
                del self._groups[group.group_id]
                log.info(
                    "group %r empty for %d min: offsets expired", group.group_id, horizon // 60_000
                )
        for cgroup in list(self._consumer_groups.values()):
            if not cgroup.members and now_ms - cgroup.state_since_ms >= horizon:
                removed += self.offsets.delete(cgroup.group_id)
                del self._consumer_groups[cgroup.group_id]
                self._forget(cgroup.group_id)
        return removed

    # -- offsets ----------------------------------------------------------------------------------
    def commit(
        self,
        group_id: str,
        generation: int,
        member_id: str,
        instance_id: str | None,
        offsets: Mapping[TopicPartition, OffsetAndMetadata],
    ) -> tuple[TopicPartition, int] | None:
        """Commit; answers where the ISR must reach for it to survive (see OffsetStore)."""
        cgroup = self._consumer_groups.get(group_id)
        if cgroup is not None:
            self._check_consumer_commit(cgroup, generation, member_id)
            return self.offsets.commit(group_id, offsets)
        group = self._groups.get(group_id)
        if generation < 0 and not member_id:
            # A consumer that assigns its own partitions commits without membership,
            # which only an empty group allows.
            if group is not None and group.members:
                raise UnknownMemberIdError(f"group {group_id!r} has members; commit as one of them")
            if group is None:
                group = self._groups[group_id] = Group(group_id, state_since_ms=_now_ms())
        else:
            group, member = self._member(group_id, member_id, instance_id, generation)
            member.last_heartbeat = _loop_time()
            if group.state is GroupState.COMPLETING_REBALANCE:
                raise RebalanceInProgressError()
        return self.offsets.commit(group_id, offsets)

    def commit_transactional(
        self,
        group_id: str,
        producer_id: int,
        producer_epoch: int,
        member: tuple[int, str, str | None] | None,
        offsets: Mapping[TopicPartition, OffsetAndMetadata],
    ) -> tuple[TopicPartition, int] | None:
        """TxnOffsetCommit: offsets pending until the transaction's marker. ``member``:
        (generation, member id, instance id) when the client named them (v3+), checked as
        OffsetCommit checks them."""
        cgroup = self._consumer_groups.get(group_id)
        if cgroup is not None:
            if member is not None and member[0] >= 0:
                self._check_consumer_commit(cgroup, member[0], member[1])
        elif member is not None and member[0] >= 0:
            self._member(group_id, member[1], member[2], member[0])
        elif group_id not in self._groups:
            self._groups[group_id] = Group(group_id, state_since_ms=_now_ms())
        return self.offsets.commit_transactional(group_id, producer_id, producer_epoch, offsets)

    def complete_transaction(self, producer_id: int, commit: bool, partition: int) -> None:
        """A transaction marker was written to ``__consumer_offsets`` partition ``partition``."""
        applied = self.offsets.complete_transaction(producer_id, commit, partition)
        if applied:
            log.debug("producer %d committed %d transactional offsets", producer_id, applied)

    # -- the consumer protocol (KIP-848) ---------------------------------------------------
    def consumer_heartbeat(self, hb: Heartbeat, topics: Mapping[str, int]) -> HeartbeatAnswer:
        """ConsumerGroupHeartbeat; ``topics``: every topic's partition count."""
        if not hb.group_id:
            raise InvalidGroupIdError("group id must not be empty")
        if self._stopping:
            raise CoordinatorNotAvailableError("the broker is shutting down")
        group = self._consumer_groups.get(hb.group_id)
        if group is None:
            classic = self._groups.get(hb.group_id)
            if classic is not None and classic.members:
                raise GroupIdNotFoundError(f"group {hb.group_id!r} is not a consumer group")
            if hb.member_epoch != 0:
                # Not here (a new coordinator, or the group expired): the member rejoins.
                raise UnknownMemberIdError(f"consumer group {hb.group_id!r} has no members")
            # An empty classic group (its offsets kept) becomes a consumer group.
            self._groups.pop(hb.group_id, None)
            group = self._consumer_groups[hb.group_id] = ConsumerGroup(
                hb.group_id, state_since_ms=_now_ms()
            )
        answer = group.heartbeat(hb, topics, _loop_time())
        if not group.members:
            group.state_since_ms = _now_ms()
        # Written before the answer goes out: what a member is told survives a restart.
        member = group.members.get(answer.member_id)
        try:
            self._persist(group, member)
        except KafkaStorageError as exc:
            # Kafka's answer to a coordinator that cannot write: find the coordinator again.
            # What changed stays in memory; the next heartbeat or tick writes it.
            _unsent(member)
            raise NotCoordinatorError(f"consumer group {hb.group_id!r} not written: {exc}") from exc
        return answer

    async def wait_replicated(self, group_id: str, member_id: str, timeout_s: float) -> None:
        """Return once the ISR of the group's ``__consumer_offsets`` partition holds every
        record of the group written so far (a heartbeat that wrote nothing itself still waits
        for what another did: Kafka's coordinator answers no read ahead of its last write).
        As Kafka's GroupCoordinatorService answers: a timeout or too small an ISR is
        COORDINATOR_NOT_AVAILABLE, leadership moved away NOT_COORDINATOR; the member, not
        told its answer, is sent its whole assignment on its next heartbeat."""
        written = self._unreplicated.get(group_id)
        if written is None:
            return
        try:
            await self._partitions.wait_replicated(*written, timeout_s)
        except StreamBusError as exc:
            group = self._consumer_groups.get(group_id)
            if group is not None:
                _unsent(group.members.get(member_id))
            if isinstance(exc, NotLeaderOrFollowerError):
                raise NotCoordinatorError(str(exc)) from exc
            raise CoordinatorNotAvailableError(
                f"consumer group {group_id!r} not replicated: {exc}"
            ) from exc
        if self._unreplicated.get(group_id) == written:
            del self._unreplicated[group_id]

    def _check_consumer_commit(self, group: ConsumerGroup, epoch: int, member_id: str) -> None:
        """An OffsetCommit's member epoch (sent as its generation) against the member's.
        A commit from an epoch it has moved past is accepted, as Kafka 4 does for a member
        still holding the partitions; an epoch ahead of the member's is stale."""
        if epoch < 0 and not member_id:
            if group.members:
                raise UnknownMemberIdError(
                    f"group {group.group_id!r} has members; commit as one of them"
                )
            return
        member = group.members.get(member_id)
        if member is None:
            raise UnknownMemberIdError(f"member {member_id} is not in group {group.group_id!r}")
        member.last_heartbeat = _loop_time()
        if epoch > member.member_epoch:
            raise StaleMemberEpochError(
                f"member {member_id} is at epoch {member.member_epoch}, not {epoch}"
            )

    def committed(self, group_id: str) -> Mapping[TopicPartition, OffsetAndMetadata]:
        """The group's committed offsets (OffsetFetch)."""
        return self.offsets.fetch(group_id)

    def delete_group(self, group_id: str) -> None:
        cgroup = self._consumer_groups.get(group_id)
        if cgroup is not None:
            if cgroup.members:
                raise NonEmptyGroupError(f"group {group_id!r} has {len(cgroup.members)} members")
            cgroup.dead = True
            self.offsets.delete(group_id)
            del self._consumer_groups[group_id]
            self._forget(group_id)
            log.info("deleted consumer group %r", group_id)
            return
        group = self._groups.get(group_id)
        if group is None or group.state is GroupState.DEAD:
            raise GroupIdNotFoundError(f"group {group_id!r} does not exist")
        if group.state is not GroupState.EMPTY:
            raise NonEmptyGroupError(f"group {group_id!r} has {len(group.members)} members")
        _set_state(group, GroupState.DEAD)
        self.offsets.delete(group_id)
        del self._groups[group_id]
        log.info("deleted group %r", group_id)


def _new_member(req: JoinRequest, member_id: str, now: float) -> Member:
    return Member(
        member_id=member_id,
        group_instance_id=req.group_instance_id,
        client_id=req.client_id,
        client_host=req.client_host,
        session_timeout_ms=req.session_timeout_ms,
        rebalance_timeout_ms=req.rebalance_timeout_ms,
        protocol_type=req.protocol_type,
        protocols=req.protocols,
        last_heartbeat=now,
    )


def _fail_waiters(member: Member, error: int) -> None:
    if member.join_waiter is not None and not member.join_waiter.done():
        member.join_waiter.set_result(JoinResult(error, -1, None, None, "", member.member_id, []))
    if member.sync_waiter is not None and not member.sync_waiter.done():
        member.sync_waiter.set_result((error, b""))


def _unsent(member: ConsumerMember | None) -> None:
    """The member was not answered: its next answer carries its whole assignment."""
    if member is not None:
        member.sent = None


def _error_for(code: int) -> StreamBusError:
    return ERROR_BY_CODE.get(code, StreamBusError)()


def _set_state(group: Group, state: GroupState) -> None:
    group.state = state
    group.state_since_ms = _now_ms()


def _loop_time() -> float:
    return time.monotonic()


def _now_ms() -> int:
    return int(time.time() * 1000)


def readable_topics(partitions: PartitionService) -> tuple[dict[str, int], dict[str, uuid.UUID]]:
    """Partition counts and ids of the topics a consumer group can read (not internal)."""
    counts: dict[str, int] = {}
    ids: dict[str, uuid.UUID] = {}
    for name, meta in partitions.topics().items():
        if meta.internal:
            continue
        counts[name] = meta.partitions
        if meta.topic_id is not None:
            ids[name] = meta.topic_id
    return counts, ids
