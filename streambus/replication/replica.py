"""One partition's replication state on this broker (Kafka's ``Partition``): its role, the
leader epoch it serves under, and, when it leads, each follower's progress, the high
watermark, produce requests waiting for it, and append times for replication latency.

Everything here runs on the event loop and is plain bookkeeping: the partition service
feeds it appends and follower fetches and acts on what it answers; the replica manager
sets roles and the ISR from the cluster metadata.

Kafka's rules, kept as they are:
- A follower's progress is the offset of its last fetch: every record below it is copied.
- It is *caught up* when it fetched at or past the leader's end at that moment; a fetch
  that reached where the leader ended at the follower's previous fetch proves it was
  caught up then (``Replica.updateFetchState``'s lastCaughtUpTime).
- The high watermark is the smallest end over the ISR and the followers being added to it,
  so a record counts as committed only once every replica that may become leader has it.
- An ISR member not caught up for ``replica.lag.time.max.ms`` is out of sync; a follower
  whose progress reached the high watermark and the current epoch's start may rejoin.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
from collections import deque
from dataclasses import dataclass, field

from streambus.errors import StreamBusError
from streambus.structs import TopicPartition


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


@dataclass(slots=True)
class FollowerProgress:
    log_end: int = -1  # offset of its last fetch; -1 before it fetched from this leader
    caught_up_s: float = 0.0  # monotonic time it last had all the leader had
    last_fetch_s: float = 0.0
    leader_end_at_last_fetch: int = -1


@dataclass(eq=False)
class Replica:
    tp: TopicPartition
    broker_id: int  # this broker
    role: Role
    leader_id: int
    leader_epoch: int
    partition_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    high_watermark: int
    epoch_start_offset: int = 0  # where this leader's epoch began in the log
    followers: dict[int, FollowerProgress] = field(default_factory=dict)
    pending_isr: set[int] = field(default_factory=set)  # expansions submitted, not applied
    isr_change_in_flight: bool = False
    # acks=all requests waiting for the high watermark: (end offset, sequence, future)
    _waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _sequence: int = 0
    # (end offset, monotonic append time) of batches not yet covered by the high watermark
    _appends: deque[tuple[int, float]] = field(default_factory=deque)

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def replicated(self) -> bool:
        return len(self.replicas) > 1

    def start_leading(self, now: float) -> None:
        """Followers start as caught up now, as Kafka's new leader counts them: the ISR the
        controller gave it is believed until ``replica.lag.time.max.ms`` says otherwise."""
        self.followers = {
            b: FollowerProgress(caught_up_s=now) for b in self.replicas if b != self.broker_id
        }
        self.pending_isr.clear()
        self.isr_change_in_flight = False

    def set_members(self, replicas: tuple[int, ...], isr: tuple[int, ...], epoch: int) -> None:
        """The metadata changed the ISR (or replicas) under the same leader epoch."""
        self.replicas, self.isr, self.partition_epoch = replicas, isr, epoch
        self.pending_isr -= set(isr)
        for b in replicas:
            if b != self.broker_id and b not in self.followers:
                self.followers[b] = FollowerProgress()
        for b in list(self.followers):
            if b not in replicas:
                del self.followers[b]

    # -- follower progress (leader side) -----------------------------------------------------
    def follower_fetched(self, broker: int, offset: int, leader_end: int, now: float) -> None:
        progress = self.followers.get(broker)
        if progress is None:
            return
        if offset >= leader_end:
            progress.caught_up_s = now
        elif offset >= progress.leader_end_at_last_fetch >= 0:
            progress.caught_up_s = max(progress.caught_up_s, progress.last_fetch_s)
        progress.log_end = offset
        progress.last_fetch_s = now
        progress.leader_end_at_last_fetch = leader_end

    def high_watermark_at(self, leader_end: int) -> int:
        """The smallest end over the ISR and the followers being added to it."""
        end = leader_end
        for b in (*self.isr, *self.pending_isr):
            if b == self.broker_id:
                continue
            progress = self.followers.get(b)
            end = min(end, progress.log_end if progress is not None else -1)
        return end

    def out_of_sync(self, now: float, max_lag_s: float) -> list[int]:
        """ISR followers not caught up for ``max_lag_s``."""
        return [
            b
            for b in self.isr
            if b != self.broker_id
            and (p := self.followers.get(b)) is not None
            and now - p.caught_up_s > max_lag_s
        ]

    def may_join(self, broker: int) -> bool:
        """A follower outside the ISR whose copy reached the high watermark and this epoch."""
        if broker in self.isr or broker in self.pending_isr or broker not in self.replicas:
            return False
        progress = self.followers.get(broker)
        return (
            progress is not None
            and progress.log_end >= self.high_watermark
            and progress.log_end >= self.epoch_start_offset
        )

    def lag_messages(self, leader_end: int) -> int:
        """How far the slowest follower is behind this leader's end (0 without followers)."""
        ends = [p.log_end for p in self.followers.values()]
        return max((leader_end - max(e, 0) for e in ends), default=0)

    # -- acks=all waits and replication latency ---------------------------------------------
    def wait_for(self, end: int) -> asyncio.Future[None]:
        """A future done once the high watermark reaches ``end``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sequence += 1
        bisect.insort(self._waiters, (end, self._sequence, future), key=lambda w: (w[0], w[1]))
        return future

    def release(self) -> None:
        """Complete the waits the high watermark now covers."""
        hw = self.high_watermark
        done = 0
        for end, _, future in self._waiters:
            if end > hw:
                break
            done += 1
            if not future.done():
                future.set_result(None)
        if done:
            del self._waiters[:done]

    def fail_waiters(self, error: StreamBusError) -> None:
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a waiter that timed out never reads it
        self._waiters.clear()
        self._appends.clear()

    def forget_waiter(self, future: asyncio.Future[None]) -> None:
        self._waiters = [w for w in self._waiters if w[2] is not future]

    def appended(self, end: int, now: float) -> None:
        if self.replicated:
            self._appends.append((end, now))

    def covered(self, now: float) -> list[float]:
        """Seconds from append to commit of the batches the high watermark now covers."""
        out: list[float] = []
        appends = self._appends
        while appends and appends[0][0] <= self.high_watermark:
            out.append(now - appends.popleft()[1])
        return out
