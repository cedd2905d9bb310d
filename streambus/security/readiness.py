"""Whether this broker's ACLs and SCRAM credentials are loaded, and waiting until they are.

The Kafka port listens before the metadata is complete: a single broker loads its
``acls.json`` and ``scram_credentials.json`` before its listeners open, but a cluster
member's come from the Raft log, which it replays and then catches up with. Until
then an empty ACL set would deny every principal (or, with
``allow.everyone.if.no.acl.found``, allow one that a DENY should stop) and an empty
credential table would refuse every password. So an authentication or an
authorization waits here, bounded, and a request still waiting at the bound has its
connection closed, which every Kafka client retries (Kafka itself does not process
requests until its authorizer's initial load completes).
"""

from __future__ import annotations

import asyncio
import contextlib

# Below every client's own request timeout (Java and kafka-python 30 s, librdkafka's
# socket.timeout.ms 60 s), so the client sees a closed connection and reconnects, rather
# than timing out a request it would report.
WAIT_S = 10.0


class SecurityState:
    """Loaded or not, with waiters woken when it is. Futures are made on the running loop
    of each wait (a broker can be restarted on another loop)."""

    def __init__(self) -> None:
        self._loaded = False
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def loaded(self) -> bool:
        return self._loaded

    def mark_loaded(self) -> None:
        self._loaded = True
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    def unload(self) -> None:
        """At stop: the next start loads (or catches up) again."""
        self._loaded = False

    async def wait(self, timeout_s: float = WAIT_S) -> bool:
        """True once loaded; False if still not after ``timeout_s``."""
        if self._loaded:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.discard(fut)
        return self._loaded
