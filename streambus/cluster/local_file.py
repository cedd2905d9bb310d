"""A single broker's state files: what its in-memory quorum must not forget.

A single broker's quorum (``LocalQuorum``) lives in memory and is seeded at start from the
data directory. State that exists only as quorum records (client quotas, ACLs, SCRAM
credentials) is therefore also written whole to one JSON file per kind after each change,
and replayed at start. A cluster's Raft log keeps the same records itself.

File layout (one per kind, in the data directory)::

    {"v": 1, "<key>": <the kind's wire form>}

written atomically (temporary file, fsync, rename) in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from streambus.errors import KafkaStorageError
from streambus.storage.datadir import write_atomically

log = logging.getLogger("streambus.cluster")

FILE_VERSION = 1
T = TypeVar("T")


class StateFile:
    def __init__(self, path: Path, key: str, what: str) -> None:
        self.path = path
        self._key = key
        self._what = what  # named in the error a broken file logs

    def encode(self, wire: object) -> bytes:
        return json.dumps({"v": FILE_VERSION, self._key: wire}).encode()

    async def save(self, wire: object) -> None:
        """Replace the file with ``wire``; a failed write is the change's error."""
        try:
            await asyncio.to_thread(write_atomically, self.path, self.encode(wire))
        except OSError as exc:
            raise KafkaStorageError(f"cannot write {self.path}: {exc}") from exc

    def load(self, parse: Callable[[Any], T]) -> T | None:
        """The file's content through ``parse``; None when there is no file, or (logged)
        when it cannot be read whole: nothing of a broken file is applied."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            wire = json.loads(raw)
            if wire.get("v") != FILE_VERSION:
                raise ValueError(f"version {wire.get('v')!r} is not {FILE_VERSION}")
            return parse(wire[self._key])
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            log.error("%s in %s not loaded: %s", self._what, self.path, exc)
            return None
