"""Where records are agreed on: one interface, a local and a Raft implementation.

Everything above the quorum (controller, broker wiring, Kafka APIs) speaks to
:class:`Quorum` only, so a single broker (:class:`LocalQuorum`: no port, no
thread, records applied as they are submitted) and a cluster
(:class:`RaftQuorum`: pysyncobj) take the same code paths.

Threads: pysyncobj applies records on its own tick thread. The state it builds
there is handed to the event loop with ``loop.call_soon_threadsafe`` together
with each record's result, in apply order; everything a caller reads
(``state``, ``leader_id``, ``term`` ...) is the loop's copy, updated only on
the loop, so callers never see a state newer than the callbacks they have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from streambus.cluster.config import ClusterConfig, Voter
from streambus.cluster.records import Record, Result, from_wire, to_wire
from streambus.cluster.state import ClusterState, apply, state_from_wire, state_to_wire
from streambus.errors import InvalidRequestError, NotControllerError, RequestTimedOutError

log = logging.getLogger("streambus.cluster")


class Applied(NamedTuple):
    """One record applied, as change callbacks see it."""

    log_index: int  # position in the quorum's log (Raft index; LocalQuorum: 1, 2, ...)
    record: Record | None  # None for a record that could not be decoded
    result: Result
    state: ClusterState  # the state after it
    changed: bool  # False when the record left the state as it was (heartbeats, errors)
    # True for a record this node had applied before it restarted, re-applied from its own
    # journal: the state is rebuilt, but nothing happened now (no need to log it again).
    replayed: bool = False


class RaftStatus(NamedTuple):
    """The quorum's view of the election, as leader callbacks see it."""

    leader_id: int | None  # the controller's node id; None during an election
    term: int
    is_leader: bool  # this node is the leader (the controller)


ChangeCallback = Callable[[Applied], None]
LeaderCallback = Callable[[RaftStatus], None]


class Quorum(Protocol):
    """What the broker and the controller use. All members are called on the event loop."""

    node_id: int

    @property
    def state(self) -> ClusterState: ...
    @property
    def is_leader(self) -> bool: ...
    @property
    def leader_id(self) -> int | None: ...
    @property
    def term(self) -> int: ...
    @property
    def commit_index(self) -> int: ...
    def live_voters(self) -> frozenset[int]: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, record: Record, timeout_s: float | None = None) -> Result: ...
    def on_change(self, callback: ChangeCallback) -> None: ...
    def on_leader_change(self, callback: LeaderCallback) -> None: ...


class _Listeners:
    """Callbacks run on the loop; one that raises is logged and the rest still run."""

    def __init__(self) -> None:
        self.changes: list[ChangeCallback] = []
        self.leaders: list[LeaderCallback] = []

    def changed(self, applied: Applied) -> None:
        for cb in list(self.changes):
            try:
                cb(applied)
            except Exception:
                log.exception("cluster change callback %r failed", cb)

    def leader(self, status: RaftStatus) -> None:
        for cb in list(self.leaders):
            try:
                cb(status)
            except Exception:
                log.exception("cluster leader callback %r failed", cb)


class LocalQuorum:
    """A quorum of one, in memory: each record applies when submitted; term 1, always leader.

    Nothing persists: a single broker seeds it at start from what its disk holds
    (``initial``, or CreateTopic records submitted before serving).
    """

    def __init__(self, node_id: int, initial: ClusterState | None = None) -> None:
        self.node_id = node_id
        self._state = initial if initial is not None else ClusterState()
        self._applied = 0
        self._listeners = _Listeners()

    @property
    def state(self) -> ClusterState:
        return self._state

    @property
    def is_leader(self) -> bool:
        return True

    @property
    def leader_id(self) -> int | None:
        return self.node_id

    @property
    def term(self) -> int:
        return 1

    @property
    def commit_index(self) -> int:
        return self._applied

    def live_voters(self) -> frozenset[int]:
        return frozenset({self.node_id})

    async def start(self) -> None:
        self._listeners.leader(RaftStatus(self.node_id, 1, True))

    async def stop(self) -> None:
        pass

    def apply_now(self, record: Record) -> Result:
        """Apply at once (no await): for start-up seeding."""
        new, result = apply(self._state, record)
        self._applied += 1
        changed = new is not self._state
        self._state = new
        self._listeners.changed(Applied(self._applied, record, result, new, changed))
        return result

    async def submit(self, record: Record, timeout_s: float | None = None) -> Result:
        return self.apply_now(record)

    def on_change(self, callback: ChangeCallback) -> None:
        self._listeners.changes.append(callback)

    def on_leader_change(self, callback: LeaderCallback) -> None:
        self._listeners.leaders.append(callback)


class _StateMachine(SyncObjConsumer):  # type: ignore[misc]
    """The replicated part: one method, applied on pysyncobj's thread on every voter."""

    def __init__(self, deliver: Callable[[Applied], None], reset: Callable[[ClusterState], None]):
        super().__init__()
        # Attributes set from here on would be in pysyncobj's default snapshot;
        # _serialize/_deserialize below replace that with the JSON wire form.
        self.state = ClusterState()
        self._deliver = deliver
        self._reset = reset
        self.replay_until = 0  # the journal's commit index at start: set before the first tick

    @replicated  # type: ignore[untyped-decorator]
    def apply_wire(self, wire: dict[str, Any]) -> Result:
        record: Record | None
        try:
            record = from_wire(wire)
        except ValueError as exc:
            record, new, result = None, self.state, Result(InvalidRequestError.errno, str(exc))
        else:
            new, result = apply(self.state, record)
        changed = new is not self.state
        self.state = new
        index = self._syncObj.raftLastApplied + 1 if self._syncObj is not None else 0
        self._deliver(Applied(index, record, result, new, changed, index <= self.replay_until))
        return result

    def _serialize(self) -> dict[str, Any]:
        return {"state": state_to_wire(self.state)}

    def _deserialize(self, data: dict[str, Any]) -> None:
        self.state = state_from_wire(data["state"])
        self._reset(self.state)


_RETRYABLE_SOON = (FAIL_REASON.MISSING_LEADER, FAIL_REASON.QUEUE_FULL)
_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}


class RaftQuorum:
    """This node's voter in a pysyncobj Raft group of the configured voters.

    Bound to this voter's own ``host:port`` only; traffic encrypted and
    authenticated with the cluster secret; journal and snapshot under
    ``config.raft_dir`` (they survive restarts).
    """

    def __init__(self, config: ClusterConfig) -> None:
        if not config.voters or config.raft_dir is None:
            raise ValueError("RaftQuorum needs voters and a raft_dir")
        self.node_id = config.node_id
        self._config = config
        self._me: Voter = config.voter(config.node_id)
        self._by_address = {v.address: v.node_id for v in config.voters}
        self._listeners = _Listeners()
        self._state = ClusterState()
        self._status = RaftStatus(None, 0, False)
        self._commit_index = 0
        self._connected: frozenset[int] = frozenset()
        self._ever_connected: frozenset[int] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync: SyncObj | None = None
        self._machine: _StateMachine | None = None
        self._last_seen_status: tuple[Any, ...] = ()
        self._pending: set[asyncio.Future[tuple[Any, int]]] = set()
        self._alone_timer: asyncio.TimerHandle | None = None

    # --- reads (on the loop) -----------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self._state

    @property
    def is_leader(self) -> bool:
        return self._status.is_leader

    @property
    def leader_id(self) -> int | None:
        return self._status.leader_id

    @property
    def term(self) -> int:
        return self._status.term

    @property
    def commit_index(self) -> int:
        return self._commit_index

    def live_voters(self) -> frozenset[int]:
        """This node and the voters it holds a connection to (pysyncobj's partners)."""
        return self._connected | {self.node_id}

    def ever_connected(self) -> frozenset[int]:
        """Voters this node has ever held a working (authenticated) connection to."""
        return self._ever_connected

    def on_change(self, callback: ChangeCallback) -> None:
        self._listeners.changes.append(callback)

    def on_leader_change(self, callback: LeaderCallback) -> None:
        self._listeners.leaders.append(callback)

    # --- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the Raft port and join; raises OSError if the port cannot be bound.

        Called on the event loop's thread: pysyncobj's tick thread lives as long
        as the thread that created it.
        """
        self._loop = asyncio.get_running_loop()
        raft_dir = self._config.raft_dir
        assert raft_dir is not None
        raft_dir.mkdir(parents=True, exist_ok=True)
        t = self._config.timings
        conf = SyncObjConf(
            bindAddress=self._me.address,  # never 0.0.0.0, pysyncobj's default
            password=self._config.secret,
            journalFile=os.fspath(raft_dir / "journal"),
            fullDumpFile=os.fspath(raft_dir / "snapshot"),
            useFork=False,  # a fork of a threaded broker to write a few kB is not worth it
            commandsWaitLeader=False,  # no leader: fail now (NOT_CONTROLLER), not queue
            raftMinTimeout=t.election_min_s,
            raftMaxTimeout=t.election_max_s,
            appendEntriesPeriod=t.append_entries_period_s,
            connectionTimeout=t.connection_timeout_s,
            connectionRetryTime=t.connection_retry_s,
            leaderFallbackTimeout=t.leader_fallback_s,
            maxBindRetries=1,
        )
        _check_bindable(self._me)
        self._machine = _StateMachine(self._deliver_from_thread, self._reset_from_thread)
        others = [v.address for v in self._config.voters if v.node_id != self.node_id]
        with warnings.catch_warnings():
            # pysyncobj 0.3.17 reads journal.meta through an open() it never closes
            warnings.simplefilter("ignore", ResourceWarning)
            sync = SyncObj(self._me.address, others, conf=conf, consumers=[self._machine])
        try:
            sync.waitBinded()
        except Exception as exc:
            sync.destroy()
            raise OSError(f"cannot bind the Raft port {self._me.address}: {exc}") from exc
        # pysyncobj's tick thread waits 0.1 s after binding before its first tick
        self._machine.replay_until = sync.raftCommitIndex
        self._sync = sync
        sync.addOnTickCallback(self._on_tick)
        self._alone_timer = self._loop.call_later(
            max(5.0, 3 * t.connection_timeout_s), self._warn_if_alone
        )
        log.info(
            "raft voter %d listening on %s; voters %s",
            self.node_id,
            self._me.address,
            ", ".join(f"{v.node_id}@{v.address}" for v in self._config.voters),
        )

    async def stop(self) -> None:
        sync, self._sync = self._sync, None
        if self._alone_timer is not None:
            self._alone_timer.cancel()
        if sync is not None:
            sync.removeOnTickCallback(self._on_tick)
            await asyncio.to_thread(sync.destroy_synchronous)
        for fut in self._pending:  # submits that would otherwise wait out their timeout
            if not fut.done():
                fut.set_result((None, FAIL_REASON.REQUEST_DENIED))
        self._pending.clear()

    def _warn_if_alone(self) -> None:
        if not self._ever_connected and self._sync is not None:
            log.warning(
                "raft voter %d has reached none of the other voters (%s): check that they "
                "run, that the cluster secret is the same on all, and the quorum addresses",
                self.node_id,
                ", ".join(v.address for v in self._config.voters if v.node_id != self.node_id),
            )

    def compact(self) -> None:
        """Write a snapshot and trim the journal at the next tick (for tests and tools)."""
        if self._sync is not None:
            self._sync.forceLogCompaction()

    # --- writes ------------------------------------------------------------------------------

    async def submit(self, record: Record, timeout_s: float | None = None) -> Result:
        """Replicate ``record`` through the leader and wait for it to apply here.

        Raises NotControllerError when no leader took it (retriable), and
        RequestTimedOutError when no answer came in ``timeout`` (the record may
        still apply later).
        """
        machine, loop = self._machine, self._loop
        if machine is None or loop is None or self._sync is None:
            raise NotControllerError(f"the Raft quorum of node {self.node_id} is not running")
        wire = to_wire(record)
        budget = self._config.submit_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        last_err: int | None = None  # the failure of the previous attempt
        while True:
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

            def done(res: Any, err: int, fut: asyncio.Future[tuple[Any, int]] = fut) -> None:
                self._post(_resolve, fut, (res, err))

            machine.apply_wire(wire, callback=done)
            self._pending.add(fut)
            try:
                res, err = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if last_err is not None:
                    raise NotControllerError(
                        f"{type(record).__name__} not committed: no Raft leader within "
                        f"{budget:.1f} s"
                    ) from None
                raise RequestTimedOutError(
                    f"no Raft commit of {type(record).__name__} within {budget:.1f} s"
                ) from None
            finally:
                self._pending.discard(fut)
            if err == FAIL_REASON.SUCCESS:
                assert isinstance(res, Result)
                return res
            # No leader known (an election is under way): the record reached no leader,
            # so trying again cannot apply it twice.
            if err in _RETRYABLE_SOON and time.monotonic() + 0.05 < deadline:
                last_err = err
                await asyncio.sleep(0.05)
                continue
            raise NotControllerError(
                f"{type(record).__name__} not committed: {_FAIL_NAMES.get(err, err)}"
            )

    # --- from pysyncobj's thread -------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(fn, *args)

    def _deliver_from_thread(self, applied: Applied) -> None:
        self._post(self._applied_on_loop, applied)

    def _reset_from_thread(self, state: ClusterState) -> None:
        self._post(self._reset_on_loop, state)

    def _on_tick(self) -> None:
        sync = self._sync
        if sync is None:
            return
        leader = sync._getLeader()
        connected = frozenset(
            self._by_address.get(n.id, -1) for n in sync.otherNodes if sync.isNodeConnected(n)
        )
        snapshot = (
            None if leader is None else self._by_address.get(leader.id),
            sync.raftCurrentTerm,
            bool(sync._isLeader()),
            sync.raftCommitIndex,
            connected,
        )
        if snapshot != self._last_seen_status:
            self._last_seen_status = snapshot
            self._post(self._status_on_loop, snapshot)

    # --- on the loop -------------------------------------------------------------------------

    def _applied_on_loop(self, applied: Applied) -> None:
        self._state = applied.state
        self._listeners.changed(applied)

    def _reset_on_loop(self, state: ClusterState) -> None:
        self._state = state
        log.info("cluster state loaded from the Raft snapshot (version %d)", state.metadata_version)

    def _status_on_loop(self, snapshot: tuple[Any, ...]) -> None:
        leader_id, term, is_leader, commit_index, connected = snapshot
        self._commit_index = commit_index
        for node in connected - self._connected:
            log.info("raft voter %d connected to voter %d", self.node_id, node)
        for node in self._connected - connected:
            log.warning("raft voter %d lost its connection to voter %d", self.node_id, node)
        self._connected = connected
        self._ever_connected = self._ever_connected | connected
        status = RaftStatus(leader_id, term, is_leader)
        if status == self._status:
            return
        old, self._status = self._status, status
        if status.leader_id != old.leader_id or status.term != old.term:
            if status.leader_id is None and old.leader_id is None:
                log.debug("raft voter %d: election in term %d", self.node_id, term)
            elif status.leader_id is None:
                log.warning(
                    "raft voter %d: no controller (term %d, was node %s)",
                    self.node_id,
                    term,
                    old.leader_id,
                )
            else:
                log.info(
                    "raft voter %d: controller is node %d (term %d, was node %s)",
                    self.node_id,
                    status.leader_id,
                    term,
                    old.leader_id,
                )
        self._listeners.leader(status)


def _resolve(fut: asyncio.Future[tuple[Any, int]], value: tuple[Any, int]) -> None:
    if not fut.done():
        fut.set_result(value)


def make_quorum(config: ClusterConfig) -> LocalQuorum | RaftQuorum:
    """The quorum a broker with ``config`` runs: local without voters, Raft with them."""
    return RaftQuorum(config) if config.replicated else LocalQuorum(config.node_id)


def _check_bindable(me: Voter) -> None:
    """Fail with a line an operator can act on when this node's Raft address is taken, most
    often by a broker already running as this node id; pysyncobj itself would log a
    traceback and say only that initialization failed."""
    family = socket.AF_INET6 if ":" in me.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((me.host, me.port))
        except OSError as exc:
            raise OSError(
                f"node {me.node_id}'s Raft address {me.address} is in use or cannot be bound "
                f"({exc.strerror}): is node {me.node_id} already running on this machine?"
            ) from exc
