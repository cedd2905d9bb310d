"""Producer ids for idempotent producers, unique across broker restarts.

Ids are handed out from blocks; the end of the current block is written to
disk before any id from it is used, so a restart (even after SIGKILL) resumes
past every id that may have been given out. The file holds one decimal
integer: the first id not yet reserved.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCK = 1000
MAX_EPOCH = 32767


class ProducerIdAllocator:
    def __init__(self, path: Path) -> None:
        self._path = path
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
        if self._path.exists():
            text = self._path.read_text().strip()
            start = int(text) if text else 0
        start = max(start, self._block_end)
        end = start + BLOCK
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{end}\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._path)
        self._next, self._block_end = start, end
