"""Every broker's registry state follows its copy of ``_schemas``, in offset order.

The store changes only by records read back from the local log, up to its high
watermark, each applied once: on followers as replication brings them, on the leader
too (its own writes are applied once replicated, which is when a follower can see them
as well), so every broker holds the same state at the same offset. ``applied`` is the
offset after the last record applied; a write answered at offset N is visible on a
broker once its ``applied`` reached N.

The tail runs as one task woken by the partition's appends and high-watermark moves
(``PartitionService.wait_for_append``), with a short timeout as a fallback: a poll that
finds nothing new costs one dictionary lookup. Reading and applying happen together on
the loop without suspending, so nothing else sees a half-applied batch.

A broker hosting no copy (``_schemas`` has three replicas; a larger cluster has brokers
without one) fetches the leader's instead, over the Kafka protocol (``remote.py``), and
applies it the same way at the same offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from streambus.errors import StreamBusError
from streambus.records import iter_records, walk_batches
from streambus.schemas.remote import RemoteSchemas
from streambus.schemas.storage import SCHEMAS_PARTITION, Record, SchemasLog, decode_stored

log = logging.getLogger("streambus.schemas")

_POLL_S = 0.5  # the fallback when no wake comes (a copy that is not hosted here yet)
_REMOTE_BACKOFF_MAX_S = 5.0  # between failed fetches from the leader, growing to this


class SchemasTail:
    def __init__(
        self,
        schemas_log: SchemasLog,
        apply: Callable[[Record], None],
        stopping: Callable[[], bool] = lambda: False,
        remote: RemoteSchemas | None = None,
    ) -> None:
        self._log = schemas_log
        self._apply = apply
        self._stopping = stopping
        self._remote = remote  # fetches from the leader while no copy is hosted here
        self._remote_backoff = 0.1
        self.applied = 0  # the offset after the last record applied
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def committed_end(self) -> int:
        """The local copy's high watermark (0 without a local copy)."""
        if not self._log.exists():
            return 0
        return self._log.service.copy_offsets(SCHEMAS_PARTITION).high_watermark

    def log_end(self) -> int:
        """The local copy's log end: what a new leader must apply before it decides."""
        if not self._log.exists():
            return 0
        return self._log.service.replica_log_end(SCHEMAS_PARTITION)[1]

    def catch_up(self) -> int:
        """Apply every committed record not applied yet; returns how many."""
        end = self.committed_end()
        if end <= self.applied:
            return 0
        count = 0
        for offset, record in self._log.read(self.applied, end):
            self._apply(record)
            self.applied = offset
            count += 1
        self.applied = max(self.applied, end)  # past control and unknown records too
        self._release()
        return count

    def _release(self) -> None:
        keep = []
        for offset, future in self._waiters:
            if offset <= self.applied:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((offset, future))
        self._waiters = keep

    async def wait_applied(self, offset: int, timeout_s: float) -> bool:
        """Wait until the state holds every record below ``offset``; False on timeout."""
        self._safe_catch_up()
        if self.applied >= offset:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((offset, future))
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            return False
        finally:
            self._waiters = [(o, f) for o, f in self._waiters if f is not future]
        return True

    def _safe_catch_up(self) -> None:
        try:
            self.catch_up()
        except StreamBusError as exc:  # the copy went offline or away: retried at next wake
            log.warning("schema registry: reading _schemas failed: %s", exc)

    # -- the background task -----------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="streambus-schemas-tail")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._remote is not None:
            await self._remote.close()

    async def _run(self) -> None:
        service = self._log.service
        while True:
            self._safe_catch_up()
            if self._remote is not None and not self._log.exists() and not self._stopping():
                await self._follow_remote(self._remote)
                continue
            if self._remote is not None:
                await self._remote.close()  # a copy is hosted here now: it is read instead
            await service.wait_for_append([SCHEMAS_PARTITION], _POLL_S)
            if self._stopping():
                await asyncio.sleep(_POLL_S)  # wait_for_append returns at once from here on

    # -- no copy here: the leader's, over the Kafka protocol (remote.py) ------------------
    async def _follow_remote(self, remote: RemoteSchemas) -> None:
        """One long-polling fetch from the leader, applied; a pause when there is none."""
        try:
            fetched = await remote.fetch(self.applied)
        except (OSError, EOFError, TimeoutError, StreamBusError) as exc:
            log.info(
                "schema registry: fetching _schemas from its leader %s failed: %s; "
                "retrying in %.1f s",
                remote.address(),
                exc or type(exc).__name__,
                self._remote_backoff,
            )
            await asyncio.sleep(self._remote_backoff)
            self._remote_backoff = min(self._remote_backoff * 2, _REMOTE_BACKOFF_MAX_S)
            return
        if fetched is None:  # no leader known yet, or this broker is being made one
            await asyncio.sleep(_POLL_S)
            return
        self._remote_backoff = 0.1
        if not fetched.records and fetched.log_start_offset > self.applied:
            # Compaction removed what this state has not seen: go on from the log's start.
            log.warning(
                "schema registry: _schemas starts at %d on its leader, past %d applied here",
                fetched.log_start_offset,
                self.applied,
            )
            self.applied = fetched.log_start_offset
            return
        try:
            self.apply_fetched(fetched.records)
        except StreamBusError as exc:  # a batch that does not decode: fetched again later
            log.warning("schema registry: a fetched _schemas batch is unreadable: %s", exc)
            await asyncio.sleep(_POLL_S)

    def apply_fetched(self, data: bytes) -> int:
        """Apply the records of the whole batches in ``data`` from ``applied`` on (the
        first batch may start before it); returns how many."""
        count = 0
        for pos, header in walk_batches(data):
            end = header.last_offset + 1
            if end <= self.applied:
                continue
            if not header.is_control:
                for record in iter_records(data, pos, header):
                    if record.offset < self.applied:
                        continue
                    decoded = decode_stored(record.key, record.value)
                    if decoded is not None:
                        self._apply(decoded)
                        count += 1
            self.applied = end
        self._release()
        return count
