"""Producer ids for idempotent producers, unique across broker restarts.

Ids are handed out from blocks; the end of the current block is written to
disk before any id from it is used, so a restart (even after SIGKILL) resumes
past every id that may have been given out. The file holds one decimal
integer: the first id not yet reserved. A block that cannot be written (a full
disk) is not used: the caller gets KafkaStorageError and the next request tries
again.
"""

from __future__ import annotations

from pathlib import Path

from streambus.errors import KafkaStorageError
from streambus.storage.datadir import write_atomically
from streambus.storage.health import WriteHealth

BLOCK = 1000
MAX_EPOCH = 32767


class ProducerIdAllocator:
    def __init__(self, path: Path, health: WriteHealth | None = None) -> None:
        self._path = path
        self._health = health
        self._next = -1
        self._block_end = -1

    def allocate(self, producer_id: int = -1, epoch: int = -1) -> tuple[int, int]:
        """A new (id, epoch 0), or the same id with the next epoch when a producer asks to bump."""
        if producer_id >= 0 and 0 <= epoch < MAX_EPOCH:
            return producer_id, epoch + 1
        if self._next < 0 or self._next >= self._block_end:
            self._reserve()
        pid = self._next
        self._next += 1
        return pid, 0

    def _reserve(self) -> None:
        start = 0
        try:
            if self._path.exists():
                text = self._path.read_text().strip()
                if text and not text.isdigit():
                    # Guessing could hand out ids already in use: refuse until it is fixed.
                    raise KafkaStorageError(f"{self._path} is corrupt: {text[:40]!r}")
                start = int(text) if text else 0
            start = max(start, self._block_end)
            end = start + BLOCK
            write_atomically(self._path, f"{end}\n".encode())
        except OSError as exc:
            if self._health is not None:
                self._health.failed(str(self._path), exc)
            raise KafkaStorageError(f"{self._path}: cannot reserve producer ids: {exc}") from exc
        if self._health is not None:
            self._health.succeeded()
        self._next, self._block_end = start, end
