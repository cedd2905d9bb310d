"""Fetch sessions (KIP-227): the broker remembers what a consumer fetches, so an
incremental request names only what changed and its response only what is new.

A client opens a session with a full request (``session_id`` 0, epoch 0); the
response carries the new session's id (0: none was cached, keep sending full
requests). Each following request sends that id and the next epoch (1, 2, ...);
it names only partitions added or whose fetch offset changed, and forgets
partitions in ``forgotten_topics_data``; the broker reads every partition of
the session and answers only those with records, an error, or a high
watermark, last stable offset or log start offset other than it last sent.
Epoch -1 (or a request version below 7) fetches without a session; a full
request naming a session closes it.

An unknown session is ``FETCH_SESSION_ID_NOT_FOUND`` (70) and an epoch other
than expected ``INVALID_FETCH_SESSION_EPOCH`` (71): the client starts again
with a full request.

The cache holds at most ``max.incremental.fetch.session.cache.slots``
sessions. A new session takes a free slot, else a session unused for
``EVICTION_S``, else the least valuable one (a consumer's before a follower's,
then the one with fewest partitions) if the new one is worth more; otherwise it
is not cached and the client goes on with full requests (Kafka's rules).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from streambus.errors import FetchSessionIdNotFoundError, InvalidFetchSessionEpochError

INVALID_SESSION_ID = 0
INITIAL_EPOCH = 0  # a full request that opens a session
FINAL_EPOCH = -1  # a full request without a session (or closing one)
SESSIONS_FROM_VERSION = 7
EVICTION_S = 120.0  # Kafka's min.incremental.fetch.session.eviction.ms
_UNSENT = -2  # no value sent yet: the partition is answered in the next response


class FetchPartition(NamedTuple):
    topic: str
    partition: int
    offset: int
    max_bytes: int
    leader_epoch: int  # current_leader_epoch (v9+), -1 when not given


class PartitionResult(Protocol):
    """What the session compares of a partition's read (fetch.py's ``_Read``)."""

    topic: str
    partition: int
    error: int
    high_watermark: int
    last_stable_offset: int
    log_start_offset: int

    @property
    def records(self) -> Any: ...


R = TypeVar("R", bound=PartitionResult)


@dataclass(slots=True)
class _Cached:
    offset: int
    max_bytes: int
    leader_epoch: int
    high_watermark: int = _UNSENT
    last_stable_offset: int = _UNSENT
    log_start_offset: int = _UNSENT

    def must_answer(self, read: PartitionResult) -> bool:
        """True when ``read`` tells the client something new; remembers what was sent."""
        changed = (
            read.high_watermark != self.high_watermark
            or read.last_stable_offset != self.last_stable_offset
            or read.log_start_offset != self.log_start_offset
        )
        self.high_watermark = read.high_watermark
        self.last_stable_offset = read.last_stable_offset
        self.log_start_offset = read.log_start_offset
        return changed or bool(read.error) or bool(read.records)


@dataclass(slots=True)
class FetchSession:
    id: int
    privileged: bool  # a follower's: worth more than a consumer's when slots are short
    partitions: dict[tuple[str, int], _Cached]
    last_used: float
    epoch: int = 1  # the epoch the next request must carry

    def value(self) -> tuple[bool, int]:
        return self.privileged, len(self.partitions)


@dataclass(slots=True)
class FetchContext:
    """One Fetch request's view of its session: what to read, and what to answer."""

    wanted: list[FetchPartition]
    session_id: int = INVALID_SESSION_ID  # what the response says
    incremental: bool = False
    session: FetchSession | None = None
    # A full request that may open a session: the cache to open it in
    _opener: Callable[[bool, dict[tuple[str, int], _Cached]], int] | None = None
    _privileged: bool = False
    _cached: dict[tuple[str, int], _Cached] = field(default_factory=dict)

    def answer(self, reads: Sequence[R]) -> list[R]:
        """The reads the response carries; opens the session of a full request."""
        if self.incremental:
            assert self.session is not None
            parts = self.session.partitions
            out = []
            for read in reads:
                key = (read.topic, read.partition)
                cached = parts.get(key)
                if cached is None or cached.must_answer(read):
                    out.append(read)
                    if read.records:
                        # Kafka's fairness rule: a partition that returned data moves to the
                        # end, so one busy partition cannot take every response's byte budget.
                        parts[key] = parts.pop(key)
            return out
        if self._opener is not None:
            for read in reads:
                cached = self._cached.get((read.topic, read.partition))
                if cached is not None:
                    cached.must_answer(read)
            self.session_id = self._opener(self._privileged, self._cached)
        return list(reads)


class FetchSessionCache:
    def __init__(self, slots: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self._clock = clock
        self._sessions: dict[int, FetchSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def context(
        self,
        version: int,
        session_id: int,
        epoch: int,
        wanted: list[FetchPartition],
        forgotten: Iterable[tuple[str, int]],
        *,
        privileged: bool = False,
    ) -> FetchContext:
        """The context for a request; raises FetchSessionIdNotFoundError (70) or
        InvalidFetchSessionEpochError (71)."""
        if version < SESSIONS_FROM_VERSION:
            return FetchContext(wanted)
        if epoch in (INITIAL_EPOCH, FINAL_EPOCH):
            if session_id != INVALID_SESSION_ID:
                self._sessions.pop(session_id, None)  # a full request closes its session
            if epoch == FINAL_EPOCH:
                return FetchContext(wanted)
            opening = {(w.topic, w.partition): _Cached(*w[2:]) for w in wanted}
            return FetchContext(wanted, _opener=self._open, _privileged=privileged, _cached=opening)
        session = self._sessions.get(session_id)
        if session is None:
            raise FetchSessionIdNotFoundError(
                f"fetch session {session_id} is not (or no longer) cached"
            )
        if session.epoch != epoch:
            raise InvalidFetchSessionEpochError(
                f"fetch session {session_id} expects epoch {session.epoch}, not {epoch}"
            )
        parts = session.partitions
        for w in wanted:
            cached = parts.get((w.topic, w.partition))
            if cached is None:
                parts[(w.topic, w.partition)] = _Cached(*w[2:])
            else:
                cached.offset, cached.max_bytes, cached.leader_epoch = w[2:]
        for key in forgotten:
            parts.pop(key, None)
        session.epoch = session.epoch + 1 if session.epoch < 2**31 - 1 else 1
        session.last_used = self._clock()
        every = [
            FetchPartition(t, p, c.offset, c.max_bytes, c.leader_epoch)
            for (t, p), c in parts.items()
        ]
        return FetchContext(every, session.id, incremental=True, session=session)

    def _open(self, privileged: bool, partitions: dict[tuple[str, int], _Cached]) -> int:
        """A new session's id, or 0 when it is not worth a slot."""
        if not partitions or self.slots <= 0:
            return INVALID_SESSION_ID
        now = self._clock()
        if len(self._sessions) >= self.slots and not self._evict(
            (privileged, len(partitions)), now
        ):
            return INVALID_SESSION_ID
        session_id = INVALID_SESSION_ID
        while session_id == INVALID_SESSION_ID or session_id in self._sessions:
            session_id = secrets.randbelow(2**31 - 1) + 1
        self._sessions[session_id] = FetchSession(session_id, privileged, partitions, now)
        return session_id

    def _evict(self, value: tuple[bool, int], now: float) -> bool:
        sessions = self._sessions.values()
        stale = min(sessions, key=lambda s: s.last_used)
        if now - stale.last_used > EVICTION_S:
            del self._sessions[stale.id]
            return True
        cheapest = min(sessions, key=lambda s: (*s.value(), s.last_used))
        if cheapest.value() < value:
            del self._sessions[cheapest.id]
            return True
        return False
