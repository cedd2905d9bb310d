"""Roles from the cluster metadata, and the ISR kept true (Kafka's ReplicaManager and
AlterPartitionManager).

On every change the quorum applies, each partition with a replica here is made leader or
follower as the metadata says (a new leader epoch: the partition service changes role, a
fetcher for the new leader takes it over and truncates first). As leader, this broker
asks the controller to take out of the ISR followers not caught up for
``replica.lag.time.max.ms`` (checked every half of it) and to add back those that caught
up, with Kafka's AlterPartition (one in flight per partition, compare-and-set on both
epochs, so a stale leader's request fails instead of overwriting a newer decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from streambus.cluster import AlterPartition, Applied, ClusterState, Quorum
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import PartitionService
from streambus.replication.fetcher import FetcherSettings, ReplicaFetcher
from streambus.replication.replica import Replica
from streambus.structs import TopicPartition

log = logging.getLogger("streambus.replication")

# Told (tp, leads) when this broker starts or stops leading a partition.
LeadershipListener = Callable[[TopicPartition, bool], None]


class ReplicaManager:
    def __init__(
        self,
        service: PartitionService,
        quorum: Quorum,
        telemetry: BrokerTelemetry,
        settings: FetcherSettings,
        *,
        lag_time_max_ms: int,
    ) -> None:
        self._service = service
        self._quorum = quorum
        self._telemetry = telemetry
        self._settings = settings
        self._broker_id = settings.broker_id
        self._lag_s = lag_time_max_ms / 1000
        self._fetchers: dict[int, ReplicaFetcher] = {}
        self._listeners: list[LeadershipListener] = []
        self._checker: asyncio.Task[None] | None = None
        self._alters: set[asyncio.Task[None]] = set()
        service.on_may_join = self._expand

    def on_leadership(self, listener: LeadershipListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._quorum.on_change(self._changed)
        self.sync(self._quorum.state)
        self._checker = asyncio.create_task(self._check_forever(), name="streambus-isr-check")

    async def stop(self) -> None:
        tasks = [t for t in (self._checker, *self._alters) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._checker = None
        for fetcher in self._fetchers.values():
            await fetcher.stop()
        self._fetchers.clear()

    # -- roles ------------------------------------------------------------------------------
    def _changed(self, applied: Applied) -> None:
        if applied.changed:
            self.sync(applied.state)

    def sync(self, state: ClusterState) -> None:
        """Every partition hosted here takes the role the metadata gives it."""
        service, me = self._service, self._broker_id
        local = service.topics()
        hosted: set[TopicPartition] = set()
        for topic in state.topics.values():
            meta = local.get(topic.name)
            if meta is None or meta.topic_id != topic.topic_id:
                continue  # no local logs (yet): reconcile makes them, the next change finds them
            for index, p in enumerate(topic.partitions):
                if me not in p.replicas or index >= meta.partitions:
                    continue
                tp = TopicPartition(topic.name, index)
                hosted.add(tp)
                current = service.replica(tp)
                was_leader = current is not None and current.is_leader
                if p.leader == me:
                    if (
                        current is None
                        or not current.is_leader
                        or current.leader_epoch != p.leader_epoch
                        or current.partition_epoch != p.partition_epoch
                    ):
                        service.become_leader(
                            tp,
                            broker_id=me,
                            leader_epoch=p.leader_epoch,
                            partition_epoch=p.partition_epoch,
                            replicas=p.replicas,
                            isr=p.isr,
                        )
                        self._unfollow(tp)
                        if not was_leader:
                            self._tell(tp, True)
                elif (
                    current is None
                    or current.is_leader
                    or current.leader_epoch != p.leader_epoch
                    or current.leader_id != p.leader
                    or current.partition_epoch != p.partition_epoch
                ):
                    if (
                        current is not None
                        and not current.is_leader
                        and current.leader_epoch == p.leader_epoch
                        and current.leader_id == p.leader
                    ):
                        current.set_members(p.replicas, p.isr, p.partition_epoch)
                        continue
                    service.become_follower(
                        tp,
                        broker_id=me,
                        leader_id=p.leader,
                        leader_epoch=p.leader_epoch,
                        partition_epoch=p.partition_epoch,
                        replicas=p.replicas,
                        isr=p.isr,
                    )
                    self._unfollow(tp)
                    if p.leader >= 0:
                        self._fetcher(p.leader).add(tp, p.leader_epoch)
                    if was_leader:
                        self._tell(tp, False)
        for tp in [tp for tp in service.replicas() if tp not in hosted]:
            replica = service.replica(tp)
            service.drop_replica(tp)
            self._unfollow(tp)
            if replica is not None and replica.is_leader:
                self._tell(tp, False)

    def _tell(self, tp: TopicPartition, leads: bool) -> None:
        for listener in self._listeners:
            try:
                listener(tp, leads)
            except Exception:
                log.exception("leadership listener failed for %s", tp)

    def _fetcher(self, leader: int) -> ReplicaFetcher:
        fetcher = self._fetchers.get(leader)
        if fetcher is None:
            fetcher = self._fetchers[leader] = ReplicaFetcher(
                leader, lambda: self._address(leader), self._service, self._settings
            )
        return fetcher

    def _address(self, broker: int) -> tuple[str, int] | None:
        info = self._quorum.state.brokers.get(broker)
        return None if info is None else (info.host, info.port)

    def _unfollow(self, tp: TopicPartition) -> None:
        for fetcher in self._fetchers.values():
            fetcher.remove(tp)

    # -- the ISR ----------------------------------------------------------------------------
    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self._lag_s / 2, 0.05))
            self.check_isr(time.monotonic())

    def check_isr(self, now: float) -> None:
        """Shrink the ISR of every partition led here by its out-of-sync followers."""
        for replica in list(self._service.replicas().values()):
            if not replica.is_leader or replica.isr_change_in_flight:
                continue
            lagging = replica.out_of_sync(now, self._lag_s)
            if lagging:
                isr = tuple(b for b in replica.isr if b not in lagging)
                self._alter(replica, isr, "shrink", lagging)

    def _expand(self, replica: Replica, follower: int) -> None:
        if replica.isr_change_in_flight:
            return
        replica.pending_isr.add(follower)
        self._alter(replica, (*replica.isr, follower), "expand", [follower])

    def _alter(self, replica: Replica, isr: tuple[int, ...], kind: str, who: list[int]) -> None:
        replica.isr_change_in_flight = True
        record = AlterPartition(
            replica.tp.topic,
            replica.tp.partition,
            self._broker_id,
            replica.leader_epoch,
            replica.partition_epoch,
            isr,
        )
        task = asyncio.create_task(self._submit(replica, record, kind, who))
        self._alters.add(task)
        task.add_done_callback(self._alters.discard)

    async def _submit(
        self, replica: Replica, record: AlterPartition, kind: str, who: list[int]
    ) -> None:
        tp = replica.tp
        try:
            result = await self._quorum.submit(record)
        except Exception as exc:  # no controller reachable: the next check tries again
            log.warning("ISR %s of %s (%s) not submitted: %s", kind, tp, who, exc)
            replica.pending_isr.difference_update(who)
            return
        finally:
            replica.isr_change_in_flight = False
        if result.ok:
            self._telemetry.isr_changed(kind)
            log.info(
                "ISR of %s: %s %s -> %s",
                tp,
                "removed" if kind == "shrink" else "added",
                who,
                list(record.isr),
            )
        else:
            replica.pending_isr.difference_update(who)
            log.info("ISR %s of %s (%s) refused: %s", kind, tp, who, result.message)

    # -- what the metrics read ----------------------------------------------------------------
    def led(self) -> Iterable[Replica]:
        return (r for r in self._service.replicas().values() if r.is_leader)
