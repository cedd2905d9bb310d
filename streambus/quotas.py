"""Client quotas enforced the Kafka way: byte rates per (user, client id), measured
over a window of samples, paid for with throttle time.

The quota table is replicated metadata (``ClusterState.client_quotas``, changed by
``AlterClientQuota`` records), so every broker enforces the same quotas; each
broker measures only the bytes it serves, as Kafka's brokers do.

Measurement follows Kafka's ``Rate`` over ``quota.window.num`` samples of
``quota.window.size.seconds`` each: the rate is the bytes of the live samples
over the time they span, never less than ``num - 1`` windows (so the first
burst of a new client is spread over the whole window, not over its first
millisecond). A request that takes the rate over the quota is answered with
``throttle_time_ms = (rate - quota) / quota * window`` (at most the whole
window), and the server mutes the connection that long: it reads none of its
requests until then (``streambus.server``).

Which quota applies is Kafka's precedence, per quota key: (user, client-id),
(user, default client-id), (user), (default user, client-id), (default user,
default client-id), (default user), (client-id), (default client-id). The
matched entry also says who shares a rate: a quota on client-id ``x`` is one
rate for every connection named ``x``; a default one is a rate per client id.

Connection creation rates per ip (KIP-612): an ``ip`` entity's
``connection_creation_rate`` (the address's own entry, else the default ip's) is a
rate of accepted connections per address, measured the same way. A connection that
takes its address over the quota is not counted (Kafka unrecords it) and is refused
Kafka's way: the server holds the accepted socket unread for the throttle time
(``(rate - quota) / quota * window``, at most one quota window) and then closes it,
so a client reconnecting in a loop is slowed to the quota instead of spinning.

Controller mutation rates (KIP-599): CreateTopics, CreatePartitions and DeleteTopics
count the partitions they create or delete against the (user, client id)'s
``controller_mutation_rate``, resolved by the same precedence as the byte rates.
Kafka measures them with a token bucket: credits refill at the quota per second up to
a burst of ``quota * num * size``; a mutation takes its partitions' worth even past
zero, and while the balance is below zero the next one is refused. Request versions
that know THROTTLING_QUOTA_EXCEEDED (CreateTopics v6+, DeleteTopics v5+,
CreatePartitions v3+) are strict: a topic met with a negative balance gets that error
and ``throttle_time_ms = -balance / quota``. Older versions are permissive: everything
is done, and the time the balance needs to climb back to zero is the throttle.

Request quotas (KIP-124): ``request_percentage`` bounds the time a (user, client id)'s
requests keep the broker busy, as a percentage of one thread over the quota window,
resolved by the same precedence. Kafka counts request handler and network thread time,
so its 100% is one of ``num.io.threads + num.network.threads``; StreamBus handles every
request on one event loop (with worker threads for large frames), so here 100% is the
whole event loop: ``request_percentage=50`` lets a client's requests take half a second
of every second. A request's time is the server's own: from its frame being read to its
handler's answer, less the time the handler spent suspended (a long poll, a rebalance,
replication acks or a worker thread: waiting, not work, as Kafka's purgatory is not
handler time); encoding the response is counted afterwards without throttling it (Kafka's
network thread time). The throttle is ``(rate - quota) / quota * span``, at most one
quota window (Kafka's bound for request quotas); the response carries it (the larger of
it and any byte-rate throttle) and the connection is muted that long. Exempt as in Kafka:
ApiVersions, SaslHandshake, SaslAuthenticate, the ClusterAction APIs, and Fetch and
OffsetForLeaderEpoch from a replica (``replica_id >= 0``).

The user of a quota entity is the connection's authenticated principal (its SASL
user, or its certificate's subject); an unauthenticated connection is the user
``ANONYMOUS``, reached through the default user entity or an entry naming it.

A single broker's quorum lives in memory; its quota table is kept durable in
``client_quotas.json`` in the data dir (written whole, atomically, on each
change, and replayed at start). A cluster's Raft log keeps it instead.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streambus.cluster.client_quotas import (
    CLIENT_ID,
    CONNECTION_CREATION_RATE,
    CONSUMER_BYTE_RATE,
    CONTROLLER_MUTATION_RATE,
    IP,
    PRODUCER_BYTE_RATE,
    REQUEST_PERCENTAGE,
    USER,
    QuotaEntity,
    QuotaTable,
    table_from_wire,
    table_to_wire,
)
from streambus.cluster.local_file import StateFile
from streambus.cluster.quorum import LocalQuorum, Quorum
from streambus.cluster.records import AlterClientQuota, Result
from streambus.errors import ThrottlingQuotaExceededError

if TYPE_CHECKING:
    from streambus.instrumentation import BrokerTelemetry

log = logging.getLogger("streambus.quotas")

ANONYMOUS = "ANONYMOUS"  # Kafka's principal for unauthenticated connections
PRODUCE = "produce"
FETCH = "fetch"
CONNECTION = "connection"  # the throttle of a connection over its ip's creation rate
# The sensor of the broker-wide max.connection.creation.rate (no ip is a tuple of one).
BROKER_CONNECTIONS: tuple[object, ...] = ("broker-connections",)
MUTATION = "controller_mutation"  # partitions created or deleted (KIP-599)
REQUEST = "request"  # time spent handling requests (KIP-124)
_KEYS = {
    PRODUCE: PRODUCER_BYTE_RATE,
    FETCH: CONSUMER_BYTE_RATE,
    MUTATION: CONTROLLER_MUTATION_RATE,
    REQUEST: REQUEST_PERCENTAGE,
}
# Never counted against request_percentage (Kafka's exemptions): ApiVersions (18),
# SaslHandshake (17), SaslAuthenticate (36), and the ClusterAction APIs: LeaderAndIsr (4),
# StopReplica (5), UpdateMetadata (6), ControlledShutdown (7), WriteTxnMarkers (27),
# Vote (52), BeginQuorumEpoch (53), EndQuorumEpoch (54), AlterPartition (56),
# Envelope (58), FetchSnapshot (59), BrokerRegistration (62), BrokerHeartbeat (63),
# AllocateProducerIds (67).
REQUEST_EXEMPT_APIS = frozenset({4, 5, 6, 7, 17, 18, 27, 36, 52, 53, 54, 56, 58, 59, 62, 63, 67})
# Exempt when a replica sends them (replica_id >= 0): Fetch (1), OffsetForLeaderEpoch (23).
REPLICA_APIS = frozenset({1, 23})
# request_percentage counts percent-seconds: one second of handling is 100.
PERCENT_PER_SECOND = 100.0
# Resolved quotas cached per client id; the cache is dropped whole when metadata changes
# or when it grows past this (client ids are the client's to choose).
RESOLVED_MAX = 10_000
# Rates of clients not seen for a whole window are dropped (their samples would all be
# obsolete anyway) once there are this many.
PRUNE_OVER = 1_000
FILE_NAME = "client_quotas.json"
# client_quotas.json: {"v": 1, "quotas": [[[[type, name or null], ...], {key: value}], ...]}


def _candidates(user: str, client_id: str) -> tuple[QuotaEntity, ...]:
    """Kafka's precedence, most specific first (entities sorted by type)."""
    c, u = (CLIENT_ID, client_id), (USER, user)
    dc, du = (CLIENT_ID, None), (USER, None)
    return ((c, u), (dc, u), (u,), (c, du), (dc, du), (du,), (c,), (dc,))


class Rate:
    """Kafka's sampled ``Rate``: [start, bytes] samples, at most ``num``."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: collections.deque[list[float]] = collections.deque()

    def record(self, value: float, now: float, window: float, num: int) -> None:
        if not self.samples or now - self.samples[-1][0] >= window:
            self.samples.append([now, 0.0])
            if len(self.samples) > num:
                self.samples.popleft()
        self.samples[-1][1] += value

    def measure(self, now: float, window: float, num: int) -> tuple[float, float]:
        """(bytes per second, the seconds that rate is measured over)."""
        samples = self.samples
        while samples and now - samples[0][0] >= window * num:
            samples.popleft()
        if not samples:
            return 0.0, window
        span = max(now - samples[0][0], window * max(num - 1, 1))
        return sum(s[1] for s in samples) / span, span

    def last_used(self) -> float:
        return self.samples[-1][0] if self.samples else float("-inf")


class TokenBucket:
    """Kafka's ``TokenBucket`` stat (KIP-599): a balance of credits and when it was last
    brought up to date."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at

    def refill(self, quota: float, burst: float, now: float) -> float:
        self.tokens = min(burst, self.tokens + max(now - self.at, 0.0) * quota)
        self.at = now
        return self.tokens

    def last_used(self) -> float:
        return self.at


class MutationQuota:
    """One request's controller mutation quota (Kafka's ``ControllerMutationQuota``):
    ``check`` before a topic is changed (raises THROTTLING_QUOTA_EXCEEDED when strict and
    the balance is below zero), ``record`` the partitions it changed, ``finish`` once
    for the request's throttle time. Without a quota every step is free."""

    __slots__ = ("_found", "_manager", "strict", "throttle_s")

    def __init__(
        self,
        manager: QuotaManager,
        found: tuple[float, tuple[object, ...]] | None,
        strict: bool,
    ) -> None:
        self._manager = manager
        self._found = found
        self.strict = strict
        self.throttle_s = 0.0

    def check(self) -> None:
        if self._found is None or not self.strict:
            return
        if self.throttle_s > 0:  # refused once: the rest of the request is too (Kafka)
            raise ThrottlingQuotaExceededError(self._message())
        balance = self._manager.mutation_balance(*self._found)
        if balance < 0:
            self.throttle_s = self._manager.throttle_for(balance, self._found[0])
            raise ThrottlingQuotaExceededError(self._message())

    def record(self, partitions: int) -> None:
        if self._found is None or partitions <= 0:
            return
        balance = self._manager.take_mutations(*self._found, partitions)
        if not self.strict and balance < 0:
            self.throttle_s = self._manager.throttle_for(balance, self._found[0])

    def finish(self) -> int:
        """The throttle time (ms) for the response; observed once per request under a quota."""
        if self._found is None:
            return 0
        self._manager.telemetry.throttle_time(MUTATION, self.throttle_s)
        return round(self.throttle_s * 1000)

    def _message(self) -> str:
        return (
            f"The throttling quota has been exceeded: controller_mutation_rate "
            f"{self._found[0] if self._found else 0:g} partitions/s; retry after "
            f"{self.throttle_s * 1000:.0f} ms"
        )


class SuspendedTime:
    """Awaits a handler's coroutine and adds up the seconds it spent suspended (waiting
    on a future, a sleep, a worker thread): the rest of its time was work on the loop."""

    __slots__ = ("_clock", "_coro", "seconds")

    def __init__(self, handling: Awaitable[Any], clock: Callable[[], float]) -> None:
        self._coro = handling.__await__()
        self._clock = clock
        self.seconds = 0.0

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, clock = self._coro, self._clock
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            suspended = clock()
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation included: handed to the handler
                error = exc
            self.seconds += clock() - suspended


class RequestQuota:
    """The request quota of one request (a client with ``request_percentage``): ``timed``
    wraps its handler, ``throttle`` counts its handling time and gives the throttle (ms),
    ``record`` adds the encoding time afterwards without throttling."""

    __slots__ = ("_found", "_manager", "_timer")

    def __init__(self, manager: QuotaManager, found: tuple[float, tuple[object, ...]]) -> None:
        self._manager = manager
        self._found = found
        self._timer: SuspendedTime | None = None

    def timed(self, handling: Awaitable[Any], clock: Callable[[], float]) -> SuspendedTime:
        self._timer = SuspendedTime(handling, clock)
        return self._timer

    def throttle(self, elapsed_s: float) -> int:
        """``elapsed_s``: from the frame read to the handler's answer; the time the handler
        was suspended is not work and is taken off."""
        busy = elapsed_s - (self._timer.seconds if self._timer is not None else 0.0)
        manager = self._manager
        quota, sensor = self._found
        rate, now = manager._rate(sensor)
        rate.record(max(busy, 0.0) * PERCENT_PER_SECOND, now, manager.window_s, manager.window_num)
        # Kafka bounds a request quota's throttle by one quota window (ClientRequestQuotaManager)
        throttle_s = min(manager._over(rate, quota, now), manager.window_s)
        manager.telemetry.throttle_time(REQUEST, throttle_s)
        return round(throttle_s * 1000)

    def record(self, busy_s: float) -> None:
        manager = self._manager
        rate, now = manager._rate(self._found[1])
        rate.record(
            max(busy_s, 0.0) * PERCENT_PER_SECOND, now, manager.window_s, manager.window_num
        )


class QuotaManager:
    def __init__(
        self,
        quorum: Callable[[], Quorum],
        telemetry: BrokerTelemetry,
        data_dir: Path,
        *,
        window_num: int = 11,
        window_size_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._quorum = quorum
        self._telemetry = telemetry
        self._file = StateFile(Path(data_dir) / FILE_NAME, "quotas", "client quotas")
        self.window_num = window_num
        self.window_s = window_size_s
        self._clock = clock
        self._resolved: dict[tuple[str, str, str], tuple[float, tuple[object, ...]] | None] = {}
        self._resolved_version = -1
        self._rates: dict[tuple[object, ...], Rate | TokenBucket] = {}
        self._pruned_at = 0.0

    @property
    def telemetry(self) -> BrokerTelemetry:
        return self._telemetry

    # -- the table ------------------------------------------------------------------------
    @property
    def table(self) -> QuotaTable:
        return self._quorum().state.client_quotas

    def quota_for(self, kind: str, client_id: str, user: str = ANONYMOUS) -> float | None:
        found = self._resolve(kind, user, client_id)
        return None if found is None else found[0]

    def _resolve(
        self, kind: str, user: str, client_id: str
    ) -> tuple[float, tuple[object, ...]] | None:
        state = self._quorum().state
        if state.metadata_version != self._resolved_version or len(self._resolved) > RESOLVED_MAX:
            self._resolved.clear()
            self._resolved_version = state.metadata_version
        cache_key = (kind, user, client_id)
        if cache_key in self._resolved:
            return self._resolved[cache_key]
        found: tuple[float, tuple[object, ...]] | None = None
        table = state.client_quotas
        if table:
            key = _KEYS[kind]
            for entity in _candidates(user, client_id):
                value = table.get(entity, {}).get(key)
                if value is not None:
                    # Who shares the rate: the entity, with default names made concrete.
                    actual = {USER: user, CLIENT_ID: client_id}
                    found = (value, (kind, *((t, actual[t]) for t, _ in entity)))
                    break
        self._resolved[cache_key] = found
        return found

    # -- enforcement ------------------------------------------------------------------------
    def record(self, kind: str, principal: str, client_id: str | None, nbytes: int) -> int:
        """Count ``nbytes`` served to this client of ``principal`` ("User:name"); the
        throttle time (ms) it has earned."""
        found = self._resolve(kind, _user(principal), client_id or "")
        if found is None:
            return 0
        quota, sensor = found
        rate, now = self._rate(sensor)
        rate.record(nbytes, now, self.window_s, self.window_num)
        throttle_s = min(self._over(rate, quota, now), self.window_s * self.window_num)
        self._telemetry.throttle_time(kind, throttle_s)
        return round(throttle_s * 1000)

    def _rate(self, sensor: tuple[object, ...]) -> tuple[Rate, float]:
        """The sensor's rate (new if none) and the clock's now."""
        now = self._clock()
        rate = self._rates.get(sensor)
        if not isinstance(rate, Rate):
            self._prune(now)
            rate = self._rates[sensor] = Rate()
        return rate, now

    def _over(self, rate: Rate, quota: float, now: float) -> float:
        """Kafka's throttle time: how long until the measured rate is back at ``quota``
        (0 while it is within)."""
        observed, span = rate.measure(now, self.window_s, self.window_num)
        return (observed - quota) / quota * span if observed > quota else 0.0

    def mutation_quota(self, principal: str, client_id: str | None, strict: bool) -> MutationQuota:
        """The controller mutation quota of a request from ``principal`` ("User:name")."""
        return MutationQuota(
            self, self._resolve(MUTATION, _user(principal), client_id or ""), strict
        )

    def _bucket(self, quota: float, sensor: tuple[object, ...], now: float) -> TokenBucket:
        bucket = self._rates.get(sensor)
        if not isinstance(bucket, TokenBucket):
            self._prune(now)
            bucket = self._rates[sensor] = TokenBucket(self._burst(quota), now)
        return bucket

    def _burst(self, quota: float) -> float:
        return quota * self.window_s * self.window_num

    def mutation_balance(self, quota: float, sensor: tuple[object, ...]) -> float:
        now = self._clock()
        return self._bucket(quota, sensor, now).refill(quota, self._burst(quota), now)

    def take_mutations(self, quota: float, sensor: tuple[object, ...], partitions: int) -> float:
        """Take ``partitions`` credits (the balance may go below zero); the new balance."""
        now = self._clock()
        bucket = self._bucket(quota, sensor, now)
        bucket.refill(quota, self._burst(quota), now)
        bucket.tokens -= partitions
        return bucket.tokens

    def throttle_for(self, balance: float, quota: float) -> float:
        """Seconds until a negative balance is back at zero, at most the whole window."""
        horizon = self.window_s * self.window_num
        return horizon if quota <= 0 else min(-balance / quota, horizon)

    def _prune(self, now: float) -> None:
        horizon = self.window_s * self.window_num
        if len(self._rates) < PRUNE_OVER or now - self._pruned_at < self.window_s:
            return
        self._pruned_at = now
        for sensor, rate in list(self._rates.items()):
            # A bucket idle that long is full again, unless it was left in debt.
            in_debt = isinstance(rate, TokenBucket) and rate.tokens < 0
            if now - rate.last_used() >= horizon and not in_debt:
                del self._rates[sensor]

    def connection_throttle(self, ip: str) -> float:
        """Count a new connection from ``ip``; the seconds to hold it unread before closing
        it when that takes ``ip`` over its ``connection_creation_rate`` (0: accept it)."""
        found = self._resolve_ip(ip)
        if found is None:
            return 0.0
        quota, sensor = found
        rate, now = self._rate(sensor)
        rate.record(1, now, self.window_s, self.window_num)
        # Kafka bounds a connection's throttle by one quota window (ConnectionQuotas)
        throttle_s = min(self._over(rate, quota, now), self.window_s)
        if throttle_s > 0:
            rate.record(-1, now, self.window_s, self.window_num)  # refused: not counted
        self._telemetry.throttle_time(CONNECTION, throttle_s)
        return throttle_s

    def broker_connection_throttle(self, rate: float) -> float:
        """Count a new connection against the broker-wide ``max.connection.creation.rate``
        (``rate`` per second, every address together; 0: unlimited); the seconds to hold it
        unread before closing it when it goes over (0: accept it). A refused connection is
        not counted, so the rate is of connections let in."""
        if rate <= 0:
            return 0.0
        sensor, now = self._rate(BROKER_CONNECTIONS)
        sensor.record(1, now, self.window_s, self.window_num)
        throttle_s = min(self._over(sensor, rate, now), self.window_s)  # as per address
        if throttle_s > 0:
            sensor.record(-1, now, self.window_s, self.window_num)
        return throttle_s

    def request_quota(
        self, principal: str, client_id: str | None, api_key: int, request: Any
    ) -> RequestQuota | None:
        """The request quota that applies to this request, None when none does (the
        common case, no quotas at all, costs one check)."""
        if not self._quorum().state.client_quotas:
            return None
        if api_key in REQUEST_EXEMPT_APIS:
            return None
        if api_key in REPLICA_APIS and getattr(request, "replica_id", -1) >= 0:
            return None
        found = self._resolve(REQUEST, _user(principal), client_id or "")
        return None if found is None else RequestQuota(self, found)

    def _resolve_ip(self, ip: str) -> tuple[float, tuple[object, ...]] | None:
        state = self._quorum().state
        if not state.client_quotas:
            return None  # the common case: no quotas at all, nothing cached
        if state.metadata_version != self._resolved_version or len(self._resolved) > RESOLVED_MAX:
            self._resolved.clear()
            self._resolved_version = state.metadata_version
        cache_key = (CONNECTION, ip, "")
        if cache_key in self._resolved:
            return self._resolved[cache_key]
        table = state.client_quotas
        found: tuple[float, tuple[object, ...]] | None = None
        for entity in (((IP, ip),), ((IP, None),)):  # the address's own, else the default
            value = table.get(entity, {}).get(CONNECTION_CREATION_RATE)
            if value is not None:
                found = (value, (CONNECTION, ip))  # a rate per address, default or not
                break
        self._resolved[cache_key] = found
        return found

    # -- changes, and their durability on a single broker ------------------------------------
    async def submit(self, record: AlterClientQuota) -> Result:
        quorum = self._quorum()
        result = await quorum.submit(record)
        if result.ok and isinstance(quorum, LocalQuorum):
            await self._file.save(table_to_wire(quorum.state.client_quotas))
        return result

    def load_local(self) -> None:
        """A single broker: replay ``client_quotas.json`` into its in-memory quorum."""
        quorum = self._quorum()
        if not isinstance(quorum, LocalQuorum):
            return
        table = self._file.load(table_from_wire)
        for entity, values in (table or {}).items():
            result = quorum.apply_now(AlterClientQuota(entity, tuple(sorted(values.items()))))
            if not result.ok:
                log.warning("client quota %r not loaded: %s", entity, result.message)


def _user(principal: str) -> str:
    """The user a quota entity names: "User:alice" -> "alice"."""
    return principal.partition(":")[2] or ANONYMOUS
