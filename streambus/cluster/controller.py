"""The controller loop every broker runs; it acts only while its node leads the quorum.

Every broker: registers itself at start (a fresh incarnation id per start) and
submits a ``BrokerHeartbeat`` every ``heartbeat_interval_ms``. Until the state
has a cluster id, it also proposes its own (``SetClusterId``, set once: the
first committed is the cluster's, and every broker then answers with that one).

The Raft leader (the controller) additionally notes, on its own monotonic
clock, when it last applied a heartbeat of each broker - not in the replicated
state, which has no clock - and fences a broker silent for longer than
``session_timeout_ms``, unfencing it when its heartbeats return. A node that
becomes controller gives every unfenced broker a full session from that moment
(it has not been watching them), so a controller change never fences anyone.

The controller also runs Kafka's automatic preferred-leader election: every
``leader_imbalance_check_interval_s`` (when ``auto_leader_rebalance_enable``) it
moves each partition whose first replica is live and in sync, but not leading,
back to that replica, so leadership spreads again after a broker returns. Kafka's
``leader.imbalance.per.broker.percentage`` threshold is not applied: every
imbalanced partition moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from streambus.cluster.config import ClusterConfig
from streambus.cluster.quorum import Applied, Quorum, RaftStatus
from streambus.cluster.records import (
    BrokerHeartbeat,
    ChangePartitionLeader,
    FenceBroker,
    RegisterBroker,
    SetClusterId,
    UnfenceBroker,
)
from streambus.cluster.state import preferred_elections
from streambus.errors import (
    DuplicateBrokerRegistrationError,
    NotControllerError,
    RequestTimedOutError,
    StreamBusError,
)

log = logging.getLogger("streambus.cluster")

# Heartbeats of another incarnation of this node id that make a refused registration final:
# more than one, so a heartbeat a killed predecessor left in flight is not mistaken for it.
_RIVAL_BEATS = 2


class Controller:
    """Registration, heartbeats, and (on the leader) fencing by session timeout."""

    def __init__(
        self,
        quorum: Quorum,
        config: ClusterConfig,
        host: str,
        port: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        registry_port: int = 0,
        registration_timeout_s: float | None = None,
        cluster_id: str = "",
        listeners: tuple[tuple[str, str, int], ...] = (),
    ) -> None:
        self.quorum = quorum
        self.listeners = listeners  # (name, advertised host, port) per listener
        self.config = config
        self.broker_id = config.node_id
        self.host = host  # advertised Kafka address, what Metadata tells clients
        self.port = port
        self.registry_port = registry_port  # the schema registry's REST port, 0: none
        self.incarnation = str(uuid.uuid4())
        self.cluster_id = cluster_id  # this broker's own (meta.properties): proposed, "" none
        self._clock = clock
        self._interval = config.heartbeat_interval_ms / 1000
        self._session = config.session_timeout_ms / 1000
        # A restart of this id is refused while its previous incarnation is still registered;
        # a dead one is fenced within a session (counted from a new controller's election),
        # so a refusal is only final once the other incarnation is seen heartbeating.
        # Without a controller, registration gives up after this long (the caller retries).
        self._registration_timeout = (
            registration_timeout_s
            if registration_timeout_s is not None
            else self._session + 3 * self._interval
        )
        self._rival_beats = 0  # heartbeats of another incarnation of this id, seen live
        self._last_seen: dict[int, float] = {}
        self._was_leader = False
        self._next_rebalance = 0.0  # on self._clock: set when this node becomes controller
        self._task: asyncio.Task[None] | None = None
        quorum.on_change(self._on_applied)
        quorum.on_leader_change(self._on_leader)
        if quorum.is_leader:  # a quorum started before us (LocalQuorum always leads)
            self._on_leader(RaftStatus(quorum.leader_id, quorum.term, True))

    async def start(self) -> None:
        """Register this broker, send its first heartbeat, then run the loop.

        Raises DuplicateBrokerRegistrationError when this node id stays live
        as another incarnation (a second broker with the same id).
        """
        # This node may lead the quorum while it registers (a controller restarted at once):
        # it must fence silent brokers meanwhile, its own previous incarnation included, or
        # its registration would wait on itself forever.
        sessions = asyncio.create_task(
            self._sessions_while_registering(), name=f"controller-{self.broker_id}-sessions"
        )
        try:
            await self._register()
        finally:
            sessions.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sessions
        await self._propose_cluster_id()
        await self._heartbeat()
        await self.check_sessions()
        self._task = asyncio.create_task(self._run(), name=f"controller-{self.broker_id}")

    async def _sessions_while_registering(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_sessions()
            except Exception:
                log.exception("controller session check of broker %d failed", self.broker_id)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _register(self) -> None:
        record = RegisterBroker(
            self.broker_id,
            self.host,
            self.port,
            self.incarnation,
            self.registry_port,
            self.listeners,
        )
        deadline = self._clock() + self._registration_timeout
        refused: str | None = None  # the last refusal, None while no leader answered
        self._rival_beats = 0
        while True:
            try:
                result = await self.quorum.submit(record)
            except (NotControllerError, RequestTimedOutError) as exc:
                reason = str(exc)
            else:
                if result.ok:
                    log.info(
                        "broker %d registered at %s:%d (incarnation %s)",
                        self.broker_id,
                        self.host,
                        self.port,
                        self.incarnation,
                    )
                    return
                err = result.error()
                if not isinstance(err, DuplicateBrokerRegistrationError):
                    raise err or StreamBusError(result.message)
                if refused is None:
                    log.warning(
                        "broker %d registration refused, retrying: %s",
                        self.broker_id,
                        result.message,
                    )
                reason = refused = result.message or err.message
            if refused is not None and self._rival_beats >= _RIVAL_BEATS:
                # Not a restart waiting for its old self to be fenced: that one heartbeats.
                raise DuplicateBrokerRegistrationError(
                    f"node id {self.broker_id} is in use by another live broker: {reason}"
                )
            if refused is None and self._clock() >= deadline:
                raise NotControllerError(f"broker {self.broker_id} could not register: {reason}")
            await asyncio.sleep(min(self._interval, 0.5))

    async def _propose_cluster_id(self) -> None:
        """Submit this broker's id while the state has none; the next round tries again."""
        if self.quorum.state.cluster_id or not self.cluster_id:
            return
        try:
            result = await self.quorum.submit(SetClusterId(self.cluster_id))
        except (NotControllerError, RequestTimedOutError) as exc:
            log.debug("broker %d cluster id not committed: %s", self.broker_id, exc)
            return
        if not result.ok:
            log.warning("broker %d cluster id refused: %s", self.broker_id, result.message)
            return
        agreed = self.quorum.state.cluster_id
        if agreed and agreed != self.cluster_id:
            log.warning(
                "broker %d: cluster id is %s (agreed by the quorum), not %s from its data dir",
                self.broker_id,
                agreed,
                self.cluster_id,
            )

    async def _heartbeat(self) -> None:
        try:
            result = await self.quorum.submit(
                BrokerHeartbeat(self.broker_id, self.incarnation), timeout_s=self._interval * 2
            )
        except (NotControllerError, RequestTimedOutError) as exc:
            log.debug("broker %d heartbeat not committed: %s", self.broker_id, exc)
            return
        if not result.ok:
            # e.g. a controller lost our registration: register again
            log.warning("broker %d heartbeat refused: %s", self.broker_id, result.message)
            with contextlib.suppress(StreamBusError):
                await self._register()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._propose_cluster_id()
                await self._heartbeat()
                await self.check_sessions()
                await self._rebalance_when_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller round of broker %d failed", self.broker_id)

    async def check_sessions(self) -> None:
        """On the controller: fence the silent, unfence the returned. No-op elsewhere."""
        if not self.quorum.is_leader:
            return
        now = self._clock()
        state = self.quorum.state
        for broker_id, info in sorted(state.brokers.items()):
            seen = self._last_seen.get(broker_id)
            if not info.fenced:
                if seen is None:
                    self._last_seen[broker_id] = now
                    continue
                silent = now - seen
                if silent > self._session:
                    reason = (
                        f"no heartbeat for {silent:.1f} s "
                        f"(broker.session.timeout.ms={self.config.session_timeout_ms})"
                    )
                    await self._submit_quietly(FenceBroker(broker_id, reason))
            elif seen is not None and now - seen <= self._session:
                await self._submit_quietly(UnfenceBroker(broker_id))

    async def _rebalance_when_due(self) -> None:
        if (
            not self.config.auto_leader_rebalance_enable
            or not self.quorum.is_leader
            or self._clock() < self._next_rebalance
        ):
            return
        self._next_rebalance = self._clock() + self.config.leader_imbalance_check_interval_s
        await self.rebalance_leaders()

    async def rebalance_leaders(self) -> int:
        """On the controller: move every partition whose preferred replica is live and in
        sync back to it; how many moved. No-op elsewhere."""
        if not self.quorum.is_leader:
            return 0
        moved = 0
        for record in preferred_elections(self.quorum.state):
            # Compare-and-set on the leader epoch: a change racing this one wins.
            if await self._submit_quietly(record):
                moved += 1
        if moved:
            log.info("preferred leader election moved %d partitions", moved)
        return moved

    async def _submit_quietly(
        self, record: FenceBroker | UnfenceBroker | ChangePartitionLeader
    ) -> bool:
        try:
            result = await self.quorum.submit(record)
        except (NotControllerError, RequestTimedOutError) as exc:
            log.warning("controller could not submit %s: %s", record, exc)
            return False
        if not result.ok:
            log.warning("controller's %s refused: %s", record, result.message)
        return result.ok

    # --- callbacks on the loop ---------------------------------------------------------------

    def _on_applied(self, applied: Applied) -> None:
        record = applied.record
        if not applied.result.ok:
            return
        if isinstance(record, BrokerHeartbeat | RegisterBroker):
            self._last_seen[record.broker_id] = self._clock()
            if (
                isinstance(record, BrokerHeartbeat)
                and record.broker_id == self.broker_id
                and record.incarnation != self.incarnation
                and not applied.replayed
            ):
                self._rival_beats += 1
        elif isinstance(record, FenceBroker):
            self._last_seen.pop(record.broker_id, None)
            if applied.changed and not applied.replayed:
                log.warning("broker %d fenced: %s", record.broker_id, record.reason)
                self._log_moves(applied)
        elif isinstance(record, UnfenceBroker) and applied.changed and not applied.replayed:
            log.info("broker %d unfenced: its heartbeats are back", record.broker_id)
            self._log_moves(applied)

    def _log_moves(self, applied: Applied) -> None:
        state = applied.state
        offline = state.offline_partitions()
        log.info(
            "after %s: %d live brokers, %d offline partitions",
            type(applied.record).__name__,
            len(state.live_brokers()),
            offline,
        )

    def _on_leader(self, status: RaftStatus) -> None:
        if status.is_leader and not self._was_leader:
            now = self._clock()
            state = self.quorum.state
            self._last_seen = {b: now for b, info in state.brokers.items() if not info.fenced}
            self._next_rebalance = now + self.config.leader_imbalance_check_interval_s
            log.info("node %d is now the controller (term %d)", self.broker_id, status.term)
        elif self._was_leader and not status.is_leader:
            log.warning(
                "node %d is no longer the controller (term %d, controller now %s)",
                self.broker_id,
                status.term,
                status.leader_id,
            )
        self._was_leader = status.is_leader
