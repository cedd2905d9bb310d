"""Producer ids for idempotent producers, unique across the cluster and across restarts.

Ids are handed out from blocks the quorum allocates (``AllocateProducerIds``,
Kafka's KIP-730): each broker takes its own block, so two producers that got
their ids from different brokers never share one. In a cluster the Raft log is
the durable record of every block taken.

A single broker's quorum lives in memory only, so its ``producer_ids`` file is
the durable reservation: it holds one decimal integer, the first id not yet
reserved, and is written before any id of a new block is used, so a restart
(even after SIGKILL) resumes past every id that may have been given out. The
in-memory state starts behind the file after a restart; its first allocation
catches it up. A block that cannot be written (a full disk) is not used: the
caller gets KafkaStorageError and the next request tries again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NoReturn

from streambus.cluster import AllocateProducerIds, Quorum
from streambus.errors import (
    CoordinatorLoadInProgressError,
    KafkaStorageError,
    NotControllerError,
    RequestTimedOutError,
    StreamBusError,
)
from streambus.storage.datadir import write_atomically
from streambus.storage.health import WriteHealth

BLOCK = 1000  # Kafka's ProducerIdsBlock size
MAX_EPOCH = 32767


class ProducerIdAllocator:
    """Hands out ids from this broker's current block, taking the next from the quorum.

    ``path``: a single broker's durable reservation file; None in a cluster.
    """

    def __init__(
        self, quorum: Quorum, path: Path | None, health: WriteHealth | None = None
    ) -> None:
        self._quorum = quorum
        self._path = path
        self._health = health
        self._next = -1
        self._block_end = -1
        self._reserving = asyncio.Lock()  # concurrent requests share one new block

    async def allocate(self, producer_id: int = -1, epoch: int = -1) -> tuple[int, int]:
        """A new (id, epoch 0), or the same id with the next epoch when a producer asks to bump."""
        if producer_id >= 0 and 0 <= epoch < MAX_EPOCH:
            return producer_id, epoch + 1
        async with self._reserving:
            if self._next >= self._block_end:
                await self._reserve()
            pid = self._next
            self._next += 1
        return pid, 0

    async def _reserve(self) -> None:
        if self._path is not None:
            # After a restart the in-memory state is behind the ids given out before it:
            # those are taken as one block first, so the next block starts past them.
            behind = self._read_reserved() - self._quorum.state.next_producer_id
            if behind > 0:
                await self._take(behind)
        start = await self._take(BLOCK)
        end = start + BLOCK
        if self._path is not None:
            try:
                write_atomically(self._path, f"{end}\n".encode())
            except OSError as exc:
                self._failed(exc)
            if self._health is not None:
                self._health.succeeded()
        self._next, self._block_end = start, end

    async def _take(self, size: int) -> int:
        """The first id of a new block of ``size`` ids from the quorum."""
        record = AllocateProducerIds(self._quorum.node_id, size)
        try:
            result = await self._quorum.submit(record)
        except (NotControllerError, RequestTimedOutError) as exc:
            # Kafka's answer while no block is available: retriable, the client asks again.
            raise CoordinatorLoadInProgressError(f"no producer id block yet: {exc}") from exc
        if not result.ok or result.value is None:
            raise result.error() or StreamBusError(f"{record} answered no block")
        return result.value

    def _read_reserved(self) -> int:
        """The file's first id not yet reserved (0 when there is no file)."""
        assert self._path is not None
        try:
            if not self._path.exists():
                return 0
            text = self._path.read_text().strip()
        except OSError as exc:
            self._failed(exc)
        if text and not text.isdigit():
            # Guessing could hand out ids already in use: refuse until it is fixed.
            raise KafkaStorageError(f"{self._path} is corrupt: {text[:40]!r}")
        return int(text) if text else 0

    def _failed(self, exc: OSError) -> NoReturn:
        if self._health is not None:
            self._health.failed(str(self._path), exc)
        raise KafkaStorageError(f"{self._path}: cannot reserve producer ids: {exc}") from exc
